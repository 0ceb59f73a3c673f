"""Teacher update rules: how one momentum value moves the teacher towards the student."""

from __future__ import annotations

import torch
import torch.nn as nn

from .build import EMA_REGISTRY


def _paired(student_items, teacher_items, what: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Pair tensors by name, checking that both models have the same ``what`` with the same shapes."""
    s, t = dict(student_items), dict(teacher_items)
    if s.keys() != t.keys():
        diff = sorted(set(s) ^ set(t))[:5]
        raise ValueError(f"student and teacher {what} differ (e.g. {diff}): they must share one architecture")
    names = list(s)
    for n in names:
        if s[n].shape != t[n].shape:
            raise ValueError(f"{what} {n}: student {tuple(s[n].shape)} vs teacher {tuple(t[n].shape)}")
    return [s[n] for n in names], [t[n] for n in names]


@EMA_REGISTRY.register()
class ParamEMA:
    """DINO's rule: ``t = m * t + (1 - m) * s`` for every parameter; buffers are left untouched.

    The update is two multi-tensor (``torch._foreach_*``) kernels over all parameters at once,
    with the reference's operation order (scale the teacher, then add the scaled student).
    """

    def __init__(self, cfg, student: nn.Module, teacher: nn.Module):
        self.student_params, self.teacher_params = _paired(
            student.named_parameters(), teacher.named_parameters(), "parameters"
        )

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"teacher momentum must be in [0, 1], got {momentum}")
        torch._foreach_mul_(self.teacher_params, momentum)
        torch._foreach_add_(self.teacher_params, self.student_params, alpha=1.0 - momentum)


@EMA_REGISTRY.register()
class ParamAndBufferEMA(ParamEMA):
    """DINO's rule on parameters *and* floating buffers (BatchNorm running statistics).

    For BatchNorm backbones the teacher otherwise keeps normalizing with its own running
    statistics, gathered on global crops only. Integer buffers (``num_batches_tracked``) are copied.
    """

    def __init__(self, cfg, student: nn.Module, teacher: nn.Module):
        super().__init__(cfg, student, teacher)
        s_bufs, t_bufs = _paired(student.named_buffers(), teacher.named_buffers(), "buffers")
        float_pairs = [(s, t) for s, t in zip(s_bufs, t_bufs) if t.is_floating_point()]
        self.student_float_buffers = [s for s, _ in float_pairs]
        self.teacher_float_buffers = [t for _, t in float_pairs]
        self.other_pairs = [(s, t) for s, t in zip(s_bufs, t_bufs) if not t.is_floating_point()]

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        super().update(momentum)
        if self.teacher_float_buffers:
            torch._foreach_mul_(self.teacher_float_buffers, momentum)
            torch._foreach_add_(self.teacher_float_buffers, self.student_float_buffers, alpha=1.0 - momentum)
        for s, t in self.other_pairs:
            t.copy_(s)
