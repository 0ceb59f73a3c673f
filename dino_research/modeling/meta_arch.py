"""Meta-architectures: the contract the trainer talks to (:class:`MetaArchitecture`) and DINO.

The trainer, the hooks, the health metrics and the checkpoint loader call only the methods of
:class:`MetaArchitecture` (see ``META_ARCH_REGISTRY``'s docstring); a new method (iBOT, a project)
subclasses it, or :class:`DINO`, and registers. Nothing outside this file reaches into DINO's
student, teacher or loss.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from ..config import configurable
from .build import META_ARCH_REGISTRY, build_backbone, build_ema, build_head, build_loss


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
        return self.head(self.embed(crops))

    def compile_backbone(self, dynamic: bool) -> None:
        """Run :meth:`embed`'s backbone passes through ``torch.compile(self.backbone)``.

        The compiled wrapper is kept outside the module tree (not a submodule): state-dict keys,
        ``.backbone`` (what evaluations and exports use, uncompiled) and checkpoints are unchanged.
        """
        object.__setattr__(self, "_compiled_backbone", torch.compile(self.backbone, dynamic=dynamic))

    def embed(self, crops: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """The backbone's embeddings of ``crops``, ``(len(crops)*B, D)``, crop-major."""
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        backbone = self.__dict__.get("_compiled_backbone")
        backbone = self.backbone if backbone is None else backbone
        embeddings, start = [], 0
        for end in range(1, len(crops) + 1):
            if end == len(crops) or crops[end].shape[-2:] != crops[start].shape[-2:]:
                batch = crops[start] if end - start == 1 else torch.cat(list(crops[start:end]))
                embeddings.append(backbone(batch))
                start = end
        return torch.cat(embeddings) if len(embeddings) > 1 else embeddings[0]


def crops_of(batch) -> list:
    """The crops of a batch: ``batch["crops"]`` of a dict batch, or the batch itself (a list)."""
    return batch["crops"] if isinstance(batch, dict) else batch


class MetaArchitecture(nn.Module):
    """What the trainer, hooks, health metrics and checkpoint loader may call on a model.

    Subclasses implement :meth:`forward` and :meth:`backbone_for_eval`; the rest have defaults for a
    model with no teacher and no state. Schedule values (``momentum``, ``teacher_temp`` and any a
    project adds, see ``solver.SCHEDULE_REGISTRY``) arrive as keyword arguments; accept ``**_`` for
    the ones a model does not use.
    """

    def forward(self, batch, **schedule_values) -> dict:
        """``batch``: a dict with ``"crops"`` (list of (B, 3, h_i, w_i), global crops first) and what
        the augmentation or collate step added; -> dict with ``"loss"`` (scalar with gradient) and
        whatever :meth:`after_step` and :meth:`health_metrics` need."""
        raise NotImplementedError

    def after_step(self, outputs: list[dict], **schedule_values) -> None:
        """Once per optimizer step, after it, with the :meth:`forward` outputs of every micro-batch
        of the step (``"loss"`` removed): teacher EMA and state updates. Every rank must stay equal."""

    def health_metrics(self, outputs: list[dict], loss: float, **schedule_values) -> dict[str, float]:
        """Scalars logged at log periods (collapse indicators); called before :meth:`after_step`."""
        return {}

    def backbone_for_eval(self) -> nn.Module:
        """The backbone that evaluations score and exports write (DINO: the teacher's)."""
        raise NotImplementedError

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """Parameters that get no update during ``SOLVER.FREEZE_LAST_LAYER_EPOCHS``."""
        return []

    def load_weights(self, kind: str, state: dict, source: str, partial: bool) -> None:
        """Initialize from a weights file (``MODEL.WEIGHTS``) that is not a checkpoint of this
        library: ``kind`` is ``"backbone"`` (a plain backbone state dict) or ``"official_full"`` (the
        reference's ``student``/``teacher``/``dino_loss`` layout); see ``checkpoint.weights_format``."""
        from ..checkpoint import CheckpointError

        raise CheckpointError(f"{source}: {type(self).__name__} cannot be initialized from a {kind} file")


