"""Solver: schedule shapes (SCHEDULER_REGISTRY), a project's extra schedules (EXTRA_SCHEDULE_REGISTRY),
optimizers with DINO's parameter groups."""

from . import schedules  # noqa: F401  (registration on import)
from .build import (
    EXTRA_SCHEDULE_REGISTRY,
    SCHEDULER_REGISTRY,
    apply_schedules,
    build_optimizer,
    build_schedules,
    clip_grad_per_param_,
    get_param_groups,
    scaled_lr,
    total_batch_size,
)
from .lars import LARS

__all__ = [
    "EXTRA_SCHEDULE_REGISTRY",
    "LARS",
    "SCHEDULER_REGISTRY",
    "apply_schedules",
    "build_optimizer",
    "build_schedules",
    "clip_grad_per_param_",
    "get_param_groups",
    "scaled_lr",
    "total_batch_size",
]
