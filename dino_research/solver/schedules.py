"""Per-iteration schedules built on fvcore's param schedulers.

fvcore's schedulers map a training fraction ``where`` in [0, 1) to a value; :class:`StepSchedule`
maps an integer step to ``where`` and adds DINO's linear warmup, with the reference's exact values:
the warmup is ``linspace(warmup_start, peak, warmup_steps)`` (the last warmup step already at the
peak), then the main shape runs over the remaining steps, ``where = (step - warmup) / remaining``.
"""

from __future__ import annotations

from fvcore.common.param_scheduler import (
    ConstantParamScheduler,
    CosineParamScheduler,
    LinearParamScheduler,
    ParamScheduler,
)

from .build import SCHEDULER_REGISTRY


class StepSchedule:
    """``schedule(step) -> float`` for integer ``step`` in ``[0, total_steps)``.

    Args:
        main: fvcore scheduler for the steps after warmup; ``main(0)`` is the peak value.
        total_steps: number of steps, warmup included.
        warmup_steps: steps of linear warmup from ``warmup_start_value`` to the peak (0: none).
    """

    def __init__(self, main: ParamScheduler, total_steps: int, warmup_steps: int = 0,
                 warmup_start_value: float = 0.0):
        if total_steps <= 0 or not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"need 0 <= warmup_steps ({warmup_steps}) <= total_steps ({total_steps}), total > 0")
        self.main, self.total_steps, self.warmup_steps = main, total_steps, warmup_steps
        self.warmup = LinearParamScheduler(warmup_start_value, main(0.0))

    def __call__(self, step: int) -> float:
        if not 0 <= step < self.total_steps:
            raise IndexError(f"step {step} outside the schedule's [0, {self.total_steps})")
        if step < self.warmup_steps:
            return float(self.warmup(step / max(self.warmup_steps - 1, 1)))
        return float(self.main((step - self.warmup_steps) / (self.total_steps - self.warmup_steps)))


class PerEpochSchedule:
    """Evaluate an epoch-indexed schedule at ``iteration // iters_per_epoch`` (a value per epoch)."""

    def __init__(self, epoch_schedule: StepSchedule, iters_per_epoch: int):
        self.epoch_schedule, self.iters_per_epoch = epoch_schedule, iters_per_epoch

    def __call__(self, iteration: int) -> float:
        return self.epoch_schedule(iteration // self.iters_per_epoch)


@SCHEDULER_REGISTRY.register()
def cosine(start_value: float, end_value: float, total_steps: int, warmup_steps: int = 0,
           warmup_start_value: float = 0.0) -> StepSchedule:
    """Half-cosine from ``start_value`` to ``end_value`` after an optional linear warmup."""
    return StepSchedule(CosineParamScheduler(start_value, end_value), total_steps, warmup_steps, warmup_start_value)


@SCHEDULER_REGISTRY.register()
def linear(start_value: float, end_value: float, total_steps: int, warmup_steps: int = 0,
           warmup_start_value: float = 0.0) -> StepSchedule:
    """Straight line from ``start_value`` to ``end_value`` after an optional linear warmup."""
    return StepSchedule(LinearParamScheduler(start_value, end_value), total_steps, warmup_steps, warmup_start_value)


@SCHEDULER_REGISTRY.register()
def constant(start_value: float, end_value: float, total_steps: int, warmup_steps: int = 0,
             warmup_start_value: float = 0.0) -> StepSchedule:
    """``start_value`` after an optional linear warmup (``end_value`` is ignored)."""
    return StepSchedule(ConstantParamScheduler(start_value), total_steps, warmup_steps, warmup_start_value)
