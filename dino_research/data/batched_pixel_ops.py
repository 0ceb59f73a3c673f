"""``pixel_ops`` on batches of torch tensors, for the augmentation's device stage.

Each function takes ``x (B, 3, H, W)``, a float32 tensor holding integers in [0, 255] (B RGB crops of
one size, on any device), with one factor per crop where the operation has one (a ``(B,)`` tensor),
and does to every crop what the ``pixel_ops`` function of the same name does: the same float32
operations in the same order, so on a CPU the bytes are equal (``tests/data/test_device_augmentation.py``).
No operation fuses two roundings (no ``addcmul``/``lerp``), which keeps CUDA's results equal too.

:func:`gaussian_blur` replays Pillow's ``GaussianBlur``: three extended-box passes along each axis in
Pillow's 8-bit fixed-point arithmetic (``libImaging/BoxBlur.c``), with the box of each crop's radius
from :func:`pil_box_blur_params` (computed on the host, in Pillow's single-precision float steps).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["adjust_contrast_", "adjust_hue", "blend_", "gaussian_blur", "luma", "pil_box_blur_params",
           "solarize_", "truncate_"]

_f32 = np.float32


def _per_crop(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``values (B,)`` as float32 ``(B, 1, 1, 1)`` on ``x``'s device (float64 -> float32 rounds to nearest,
    as numpy's ``float32(factor)``)."""
    return values.to(device=x.device, dtype=torch.float32).view(-1, 1, 1, 1)


def truncate_(x: torch.Tensor) -> torch.Tensor:
    """PIL's blend stores ``temp <= 0 -> 0, temp >= 255 -> 255, else (UINT8)temp``, in place."""
    return x.clamp_(0.0, 255.0).floor_()


def luma(x: torch.Tensor) -> torch.Tensor:
    """PIL's ``convert("L")`` of each crop, ``(B, 1, H, W)``."""
    y = x[:, 0:1] * 19595.0
    y += x[:, 1:2] * 38470.0
    y += x[:, 2:3] * 7471.0
    y += 32768.0
    y *= 1.0 / 65536.0
    return y.floor_()


