"""Numerical health of a DINO run: collapse indicators, and NaN/inf checks of the loss, gradients and
weights.

Functions of the model's tensors; the trainer decides what to do with the answers (log, skip a
step, stop). :func:`finite_on_all_ranks` is the one collective here.
"""

from __future__ import annotations

import logging
import math
from typing import Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ..utils.errors import UserError

logger = logging.getLogger("dino_research")


class NonFiniteLossError(UserError, FloatingPointError):
    """The loss or the gradients became NaN or infinite (more often than ``SOLVER.SKIP_NONFINITE``
    allows); raised before the optimizer step, so neither the weights nor any checkpoint is corrupted.
    A :class:`UserError`: its message names the iteration, the last good checkpoint and the fixes,
    which is all a traceback would add."""


def finite_on_all_ranks(value: float, world_size: int, device: torch.device) -> bool:
    """Whether ``value`` is finite on every rank (an all-reduce MIN when ``world_size`` > 1).

    Every rank must take the same skip-or-stop decision: a rank that stopped alone would leave the
    others waiting in DDP's gradient all-reduce until the process-group timeout.
    """
    finite = math.isfinite(value)
    if world_size > 1:
        flag = torch.tensor([int(finite)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        finite = bool(flag.item())
    return finite


@torch.no_grad()
def collapse_indicators(loss_module: nn.Module, teacher_out: torch.Tensor, teacher_temp: float,
                        loss: float) -> dict:
    """Teacher entropy, KL(teacher || student) and center norm: DINO's collapse indicators.

    ``teacher_out`` (n_global * B, K) are the teacher's logits of this rank's batch; ``loss`` the
    step's loss. Uniform collapse drives the teacher's entropy to ln K, one-dimension collapse to 0
    (warned about only when the images also agree on the dimension: a sharp, diverse teacher is healthy);
    in both the KL between teacher and student goes to 0. The loss averages the cross-entropy
    H(q, p) = H(q) + KL(q || p) over pairs, so KL = loss - mean H(q). Logs a warning near either
    collapse, with the knob to turn.
    """
    probs = loss_module.teacher_probs(teacher_out, teacher_temp)
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1).mean().item()
    max_entropy = math.log(probs.shape[-1])
    if entropy > 0.95 * max_entropy:
        logger.warning("teacher entropy %.3f is close to ln K = %.3f: outputs near uniform (collapse?). "
                       "Lower MODEL.LOSS.TEACHER_TEMP or check the centering.", entropy, max_entropy)
    elif entropy < 0.01 * max_entropy:
        # Sharp outputs alone are what a low teacher temperature asks for; one-dimension collapse is
        # every image choosing the *same* dimension: the batch's mean distribution is sharp too.
        mean_probs = probs.mean(0)
        batch_entropy = -(mean_probs * mean_probs.clamp_min(1e-30).log()).sum().item()
        if batch_entropy < 0.01 * max_entropy:
            logger.warning("teacher entropy %.4f is close to 0 and every image of the batch picks the same "
                           "dimension (entropy of their mean %.4f): one dimension dominates (collapse?). "
                           "Centering is not keeping up: lower MODEL.LOSS.CENTER_MOMENTUM or raise "
                           "MODEL.LOSS.TEACHER_TEMP.", entropy, batch_entropy)
    metrics = {"teacher_entropy": entropy, "kl_teacher_student": loss - entropy}
    center = getattr(loss_module, "center", None)
    if isinstance(center, torch.Tensor):  # a loss without a running center (Sinkhorn) has none to report
        metrics["center_norm"] = center.norm().item()
    return metrics


@torch.no_grad()
def gradient_fault(params: Iterable[nn.Parameter], norms: Optional[torch.Tensor] = None) -> Optional[str]:
    """"K of N gradients are non-finite", or None when every gradient of ``params`` is finite.

    ``norms`` (N,): the per-parameter gradient norms when already computed (by the clipping);
    else they are computed here. One device sync. Under DDP gradients are all-reduced before this,
    so every rank gets the same answer.
    """
    if norms is None:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return None
        norms = torch.stack(torch._foreach_norm(grads))
    bad = int((~torch.isfinite(norms)).sum())
    return f"{bad} of {norms.numel()} gradients are non-finite" if bad else None


@torch.no_grad()
def state_is_finite(module: nn.Module) -> bool:
    """True when every floating tensor of ``module.state_dict()`` (weights and buffers) is finite."""
    flags = [torch.isfinite(t).all() for t in module.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True  # one device sync
