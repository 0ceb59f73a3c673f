"""The multi-crop augmentation split in two: draws and resizing in the loader, pixels on the device.

With ``INPUT.DEVICE_AUGMENTATION``, ``DINOMultiCrop`` draws every crop's random parameters and does the
geometric part (crop, bicubic resize, flip) in the data-loader worker, and returns uint8 crops with
their draws encoded here (:func:`encode_draw`, one float64 row per crop). The training process then
applies the colour jitter, grayscale, Gaussian blur and solarization batched on the training device
(:func:`finish_crops`). A loader worker does a third of the work and sends a quarter of the bytes
(uint8 instead of float32); on a GPU the rest costs little.

The draws are those of the in-worker path (the same function makes them) and :func:`finish_crops`
applies ``batched_pixel_ops``, which replay ``pixel_ops`` operation by operation: on a CPU both paths
give the same bytes (``tests/data/test_device_augmentation.py``).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .batched_pixel_ops import (
    adjust_contrast_,
    adjust_hue,
    blend_,
    gaussian_blur,
    luma,
    pil_box_blur_params,
    solarize_,
    truncate_,
)

__all__ = ["CROP_PARAMS", "CropDraw", "encode_draw", "finish_crops"]


class CropDraw(NamedTuple):
    """The random draws of one crop: what the augmentation does to it, independent of its pixels.

    ``box``: ``(top, left, height, width)`` in the image; ``flip``; ``jitter``: ``(order, factors)``
    (``order`` a permutation of brightness 0, contrast 1, saturation 2, hue 3; ``factors`` four floats
    or None where not drawn) or None when the jitter is not applied; ``gray``; ``radius``: the blur's
    radius or None; ``solarize``.
    """

    box: tuple[int, int, int, int]
    flip: bool
    jitter: Optional[tuple[tuple[int, ...], tuple[Optional[float], ...]]]
    gray: bool
    radius: Optional[float]
    solarize: bool


# Columns of an encoded draw (float64: every factor and Pillow's 24-bit blur weights are exact).
_JITTER, _ORDER, _FACTORS, _GRAY, _BLUR, _BOX, _SOLARIZE = 0, 1, 5, 9, 10, 11, 14
CROP_PARAMS = 15


def encode_draw(draw: CropDraw) -> torch.Tensor:
    """``draw``'s pixel operations as a float64 ``(CROP_PARAMS,)`` row: jitter applied, its order
    (4) and factors (4, NaN where not drawn), grayscale, blur applied, Pillow's box ``(r, ww, fw)``,
    solarization. The box and flip are done in the worker and not encoded."""
    row = [0.0] * CROP_PARAMS
    if draw.jitter is not None:
        order, factors = draw.jitter
        row[_JITTER] = 1.0
        row[_ORDER:_ORDER + 4] = [float(i) for i in order]
        row[_FACTORS:_FACTORS + 4] = [math.nan if f is None else float(f) for f in factors]
    row[_GRAY] = float(draw.gray)
    if draw.radius is not None:
        row[_BLUR] = 1.0
        row[_BOX:_BOX + 3] = [float(v) for v in pil_box_blur_params(draw.radius)]
    row[_SOLARIZE] = float(draw.solarize)
    return torch.tensor(row, dtype=torch.float64)


def _apply(x: torch.Tensor, which: torch.Tensor, fn) -> torch.Tensor:
    """``x`` with ``fn(x[which], rows)`` in place of the crops where host bool ``which (B,)`` is true;
    ``rows`` are their indices. Indices go to the device once and no step waits for it."""
    rows = which.nonzero().flatten()
    if rows.numel() == 0:
        return x
    index = rows.to(x.device, non_blocking=True)
    return x.index_copy_(0, index, fn(x.index_select(0, index), rows))


_JITTER_OPS = (
    lambda x, f: truncate_(x.mul_(f.to(x.device, torch.float32).view(-1, 1, 1, 1))),  # brightness: blend with 0
    adjust_contrast_,
    lambda x, f: blend_(x, luma(x), f),  # saturation: blend with the L image
    adjust_hue,
)


def finish_crops(x: torch.Tensor, params: torch.Tensor, solarize_threshold: int) -> torch.Tensor:
    """The pixel operations of B crops of one size: ``x (B, 3, H, W)`` float32 holding the resized,
    flipped uint8 values, ``params (B, CROP_PARAMS)`` float64 on the host (:func:`encode_draw`).
    Returns the crops (0-255 float32, before normalization), ``x`` reused.

    Jitter: at each of the four positions of the crops' orders, each operation runs on the crops
    that have it there (and drew its factor); then grayscale, blur, solarization on their crops.
    """
    params = params.cpu().to(torch.float64)
    applied = params[:, _JITTER] > 0
    for position in range(4):
        op_at = params[:, _ORDER + position]
        for op, fn in enumerate(_JITTER_OPS):
            factor = params[:, _FACTORS + op]
            x = _apply(x, applied & (op_at == op) & ~torch.isnan(factor),
                       lambda sub, rows, fn=fn, factor=factor: fn(sub, factor[rows]))
    x = _apply(x, params[:, _GRAY] > 0, lambda sub, rows: luma(sub).expand_as(sub).contiguous())
    x = _apply(x, params[:, _BLUR] > 0, lambda sub, rows: gaussian_blur(sub, params[rows, _BOX:_BOX + 3]))
    return _apply(x, params[:, _SOLARIZE] > 0, lambda sub, rows: solarize_(sub, solarize_threshold))
