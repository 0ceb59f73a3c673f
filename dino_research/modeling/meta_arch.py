"""The DINO meta-architecture: a student and its EMA teacher, each a backbone + head."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..config import configurable
from .build import META_ARCH_REGISTRY, build_backbone, build_head, build_loss


class MultiCropNetwork(nn.Module):
    """``backbone`` + ``head`` applied to a list of crops of possibly different resolutions.

    Consecutive crops of the same resolution are concatenated and go through the backbone in one
    pass (two global 224 crops: one pass; eight local 96 crops: one pass); the head then runs once
    over all embeddings. ``forward(crops: list of (B, 3, h_i, w_i)) -> (len(crops)*B, K)``,
    crop-major. The attribute names give the reference checkpoints' ``backbone.*``/``head.*`` keys.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        embeddings, start = [], 0
        for end in range(1, len(crops) + 1):
            if end == len(crops) or crops[end].shape[-2:] != crops[start].shape[-2:]:
                batch = crops[start] if end - start == 1 else torch.cat(list(crops[start:end]))
                embeddings.append(self.backbone(batch))
                start = end
        return self.head(torch.cat(embeddings) if len(embeddings) > 1 else embeddings[0])


@META_ARCH_REGISTRY.register()
class DINO(nn.Module):
    """Self-distillation with no labels.

    The student (backbone with stochastic depth + head) is trained by gradient descent to match
    the teacher's centered, sharpened outputs; the teacher has the same architecture without
    stochastic depth, starts as an exact copy of the student and never receives gradients: it
    follows the student by EMA (``MODEL.TEACHER.EMA``, applied by the trainer).

    ``forward(crops, teacher_temp) -> {"loss", "teacher_out", "student_out"}`` where ``crops`` is
    the augmentation's list, global crops first. The teacher sees only the global crops, the student
    all of them: matching local to global views is what teaches local-to-global correspondence.
    The loss's center is *not* updated here; the trainer calls ``loss.update_state`` once per
    optimizer step.
    """

    @configurable
    def __init__(self, *, student: MultiCropNetwork, teacher: MultiCropNetwork, loss: nn.Module,
                 num_global_crops: int = 2):
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.loss = loss
        self.num_global_crops = num_global_crops
        # The teacher starts as an exact copy of the student (parameters and buffers).
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)

    @classmethod
    def from_config(cls, cfg) -> dict:
        nets = []
        for drop_path_rate in (cfg.MODEL.BACKBONE.DROP_PATH_RATE, 0.0):  # student, teacher
            backbone = build_backbone(cfg, drop_path_rate=drop_path_rate)
            nets.append(MultiCropNetwork(backbone, build_head(cfg, in_dim=backbone.embed_dim)))
        return dict(student=nets[0], teacher=nets[1], loss=build_loss(cfg))

    def forward(self, crops: Sequence[torch.Tensor], teacher_temp: float) -> dict[str, torch.Tensor]:
        if len(crops) < self.num_global_crops:
            raise ValueError(f"DINO needs at least {self.num_global_crops} crops, got {len(crops)}")
        with torch.no_grad():
            teacher_out = self.teacher(crops[: self.num_global_crops])
        student_out = self.student(crops)
        loss = self.loss(student_out, teacher_out, teacher_temp, update_state=False)
        return {"loss": loss, "teacher_out": teacher_out, "student_out": student_out}

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """Student parameters that get no update during ``SOLVER.FREEZE_LAST_LAYER_EPOCHS``."""
        last = getattr(self.student.head, "last_layer", None)
        return [] if last is None else [p for p in last.parameters() if p.requires_grad]