def blend_(x: torch.Tensor, degenerate: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``degenerate + factor * (x - degenerate)`` in float32, truncated, in place; ``factor (B,)``."""
    x -= degenerate
    x *= _per_crop(factor, x)
    x += degenerate
    return truncate_(x)


def adjust_contrast_(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Contrast: blend with the mean of each crop's L image, rounded as ``int(mean + 0.5)``.

    The sum of integers below 2**53 is exact in float64 in any order, so it equals numpy's.
    """
    height, width = x.shape[-2:]
    sums = luma(x).sum(dim=(1, 2, 3), dtype=torch.float64)
    mean = torch.floor(sums / (height * width) + 0.5)  # int() of a positive number
    return blend_(x, mean.to(torch.float32).view(-1, 1, 1, 1), factor)


_HUE_CENTER = (127.5, 85.0, 170.0)
_HUE_SIGN = (-1.0, 1.0, 1.0)
_HUE_OFFSET = (85.0, -42.5, -42.5)


def hue_shift(factor: torch.Tensor) -> torch.Tensor:
    """torchvision's 8-bit hue offset ``int(factor * 255) % 256`` of each float64 ``factor (B,)``."""
    return torch.remainder(torch.trunc(factor.to(torch.float64) * 255.0), 256.0)


def adjust_hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``pixel_ops.adjust_hue`` of each crop by its ``factor (B,)``: RGB -> 8-bit HSV, H += shift, -> RGB."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    chroma = maxc - minc
    t = maxc + maxc
    t += minc
    t -= r
    t -= g
    t -= b
    t /= torch.clamp(chroma, min=1.0)
    rg, gb, br = (r >= g).float(), (g >= b).float(), (b >= r).float()
    sign = rg + gb
    sign += br
    sign *= -2.0
    sign += 3.0
    k = br * 2.0
    k += gb
    k -= 1.0
    k *= rg
    k += br
    k *= 2.0
    k += 1.0
    h = sign * t
    h += k
    h /= 6.0
    h += (h < 0.0).float()
    h *= 255.0
    hue = h.floor_()
    hue += _per_crop(hue_shift(factor), x)
    hue -= (hue >= 256.0).float() * 256.0
    scale = chroma / torch.clamp(maxc, min=1.0)
    scale *= 255.0
    scale.floor_()
    scale *= maxc
    scale *= float(_f32(1.0 / (255.0 * 42.5)))
    center, sign3, offset = (torch.tensor(v, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
                             for v in (_HUE_CENTER, _HUE_SIGN, _HUE_OFFSET))
    w = hue - center
    w.abs_()
    w *= sign3
    w += offset
    w.clamp_(0.0, 42.5)
    w *= scale
    out = maxc + 0.5
    out = out - w
    return out.floor_()


def solarize_(x: torch.Tensor, threshold: int) -> torch.Tensor:
    """``ImageOps.solarize``: ``v >= threshold`` becomes ``255 - v``, in place."""
    return x.copy_(torch.where(x >= threshold, 255.0 - x, x))


# ------------------------------------------------------------------------------ Gaussian blur
def pil_box_blur_params(radius: float, passes: int = 3) -> tuple[int, int, int]:
    """Pillow's box for ``GaussianBlur(radius)``: ``(r, ww, fw)`` of each of its ``passes`` box passes.

    ``r`` is the box's integer radius, ``ww`` the 24-bit fixed-point weight of its ``2r + 1`` inner
    pixels and ``fw`` that of the two outer ones (the fractional part). Replays
    ``_gaussian_blur_radius`` and ``ImagingHorizontalBoxBlur``'s set-up: C ``float`` steps in float32,
    the ``double`` ones in float64. ``(0, 1 << 24, 0)`` is the identity.
    """
    rad = _f32(radius)  # PyArg_ParseTuple "f"
    sigma2 = rad * rad / _f32(passes)
    big_l = _f32(math.sqrt(12.0 * float(sigma2) + 1.0))
    small_l = _f32(math.floor((float(big_l) - 1.0) / 2.0))
    a = (_f32(2) * small_l + _f32(1)) * (small_l * (small_l + _f32(1)) - _f32(3) * sigma2)
    a /= _f32(6) * (sigma2 - (small_l + _f32(1)) * (small_l + _f32(1)))
    box = small_l + a
    r = int(box)
    ww = int(_f32(1 << 24) / (box * _f32(2) + _f32(1)))
    fw = ((1 << 24) - (r * 2 + 1) * ww) // 2
    return r, ww, fw


def _box_pass_last_dim(y: torch.Tensor, r: int, ww: torch.Tensor, fw: torch.Tensor) -> torch.Tensor:
    """One extended-box pass of Pillow along the last dimension of ``y (B, C, H, W)``, float64 holding
    integers; every crop's box has integer radius ``r``, ``ww, fw`` are ``(B, 1, 1, 1)`` float64.

    ``out[i] = (ww * sum(y[i-r .. i+r]) + fw * (y[i-r-1] + y[i+r+1]) + 2**23) >> 24``, out of range
    pixels repeating the edge ones (Pillow's loops). Every value stays below 2**53: exact in float64
    (int64 products are slower on CPUs and GPUs alike).
    """
    width = y.shape[-1]
    pad = r + 1
    padded = F.pad(y.reshape(-1, 1, width), (pad, pad), mode="replicate").view(*y.shape[:-1], width + 2 * pad)
    # Output i sits at padded[i + pad]: its box is padded[i + 1 .. i + 2r + 1], its outer pixels
    # padded[i] and padded[i + 2r + 2].
    inner = padded[..., 1 : 1 + width].clone()
    for k in range(2, 2 * r + 2):
        inner += padded[..., k : k + width]
    outer = padded[..., :width] + padded[..., 2 * r + 2 : 2 * r + 2 + width]
    bulk = inner * ww
    bulk += outer * fw
    bulk += float(1 << 23)
    bulk *= 2.0 ** -24
    return bulk.floor_()


def gaussian_blur(x: torch.Tensor, boxes: torch.Tensor, passes: int = 3) -> torch.Tensor:
    """Pillow's ``GaussianBlur`` of each crop of ``x (B, 3, H, W)``, ``boxes (B, 3)`` its
    :func:`pil_box_blur_params` ``(r, ww, fw)`` (host tensor). Returns a new float32 tensor.

    Pillow blurs the 8-bit image: ``passes`` horizontal passes, then ``passes`` vertical ones, each
    rounded to a byte. Crops are blurred in groups of equal integer box radius (one or two groups
    with the paper's radii).
    """
    boxes = boxes.cpu().to(torch.float64)
    out = torch.empty_like(x)
    for r in boxes[:, 0].unique().tolist():
        rows = (boxes[:, 0] == r).nonzero().flatten()
        index = rows.to(x.device, non_blocking=True)
        ww, fw = (boxes[rows, col].to(x.device).view(-1, 1, 1, 1) for col in (1, 2))
        y = x.index_select(0, index).to(torch.float64)
        for _ in range(passes):
            y = _box_pass_last_dim(y, int(r), ww, fw)
        y = y.transpose(-1, -2).contiguous()  # the vertical passes along rows: contiguous reads
        for _ in range(passes):
            y = _box_pass_last_dim(y, int(r), ww, fw)
        out.index_copy_(0, index, y.transpose(-1, -2).to(torch.float32))
    return out
