"""Models: registries and builders, then the modules that register DINO's components.

``build.py`` is imported first so the registries exist when the component modules register.
"""

from . import backbones, ema, heads, losses, meta_arch, small_resnet  # noqa: F401  (registration on import)
from .build import (
    BACKBONE_REGISTRY,
    EMA_REGISTRY,
    HEAD_REGISTRY,
    LOSS_REGISTRY,
    META_ARCH_REGISTRY,
    build_backbone,
    build_ema,
    build_head,
    build_loss,
    build_model,
)

__all__ = [
    "BACKBONE_REGISTRY",
    "EMA_REGISTRY",
    "HEAD_REGISTRY",
    "LOSS_REGISTRY",
    "META_ARCH_REGISTRY",
    "build_backbone",
    "build_ema",
    "build_head",
    "build_loss",
    "build_model",
]
