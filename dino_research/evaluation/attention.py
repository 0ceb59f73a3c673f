"""Self-attention maps of a ViT's last block, as in the DINO paper's figures.

The paper shows, for each head of the last block, the attention of the [CLS] query to every patch
(Caron et al. 2021, Fig. 1 and 3), and "keeps 60% of the mass" to turn a map into a mask (Fig. 3).
This module computes those maps and masks and draws them; ``tools/visualize_attention.py`` writes
them for a file or a folder of images.

Tensors: ``B`` images, ``heads`` attention heads, an (h, w) = (H/p, W/p) patch grid for (H, W)
images and patch size p. Figures are drawn with Pillow and a built-in viridis colormap (no
matplotlib).
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw
from torchvision.transforms import InterpolationMode

from ..data.datasets import to_rgb

__all__ = [
    "attention_figure",
    "check_attention_backbone",
    "colorize",
    "crop_to_patch_multiple",
    "last_self_attention_maps",
    "limit_size",
    "prepare_image",
    "render_attention",
    "resize_image",
    "threshold_masks",
    "upsample",
]

logger = logging.getLogger("dino_research")


# ------------------------------------------------------------------------------------ computation
def check_attention_backbone(backbone: nn.Module, name: str = "") -> None:
    """Raise ``TypeError`` unless ``backbone`` is a ViT exposing ``get_last_selfattention(x)`` and an
    int ``patch_size`` (dino_research's vit_tiny / vit_small / vit_base). ``name`` (e.g. the config's
    ``MODEL.BACKBONE.NAME``) goes into the message; by default the class name does."""
    if callable(getattr(backbone, "get_last_selfattention", None)) and isinstance(
        getattr(backbone, "patch_size", None), int
    ):
        return
    what = f"MODEL.BACKBONE.NAME is {name!r}" if name else f"got a {type(backbone).__name__}"
    raise TypeError(
        f"attention maps need a ViT backbone (vit_tiny, vit_small, vit_base: one with "
        f"get_last_selfattention(x) and an int patch_size); {what}, which has no [CLS]-to-patch attention"
    )


def crop_to_patch_multiple(image, patch_size: int):
    """Crop the bottom rows and right columns of ``image`` so both sides are multiples of ``patch_size``.

    ``image`` is a Tensor (..., H, W) or a ``PIL.Image`` of size (W, H); the result has the same type,
    sides ``H - H % p`` and ``W - W % p``. The top-left corner is kept, as in DINO's
    ``visualize_attention.py``, so pixel (y, x) of the crop is pixel (y, x) of the input. Raises
    ``ValueError`` if a side is shorter than one patch.
    """
    if isinstance(image, Image.Image):
        W, H = image.size
    elif isinstance(image, torch.Tensor):
        H, W = image.shape[-2:]
    else:
        raise TypeError(f"expected a Tensor or a PIL.Image, got {type(image).__name__}")
    if H < patch_size or W < patch_size:
        raise ValueError(f"image {H}x{W} is smaller than one {patch_size}x{patch_size} patch")
    h, w = H - H % patch_size, W - W % patch_size
    if (h, w) == (H, W):
        return image
    if isinstance(image, Image.Image):
        return image.crop((0, 0, w, h))
    return image[..., :h, :w]


@torch.no_grad()
def last_self_attention_maps(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The last block's [CLS]-to-patch attention of every head: (B, heads, h, w).

    ``images`` (B, 3, H, W) (or one image (3, H, W), treated as B = 1), normalized as the backbone
    expects, on the backbone's device. H and W are first cropped to multiples of the patch size
    (:func:`crop_to_patch_multiple`), so h = H // p and w = W // p. Entry [b, i, y, x] is row 0
    ([CLS] query) of head i's post-softmax attention, column of the patch at row y, column x of the
    grid. The [CLS]-to-[CLS] weight is dropped, so a map sums to 1 minus that weight, not to 1.

    Runs without gradients and leaves the backbone's mode alone (pass it in eval mode). Raises
    ``TypeError`` for a backbone without self-attention (see :func:`check_attention_backbone`).
    """
    check_attention_backbone(backbone)
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images (B, 3, H, W), got shape {tuple(images.shape)}")
    p = backbone.patch_size
    cropped = crop_to_patch_multiple(images, p)
    if cropped.shape != images.shape:
        logger.info("cropped %dx%d to %dx%d, a multiple of the patch size %d",
                    *images.shape[-2:], *cropped.shape[-2:], p)
    h, w = cropped.shape[-2] // p, cropped.shape[-1] // p
    attn = backbone.get_last_selfattention(cropped)  # (B, heads, 1 + h*w, 1 + h*w), [CLS] first
    B, heads = attn.shape[:2]
    # Tokens are [CLS] then the patches row-major, so the reshape recovers the (h, w) grid.
    return attn[:, :, 0, 1:].reshape(B, heads, h, w)


