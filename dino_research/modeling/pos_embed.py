"""DINO's positional-embedding resize written with tensor arithmetic only, for graph export.

``DINOVisionTransformer.interpolate_pos_encoding`` resizes the stored (side x side) grid with
``F.interpolate(scale_factor=(h + 0.1) / side, mode="bicubic")`` and returns it unchanged on the
native grid. Under ``torch.export`` (the ONNX exporter) both are frozen at the example input's size:
the Python ``if h == side`` is specialized, and so is the interpolation's output size, which the
exporter computes from a constant scale. A graph exported at 224 pixels then fails at any other size.

:func:`resize_pos_embed_traceable` computes the same values from the patch grid ``(h, w)`` as
tensors: PyTorch's bicubic kernel (A = -0.75, ``align_corners=False``, the given scale used for the
coordinate mapping, borders clamped) as index arithmetic and gathers, so ``h`` and ``w`` stay
symbolic. On the native grid the scale becomes exactly 1, where the bicubic taps are (0, 1, 0, 0):
the embedding comes back unchanged, as in eager mode, without a data-dependent branch.
"""

from __future__ import annotations

import math

import torch

__all__ = ["exporting", "resize_pos_embed_traceable"]

def exporting() -> bool:
    """Whether ``torch.export`` is tracing the caller (False on torch releases without the query)."""
    query = getattr(getattr(torch, "compiler", None), "is_exporting", None)
    return bool(query()) if query is not None else False


# PyTorch's bicubic convolution coefficient (upsample_bicubic2d, and OpenCV's): A = -0.75.
_A = -0.75


def _cubic_weights(t: torch.Tensor) -> torch.Tensor:
    """Fractional offsets ``t`` (n,) in [0, 1) -> weights (n, 4) of the taps at -1, 0, +1, +2."""

    def near(x):  # the kernel for |x| <= 1
        return ((_A + 2) * x - (_A + 3)) * x * x + 1

    def far(x):  # the kernel for 1 < |x| < 2
        return ((_A * x - 5 * _A) * x + 8 * _A) * x - 4 * _A

    return torch.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], dim=-1)


def _taps(out_size, in_size: int, ratio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Source indices (out_size, 4), clamped to the grid, and their weights (out_size, 4) for one axis.

    ``ratio`` is input/output as PyTorch maps coordinates with a given scale: ``1 / scale`` in float32;
    the source coordinate of output ``i`` is ``ratio * (i + 0.5) - 0.5`` (not clamped for bicubic)."""
    dst = torch.arange(out_size, dtype=torch.float32)
    src = ratio * (dst + 0.5) - 0.5
    base = torch.floor(src)
    index = base.to(torch.int64).unsqueeze(-1) + torch.arange(-1, 3)
    return index.clamp(0, in_size - 1), _cubic_weights(src - base)


def resize_pos_embed_traceable(pos_embed: torch.Tensor, h, w) -> torch.Tensor:
    """DINO's positional embedding for an (h, w) patch grid: (1, 1 + side^2, D) -> (1, 1 + h*w, D).

    The values of ``DINOVisionTransformer.interpolate_pos_encoding`` (to float32 rounding), with
    ``h`` and ``w`` ints or symbolic sizes of a graph being exported. The class-token entry is kept.
    """
    num_patches, dim = pos_embed.shape[1] - 1, pos_embed.shape[-1]
    side = int(math.sqrt(num_patches))
    assert side * side == num_patches, f"pos_embed holds {num_patches} patches, not a square grid"
    # As tensors, so that neither the native-grid test nor the scale is a Python constant in a graph.
    h_t = torch.scalar_tensor(h, dtype=torch.float64)
    w_t = torch.scalar_tensor(w, dtype=torch.float64)
    native = (h_t == side) & (w_t == side)  # eager mode returns the embedding as is only when both match
    one = torch.ones((), dtype=torch.float64)
    # PyTorch maps coordinates with float32(1.0 / scale), scale = (h + 0.1) / sqrt(N) in double.
    ratio_h = torch.where(native, one, 1.0 / ((h_t + 0.1) / math.sqrt(num_patches))).float()
    ratio_w = torch.where(native, one, 1.0 / ((w_t + 0.1) / math.sqrt(num_patches))).float()
    grid = pos_embed[0, 1:].reshape(side, side, dim)
    ix, wx = _taps(w, side, ratio_w)  # (w, 4)
    iy, wy = _taps(h, side, ratio_h)  # (h, 4)
    # Along the width first, then the height: the order of PyTorch's kernel.
    rows = (grid[:, ix] * wx.to(grid.dtype)[None, :, :, None]).sum(2)  # (side, w, 4, D) -> (side, w, D)
    out = (rows[iy] * wy.to(grid.dtype)[:, :, None, None]).sum(1)  # (h, 4, w, D) -> (h, w, D)
    return torch.cat([pos_embed[:, :1], out.reshape(1, h * w, dim)], dim=1)
