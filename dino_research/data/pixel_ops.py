"""The pixel arithmetic of DINO's color and blur augmentations, on float32 numpy arrays.

Each function takes ``x (3, H, W)``, a float32 array holding integers in [0, 255] (an RGB image),
and returns what torchvision's PIL-based functions return on the same uint8 image, bit for bit:
integers below 2**24 are exact in float32, so PIL's integer and float32 arithmetic replays exactly
(each float32 operation rounded as in PIL's C code). Functions ending in ``_`` work in place and
return their input. numpy rather than torch: the arrays are small and numpy's per-call overhead is
lower. ``augmentations.DINOMultiCrop`` calls them; ``tests/data/test_augmentations.py`` checks them
against PIL (``adjust_hue`` on all 2**24 colors).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

__all__ = ["adjust_contrast_", "adjust_hue", "blend_", "gaussian_blur", "luma", "solarize_", "truncate_"]

_f32 = np.float32


def truncate_(x: np.ndarray) -> np.ndarray:
    """PIL's blend stores ``temp <= 0 -> 0, temp >= 255 -> 255, else (UINT8)temp``."""
    np.clip(x, _f32(0.0), _f32(255.0), out=x)
    return np.floor(x, out=x)


def luma(x: np.ndarray) -> np.ndarray:
    """PIL's ``convert("L")``: ``(19595 R + 38470 G + 7471 B + 2**15) >> 16``, shape (H, W)."""
    y = x[0] * _f32(19595.0)
    y += x[1] * _f32(38470.0)
    y += x[2] * _f32(7471.0)
    y += _f32(32768.0)
    y *= _f32(1.0 / 65536.0)
    return np.floor(y, out=y)


def blend_(x: np.ndarray, degenerate, factor: float) -> np.ndarray:
    """PIL's ``Image.blend(degenerate, x, factor)``, ``degenerate + factor * (x - degenerate)``
    in float32 then truncated (what ``ImageEnhance`` does), in place."""
    x -= degenerate
    x *= _f32(factor)
    x += degenerate
    return truncate_(x)


def adjust_contrast_(x: np.ndarray, factor: float) -> np.ndarray:
    # ImageEnhance.Contrast blends with the mean of the L image, rounded as int(mean + 0.5).
    mean = int(float(luma(x).sum(dtype=np.float64)) / (x.shape[1] * x.shape[2]) + 0.5)
    return blend_(x, _f32(mean), factor)


_HUE_CENTER = np.array([127.5, 85.0, 170.0], _f32).reshape(3, 1, 1)
_HUE_SIGN = np.array([-1.0, 1.0, 1.0], _f32).reshape(3, 1, 1)
_HUE_OFFSET = np.array([85.0, -42.5, -42.5], _f32).reshape(3, 1, 1)


def adjust_hue(x: np.ndarray, factor: float) -> np.ndarray:
    """torchvision's PIL ``adjust_hue``: RGB -> 8-bit HSV (PIL), H += int(factor * 255) mod 256, -> RGB.

    Follows PIL's ``rgb2hsv``/``hsv2rgb`` with the rounding of each of their float operations;
    checked equal on all 2**24 colors.
    """
    r, g, b = x
    maxc = np.maximum(np.maximum(r, g), b)
    minc = np.minimum(np.minimum(r, g), b)
    chroma = maxc - minc
    # PIL divides (max - c) / chroma for each channel c; only the middle channel's quotient t is
    # neither 0 nor 1, and the hue in sixths of a turn is K + sign * t (one float32 rounding).
    t = maxc + maxc
    t += minc
    t -= r
    t -= g
    t -= b
    t /= np.maximum(chroma, _f32(1.0))
    rg, gb, br = r >= g, g >= b, b >= r
    # (K, sign): red max: (1, -1) if g >= b else (-1, +1); green max: (1, +1) if b < r else (3, -1);
    # blue max: (3, +1) if r < g else (5, -1); ties give the same hue either way. In terms of the
    # comparisons: sign = 3 - 2 (rg + gb + br), K = 1 + 2 br + 2 rg (gb + 2 br - 1).
    sign = np.add(rg, gb, dtype=_f32)
    sign += br
    sign *= _f32(-2.0)
    sign += _f32(3.0)
    k = np.multiply(br, _f32(2.0), dtype=_f32)
    k += gb
    k -= _f32(1.0)
    k *= rg
    k += br
    k *= _f32(2.0)
    k += _f32(1.0)
    h = sign * t
    h += k
    # PIL: (int)(255 * fmod(h / 6 + 1, 1)), the fmod in double; h / 6 + [h < 0] in float32 gives
    # the same byte on all colors (h < 0 only for red max with g < b).
    h /= _f32(6.0)
    h += h < _f32(0.0)  # adds 1.0 where negative
    h *= _f32(255.0)
    hue = np.floor(h, out=h)
    hue += _f32(int(factor * 255) % 256)  # torchvision: np_h += np.int32(factor * 255).astype(uint8)
    hue -= np.multiply(hue >= _f32(256.0), _f32(256.0), dtype=_f32)  # wrap around to a byte
    # hsv2rgb: each channel is round(v * (1 - s * w)), w in [0, 1] a trapezoid of the hue, 0 where
    # the channel is the max and 1 where it is the min; 42.5 * w is exact in float32.
    scale = chroma / np.maximum(maxc, _f32(1.0))
    scale *= _f32(255.0)
    np.floor(scale, out=scale)  # PIL's 8-bit saturation
    scale *= maxc
    scale *= _f32(1.0 / (255.0 * 42.5))
    w = hue - _HUE_CENTER
    np.abs(w, out=w)
    w *= _HUE_SIGN
    w += _HUE_OFFSET
    np.clip(w, _f32(0.0), _f32(42.5), out=w)
    w *= scale
    out = maxc + _f32(0.5)
    out = out - w
    return np.floor(out, out=out)


def solarize_(x: np.ndarray, threshold: int) -> np.ndarray:
    """``ImageOps.solarize``: ``v >= threshold`` becomes ``255 - v``, in place."""
    return np.subtract(_f32(255.0), x, out=x, where=x >= threshold)


def gaussian_blur(x: np.ndarray, radius: float) -> np.ndarray:
    """PIL's ``GaussianBlur(radius)`` on the 8-bit image."""
    planes = x.astype(np.uint8)
    size = (x.shape[2], x.shape[1])
    bands = [Image.frombuffer("L", size, plane, "raw", "L", 0, 1) for plane in planes]
    blurred = Image.merge("RGB", bands).filter(ImageFilter.GaussianBlur(radius=radius))
    return np.asarray(blurred).transpose(2, 0, 1).astype(_f32, order="C")
