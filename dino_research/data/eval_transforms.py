"""Deterministic evaluation transform: resize, center crop, normalize (the paper's k-NN/linear eval)."""

from __future__ import annotations

from torchvision import transforms as T

from .datasets import to_rgb


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