def threshold_masks(attentions: torch.Tensor, threshold: float = 0.6) -> torch.Tensor:
    """Per map, the smallest set of patches holding at least ``threshold`` of its attention mass.

    ``attentions`` (..., h, w), non-negative (e.g. (B, heads, h, w) from
    :func:`last_self_attention_maps`) -> bool mask of the same shape. In each map, patches are taken
    in decreasing order of attention and a patch is kept while the mass of the patches taken *before*
    it is below ``threshold`` times the map's total: the kept mass is then >= threshold, and dropping
    the smallest kept patch would bring it below. Mass exactly equal to the threshold is enough:
    [0.5, 0.3, 0.1, 0.1] keeps only the first patch at 0.5 and the first two at 0.6. This is the
    reference's rule (``cumsum(ascending) / total > 1 - threshold``) written the other way round.

    Equal values are taken in row-major order (stable sort), so among ties at the boundary the
    first patches win. Sums are accumulated in float64; a map that sums to 0 keeps nothing.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold is a fraction of the attention mass in (0, 1], got {threshold}")
    if attentions.dim() < 2:
        raise ValueError(f"expected maps (..., h, w), got shape {tuple(attentions.shape)}")
    flat = attentions.detach().flatten(-2).double()  # (..., h*w)
    values, order = torch.sort(flat, dim=-1, descending=True, stable=True)
    cumulative = values.cumsum(dim=-1)
    before = torch.cat([torch.zeros_like(cumulative[..., :1]), cumulative[..., :-1]], dim=-1)
    keep_sorted = before < threshold * cumulative[..., -1:]
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)  # back to patch order
    return keep.reshape(attentions.shape)


def upsample(maps: torch.Tensor, patch_size: int, mode: str = "nearest") -> torch.Tensor:
    """Patch-grid maps (..., h, w) -> pixel maps (..., h*p, w*p), p = ``patch_size``.

    ``"nearest"`` (the reference's choice, and the default) repeats each value over its p x p patch
    exactly and keeps the dtype, so it also serves bool masks. ``"bilinear"`` (float maps only)
    interpolates between patch centres (``align_corners=False``) for smoother pictures.
    """
    if maps.dim() < 2:
        raise ValueError(f"expected maps (..., h, w), got shape {tuple(maps.shape)}")
    if mode == "nearest":
        return maps.repeat_interleave(patch_size, dim=-2).repeat_interleave(patch_size, dim=-1)
    if mode == "bilinear":
        if not maps.is_floating_point():
            raise ValueError(f"bilinear upsampling needs float maps, got {maps.dtype}")
        h, w = maps.shape[-2:]
        out = F.interpolate(maps.reshape(-1, 1, h, w), scale_factor=patch_size, mode="bilinear",
                            align_corners=False)
        return out.reshape(*maps.shape[:-2], h * patch_size, w * patch_size)
    raise ValueError(f"mode must be 'nearest' or 'bilinear', got {mode!r}")


def resize_image(image: Image.Image, size: Sequence[int] | int | None = None) -> Image.Image:
    """``size``: None returns ``image``; an int resizes the shorter side to it (aspect ratio kept, as
    ``torchvision.transforms.Resize(int)``); (H, W) resizes to exactly that. Bicubic, as the
    evaluation transform."""
    if size is None:
        return image
    if isinstance(size, int):
        size = [size]
    size = [int(s) for s in size]
    if len(size) not in (1, 2) or min(size) < 1:
        raise ValueError(f"size must be None, a positive int or (H, W), got {size}")
    return TF.resize(image, size, interpolation=InterpolationMode.BICUBIC)


def limit_size(image: Image.Image, max_size: int | None) -> Image.Image:
    """``image`` shrunk so that its longer side is at most ``max_size`` pixels; itself when it fits or
    ``max_size`` is None or 0.

    The attention of one image costs ``heads x (1 + H*W/p^2)^2`` floats per block, quadratic in the
    pixel count: a 4000x3000 photo at patch 16 asks ViT-S (6 heads) for ~53 GB, 1024x768 for 227 MB.
    The longer side becomes ``max_size``, the shorter ``round(short * max_size / long)`` (>= 1): the
    aspect ratio is kept. Bicubic.
    """
    if not max_size:
        return image
    if max_size < 0:
        raise ValueError(f"max_size must be None, 0 (no limit) or a positive number of pixels, got {max_size}")
    W, H = image.size
    if max(W, H) <= max_size:
        return image
    scale = max_size / max(W, H)
    size = (max_size, max(1, round(H * scale))) if W >= H else (max(1, round(W * scale)), max_size)
    return image.resize(size, Image.BICUBIC)


def prepare_image(image: Image.Image, patch_size: int, mean: Sequence[float], std: Sequence[float],
                  size: Sequence[int] | int | None = None,
                  max_size: int | None = None) -> tuple[Image.Image, torch.Tensor]:
    """Resize, cap, crop and normalize one image for :func:`last_self_attention_maps`.

    ``size``: as :func:`resize_image` (None keeps the image's size). ``max_size``: then the longer
    side is capped (:func:`limit_size`; None or 0: no cap). The result is then cropped to a patch
    multiple (:func:`crop_to_patch_multiple`). Returns the RGB ``PIL.Image`` shown in figures, of
    size (W, H), and the tensor (1, 3, H, W) normalized with ``mean``/``std`` (0-1 scale).
    """
    image = limit_size(resize_image(to_rgb(image), size), max_size)
    image = crop_to_patch_multiple(image, patch_size)
    tensor = TF.normalize(TF.to_tensor(image), list(mean), list(std))
    return image, tensor.unsqueeze(0)


# ---------------------------------------------------------------------------------------- figures
# Nine evenly spaced colours of matplotlib's viridis (perceptually uniform, readable in grayscale);
# colorize() interpolates linearly between them, which is visually indistinguishable from the full
# 256-entry table.
_VIRIDIS_STOPS = np.array([
    (0x44, 0x01, 0x54), (0x48, 0x28, 0x78), (0x3E, 0x4A, 0x89), (0x31, 0x68, 0x8E), (0x26, 0x82, 0x8E),
    (0x1F, 0x9E, 0x89), (0x35, 0xB7, 0x79), (0x6E, 0xCE, 0x58), (0xFD, 0xE7, 0x25),
], dtype=np.float64)
_VIRIDIS = np.stack([np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_VIRIDIS_STOPS)), _VIRIDIS_STOPS[:, c])
                     for c in range(3)], axis=1).round().astype(np.uint8)  # (256, 3) lookup table


def colorize(map2d) -> Image.Image:
    """A map (H, W) (Tensor or array) -> RGB ``PIL.Image`` of size (W, H), viridis colours.

    Values are scaled to [0, 1] by the map's own min and max (as ``plt.imsave`` does in the
    reference), so the lowest value is dark purple and the highest yellow; a constant map is all
    dark purple. Non-finite values are an error.
    """
    values = map2d.detach().cpu().double().numpy() if isinstance(map2d, torch.Tensor) else np.asarray(map2d, float)
    if values.ndim != 2:
        raise ValueError(f"expected a 2-D map (H, W), got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError("map holds NaN or infinite values")
    low, span = values.min(), values.max() - values.min()
    unit = (values - low) / span if span > 0 else np.zeros_like(values)
    return Image.fromarray(_VIRIDIS[np.rint(unit * 255).astype(np.int64)])  # (H, W, 3) uint8: RGB


def mask_overlay(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """``image`` with the pixels outside ``mask`` (H, W bool) darkened to 25% brightness."""
    pixels = np.asarray(image, dtype=np.float64)
    pixels = np.where(mask[..., None], pixels, pixels * 0.25)
    return Image.fromarray(pixels.round().astype(np.uint8))


def attention_figure(image: Image.Image, attentions: torch.Tensor, masks: torch.Tensor | None = None, *,
                     pad: int = 4, label_height: int = 14) -> Image.Image:
    """One picture of an image's attention: a grid of labelled panels, each the image's size.

    ``image`` RGB ``PIL.Image`` of size (W, H); ``attentions`` (heads, H, W) pixel maps (e.g.
    :func:`upsample` of one image's maps); ``masks`` optional bool (heads, H, W).

    Row 0: "image", "mean" (the mean over heads), then "head i" for each head, each map coloured by
    :func:`colorize` with its own min/max. Row 1 (only with ``masks``): "any head" (the union of the
    masks) and, under each head, "mask i": the image darkened outside that head's mask; the cell
    under "mean" stays empty. Each panel has a ``label_height`` strip above it for its label, and
    panels are ``pad`` pixels apart and from the border, on white, so the figure is
    ``pad + (2 + heads) * (W + pad)`` wide and ``pad + rows * (label_height + H + pad)`` high.
    Labels are drawn with Pillow's default font and clipped to the panel width (narrow images,
    below ~50 pixels, show them cut).
    """
    image = to_rgb(image)
    if attentions.dim() != 3:
        raise ValueError(f"expected attentions (heads, H, W), got shape {tuple(attentions.shape)}")
    heads, H, W = attentions.shape
    if image.size != (W, H):
        raise ValueError(f"image is {image.size[0]}x{image.size[1]} (WxH) but the maps are {W}x{H}")
    if masks is not None and tuple(masks.shape) != (heads, H, W):
        raise ValueError(f"masks {tuple(masks.shape)} do not match the attentions {(heads, H, W)}")
    attentions = attentions.detach().cpu().float()
    rows = [[("image", image), ("mean", colorize(attentions.mean(0)))]
            + [(f"head {i}", colorize(attentions[i])) for i in range(heads)]]
    if masks is not None:
        masks = masks.detach().cpu().bool().numpy()
        rows.append([("any head", mask_overlay(image, masks.any(0))), None]
                    + [(f"mask {i}", mask_overlay(image, masks[i])) for i in range(heads)])
    cell_w, cell_h = W + pad, label_height + H + pad
    figure = Image.new("RGB", (pad + (2 + heads) * cell_w, pad + len(rows) * cell_h), "white")
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            if panel is None:
                continue
            label, picture = panel
            x, y = pad + c * cell_w, pad + r * cell_h
            strip = Image.new("RGB", (W, label_height), "white")  # a label never spills over a neighbour
            ImageDraw.Draw(strip).text((0, 0), label, fill="black")  # Pillow's default font: no file needed
            figure.paste(strip, (x, y))
            figure.paste(picture, (x, y + label_height))
    return figure


@torch.no_grad()
def render_attention(backbone: nn.Module, picture: Image.Image, mean: Sequence[float], std: Sequence[float], *,
                     device, threshold: float = 0.6, scale: int = 1, min_side: int = 0) -> dict:
    """The attention of one image, computed and drawn: what ``tools/visualize_attention.py`` and the
    training-time ``AttentionMapHook`` both write.

    ``picture`` is used at its size (cropped to a patch multiple, normalized with ``mean``/``std``);
    pass ``backbone`` in eval mode. Returns ``{"image": the cropped RGB image (W, H), "maps": (heads,
    H, W) float32 pixel maps, "masks": (heads, H, W) bool keeping ``threshold`` of each map's mass, or
    None when ``threshold`` is 0, "figure": attention_figure of them}``. The figure's panels are
    enlarged ``scale`` times, or more to reach ``min_side`` pixels (small images such as 28-pixel
    Fashion-MNIST), pixels repeated so a panel shows exactly what each patch covered.
    """
    p = backbone.patch_size
    image, tensor = prepare_image(picture, p, mean, std)
    grid = last_self_attention_maps(backbone, tensor.to(device))[0].float().cpu()  # (heads, h, w)
    maps = upsample(grid, p)
    masks = upsample(threshold_masks(grid, threshold), p) if threshold > 0 else None
    k = max(scale, -(-min_side // min(image.size)) if min_side else 1)
    shown = image.resize((image.width * k, image.height * k), Image.NEAREST) if k > 1 else image
    figure = attention_figure(shown, upsample(maps, k), None if masks is None else upsample(masks, k))
    return {"image": image, "maps": maps, "masks": masks, "figure": figure}
