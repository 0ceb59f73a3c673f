"""The backbones of ``hubconf.py``: ``torch.hub.load(REPO_DIR, "dino_vits16", source="local", ...)``.

Every architecture the BACKBONE registry trains has an entry point; each returns the backbone in eval
mode on the CPU, randomly initialized or with the weights of a local file. Nothing is ever
downloaded: ``pretrained=True`` is an error saying so, and ``weights=PATH`` takes any file
:func:`~dino_research.evaluation.weights.load_backbone` reads (our training checkpoints, exported
backbones, the official DINO files, safetensors).
"""

from __future__ import annotations

import logging

import torch.nn as nn

from ..config import get_cfg
from ..modeling import build_backbone
from ..utils.errors import UserError
from .weights import load_backbone_and_config

__all__ = ["ENTRY_POINTS", "HubError", "hub_backbone", "entry_point_name"]

logger = logging.getLogger("dino_research")

# hubconf.py entry point -> (MODEL.BACKBONE.NAME, MODEL.BACKBONE.PATCH_SIZE); the names of the
# reference's hubconf (dino_vits16, ...) where it has the architecture.
ENTRY_POINTS = {
    "dino_vitt16": ("vit_tiny", 16), "dino_vitt8": ("vit_tiny", 8),
    "dino_vits16": ("vit_small", 16), "dino_vits8": ("vit_small", 8),
    "dino_vitb16": ("vit_base", 16), "dino_vitb8": ("vit_base", 8),
    "dino_resnet50": ("resnet50", 16), "dino_cifar_resnet": ("cifar_resnet", 16), "dino_timm": ("timm", 16),
}


class HubError(UserError, ValueError):
    """A hub call that cannot be served (a download asked for, weights of another architecture)."""


def entry_point_name(name: str, patch_size: int) -> str | None:
    """The entry point building ``MODEL.BACKBONE.NAME`` ``name`` at ``patch_size``, if any."""
    for entry, (backbone, patch) in ENTRY_POINTS.items():
        if backbone == name and (patch == patch_size or not name.startswith("vit_")):
            return entry
    return None


def hub_backbone(name: str, *, patch_size: int = 16, pretrained: bool = False, weights: str = "",
                 checkpoint_key: str = "teacher", depth: int = 0, width: int = 64, timm_model: str = "",
                 entry: str = "") -> nn.Module:
    """Build the backbone ``name`` (a BACKBONE registry name) and load ``weights`` strictly.

    Args:
        patch_size, depth, width, timm_model: ``MODEL.BACKBONE.PATCH_SIZE``, ``DEPTH`` (0: the
            architecture's own), ``RESNET_WIDTH`` (cifar_resnet) and ``TIMM_MODEL`` (timm).
        pretrained: must be False: there is nothing to download (a :class:`HubError` says what to do).
        weights: a local weights file; "" keeps the random initialization. A training checkpoint of
            ours carries its architecture: it must be ``name`` at ``patch_size`` (its depth is taken
            from it), else a :class:`HubError` names the entry point that fits.
        checkpoint_key: "teacher" or "student" network of a training checkpoint.
        entry: the calling entry point, for messages.

    Returns the backbone, in eval mode, on the CPU: images (B, 3, H, W) -> features (B, embed_dim).
    """
    entry = entry or entry_point_name(name, patch_size) or name
    if pretrained:
        raise HubError(
            f"{entry}(pretrained=True): dino_research never downloads weights, so there is nothing to fetch. "
            f"Pass weights=PATH to a local file instead: a checkpoint or teacher_backbone.pth of a training "
            f"run, or an official DINO file downloaded beforehand (e.g. dino_deitsmall16_pretrain.pth for "
            f"dino_vits16); or pretrained=False for a random initialization.")
    cfg = get_cfg()
    cfg.MODEL.BACKBONE.NAME, cfg.MODEL.BACKBONE.PATCH_SIZE = name, patch_size
    cfg.MODEL.BACKBONE.DEPTH, cfg.MODEL.BACKBONE.RESNET_WIDTH = depth, width
    cfg.MODEL.BACKBONE.TIMM_MODEL = timm_model
    if not weights:
        return build_backbone(cfg, drop_path_rate=0.0).eval()
    backbone, stored = load_backbone_and_config(cfg, weights, checkpoint_key)  # strict: never a partial load
    found = (stored.MODEL.BACKBONE.NAME, stored.MODEL.BACKBONE.PATCH_SIZE)
    if found[0] != name or (name.startswith("vit_") and found[1] != patch_size) or (
            name == "timm" and stored.MODEL.BACKBONE.TIMM_MODEL != timm_model):
        fits = entry_point_name(*found)
        raise HubError(f"{weights} holds a {found[0]}/{found[1]} backbone, not the {name}/{patch_size} of {entry}"
                       + (f": use torch.hub.load(..., {fits!r}, weights=...)" if fits else ""))
    logger.info("%s: loaded the %s backbone of %s", entry, checkpoint_key, weights)
    return backbone
