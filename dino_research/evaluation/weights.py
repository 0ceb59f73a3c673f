"""Load the backbone people evaluate, whatever file it comes in.

One loader serves every evaluation tool. Accepted files:

* a dino_research training checkpoint (``{"model": ..., "config": ...}``): the ``teacher`` backbone
  by default (``checkpoint_key="student"`` for the other); its stored config decides the architecture;
* an exported backbone (``teacher_backbone.pth``) or an official DINO backbone file: a plain state dict;
* an official DINO full checkpoint (``teacher``/``student`` entries, ``module.``/``backbone.``
  prefixes, head weights dropped);
* nothing: ``MODEL.BACKBONE.NAME timm`` with ``MODEL.BACKBONE.TIMM_MODEL`` and no file gives a randomly
  initialized timm model (weights only ever come from a local file).

Missing or unexpected backbone keys are an error naming them: never a silent partial load.
"""

from __future__ import annotations

import logging

import torch.nn as nn

from ..checkpoint import CheckpointError, backbone_state, load_backbone_state, load_file
from ..config import CfgNode
from ..modeling import build_backbone

logger = logging.getLogger("dino_research")


def config_from_checkpoint(cfg: CfgNode, data: dict, path: str) -> CfgNode:
    """``cfg`` with ``MODEL.BACKBONE`` replaced by the one stored in our checkpoint ``data`` (loaded
    from ``path``); unchanged for other files. The architecture then always matches the weights."""
    if not isinstance(data.get("config"), str):
        return cfg
    # Only the backbone's keys: the rest may hold keys of a project this process has not imported.
    stored_backbone = (CfgNode.load_cfg(data["config"]).get("MODEL", {}) or {}).get("BACKBONE", {})
    out = cfg.clone()
    out.defrost()
    out.MODEL.merge_from_other_cfg(CfgNode({"BACKBONE": stored_backbone}))
    out.freeze()
    logger.info("architecture taken from %s: %s/%d", path, out.MODEL.BACKBONE.NAME, out.MODEL.BACKBONE.PATCH_SIZE)
    return out


def load_backbone(cfg: CfgNode, weights: str = "", checkpoint_key: str = "teacher") -> nn.Module:
    """Build ``MODEL.BACKBONE`` (no drop path) and load ``weights`` (default ``MODEL.WEIGHTS``) strictly.

    Returns the backbone in eval mode on the CPU. Raises :class:`CheckpointError` when the file does
    not fit (shapes, missing or unexpected keys).
    """
    return load_backbone_and_config(cfg, weights, checkpoint_key)[0]


def load_backbone_and_config(cfg: CfgNode, weights: str = "", checkpoint_key: str = "teacher") -> tuple:
    """:func:`load_backbone`, and the config it was built from: ``cfg`` with the ``MODEL.BACKBONE`` of
    the checkpoint when the file stores one (:func:`config_from_checkpoint`), for callers that need the
    architecture's name (the export tool, the hub)."""
    weights = weights or cfg.MODEL.WEIGHTS
    if checkpoint_key not in ("teacher", "student"):
        raise ValueError(f"checkpoint key must be 'teacher' or 'student', got {checkpoint_key!r}")
    data = load_file(weights) if weights else None
    if data is not None:
        if not isinstance(data, dict):
            raise CheckpointError(f"{weights}: expected a dict of weights, got {type(data).__name__}")
        cfg = config_from_checkpoint(cfg, data, weights)
    backbone = build_backbone(cfg, drop_path_rate=0.0)
    if data is not None:
        load_backbone_state(backbone, backbone_state(data, checkpoint_key, weights), weights, strict=True)
        logger.info("loaded the %s backbone from %s", checkpoint_key, weights)
    elif cfg.MODEL.BACKBONE.NAME != "timm":
        raise ValueError(
            f"no weights given for {cfg.MODEL.BACKBONE.NAME}: pass --weights FILE (or MODEL.WEIGHTS); "
            f"only MODEL.BACKBONE.NAME timm may be evaluated from random initialization"
        )
    else:
        logger.warning("evaluating timm model %s with random weights (no file given)", cfg.MODEL.BACKBONE.TIMM_MODEL)
    return backbone.eval(), cfg
