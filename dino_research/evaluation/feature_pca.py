"""PCA of a ViT's patch features: the first component separates the object from the background, the
next three, shown as RGB over the object, colour its parts (as in the DINOv2 paper's figures).

The components are fitted jointly over every patch of every image of a set, so one colour means the
same feature direction in all of them: matching parts of different images get matching colours.

Tensors: an image gives an (h, w) = (H/p, W/p) grid of D-dimensional patch tokens (final-normed
tokens of the last block, [CLS] dropped).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from ..utils.plots import save_figure

__all__ = ["feature_pca", "fit_pca", "patch_features", "pca_figure"]


@torch.no_grad()
def patch_features(backbone: nn.Module, images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Patch tokens of each image: (1, 3, H, W) each, H and W multiples of the patch size, on the
    backbone's device -> [(h, w, D) float32 on the CPU]. Images may differ in size."""
    if not isinstance(getattr(backbone, "patch_size", None), int) or not callable(
            getattr(backbone, "forward_features", None)):
        raise TypeError(f"feature PCA needs a ViT backbone (patch tokens); got a {type(backbone).__name__}")
    p = backbone.patch_size
    grids = []
    for image in images:
        h, w = image.shape[-2] // p, image.shape[-1] // p
        tokens = backbone.forward_features(image)[0, 1:]  # (h*w, D), row-major: [CLS] dropped
        grids.append(tokens.float().cpu().reshape(h, w, -1))
    return grids


def fit_pca(features: torch.Tensor, n_components: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Principal axes of ``features`` (M, D): ``(mean (D,), components (K, D), variance (K,))``, by
    decreasing variance, in float64. Each component's sign makes its largest coefficient positive
    (PCA leaves the sign free; this makes it reproducible)."""
    x = features.double()
    mean = x.mean(0)
    centred = x - mean
    covariance = centred.T @ centred / max(1, x.shape[0] - 1)
    variance, vectors = torch.linalg.eigh(covariance)  # ascending
    k = min(n_components, x.shape[1])
    variance, components = variance.flip(0)[:k], vectors.flip(1)[:, :k].T.contiguous()
    signs = torch.sign(components.gather(1, components.abs().argmax(1, keepdim=True)))
    return mean, components * signs, variance


def feature_pca(grids: Sequence[torch.Tensor], threshold: float = 0.0) -> list[dict]:
    """Foreground and part colours of each grid (h_i, w_i, D), from one PCA of all their patches.

    The first component's sign is chosen so that the patches on the images' borders lie below the
    mean on average: photographs usually frame the object away from the edges, so the border is
    mostly background. A patch is foreground when its first component, in units of that component's
    standard deviation over the set, exceeds ``threshold`` (0: above the set's mean). Components 2-4
    become red, green and blue, each scaled to [0, 1] by its min and max over the foreground patches of
    the whole set; background is black.

    Returns per grid ``{"first": (h, w) float32 first component (standardized), "foreground": (h, w)
    bool, "rgb": (h, w, 3) float32 in [0, 1]}``. Fewer than 4 feature dimensions give fewer colours.
    """
    if not grids:
        raise ValueError("feature_pca needs at least one grid")
    flat = torch.cat([g.reshape(-1, g.shape[-1]) for g in grids])
    mean, components, _ = fit_pca(flat, 4)
    projected = (flat.double() - mean) @ components.T  # (M, K)
    border = torch.cat([_border(g.shape[0], g.shape[1]) for g in grids])
    first = projected[:, 0]
    if first[border].mean() > first.mean():
        first = -first
    first = first / first.std().clamp_min(1e-12)
    foreground = first > threshold
    colours = projected[:, 1:4]
    rgb = torch.zeros(flat.shape[0], 3, dtype=torch.float64)
    if foreground.any() and colours.shape[1]:
        chosen = colours[foreground]
        low, high = chosen.min(0).values, chosen.max(0).values
        rgb[foreground, : colours.shape[1]] = ((chosen - low) / (high - low).clamp_min(1e-12)).clamp(0, 1)
    out, start = [], 0
    for g in grids:
        h, w = g.shape[:2]
        stop = start + h * w
        out.append({"first": first[start:stop].reshape(h, w).float(),
                    "foreground": foreground[start:stop].reshape(h, w),
                    "rgb": rgb[start:stop].reshape(h, w, 3).float()})
        start = stop
    return out


def _border(h: int, w: int) -> torch.Tensor:
    """(h*w,) bool: the patches on the grid's outer ring."""
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[0], mask[-1], mask[:, 0], mask[:, -1] = True, True, True, True
    return mask.reshape(-1)


def pca_figure(images: Sequence, results: Sequence[dict], titles: Sequence[str], out: str) -> str:
    """One row per image: the image, the first component (viridis), the foreground (image darkened
    outside it) and the RGB of components 2-4, each map upsampled by repeating patches to the
    image's size. ``images`` are RGB ``PIL.Image``s whose sides are the grids' times the patch size.
    Written to ``out`` (PNG) through a temporary and a rename; returns ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(images), 4, figsize=(12, 3.2 * len(images)), squeeze=False)
    for row, (image, result, title) in enumerate(zip(images, results, titles)):
        pixels = np.asarray(image, dtype=np.float64) / 255.0
        k = pixels.shape[0] // result["first"].shape[0]  # the patch size
        mask = _up(result["foreground"].numpy(), k)
        panels = [(pixels, title), (_up(result["first"].numpy(), k), "1st component"),
                  (np.where(mask[..., None], pixels, 0.2 * pixels), "foreground (1st > threshold)"),
                  (_up(result["rgb"].numpy(), k), "components 2-4 as RGB")]
        for ax, (picture, label) in zip(axes[row], panels):
            ax.imshow(picture, cmap="viridis" if picture.ndim == 2 else None, interpolation="nearest")
            ax.set_title(label, fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, out)


def _up(grid: np.ndarray, k: int) -> np.ndarray:
    """Patch grid (h, w, ...) -> pixels (h*k, w*k, ...), each value repeated over its patch."""
    return grid.repeat(k, axis=0).repeat(k, axis=1)
