"""Datasets registered in ``DATASET_REGISTRY``: ImageFolder, FileList and Synthetic.

Every dataset yields ``(transform(image), label)`` with ``image`` an RGB ``PIL.Image`` and ``label`` an
int (-1 where there is none). Files are read through iopath's ``g_pathmgr``, so ``root`` may be a local
path or any URI a registered iopath handler understands. Construction checks that the data exist and
raises ``ValueError`` naming ``root`` otherwise; nothing is ever downloaded. Files are opened only when
read: one that cannot be read then raises :class:`UnreadableImageError` (the pretraining loader skips
or stops on it, see ``DATALOADER.STRICT``).
"""

from __future__ import annotations

import math
import os
from typing import Callable

import numpy as np
from iopath.common.file_io import g_pathmgr
from PIL import Image, ImageDraw, UnidentifiedImageError
from torch.utils.data import Dataset

from ..config import configurable
from .build import DATASET_REGISTRY

__all__ = [
    "IMAGE_EXTENSIONS",
    "FileList",
    "ImageFolder",
    "Synthetic",
    "UnreadableImageError",
    "load_image",
    "to_rgb",
]

# File extensions taken as images (compared lower-case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


# --------------------------------------------------------------------------------------- decoding
def to_rgb(image: Image.Image) -> Image.Image:
    """Return ``image`` as an 8-bit RGB ``PIL.Image`` (the same object when it already is one).

    - 16-bit grayscale (``I;16*``, and ``I``, which Pillow uses for 16-bit PNG/TIFF data) is scaled
      to 8 bits as ``round(v / 257)`` (0 -> 0, 65535 -> 255); Pillow's own conversion clips every
      value above 255 to white. ``I`` values outside [0, 65535] are clipped first.
    - Palette images with a transparency entry go through RGBA (same colors, no Pillow warning).
    - Everything else (L, LA, P, RGBA, CMYK, YCbCr, 1, F...) uses Pillow's ``convert("RGB")``: alpha
      is dropped, not composited, as torchvision's loader does.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL.Image, got {type(image).__name__}")
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int64)
        values = (np.clip(values, 0, 65535) + 128) // 257  # integer round(v / 257)
        return Image.fromarray(values.astype(np.uint8)).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


class UnreadableImageError(OSError):
    """An image file that cannot be opened, decoded or converted to RGB (missing, truncated, not an
    image, over Pillow's decompression-bomb limit...). Message: ``cannot read image {path!r}: {reason}``,
    followed by ``hint`` when one is given.

    An ``OSError``, so code that caught ``load_image``'s ``OSError`` before still catches it.

    Attributes:
        path (str): the file, as given to :func:`load_image`.
        reason (str): what failed, e.g. ``"OSError: image file is truncated (150 bytes not processed)"``.
        hint (str): what to do about it ("" when none); not part of ``reason``.
    """

    def __init__(self, path: str, reason: str, hint: str = ""):
        message = f"cannot read image {path!r}: {reason}"
        super().__init__(f"{message}. {hint}" if hint else message)
        self.path, self.reason, self.hint = path, reason, hint

    def __reduce__(self):  # OSError pickles its message alone; rebuild from the fields instead
        return type(self), (self.path, self.reason, self.hint)


def load_image(path: str) -> Image.Image:
    """Read the image at ``path`` (local or iopath URI), fully decoded, as RGB (see :func:`to_rgb`).

    Raises:
        UnreadableImageError: naming ``path``, for any failure to open, decode or convert the file.
    """
    try:
        with g_pathmgr.open(path, "rb") as f:
            image = Image.open(f)
            image.load()  # decode while the file is open: PIL reads lazily
        return to_rgb(image)
    except Image.DecompressionBombError as e:  # not an OSError: raised by Image.open before decoding
        raise UnreadableImageError(
            path,
            f"DecompressionBombError: {e} Pillow refuses images over 2 x PIL.Image.MAX_IMAGE_PIXELS "
            f"(= 2 x {Image.MAX_IMAGE_PIXELS}) pixels; raise PIL.Image.MAX_IMAGE_PIXELS if the image is genuine",
        ) from e
    except UnidentifiedImageError as e:  # Pillow's message only repeats the path (as a file object)
        raise UnreadableImageError(
            path, "UnidentifiedImageError: Pillow cannot identify it as an image (empty, not an image, corrupt header?)"
        ) from e
    except Exception as e:
        # Pillow signals broken files with many types besides OSError: SyntaxError (PNG chunks),
        # ValueError (short headers), EOFError, struct.error, MemoryError... Exception, not
        # BaseException: KeyboardInterrupt and SystemExit pass.
        raise UnreadableImageError(path, f"{type(e).__name__}: {e}") from e


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _join(folder: str, name: str) -> str:
    return folder.rstrip("/") + "/" + name if "://" in folder else os.path.join(folder, name)


def _list_images(folder: str) -> list[str]:
    """Image files under ``folder``, recursively, sorted by name at every level; hidden entries skipped.

    A name with an image extension is taken as a file without a stat call (listing ImageNet costs
    one ``ls`` per folder, not 1.28M stats); only other names are checked for being folders.
    """
    found = []
    for name in sorted(g_pathmgr.ls(folder)):
        if name.startswith("."):
            continue
        path = _join(folder, name)
        if _is_image_name(name):
            found.append(path)
        elif g_pathmgr.isdir(path):
            found.extend(_list_images(path))
    return found


# ---------------------------------------------------------------------------------------- datasets
@DATASET_REGISTRY.register()
class ImageFolder(Dataset):
    """``root/<class>/**/<image>``: one sub-folder per class, labels by sorted class name.

    Class folders and files are sorted, so labels and order are the same on every machine. Hidden
    entries (names starting with ".") are skipped. ``train`` selects nothing: ``root`` is the split.

    Attributes:
        classes (list[str]): class folder names; label ``i`` is ``classes[i]``.
        samples (list[tuple[str, int]]): ``(path, label)`` of every image.
    """

    @configurable
    def __init__(self, *, root: str, transform: Callable | None = None):
        expected = (
            f"expected a folder holding one sub-folder per class, each containing images "
            f"({', '.join(IMAGE_EXTENSIONS)}, any case)"
        )
        if not g_pathmgr.exists(root):
            raise ValueError(f"ImageFolder: root {root!r} does not exist; {expected}")
        if not g_pathmgr.isdir(root):
            raise ValueError(f"ImageFolder: root {root!r} is not a folder; {expected}")
        names = sorted(n for n in g_pathmgr.ls(root) if not n.startswith("."))
        classes = [n for n in names if not _is_image_name(n) and g_pathmgr.isdir(_join(root, n))]
        if not classes:
            loose = sum(_is_image_name(n) for n in names)
            raise ValueError(
                f"ImageFolder: root {root!r} has no class sub-folders ({loose} image files lie directly "
                f"inside); {expected}. Move the images into root/<class>/, or list them with FileList."
            )
        samples, empty = [], []
        for label, name in enumerate(classes):
            files = _list_images(_join(root, name))
            if not files:
                empty.append(name)
            samples.extend((path, label) for path in files)
        if empty:
            raise ValueError(
                f"ImageFolder: root {root!r}: {len(empty)} of {len(classes)} class folders contain no "
                f"images: {', '.join(empty[:10])}{' ...' if len(empty) > 10 else ''}; {expected}"
            )
        self.root = root
        self.transform = transform
        self.classes = classes
        self.class_to_idx = {name: i for i, name in enumerate(classes)}
        self.samples = samples
        self.targets = [label for _, label in samples]

    @classmethod
    def from_config(cls, cfg, root: str, train: bool = True, transform: Callable | None = None) -> dict:
        return {"root": root, "transform": transform}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        image = load_image(path)
        return (self.transform(image) if self.transform is not None else image), label

    def __repr__(self) -> str:
        return f"ImageFolder(root={self.root!r}, images={len(self)}, classes={len(self.classes)})"


@DATASET_REGISTRY.register()
class FileList(Dataset):
    """Images listed in a text file, one ``PATH [LABEL]`` per line.

    ``PATH`` is absolute (or an iopath URI) or relative to the list file's folder, and contains no
    whitespace; ``LABEL`` is an integer >= -1, -1 (the default) meaning unlabeled. Blank lines and
    ``#`` comments (a ``#`` at the start of a line or after whitespace) are ignored. Files are not
    opened at construction, so a listed path that is missing or broken fails when read: an
    :class:`UnreadableImageError` whose ``reason`` names the list file and line.

    Attributes:
        samples (list[tuple[str, int]]): ``(resolved path, label)``, in file order.
    """

    @configurable
    def __init__(self, *, list_file: str, transform: Callable | None = None):
        if not g_pathmgr.isfile(list_file):
            raise ValueError(
                f"FileList: list file {list_file!r} does not exist (or is a folder); expected a text "
                f"file with one 'PATH [LABEL]' per line"
            )
        folder = os.path.dirname(list_file)
        with g_pathmgr.open(list_file, "r") as f:
            lines = f.read().splitlines()
        samples, line_numbers = [], []
        for number, line in enumerate(lines, start=1):
            fields = []
            for field in line.split():
                if field.startswith("#"):
                    break
                fields.append(field)
            if not fields:
                continue
            label = -1
            if len(fields) > 2 or (len(fields) == 2 and not _is_label(fields[1])):
                raise ValueError(
                    f"FileList: {list_file}:{number}: expected 'PATH [LABEL]' with an integer LABEL >= -1 "
                    f"and no whitespace in PATH; got {line.strip()!r}"
                )
            if len(fields) == 2:
                label = int(fields[1])
            path = fields[0]
            if not (os.path.isabs(path) or "://" in path):
                path = _join(folder, path) if folder else path
            samples.append((path, label))
            line_numbers.append(number)
        if not samples:
            raise ValueError(f"FileList: list file {list_file!r} lists no images")
        self.list_file = list_file
        self.transform = transform
        self.samples = samples
        self.targets = [label for _, label in samples]
        self._line_numbers = line_numbers

    @classmethod
    def from_config(cls, cfg, root: str, train: bool = True, transform: Callable | None = None) -> dict:
        return {"list_file": root, "transform": transform}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            image = load_image(path)
        except UnreadableImageError as e:
            where = f"listed at {self.list_file}:{self._line_numbers[index]}"
            raise UnreadableImageError(e.path, f"{e.reason} ({where})") from e
        return (self.transform(image) if self.transform is not None else image), label

    def __repr__(self) -> str:
        return f"FileList(list_file={self.list_file!r}, images={len(self)})"


def _is_label(text: str) -> bool:
    try:
        return int(text) >= -1
    except ValueError:
        return False


# Number of classes of the Synthetic dataset: image i has label i % SYNTHETIC_NUM_CLASSES.
SYNTHETIC_NUM_CLASSES = 10
# Mixed into every Synthetic seed so its images do not coincide with other seeded streams.
_SYNTHETIC_SEED = 20210429


@DATASET_REGISTRY.register()
class Synthetic(Dataset):
    """``num_images`` generated RGB images of side ``image_size``; label ``i % 10``. No file is read.

    Image ``i`` is drawn from its own generator seeded by ``(i, train)``: it is the same in every
    process and on every call, and the global ``random``/``torch`` generators are left untouched (so
    the augmentation stream does not depend on which images were generated). The train and test
    splits hold different images. Each image is noise over class-tinted stripes whose hue and
    orientation depend on the label, under a few random rectangles and ellipses: enough structure
    for a k-NN smoke evaluation to beat chance. ``root`` is ignored.
    """

    @configurable
    def __init__(
        self, *, num_images: int, image_size: int, train: bool = True, transform: Callable | None = None
    ):
        if num_images < 0 or image_size <= 0:
            raise ValueError(
                f"Synthetic: DATASETS.SYNTHETIC_SIZE must be >= 0 and DATASETS.SYNTHETIC_IMAGE_SIZE > 0; "
                f"got {num_images} and {image_size}"
            )
        self.num_images = num_images
        self.image_size = image_size
        self.train = train
        self.transform = transform

    @classmethod
    def from_config(cls, cfg, root: str = "", train: bool = True, transform: Callable | None = None) -> dict:
        return {
            "num_images": cfg.DATASETS.SYNTHETIC_SIZE,
            "image_size": cfg.DATASETS.SYNTHETIC_IMAGE_SIZE,
            "train": train,
            "transform": transform,
        }

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int):
        if not -self.num_images <= index < self.num_images:
            raise IndexError(f"Synthetic index {index} out of range for {self.num_images} images")
        index %= self.num_images
        label = index % SYNTHETIC_NUM_CLASSES
        image = self.generate(index, label)
        return (self.transform(image) if self.transform is not None else image), label

    def generate(self, index: int, label: int) -> Image.Image:
        """The image of ``index`` (a pure function of ``index``, ``label``, ``train``, ``image_size``)."""
        rng = np.random.default_rng([_SYNTHETIC_SEED, int(self.train), index])
        s = self.image_size
        hue = label / SYNTHETIC_NUM_CLASSES
        tint = np.array([math.cos(2 * math.pi * (hue - k / 3)) for k in range(3)], dtype=np.float32)
        angle = math.pi * label / SYNTHETIC_NUM_CLASSES
        y, x = np.mgrid[0:s, 0:s].astype(np.float32) / s
        phase = rng.uniform(0, 2 * math.pi)
        stripes = np.sin(2 * math.pi * 4 * (x * math.cos(angle) + y * math.sin(angle)) + phase)
        pixels = 128 + 60 * tint + 40 * stripes[..., None] + rng.normal(0, 20, (s, s, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(2, 6))):
            x0, y0 = rng.integers(0, s, 2)
            w, h = rng.integers(max(1, s // 8), max(2, s // 2), 2)
            color = tuple(int(c) for c in rng.integers(0, 256, 3))
            box = (int(x0), int(y0), int(x0 + w), int(y0 + h))
            (draw.rectangle if rng.random() < 0.5 else draw.ellipse)(box, fill=color)
        return image

    def __repr__(self) -> str:
        split = "train" if self.train else "test"
        return f"Synthetic(images={self.num_images}, size={self.image_size}, split={split})"
