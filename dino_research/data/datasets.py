"""Datasets registered in ``DATASET_REGISTRY``: ImageFolder, FileList and Synthetic (UnlabeledFolder, any
folder layout without labels, lives in ``unlabeled.py``).

Every dataset yields ``(transform(image), label)`` with ``image`` an RGB ``PIL.Image`` and ``label`` an
int (-1 where there is none). Files are read through iopath's ``g_pathmgr``, so ``root`` may be a local
path or any URI a registered iopath handler understands. Construction checks that the data exist and
raises ``ValueError`` naming ``root`` otherwise; nothing is ever downloaded. Files are opened only when
read: one that cannot be read then raises :class:`UnreadableImageError` (the pretraining loader skips
or stops on it, see ``DATALOADER.STRICT``). Decoded files are turned upright by their EXIF orientation
unless ``INPUT.EXIF_TRANSPOSE`` is False. Decoding lives in ``images.py``, folder walking (image names,
links) in ``folders.py``; their public names are re-exported here.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Callable, Sequence

import numpy as np
from iopath.common.file_io import g_pathmgr
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from ..config import configurable
from ..config.checks import declare_choices
from .build import DATASET_REGISTRY, DatasetError
from .folders import IMAGE_EXTENSIONS, is_image_name, join, list_images, real_dir_key
from .images import UnreadableImageError, apply_exif_orientation, load_image, to_rgb

__all__ = [
    "IMAGE_EXTENSIONS",
    "FileList",
    "ImageFolder",
    "Synthetic",
    "UNKNOWN_CLASS_POLICIES",
    "UnreadableImageError",
    "apply_exif_orientation",
    "load_image",
    "to_rgb",
]

logger = logging.getLogger("dino_research")


# ---------------------------------------------------------------------------------------- datasets
# What ImageFolder does with class folders absent from the class index it is given (TEST.UNKNOWN_VAL_CLASSES).
UNKNOWN_CLASS_POLICIES = declare_choices("TEST.UNKNOWN_VAL_CLASSES", ("error", "ignore"))


class ImageFiles(Dataset):
    """Base of the datasets that hold ``samples``, a list of ``(image path, label)``: item ``i`` is
    the image of ``samples[i]`` read by :func:`load_image` (with ``exif_transpose``), passed through
    ``transform`` when there is one, and its label."""

    samples: list
    transform: Callable | None
    exif_transpose: bool

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        image = load_image(path, self.exif_transpose)
        return (self.transform(image) if self.transform is not None else image), label


@DATASET_REGISTRY.register()
class ImageFolder(ImageFiles):
    """``root/<class>/**/<image>``: one sub-folder per class, labels by sorted class name or by a given
    class index.

    Class folders and files are sorted, so labels and order are the same on every machine. Hidden
    entries (names starting with ".") are skipped. Links are followed, each real folder read once
    (:func:`~dino_research.data.folders.list_images`; a link from one class into another class's
    folder is not followed). ``train`` selects nothing: ``root`` is the split.

    Two splits must share one class index: numbered separately, a class missing from one split
    shifts every later label of that split. Build the second with the first one's ``classes``
    (:func:`~dino_research.data.eval_transforms.build_eval_datasets` does so for k-NN and the linear
    probe): label ``i`` is then ``classes[i]``, and a class of ``classes`` with no folder in ``root``
    simply has no image here.

    Args:
        root: the split's folder, local path or iopath URI.
        transform: applied to each RGB ``PIL.Image``; None returns the image.
        classes: the class index (names; label ``i`` is ``classes[i]``). None: the class folders of
            ``root``, sorted.
        unknown_classes: class folders of ``root`` not in ``classes``: "error" (``ValueError`` naming
            them, ``root`` and ``classes_source``) or "ignore" (their images are dropped, with a
            warning naming the classes and counting the images).
        classes_source: where ``classes`` come from, for messages ("the training split 'x'").
        exif_transpose: turn images upright by their EXIF orientation (:func:`load_image`).

    Attributes:
        classes (list[str]): label ``i`` is ``classes[i]``; ``class_to_idx`` is the inverse.
        samples (list[tuple[str, int]]): ``(path, label)`` of every image, by class folder name.
    """

    @configurable
    def __init__(self, *, root: str, transform: Callable | None = None, classes: Sequence[str] | None = None,
                 unknown_classes: str = "error", classes_source: str = "", exif_transpose: bool = True):
        if unknown_classes not in UNKNOWN_CLASS_POLICIES:
            raise DatasetError(f"ImageFolder: unknown_classes must be one of {', '.join(UNKNOWN_CLASS_POLICIES)} "
                             f"(config: TEST.UNKNOWN_VAL_CLASSES), got {unknown_classes!r}")
        expected = (
            f"expected a folder holding one sub-folder per class, each containing images "
            f"({', '.join(IMAGE_EXTENSIONS)}, any case)"
        )
        if not g_pathmgr.exists(root):
            raise DatasetError(f"ImageFolder: root {root!r} does not exist; {expected}")
        if not g_pathmgr.isdir(root):
            raise DatasetError(f"ImageFolder: root {root!r} is not a folder; {expected}")
        names = sorted(n for n in g_pathmgr.ls(root) if not n.startswith("."))
        folders = [n for n in names if not is_image_name(n) and g_pathmgr.isdir(join(root, n))]
        if not folders:
            loose = sum(is_image_name(n) for n in names)
            raise DatasetError(
                f"ImageFolder: root {root!r} has no class sub-folders ({loose} image files lie directly "
                f"inside); {expected}. Move the images into root/<class>/, list them with FileList, or, to "
                f"pretrain on them without labels in any layout, use UnlabeledFolder (DATASETS.TRAIN "
                f"UnlabeledFolder)."
            )
        classes = list(folders if classes is None else classes)
        if len(set(classes)) != len(classes):
            raise DatasetError(f"ImageFolder: classes must be distinct names, got {classes}")
        class_to_idx = {name: i for i, name in enumerate(classes)}
        # One set of walked folders for the whole root, the root and the class folders first.
        visited = {key for key in map(real_dir_key, [root] + [join(root, n) for n in folders]) if key is not None}
        samples, empty, unknown = [], [], {}
        for name in folders:
            files = list_images(join(root, name), visited)
            if not files:
                empty.append(name)
            elif name not in class_to_idx:
                unknown[name] = len(files)
            else:
                samples.extend((path, class_to_idx[name]) for path in files)
        if empty:
            raise DatasetError(
                f"ImageFolder: root {root!r}: {len(empty)} of {len(folders)} class folders contain no "
                f"images: {', '.join(empty[:10])}{' ...' if len(empty) > 10 else ''}; {expected}"
            )
        if unknown:
            samples = self._unknown_classes(root, unknown, unknown_classes, classes_source, samples)
        self.root = root
        self.transform = transform
        self.exif_transpose = exif_transpose
        self.classes = classes
        self.class_to_idx = class_to_idx
        self.samples = samples
        self.targets = [label for _, label in samples]

    @staticmethod
    def _unknown_classes(root: str, unknown: dict, policy: str, source: str, samples: list) -> list:
        """Raise, or warn and return ``samples`` (which exclude them), for the class folders ``unknown``
        (name -> image count) that the class index lacks."""
        source = source or "the given class index"
        shown = ", ".join(f"{name!r} ({count} images)" for name, count in list(unknown.items())[:10])
        shown += " ..." if len(unknown) > 10 else ""
        if policy == "error":
            raise DatasetError(
                f"ImageFolder: root {root!r} has {len(unknown)} class folder(s) that {source} does not have: "
                f"{shown}. Labels come from one class index, so these images have none. Fix: add the "
                f"class(es) to {source}, remove them from {root!r}, or drop their images with "
                f"unknown_classes='ignore' (config: TEST.UNKNOWN_VAL_CLASSES ignore)"
            )
        logger.warning("ImageFolder: root %r: %d images of %d class folder(s) that %s does not have are "
                       "ignored (TEST.UNKNOWN_VAL_CLASSES ignore): %s", root, sum(unknown.values()),
                       len(unknown), source, shown)
        if not samples:
            raise DatasetError(f"ImageFolder: root {root!r}: no image left once the class folders that {source} "
                             f"does not have are ignored")
        return samples

    @classmethod
    def from_config(cls, cfg, root: str, train: bool = True, transform: Callable | None = None) -> dict:
        return {"root": root, "transform": transform, "exif_transpose": cfg.INPUT.EXIF_TRANSPOSE}

    def __repr__(self) -> str:
        return f"ImageFolder(root={self.root!r}, images={len(self)}, classes={len(self.classes)})"


@DATASET_REGISTRY.register()
class FileList(Dataset):
    """Images listed in a text file, one ``PATH [LABEL]`` per line.

    ``PATH`` is absolute (or an iopath URI) or relative to the list file's folder, and contains no
    whitespace; ``LABEL`` is an integer >= -1, -1 (the default) meaning unlabeled. Blank lines and
    ``#`` comments (a ``#`` at the start of a line or after whitespace) are ignored. Files are not
    opened at construction, so a listed path that is missing or broken fails when read: an
    :class:`UnreadableImageError` whose ``reason`` names the list file and line. ``exif_transpose``:
    as :func:`load_image`. Labels are the list's own: nothing is renumbered.

    Attributes:
        samples (list[tuple[str, int]]): ``(resolved path, label)``, in file order.
    """

    @configurable
    def __init__(self, *, list_file: str, transform: Callable | None = None, exif_transpose: bool = True):
        if not g_pathmgr.isfile(list_file):
            raise DatasetError(
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
                raise DatasetError(
                    f"FileList: {list_file}:{number}: expected 'PATH [LABEL]' with an integer LABEL >= -1 "
                    f"and no whitespace in PATH; got {line.strip()!r}"
                )
            if len(fields) == 2:
                label = int(fields[1])
            path = fields[0]
            if not (os.path.isabs(path) or "://" in path):
                path = join(folder, path) if folder else path
            samples.append((path, label))
            line_numbers.append(number)
        if not samples:
            raise DatasetError(f"FileList: list file {list_file!r} lists no images")
        self.list_file = list_file
        self.transform = transform
        self.exif_transpose = exif_transpose
        self.samples = samples
        self.targets = [label for _, label in samples]
        self._line_numbers = line_numbers

    @classmethod
    def from_config(cls, cfg, root: str, train: bool = True, transform: Callable | None = None) -> dict:
        return {"list_file": root, "transform": transform, "exif_transpose": cfg.INPUT.EXIF_TRANSPOSE}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            image = load_image(path, self.exif_transpose)
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
            raise DatasetError(
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
