"""Fashion-MNIST (Xiao et al. 2017) from its idx files, registered in ``DATASET_REGISTRY``.

The four idx files (``{train,t10k}-{images-idx3,labels-idx1}-ubyte``, gzip-compressed or not) are
parsed here with numpy; torchvision is needed only to download them, which happens only when
``DATASETS.DOWNLOAD`` is True. Debian's ``dataset-fashion-mnist`` package installs them in
:data:`DEBIAN_ROOT`, which is used when ``root`` is "".
"""

from __future__ import annotations

import gzip
import os
import zlib
from typing import Callable

import numpy as np
from iopath.common.file_io import g_pathmgr
from PIL import Image
from torch.utils.data import Dataset

from ..config import configurable
from .build import DATASET_REGISTRY, DatasetError

__all__ = ["DEBIAN_ROOT", "FashionMNIST", "read_idx"]

# Where `apt-get install dataset-fashion-mnist` puts the four .gz files.
DEBIAN_ROOT = "/usr/share/datasets/fashion-mnist"

# idx magic numbers: 0x0000 (zero), 0x08 (unsigned byte), number of dimensions.
IMAGES_MAGIC = 0x00000803  # 2051
LABELS_MAGIC = 0x00000801  # 2049


def read_idx(path: str, magic: int) -> np.ndarray:
    """The uint8 array of the idx file at ``path`` (gzip-compressed if it ends in ``.gz``).

    Checks the magic number (``2051`` for images ``(N, rows, cols)``, ``2049`` for labels ``(N,)``)
    and that the file holds exactly the bytes its header announces. The array is read-only.

    Raises:
        ValueError: naming ``path``, on a corrupt gzip stream, a wrong magic number, or a size that
            does not match the header (a truncated download, say).
    """
    with g_pathmgr.open(path, "rb") as f:
        data = f.read()
    if path.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise DatasetError(f"Fashion-MNIST: {path} is not a valid gzip file (truncated or corrupt?): {e}") from e
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    found = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    if found != magic:
        kind = "images" if magic == IMAGES_MAGIC else "labels"
        raise DatasetError(
            f"Fashion-MNIST: {path} is not an idx {kind} file: magic number {found} (expected {magic})"
        )
    if len(data) < header:
        raise DatasetError(f"Fashion-MNIST: {path} is truncated: {len(data)} bytes, shorter than its header")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        raise DatasetError(
            f"Fashion-MNIST: {path} is truncated or corrupt: its header announces shape {dims} "
            f"({expected} bytes) but it holds {len(data)} bytes"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _find(folder: str, name: str, tried: list[str]) -> str | None:
    """``folder/name`` or ``folder/name.gz`` (uncompressed first: no decompression), else None."""
    for candidate in (name, name + ".gz"):
        path = os.path.join(folder, candidate)
        tried.append(path)
        if g_pathmgr.isfile(path):
            return path
    return None


def _locate(root: str, prefix: str) -> tuple[tuple[str, str] | None, list[str]]:
    """``(images path, labels path)`` of split ``prefix`` under ``root`` or torchvision's
    ``root/FashionMNIST/raw``, and every path tried."""
    tried: list[str] = []
    for folder in (root, os.path.join(root, "FashionMNIST", "raw")):
        images = _find(folder, f"{prefix}-images-idx3-ubyte", tried)
        labels = _find(folder, f"{prefix}-labels-idx1-ubyte", tried)
        if images and labels:
            return (images, labels), tried
    return None, tried


@DATASET_REGISTRY.register()
class FashionMNIST(Dataset):
    """Fashion-MNIST: 60000 train / 10000 test 28x28 grayscale images of 10 clothing classes.

    Items are ``(transform(image), label)``, ``image`` an RGB ``PIL.Image`` (the gray value repeated in
    the three channels, so RGB augmentations and ImageNet normalization apply unchanged).

    ``root`` is a folder holding the idx files directly (as Debian installs them; ``.gz`` or
    uncompressed), or a torchvision root holding them in ``root/FashionMNIST/raw/``; "" means
    :data:`DEBIAN_ROOT`. The files are read once, at construction, into a uint8 array (~47 MB for the
    train split); images are made on access. With ``download`` (``DATASETS.DOWNLOAD``) missing files
    are fetched by torchvision into ``root/FashionMNIST/raw/``; never otherwise.

    Attributes:
        classes (list[str]): the 10 class names; label ``i`` is ``classes[i]``.
        data (np.ndarray): uint8 ``(N, 28, 28)``, read-only.
        targets (list[int]): the label of every image.
    """

    classes = [
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ]  # fmt: skip

    @configurable
    def __init__(
        self, *, root: str = "", train: bool = True, transform: Callable | None = None, download: bool = False
    ):
        prefix = "train" if train else "t10k"
        folder = root or DEBIAN_ROOT
        found, tried = _locate(folder, prefix)
        if found is None and download:
            if not root:
                raise DatasetError(
                    "Fashion-MNIST: DATASETS.DOWNLOAD needs a writable root folder to download into; "
                    f"the dataset root is '' (which means {DEBIAN_ROOT})"
                )
            from torchvision.datasets import FashionMNIST as _TorchvisionFashionMNIST

            _TorchvisionFashionMNIST(root, train=train, download=True)
            found, tried = _locate(folder, prefix)
        if found is None:
            raise DatasetError(
                f"Fashion-MNIST: no {prefix} split under root {folder!r}; tried: {', '.join(tried)}. "
                f"Install it with `apt-get install dataset-fashion-mnist` (files in {DEBIAN_ROOT}, used "
                f"when the root is ''), point the root at a folder holding the idx files, or set "
                f"DATASETS.DOWNLOAD True to download them with torchvision."
            )
        images_path, labels_path = found
        images = read_idx(images_path, IMAGES_MAGIC)
        labels = read_idx(labels_path, LABELS_MAGIC)
        if len(images) != len(labels):
            raise DatasetError(
                f"Fashion-MNIST: {images_path} holds {len(images)} images but {labels_path} "
                f"{len(labels)} labels"
            )
        if len(labels) and int(labels.max()) >= len(self.classes):
            raise DatasetError(
                f"Fashion-MNIST: {labels_path} has label {int(labels.max())}; expected 0..{len(self.classes) - 1}"
            )
        self.root = folder
        self.train = train
        self.transform = transform
        self.data = images
        self.targets = labels.tolist()

    @classmethod
    def from_config(cls, cfg, root: str = "", train: bool = True, transform: Callable | None = None) -> dict:
        return {
            "root": root,
            "train": train,
            "transform": transform,
            # DATASETS.DOWNLOAD may be absent from older configs: never download then.
            "download": bool(getattr(cfg.DATASETS, "DOWNLOAD", False)),
        }

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.data[index]).convert("RGB")  # uint8 (28, 28) -> "L" -> RGB
        label = self.targets[index]
        return (self.transform(image) if self.transform is not None else image), label

    def __repr__(self) -> str:
        split = "train" if self.train else "test"
        return f"FashionMNIST(root={self.root!r}, split={split}, images={len(self)})"
