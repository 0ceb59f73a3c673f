"""Schedules, optimizers and the gradient operations of a DINO step."""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn
from fvcore.common.registry import Registry

from ..config.checks import declare_choices, declare_registry_key
from ..utils import comm
from ..utils.registry import lookup

SCHEDULER_REGISTRY = Registry("SCHEDULER")
SCHEDULER_REGISTRY.__doc__ = """
Schedule shapes, selected per quantity by ``SOLVER.LR_SCHEDULER``, ``SOLVER.WEIGHT_DECAY_SCHEDULER``,
``MODEL.TEACHER.MOMENTUM_SCHEDULER`` and ``MODEL.LOSS.TEACHER_TEMP_SCHEDULER``.

Called as ``obj(start_value, end_value, total_steps, warmup_steps=0, warmup_start_value=0.0)`` and
returns a callable ``schedule(step: int) -> float`` defined for ``0 <= step < total_steps``: a linear
warmup from ``warmup_start_value`` reaching ``start_value`` at step ``warmup_steps - 1``, then the
shape from ``start_value`` (towards ``end_value``) over the remaining steps.
"""

EXTRA_SCHEDULE_REGISTRY = Registry("EXTRA_SCHEDULE")
EXTRA_SCHEDULE_REGISTRY.__doc__ = """
Per-iteration schedules a project adds to the core ones (lr, weight_decay, momentum, teacher_temp), e.g.
iBOT's patch-loss teacher temperature. Every registered object is called by ``build_schedules`` as
``obj(cfg, iters_per_epoch: int) -> dict[str, schedule]`` (``schedule(iteration) -> float``, defined for
the run's iterations) and its entries are added; a name already taken is an error. Return ``{}`` when
the config does not use them (another ``MODEL.META_ARCHITECTURE``). The trainer passes every schedule
but lr and weight decay to the model's ``forward``/``after_step`` as a keyword argument and logs it.
"""

for _key in ("SOLVER.LR_SCHEDULER", "SOLVER.WEIGHT_DECAY_SCHEDULER", "MODEL.TEACHER.MOMENTUM_SCHEDULER",
             "MODEL.LOSS.TEACHER_TEMP_SCHEDULER"):
    declare_registry_key(_key, SCHEDULER_REGISTRY)
# The optimizers build_optimizer knows (SOLVER.OPTIMIZER, case-insensitive).
OPTIMIZERS = declare_choices("SOLVER.OPTIMIZER", ("adamw", "sgd", "lars"))

# Reference batch of the linear scaling rule: BASE_LR is the learning rate for 256 images.
LR_REFERENCE_BATCH = 256


def total_batch_size(cfg, world_size: Optional[int] = None) -> int:
    """Images per optimizer step over all processes:
    ``BATCH_SIZE_PER_GPU * world_size * ACCUMULATE_STEPS``."""
    world_size = comm.get_world_size() if world_size is None else world_size
    return cfg.SOLVER.BATCH_SIZE_PER_GPU * world_size * cfg.SOLVER.ACCUMULATE_STEPS


def scaled_lr(cfg, world_size: Optional[int] = None) -> float:
    """Peak learning rate: ``BASE_LR * total_batch / 256`` (the paper's linear scaling rule)."""
    return cfg.SOLVER.BASE_LR * total_batch_size(cfg, world_size) / LR_REFERENCE_BATCH


