"""iBOT as a project: DINO's [CLS] self-distillation plus masked-patch self-distillation.

Zhou et al. 2022 ("iBOT: Image BERT Pre-Training with Online Tokenizer"): the student sees its global
crops with some patches replaced by a learnable mask token (``ibot_masking.py`` draws the masks)
and predicts, at every masked patch, the teacher's centered and sharpened distribution for that
patch of the unmasked crop. The patch loss has its own prototypes (``IBOT.PATCH_OUT_DIM``; or the
[CLS] ones, ``IBOT.SHARED_HEAD``), center and teacher temperature schedule, and is added to DINO's
[CLS] loss. The numerics follow the reference's ``iBOTLoss`` and ``iBOTHead`` (bytedance/ibot).

Registered on import: the meta-architecture ``iBOT`` (``MODEL.META_ARCHITECTURE``) and the schedule
``patch_teacher_temp`` (``EXTRA_SCHEDULE_REGISTRY``). Nothing in the core is edited: the trainer
calls the meta-architecture contract, the mask token enters through the ViT's ``token_mask``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dino_research.config import configurable
from dino_research.modeling import META_ARCH_REGISTRY
from dino_research.modeling.heads import DINOHead, WeightNormLinear
from dino_research.modeling.meta_arch import DINO, MultiCropNetwork
from dino_research.solver import EXTRA_SCHEDULE_REGISTRY
from dino_research.solver.schedules import PerEpochSchedule
from dino_research.utils import comm


class iBOTHead(DINOHead):
    """DINO's head applied to every token: the MLP and L2 normalization are shared, then the [CLS]
    token goes through ``last_layer`` (K prototypes) and the patch tokens through ``last_layer2``
    (``patch_out_dim`` prototypes; the same layer when ``shared``).

    ``forward(x (N, D)) -> (N, K)`` as DINO's; :meth:`forward_tokens` ``(N, 1 + T, D) -> ((N, K),
    (N, T, K2))``.
    """

    @configurable
    def __init__(self, *, patch_out_dim: int, shared: bool = False, **kwargs):
        super().__init__(**kwargs)
        if shared:
            if patch_out_dim != self.last_layer.out_features:
                raise ValueError(f"IBOT.SHARED_HEAD needs IBOT.PATCH_OUT_DIM = MODEL.HEAD.OUT_DIM "
                                 f"({self.last_layer.out_features}), got {patch_out_dim}")
            self.last_layer2 = self.last_layer
        else:
            self.last_layer2 = WeightNormLinear(self.last_layer.in_features, patch_out_dim)
            self.last_layer2.weight_g.requires_grad_(self.last_layer.weight_g.requires_grad)

    @classmethod
    def from_config(cls, cfg, in_dim: int) -> dict:
        return dict(DINOHead.from_config(cfg, in_dim), patch_out_dim=cfg.IBOT.PATCH_OUT_DIM,
                    shared=cfg.IBOT.SHARED_HEAD)

    def forward_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, t, d = tokens.shape
        x = F.normalize(self.mlp(tokens.reshape(n * t, d)), dim=-1, p=2).reshape(n, t, -1)
        return self.last_layer(x[:, 0]), self.last_layer2(x[:, 1:])


class iBOTNetwork(MultiCropNetwork):
    """A ViT backbone + :class:`iBOTHead`, with the learnable ``mask_token`` (zeros at start, as the
    reference's ``masked_embed``). The teacher has one too, never used, so that the EMA pairs the two
    networks parameter by parameter."""

    def __init__(self, backbone: nn.Module, head: iBOTHead):
        super().__init__(backbone, head)
        if not callable(getattr(backbone, "forward_features", None)) or not hasattr(backbone, "patch_size"):
            raise TypeError("iBOT needs a ViT backbone (vit_tiny, vit_small, vit_base): patch tokens and a mask token")
        self.mask_token = nn.Parameter(torch.zeros(backbone.embed_dim))

    def forward_global(self, crops: list[torch.Tensor], masks: list[torch.Tensor] | None = None):
        """Global crops (each (B, 3, H, W), one size) and optional masks (each bool (B, H/p, W/p))
        -> ([CLS] logits (G*B, K), patch logits (G*B, T, K2)), crop-major."""
        images = torch.cat(list(crops))
        mask = torch.cat(list(masks)) if masks is not None else None
        tokens = self.backbone.forward_features(images, mask, self.mask_token if mask is not None else None)
        return self.head.forward_tokens(tokens)


def ibot_patch_loss(student_patch: torch.Tensor, teacher_probs: torch.Tensor, masks: torch.Tensor,
                    student_temp: float, num_crops: int) -> torch.Tensor:
    """The masked-patch loss of iBOT's reference, for each global crop the student's masked view
    against the teacher's unmasked view of the *same* crop.

    Args:
        student_patch: (G*B, T, K2) student patch logits, crop-major.
        teacher_probs: (G*B, T, K2) the teacher's centered, sharpened patch distributions.
        masks: bool (G*B, T), the masked patches of the student's crops.
        student_temp: the student's temperature.
        num_crops: G, the number of global crops.

    Returns ``mean over crops of mean over images of [sum_t mask_t * CE_t / max(1, sum_t mask_t)]``,
    ``CE_t = -sum_k q_t,k log p_t,k``: an image without a mask contributes 0 (it still counts in
    the mean, as the reference's ``loss2.mean()``).
    """
    log_p = F.log_softmax(student_patch.float() / student_temp, dim=-1)
    cross = -(teacher_probs * log_p).sum(dim=-1)  # (G*B, T)
    m = masks.flatten(1).float()
    per_image = (cross * m).sum(dim=-1) / m.sum(dim=-1).clamp(min=1.0)
    return per_image.reshape(num_crops, -1).mean(dim=1).mean()


@META_ARCH_REGISTRY.register()
class iBOT(DINO):
    """DINO plus masked-patch self-distillation (see the module docstring).

    ``forward(batch, teacher_temp, patch_teacher_temp) -> {"loss", "cls_loss", "patch_loss",
    "teacher_out", "teacher_patch", "student_out"}`` with ``batch["masks"]`` from ``iBOTMultiCrop``
    (a batch without masks trains the [CLS] loss alone, the student seeing whole crops).
    ``after_step`` updates the teacher by EMA, the [CLS] center (DINO's loss) and the patch center.
    """

    @configurable
    def __init__(self, *, patch_center_momentum: float = 0.9, cls_weight: float = 1.0, patch_weight: float = 1.0,
                 **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= patch_center_momentum <= 1.0:
            raise ValueError(f"IBOT.PATCH_CENTER_MOMENTUM must be in [0, 1], got {patch_center_momentum}")
        self.patch_center_momentum, self.cls_weight, self.patch_weight = patch_center_momentum, cls_weight, patch_weight
        self.register_buffer("patch_center", torch.zeros(1, 1, self.student.head.last_layer2.out_features))

    @classmethod
    def build_network(cls, cfg, backbone: nn.Module) -> nn.Module:
        return iBOTNetwork(backbone, iBOTHead(cfg, in_dim=backbone.embed_dim))

    @classmethod
    def from_config(cls, cfg) -> dict:
        return dict(super().from_config(cfg), patch_center_momentum=cfg.IBOT.PATCH_CENTER_MOMENTUM,
                    cls_weight=cfg.IBOT.CLS_WEIGHT, patch_weight=cfg.IBOT.PATCH_WEIGHT)

    def forward(self, batch, teacher_temp: float, patch_teacher_temp: float = 0.07, **_) -> dict:
        crops, masks = batch["crops"], batch.get("masks")
        g = self.num_global_crops
        with torch.no_grad():
            teacher_cls, teacher_patch = self.teacher.forward_global(crops[:g])
        student_cls, student_patch = self.student.forward_global(crops[:g], masks)
        if len(crops) > g:  # local crops: [CLS] only, never masked
            student_cls = torch.cat([student_cls, self.student.head(self.student.embed(crops[g:]))])
        cls_loss = self.loss(student_cls, teacher_cls, teacher_temp, update_state=False)
        out = {"cls_loss": cls_loss.detach(), "teacher_out": teacher_cls, "teacher_patch": teacher_patch,
               "student_out": student_cls}
        if masks is None:
            out["loss"] = self.cls_weight * cls_loss
            out["patch_loss"] = torch.zeros((), device=cls_loss.device)
            return out
        with torch.autocast(device_type=student_patch.device.type, enabled=False):
            q = self.patch_teacher_probs(teacher_patch, patch_teacher_temp)
            patch_loss = ibot_patch_loss(student_patch, q, torch.cat(list(masks)), self.loss.student_temp, g)
        out["patch_loss"] = patch_loss.detach()
        out["loss"] = self.cls_weight * cls_loss + self.patch_weight * patch_loss
        return out

    def patch_teacher_probs(self, teacher_patch: torch.Tensor, temp: float) -> torch.Tensor:
        """(G*B, T, K2) logits -> centered, sharpened distributions, float32, no gradient."""
        return F.softmax((teacher_patch.detach().float() - self.patch_center) / temp, dim=-1)

    def after_step(self, outputs: list[dict], momentum: float, **values) -> None:
        super().after_step(outputs, momentum=momentum, **values)  # EMA, then the [CLS] center
        patches = torch.cat([out["teacher_patch"] for out in outputs])  # (G*B_total, T, K2)
        batch_center = patches.detach().float().mean(dim=1).mean(dim=0, keepdim=True).unsqueeze(0)
        comm.all_reduce_mean_(batch_center)
        self.patch_center.mul_(self.patch_center_momentum).add_(batch_center, alpha=1 - self.patch_center_momentum)

    def health_metrics(self, outputs: list[dict], loss: float, teacher_temp: float,
                       patch_teacher_temp: float = 0.07, **_) -> dict[str, float]:
        metrics = super().health_metrics(outputs, loss=float(np.mean([o["cls_loss"].item() for o in outputs])),
                                         teacher_temp=teacher_temp)
        probs = self.patch_teacher_probs(torch.cat([o["teacher_patch"] for o in outputs]), patch_teacher_temp)
        metrics["patch_teacher_entropy"] = float(-(probs * probs.clamp_min(1e-30).log()).sum(-1).mean())
        metrics["cls_loss"] = float(np.mean([o["cls_loss"].item() for o in outputs]))
        metrics["patch_loss"] = float(np.mean([o["patch_loss"].item() for o in outputs]))
        return metrics

    def last_layer_parameters(self) -> list[nn.Parameter]:
        head = self.student.head
        layers = (head.last_layer, head.last_layer2)  # the same layer twice when shared
        params = {id(p): p for layer in layers for p in layer.parameters() if p.requires_grad}
        return list(params.values())


@EXTRA_SCHEDULE_REGISTRY.register()
def patch_teacher_temp(cfg, iters_per_epoch: int) -> dict:
    """``patch_teacher_temp``: per epoch, linear from ``IBOT.WARMUP_PATCH_TEACHER_TEMP`` to
    ``IBOT.PATCH_TEACHER_TEMP`` over ``MODEL.LOSS.WARMUP_TEACHER_TEMP_EPOCHS``, then constant (the
    reference's ``teacher_temp2_schedule``); only for ``MODEL.META_ARCHITECTURE iBOT``."""
    if cfg.MODEL.META_ARCHITECTURE != "iBOT":
        return {}
    epochs, warmup = cfg.SOLVER.EPOCHS, cfg.MODEL.LOSS.WARMUP_TEACHER_TEMP_EPOCHS
    per_epoch = np.concatenate([np.linspace(cfg.IBOT.WARMUP_PATCH_TEACHER_TEMP, cfg.IBOT.PATCH_TEACHER_TEMP, warmup),
                                np.full(epochs - warmup, cfg.IBOT.PATCH_TEACHER_TEMP)])
    return {"patch_teacher_temp": PerEpochSchedule(lambda e: float(per_epoch[e]), iters_per_epoch)}
