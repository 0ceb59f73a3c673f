"""DINO's segmentation property, measured: how well thresholded self-attention covers the object.

The paper (Caron et al. 2021, Sec. 4.2.1 and Fig. 4) turns each head's [CLS]-to-patch attention map
into a mask by keeping the patches that hold 60% of its mass, and reports the Jaccard index (IoU)
of that mask with the ground-truth segmentation. :func:`attention_jaccard` does this for any
image/mask pairs (PASCAL VOC, DAVIS, or Fashion-MNIST, whose foreground is free:
:func:`foreground_masks`), for every head, and summarizes it as the best head's and the mean over
heads.
"""

from __future__ import annotations

import torch

from .attention import threshold_masks, upsample

__all__ = ["attention_jaccard", "attention_jaccard_of_images", "foreground_masks", "jaccard"]


def jaccard(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Jaccard index ``|pred & target| / |pred | target|`` over the last two dimensions.

    ``pred``, ``target``: bool (..., H, W) of one shape (broadcastable). Returns float64 (...); two
    empty masks agree perfectly (1.0).
    """
    if pred.dtype != torch.bool or target.dtype != torch.bool:
        raise TypeError(f"jaccard needs bool masks, got {pred.dtype} and {target.dtype}")
    inter = (pred & target).flatten(-2).sum(-1).double()
    union = (pred | target).flatten(-2).sum(-1).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def foreground_masks(images: torch.Tensor, threshold: float = 0.05) -> torch.Tensor:
    """Ground-truth masks of objects on a black background (Fashion-MNIST, MNIST): pixels whose
    brightest channel exceeds ``threshold``.

    ``images`` (B, C, H, W) with values in [0, 1] (not normalized) -> bool (B, H, W).
    """
    if images.dim() != 4:
        raise ValueError(f"expected images (B, C, H, W), got shape {tuple(images.shape)}")
    return images.amax(dim=1) > threshold


def attention_jaccard(attentions: torch.Tensor, masks: torch.Tensor, patch_size: int,
                      threshold: float = 0.6) -> dict:
    """Jaccard index between each head's thresholded attention and the ground truth.

    Args:
        attentions: (B, heads, h, w) non-negative [CLS]-to-patch attention of B images (e.g.
            :func:`~dino_research.evaluation.attention.last_self_attention_maps`).
        masks: bool (B, h * patch_size, w * patch_size) ground-truth foreground of the same images.
        patch_size: pixels per patch side; each patch of a mask covers patch_size x patch_size pixels.
        threshold: fraction of each map's mass kept (the paper's 0.6; see ``threshold_masks``).

    Returns:
        ``{"per_image_head": (B, heads) float64, "per_head": (heads,) mean over images,
        "best_head": int, "best_head_jaccard": float, "mean_over_heads": float, "mask_area": (heads,)
        mean fraction of the image each head's mask covers, "foreground_area": float, the ground
        truth's}``; values in [0, 1]. The areas tell a diffuse map from a sharp one: a mask much
        smaller than the object cannot score high, however well placed.
        The best head is chosen over the whole set (one head for all images), as a head is a fixed
        part of the model.
    """
    if attentions.dim() != 4:
        raise ValueError(f"expected attentions (B, heads, h, w), got shape {tuple(attentions.shape)}")
    b, heads, h, w = attentions.shape
    if masks.shape != (b, h * patch_size, w * patch_size):
        raise ValueError(f"masks must be (B, h*p, w*p) = {(b, h * patch_size, w * patch_size)} for attention maps "
                         f"{tuple(attentions.shape)} and patch size {patch_size}; got {tuple(masks.shape)}")
    predicted = upsample(threshold_masks(attentions, threshold), patch_size)  # (B, heads, H, W) bool
    per_image_head = jaccard(predicted, masks.bool().unsqueeze(1))
    per_head = per_image_head.mean(dim=0)
    best = int(per_head.argmax())
    return {"per_image_head": per_image_head, "per_head": per_head, "best_head": best,
            "best_head_jaccard": float(per_head[best]), "mean_over_heads": float(per_head.mean()),
            "mask_area": predicted.double().mean(dim=(0, 2, 3)), "foreground_area": float(masks.double().mean())}


@torch.no_grad()
def attention_jaccard_of_images(backbone, images, masks, mean, std, device, threshold: float = 0.6,
                                foreground: float = 0.05, batch_size: int = 64) -> dict:
    """:func:`attention_jaccard` of a ViT ``backbone`` on RGB ``PIL.Image`` ``images`` of one size.

    ``masks``: bool (N, H, W) ground truth of the images (H, W multiples of the patch size), or None
    for :func:`foreground_masks` of the images themselves (objects on black, pixels above ``foreground``).
    The backbone runs in
    eval mode (its mode is restored). Returns :func:`attention_jaccard`'s dict, tensors on the CPU.
    """
    import torchvision.transforms.functional as TF

    from .attention import last_self_attention_maps

    pixels = torch.stack([TF.to_tensor(image) for image in images])  # (N, 3, H, W) in [0, 1]
    p = backbone.patch_size
    if pixels.shape[-1] % p or pixels.shape[-2] % p:
        raise ValueError(f"images of {tuple(pixels.shape[-2:])} pixels are not a multiple of the patch size {p}")
    masks = foreground_masks(pixels, foreground) if masks is None else masks
    normalized = TF.normalize(pixels, list(mean), list(std))
    was_training = backbone.training
    backbone.eval()
    try:
        maps = torch.cat([last_self_attention_maps(backbone, normalized[i:i + batch_size].to(device)).float().cpu()
                          for i in range(0, len(normalized), batch_size)])
    finally:
        backbone.train(was_training)
    return attention_jaccard(maps, masks, p, threshold)