def build_schedules(cfg, iters_per_epoch: int, world_size: Optional[int] = None) -> dict[str, Callable[[int], float]]:
    """Every per-iteration schedule of a DINO run, indexed by global iteration (optimizer step).

    Returns ``{"lr", "weight_decay", "momentum", "teacher_temp"}``, each ``sched(iteration) -> float``
    for ``0 <= iteration < SOLVER.EPOCHS * iters_per_epoch``:

    * lr: linear warmup 0 -> ``scaled_lr`` over ``SOLVER.WARMUP_EPOCHS``, then ``LR_SCHEDULER`` to ``MIN_LR``;
    * weight_decay: ``WEIGHT_DECAY_SCHEDULER`` from ``WEIGHT_DECAY`` to ``WEIGHT_DECAY_END``;
    * momentum: ``MOMENTUM_SCHEDULER`` from ``MODEL.TEACHER.MOMENTUM`` to ``MOMENTUM_END``;
    * teacher_temp: one value per epoch, linear ``WARMUP_TEACHER_TEMP`` -> ``TEACHER_TEMP`` over
      ``WARMUP_TEACHER_TEMP_EPOCHS``, then ``TEACHER_TEMP_SCHEDULER`` (constant in the paper);

    and those of every ``EXTRA_SCHEDULE_REGISTRY`` entry (a project's).
    """
    from .schedules import PerEpochSchedule  # registers the shapes; imported here to avoid a cycle

    s, epochs = cfg.SOLVER, cfg.SOLVER.EPOCHS
    if iters_per_epoch <= 0:
        raise ValueError(f"iters_per_epoch must be > 0, got {iters_per_epoch} (dataset smaller than one batch?)")
    for key, value in (("SOLVER.WARMUP_EPOCHS", s.WARMUP_EPOCHS),
                       ("MODEL.LOSS.WARMUP_TEACHER_TEMP_EPOCHS", cfg.MODEL.LOSS.WARMUP_TEACHER_TEMP_EPOCHS)):
        if not 0 <= value <= epochs:
            raise ValueError(f"{key} = {value} must be between 0 and SOLVER.EPOCHS = {epochs}")
    total = epochs * iters_per_epoch

    def shape(key: str, name: str):
        return lookup(SCHEDULER_REGISTRY, name, key)

    loss_cfg, teacher_cfg = cfg.MODEL.LOSS, cfg.MODEL.TEACHER
    temp_per_epoch = shape("MODEL.LOSS.TEACHER_TEMP_SCHEDULER", loss_cfg.TEACHER_TEMP_SCHEDULER)(
        loss_cfg.TEACHER_TEMP, loss_cfg.TEACHER_TEMP, epochs,
        warmup_steps=loss_cfg.WARMUP_TEACHER_TEMP_EPOCHS, warmup_start_value=loss_cfg.WARMUP_TEACHER_TEMP,
    )
    schedules = {
        "lr": shape("SOLVER.LR_SCHEDULER", s.LR_SCHEDULER)(
            scaled_lr(cfg, world_size), s.MIN_LR, total,
            warmup_steps=s.WARMUP_EPOCHS * iters_per_epoch, warmup_start_value=0.0,
        ),
        "weight_decay": shape("SOLVER.WEIGHT_DECAY_SCHEDULER", s.WEIGHT_DECAY_SCHEDULER)(
            s.WEIGHT_DECAY, s.WEIGHT_DECAY_END, total
        ),
        "momentum": shape("MODEL.TEACHER.MOMENTUM_SCHEDULER", teacher_cfg.MOMENTUM_SCHEDULER)(
            teacher_cfg.MOMENTUM, teacher_cfg.MOMENTUM_END, total
        ),
        "teacher_temp": PerEpochSchedule(temp_per_epoch, iters_per_epoch),
    }
    for name, extra in EXTRA_SCHEDULE_REGISTRY:
        added = extra(cfg, iters_per_epoch)
        taken = sorted(set(added) & set(schedules))
        if taken:
            raise ValueError(f"EXTRA_SCHEDULE_REGISTRY entry {name} adds schedule(s) {taken}, already defined")
        schedules.update(added)
    return schedules


def get_param_groups(model: nn.Module) -> list[dict]:
    """Split trainable parameters into a weight-decayed group and a group without decay.

    As the reference: biases and every 1-D parameter (norm scales) get no weight decay; all other
    tensors do (``cls_token`` and ``pos_embed`` included). Frozen parameters (the teacher, a frozen
    weight-norm gain) are left out. Group 0 carries ``apply_weight_decay=True``: the weight-decay
    schedule drives it alone.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return [
        {"params": decay, "apply_weight_decay": True},
        {"params": no_decay, "apply_weight_decay": False, "weight_decay": 0.0},
    ]


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """Build ``SOLVER.OPTIMIZER`` over ``model``'s trainable parameters, in two groups.

    The learning rate and weight decay given here are placeholders: :func:`apply_schedules` sets
    them at every iteration. Build after moving the model to its device (fused kernels need it).
    """
    from .lars import LARS

    s, groups = cfg.SOLVER, get_param_groups(model)
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise ValueError("the model has no trainable parameter")
    name = s.OPTIMIZER.lower()
    # One fused kernel for all parameters (CPU and CUDA both provide it); no per-parameter loop.
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=s.BASE_LR, betas=tuple(s.BETAS), weight_decay=s.WEIGHT_DECAY,
                                 fused=fused or None)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=s.BASE_LR, momentum=s.MOMENTUM, weight_decay=s.WEIGHT_DECAY,
                               fused=fused or None)
    if name == "lars":
        return LARS(groups, lr=s.BASE_LR, momentum=s.MOMENTUM, weight_decay=s.WEIGHT_DECAY)
    raise ValueError(f"SOLVER.OPTIMIZER = {s.OPTIMIZER!r} is not one of: {', '.join(OPTIMIZERS)}")


def apply_schedules(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """Set this iteration's learning rate on every group and weight decay on the decayed group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group.get("apply_weight_decay", False):
            group["weight_decay"] = weight_decay


@torch.no_grad()
def clip_grad_per_param_(parameters: Iterable[nn.Parameter], max_norm: float) -> Optional[torch.Tensor]:
    """Scale each parameter's gradient so that *its own* L2 norm is at most ``max_norm``.

    DINO clips parameter by parameter (``coef = max_norm / (norm + 1e-6)``, applied when < 1), not
    the global norm. Done with multi-tensor kernels. Returns the per-parameter norms before clipping
    (1-D tensor), or None when no parameter has a gradient.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return None
    norms = torch._foreach_norm(grads)
    # coef = max_norm / (norm + 1e-6) computed as the reference does (reciprocal, then scale), capped
    # at 1 so that unclipped gradients are multiplied by exactly 1.0.
    coefs = torch._foreach_mul(torch._foreach_reciprocal(torch._foreach_add(norms, 1e-6)), max_norm)
    torch._foreach_clamp_max_(coefs, 1.0)
    torch._foreach_mul_(grads, coefs)
    return torch.stack(norms)
