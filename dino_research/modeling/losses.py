"""DINO's self-distillation loss with the centered, sharpened teacher."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import configurable
from ..config.checks import check_value
from ..utils import comm
from .build import LOSS_REGISTRY


@LOSS_REGISTRY.register()
class DINOLoss(nn.Module):
    """Cross-entropy between the teacher's and the student's softmax outputs over all view pairs.

    For teacher view i (a global crop) and student view v with v != i::

        CE(i, v) = mean_b sum_k  -q_i[b, k] * log p_v[b, k]
        q_i = softmax((teacher_out_i - center) / teacher_temp),  detached
        p_v = softmax(student_out_v / student_temp)

    and the loss is the mean of CE over the ``n_global * n_crops - n_global`` pairs (18 for 2 global
    + 8 local crops). Centering (subtracting a running mean of teacher outputs) and sharpening (a low
    teacher temperature) are the two forces that together avoid collapse.

    The center is a ``(1, K)`` float32 buffer updated after each loss as
    ``center = m * center + (1 - m) * mean(teacher_out)``, the mean taken over the local batch and
    then averaged over ranks when a process group exists.
    """

    @configurable
    def __init__(self, *, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 num_global_crops: int = 2):
        super().__init__()
        check_value("MODEL.LOSS.STUDENT_TEMP", student_temp)
        check_value("MODEL.LOSS.CENTER_MOMENTUM", center_momentum)
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.num_global_crops = num_global_crops
        self.register_buffer("center", torch.zeros(1, out_dim))

    @classmethod
    def from_config(cls, cfg) -> dict:
        return dict(
            out_dim=cfg.MODEL.HEAD.OUT_DIM,
            student_temp=cfg.MODEL.LOSS.STUDENT_TEMP,
            center_momentum=cfg.MODEL.LOSS.CENTER_MOMENTUM,
        )

    def teacher_probs(self, teacher_out: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """``(n_global*B, K)`` logits -> centered, sharpened probabilities, float32, no gradient."""
        return F.softmax((teacher_out.detach().float() - self.center) / teacher_temp, dim=-1)

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, teacher_temp: float,
                update_state: bool = True) -> torch.Tensor:
        """``student_out (n_crops*B, K)``, ``teacher_out (n_global*B, K)``, crop-major -> scalar."""
        n_global = self.num_global_crops
        if teacher_out.shape[0] % n_global or teacher_out.shape[1:] != student_out.shape[1:]:
            raise ValueError(
                f"teacher_out {tuple(teacher_out.shape)} must be ({n_global}*B, K) and match the K of "
                f"student_out {tuple(student_out.shape)}"
            )
        batch = teacher_out.shape[0] // n_global
        if student_out.shape[0] % batch or student_out.shape[0] < teacher_out.shape[0]:
            raise ValueError(
                f"student_out {tuple(student_out.shape)} must hold n_crops >= {n_global} crops of the "
                f"teacher's batch B={batch}"
            )
        n_crops = student_out.shape[0] // batch
        # The sums below run over B*K terms: keep them in float32 even inside an autocast region,
        # where a matmul would otherwise run in bfloat16/float16.
        with torch.autocast(device_type=student_out.device.type, enabled=False):
            log_p = F.log_softmax(student_out.float() / self.student_temp, dim=-1)
            q = self.teacher_probs(teacher_out, teacher_temp)
            # cross[i, v] = -(1/B) sum_{b,k} q_i[b,k] log p_v[b,k]: every pair in one matmul.
            cross = -(q.reshape(n_global, -1) @ log_p.reshape(n_crops, -1).T) / batch
            # A teacher view is never compared with the same view seen by the student.
            not_same_view = ~torch.eye(n_global, n_crops, dtype=torch.bool, device=cross.device)
            loss = cross[not_same_view].mean()
        if update_state:
            self.update_state(teacher_out)
        return loss

    @torch.no_grad()
    def update_state(self, teacher_out: torch.Tensor) -> None:
        """EMA of the center towards ``teacher_out``'s batch mean (averaged over ranks)."""
        batch_center = teacher_out.detach().float().mean(dim=0, keepdim=True)
        comm.all_reduce_mean_(batch_center)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1.0 - self.center_momentum)
