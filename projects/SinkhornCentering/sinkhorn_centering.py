"""DINO with Sinkhorn-Knopp teacher centering instead of the running-mean center.

DINO keeps the teacher from collapsing by subtracting a running mean of its outputs (the center)
before a sharp softmax. SwAV (Caron et al. 2020) and DINOv2 (Oquab et al. 2023) instead turn the
teacher's batch of logits into an assignment in which every prototype gets the same share of the
batch, with a few Sinkhorn-Knopp normalizations; there is no state to carry between steps.

Registered as ``MODEL.LOSS.NAME DINOSinkhornLoss``: the same cross-entropy over all
(teacher view, student view) pairs as ``DINOLoss``, only ``teacher_probs`` differs. Its one setting
is a config key this project adds, ``SINKHORN.ITERATIONS``. The core is not edited: the config
names this file in ``IMPORTS``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dino_research.config import CfgNode, configurable, register_config_extension
from dino_research.modeling import LOSS_REGISTRY
from dino_research.modeling.losses import DINOLoss
from dino_research.utils import comm


@register_config_extension
def add_sinkhorn_config(cfg: CfgNode) -> None:
    """This project's keys (added to the defaults once this module is imported)."""
    cfg.SINKHORN = CfgNode()
    # Sinkhorn-Knopp normalization rounds per step (DINOv2: 3). More balance the prototypes more
    # exactly at a small cost; 1 already removes most of a dominant prototype's share.
    cfg.SINKHORN.ITERATIONS = 3


@torch.no_grad()
def sinkhorn_knopp(teacher_out: torch.Tensor, teacher_temp: float, iterations: int = 3) -> torch.Tensor:
    """Logits ``(N, K)`` of this rank -> probabilities ``(N, K)``, every row summing to 1.

    ``Q = exp(teacher_out / teacher_temp)`` over the whole batch of all ranks (``N_total`` rows), then
    ``iterations`` rounds of: scale each prototype (column) to total mass ``N_total / K``, then each
    sample (row) to mass 1. The sums run over all ranks, so 2 ranks with half the batch each get
    what one process gets with the whole batch. Computed on log Q in float32, so sharp logits
    (a low ``teacher_temp``) neither overflow nor leave a prototype or a sample with zero mass; no
    gradient.
    """
    log_q = teacher_out.detach().float() / teacher_temp
    n_total = torch.tensor([float(log_q.shape[0])], device=log_q.device)
    if comm.get_world_size() > 1:
        dist.all_reduce(n_total)
    log_column_target = torch.log(n_total / log_q.shape[1])
    for _ in range(iterations):
        log_q = log_q - _column_logsumexp(log_q) + log_column_target
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True)
    return log_q.exp()


def _column_logsumexp(log_q: torch.Tensor) -> torch.Tensor:
    """``log sum_rows exp(log_q)`` per column, ``(1, K)``, the rows of every rank included."""
    peak = log_q.max(dim=0, keepdim=True).values
    distributed = comm.get_world_size() > 1
    if distributed:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    mass = torch.exp(log_q - peak).sum(dim=0, keepdim=True)
    if distributed:
        dist.all_reduce(mass)
    return peak + mass.log()


@LOSS_REGISTRY.register()
class DINOSinkhornLoss(DINOLoss):
    """``DINOLoss`` whose teacher targets come from :func:`sinkhorn_knopp` instead of
    ``softmax((teacher_out - center) / teacher_temp)``. There is no running state: no ``center``
    buffer, and ``update_state`` does nothing.

    ``sinkhorn_iterations``: ``SINKHORN.ITERATIONS`` (this project's key) when built from a config.
    """

    @configurable
    def __init__(self, *, sinkhorn_iterations: int = 3, **kwargs):
        super().__init__(out_dim=1, **kwargs)
        del self.center  # DINOLoss's running center: Sinkhorn-Knopp needs none
        if sinkhorn_iterations < 1:
            raise ValueError(f"SINKHORN.ITERATIONS must be >= 1, got {sinkhorn_iterations}")
        self.sinkhorn_iterations = sinkhorn_iterations

    @classmethod
    def from_config(cls, cfg) -> dict:
        kwargs = DINOLoss.from_config(cfg)
        kwargs.pop("out_dim")
        return dict(kwargs, sinkhorn_iterations=cfg.SINKHORN.ITERATIONS)

    def teacher_probs(self, teacher_out: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        return sinkhorn_knopp(teacher_out, teacher_temp, self.sinkhorn_iterations)

    @torch.no_grad()
    def update_state(self, teacher_out: torch.Tensor) -> None:
        """No running statistics: Sinkhorn-Knopp balances each batch on its own."""
