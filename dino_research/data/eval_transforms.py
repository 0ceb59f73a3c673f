"""Evaluation data: the deterministic transform (resize, center crop, normalize: the paper's k-NN/linear
eval) and the (train, val) pair of labelled splits, numbered with one class index."""

from __future__ import annotations

import logging
from typing import Callable

from torchvision import transforms as T

from ..utils.registry import lookup
from .build import DATASET_REGISTRY, build_dataset
from .datasets import ImageFolder, to_rgb

logger = logging.getLogger("dino_research")


def build_eval_transform(cfg):
    """``PIL.Image -> Tensor (3, TEST.CROP_SIZE, TEST.CROP_SIZE)``: shorter side resized to
    ``TEST.RESIZE_SIZE`` (bicubic), center crop ``TEST.CROP_SIZE``, normalized with ``INPUT.MEAN/STD``.

    With the paper's 256/224 the crop keeps the central 87.5% of the shorter side. Images of any mode
    are converted to RGB first.
    """
    resize, crop = cfg.TEST.RESIZE_SIZE, cfg.TEST.CROP_SIZE
    if resize < crop:
        raise ValueError(f"TEST.RESIZE_SIZE ({resize}) must be >= TEST.CROP_SIZE ({crop})")
    return T.Compose([
        T.Lambda(to_rgb),
        T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(crop),
        T.ToTensor(),
        T.Normalize(cfg.INPUT.MEAN, cfg.INPUT.STD),
    ])


def build_eval_datasets(cfg, train_transform: Callable | None, val_transform: Callable | None) -> tuple:
    """``(train, val)``: ``TEST.DATASET`` at ``TEST.TRAIN_ROOT`` and at ``TEST.VAL_ROOT``, labelled alike.

    The one builder of the two splits that k-NN (``tools/eval_knn.py``, the training-time
    ``KNNEvalHook``) and the linear probes compare. For an :class:`ImageFolder` the validation split
    is numbered with the training split's class index (its ``classes``), so label ``i`` names the
    same class in both, whichever class folders the validation split lacks. A validation class folder
    the training split does not have is ``TEST.UNKNOWN_VAL_CLASSES``'s business: "error" (a
    ``ValueError`` naming the class and both roots) or "ignore" (its images dropped, with a warning).
    Other datasets (FileList, FashionMNIST, Synthetic) carry their own fixed labels and are built as
    they are.

    Raises ``ValueError`` naming the root when a split is missing or empty (raised by the dataset).
    """
    name, train_root, val_root = cfg.TEST.DATASET, cfg.TEST.TRAIN_ROOT, cfg.TEST.VAL_ROOT
    train = build_dataset(cfg, name, train_root, train=True, transform=train_transform, key="TEST.DATASET")
    if not isinstance(train, ImageFolder):
        return train, build_dataset(cfg, name, val_root, train=False, transform=val_transform, key="TEST.DATASET")
    val = lookup(DATASET_REGISTRY, name, "TEST.DATASET")(
        cfg, root=val_root, train=False, transform=val_transform, classes=train.classes,
        unknown_classes=cfg.TEST.UNKNOWN_VAL_CLASSES,
        classes_source=f"the training split {train_root!r} (TEST.TRAIN_ROOT)")
    present = len(set(val.targets))
    if present < len(train.classes):  # legal (labels stay aligned), but worth knowing when reading top-1
        logger.info("validation split %r holds images of %d of the %d classes of the training split %r",
                    val_root, present, len(train.classes), train_root)
    return train, val
