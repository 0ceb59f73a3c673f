"""Registries: unknown names list what is registered; an outside component trains end to end."""

import pytest
import torch
import torch.nn as nn

from dino_research.data import AUGMENTATION_REGISTRY, DATASET_REGISTRY, build_augmentation
from dino_research.modeling import (
    BACKBONE_REGISTRY,
    HEAD_REGISTRY,
    LOSS_REGISTRY,
    META_ARCH_REGISTRY,
    build_backbone,
    build_head,
    build_loss,
    build_model,
)
from dino_research.solver import SCHEDULER_REGISTRY, apply_schedules, build_optimizer, build_schedules


@BACKBONE_REGISTRY.register()
class ToyConvBackbone(nn.Module):
    """A backbone defined outside the package: conv + global pooling, any input size."""

    def __init__(self, cfg, drop_path_rate: float):
        super().__init__()
        self.embed_dim = 8
        self.conv = nn.Conv2d(3, self.embed_dim, 3, padding=1)

    def forward(self, x):
        return self.conv(x).relu().mean(dim=(2, 3))


@pytest.mark.parametrize(
    "registry,key,builder",
    [
        (BACKBONE_REGISTRY, "MODEL.BACKBONE.NAME", lambda cfg: build_backbone(cfg)),
        (HEAD_REGISTRY, "MODEL.HEAD.NAME", lambda cfg: build_head(cfg, in_dim=4)),
        (LOSS_REGISTRY, "MODEL.LOSS.NAME", build_loss),
        (META_ARCH_REGISTRY, "MODEL.META_ARCHITECTURE", build_model),
        (AUGMENTATION_REGISTRY, "INPUT.AUGMENTATION", build_augmentation),
    ],
)
def test_unknown_name_lists_registered_names(make_tiny_cfg, registry, key, builder):
    cfg = make_tiny_cfg(**{key: "DoesNotExist"})
    with pytest.raises(KeyError) as e:
        builder(cfg)
    message = str(e.value)
    assert key in message and "DoesNotExist" in message
    assert ", ".join(sorted(dict(registry))) in message


def test_expected_components_are_registered():
    assert {"vit_tiny", "vit_small", "vit_base", "resnet50", "timm"} <= set(dict(BACKBONE_REGISTRY))
    assert "DINOHead" in dict(HEAD_REGISTRY) and "DINOLoss" in dict(LOSS_REGISTRY)
    assert "DINO" in dict(META_ARCH_REGISTRY) and "DINOMultiCrop" in dict(AUGMENTATION_REGISTRY)
    assert {"ImageFolder", "Synthetic"} <= set(dict(DATASET_REGISTRY))
    assert {"cosine", "linear", "constant"} <= set(dict(SCHEDULER_REGISTRY))


def test_outside_backbone_trains_with_the_dino_recipe(make_tiny_cfg):
    """Build DINO around the toy backbone and run a few optimizer steps as the trainer will."""
    from dino_research.modeling import build_ema

    cfg = make_tiny_cfg(**{"MODEL.BACKBONE.NAME": "ToyConvBackbone", "SOLVER.EPOCHS": "1",
                           "SOLVER.WARMUP_EPOCHS": "0", "SOLVER.FREEZE_LAST_LAYER_EPOCHS": "0"})
    model = build_model(cfg)
    assert isinstance(model.student.backbone, ToyConvBackbone)
    optimizer, ema = build_optimizer(cfg, model), build_ema(cfg, model.student, model.teacher)
    schedules = build_schedules(cfg, iters_per_epoch=4, world_size=1)
    torch.manual_seed(0)
    images = torch.rand(4, 3, 32, 32)
    crops = [images, images.flip(-1), images[..., :16, :16], images[..., 16:, 16:]]
    teacher_before = [p.clone() for p in model.teacher.parameters()]
    losses = []
    for it in range(4):
        apply_schedules(optimizer, schedules["lr"](it), schedules["weight_decay"](it))
        out = model(crops, teacher_temp=schedules["teacher_temp"](it))
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        ema.update(schedules["momentum"](it))
        model.loss.update_state(out["teacher_out"])
        losses.append(out["loss"].item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(a, b) for a, b in zip(teacher_before, model.teacher.parameters()))
    assert torch.count_nonzero(model.loss.center) > 0
    assert model.student.backbone.conv.weight.grad is not None