@META_ARCH_REGISTRY.register()
class DINO(MetaArchitecture):
    """Self-distillation with no labels.

    The student (backbone with stochastic depth + head) is trained by gradient descent to match
    the teacher's centered, sharpened outputs; the teacher has the same architecture without
    stochastic depth, starts as an exact copy of the student and never receives gradients: it
    follows the student by EMA (``MODEL.TEACHER.EMA``) in :meth:`after_step`.

    ``forward(batch, teacher_temp) -> {"loss", "teacher_out", "student_out"}``. The teacher sees only
    the global crops, the student all of them: matching local to global views is what teaches
    local-to-global correspondence. The loss's center is updated in :meth:`after_step`, once per
    optimizer step (not per micro-batch).
    """

    @configurable
    def __init__(self, *, student: MultiCropNetwork, teacher: MultiCropNetwork, loss: nn.Module,
                 num_global_crops: int = 2, ema_factory: Optional[Callable] = None):
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.loss = loss
        self.num_global_crops = num_global_crops
        # The teacher starts as an exact copy of the student (parameters and buffers).
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        # The EMA rule keeps references to tensors, so it is built on first use, once the model is on
        # its device (Module.to replaces buffers). Not a module: no state to checkpoint.
        self._ema_factory = ema_factory
        self._ema = None

    @classmethod
    def build_network(cls, cfg, backbone: nn.Module) -> nn.Module:
        """Backbone + head of one of the two networks; a subclass with another head overrides this
        (iBOT's patch head) and keeps the rest of :meth:`from_config`."""
        return MultiCropNetwork(backbone, build_head(cfg, in_dim=backbone.embed_dim))

    @classmethod
    def from_config(cls, cfg) -> dict:
        student, teacher = (cls.build_network(cfg, build_backbone(cfg, drop_path_rate=rate))
                            for rate in (cfg.MODEL.BACKBONE.DROP_PATH_RATE, 0.0))  # no drop path in the teacher
        return dict(student=student, teacher=teacher, loss=build_loss(cfg),
                    ema_factory=lambda student, teacher: build_ema(cfg, student, teacher))

    def forward(self, batch, teacher_temp: float, **_) -> dict[str, torch.Tensor]:
        crops = crops_of(batch)
        if len(crops) < self.num_global_crops:
            raise ValueError(f"DINO needs at least {self.num_global_crops} crops, got {len(crops)}")
        with torch.no_grad():
            teacher_out = self.teacher(crops[: self.num_global_crops])
        student_out = self.student(crops)
        loss = self.loss(student_out, teacher_out, teacher_temp, update_state=False)
        return {"loss": loss, "teacher_out": teacher_out, "student_out": student_out}

    @property
    def ema(self):
        """The teacher update rule (``MODEL.TEACHER.EMA``) pairing student and teacher, built on first use."""
        if self._ema is None:
            if self._ema_factory is None:
                from .ema import ParamEMA

                self._ema = ParamEMA(None, self.student, self.teacher)
            else:
                self._ema = self._ema_factory(self.student, self.teacher)
        return self._ema

    def _apply(self, fn, recurse: bool = True):
        self._ema = None  # .to(device) replaces buffers: pair the new tensors at the next update
        return super()._apply(fn, recurse)

    @staticmethod
    def teacher_outputs(outputs: list[dict]) -> torch.Tensor:
        """The teacher logits of all micro-batches of a step, ``(n_global * B_total, K)``."""
        parts = [out["teacher_out"] for out in outputs]
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def after_step(self, outputs: list[dict], momentum: float, **_) -> None:
        # Teacher EMA, then the center, once per optimizer step (the reference's order).
        self.ema.update(momentum)
        self.loss.update_state(self.teacher_outputs(outputs))

    def health_metrics(self, outputs: list[dict], loss: float, teacher_temp: float, **_) -> dict[str, float]:
        from ..engine.health import collapse_indicators

        return collapse_indicators(self.loss, self.teacher_outputs(outputs), teacher_temp, loss)

    def backbone_for_eval(self) -> nn.Module:
        return self.teacher.backbone

    def last_layer_parameters(self) -> list[nn.Parameter]:
        last = getattr(self.student.head, "last_layer", None)
        return [] if last is None else [p for p in last.parameters() if p.requires_grad]

    def load_weights(self, kind: str, state: dict, source: str, partial: bool) -> None:
        from ..checkpoint.checkpointer import load_backbone_into_networks, load_official_full

        if kind == "official_full":
            load_official_full(self.student, self.teacher, self.loss, state, source, partial)
        elif kind == "backbone":
            load_backbone_into_networks((self.student, self.teacher), state, source, partial)
        else:
            super().load_weights(kind, state, source, partial)
