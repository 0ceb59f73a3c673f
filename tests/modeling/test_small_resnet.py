"""The CIFAR-style ResNet: contract shapes, stride-1 stem, depths, and its BatchNorm statistics
followed by the teacher through ParamAndBufferEMA."""

import pytest
import torch
from step_compare import assert_same_loss_and_gradients

from dino_research.modeling import build_backbone, build_ema, build_model
from dino_research.modeling.small_resnet import CifarResNet


def _cfg(make_tiny_cfg, depth=18, width=8):
    return make_tiny_cfg(**{"MODEL.BACKBONE.NAME": "cifar_resnet", "MODEL.BACKBONE.DEPTH": str(depth),
                            "MODEL.BACKBONE.RESNET_WIDTH": str(width), "MODEL.TEACHER.EMA": "ParamAndBufferEMA"})


@pytest.mark.parametrize("depth,width,dim,blocks", [(18, 8, 64, 8), (34, 4, 32, 16), (50, 4, 128, 16)])
def test_shapes_and_depths(make_tiny_cfg, depth, width, dim, blocks):
    net = build_backbone(_cfg(make_tiny_cfg, depth, width))
    assert net.embed_dim == dim
    assert sum(len(stage) for stage in net.stages) == blocks
    for size in (28, 14, 32):  # global and local crops of Fashion-MNIST, CIFAR
        assert net(torch.randn(2, 3, size, size)).shape == (2, dim)
    # Stride-1 3x3 stem, no max-pool: a 28-pixel image keeps 28x28 maps in the first stage, 4x4 at the end.
    assert net.stem(torch.randn(1, 3, 28, 28)).shape[-2:] == (28, 28)
    assert net.forward_feature_map(torch.randn(1, 3, 28, 28)).shape == (1, dim, 4, 4)


def test_bad_depth_names_the_key(make_tiny_cfg):
    with pytest.raises(ValueError, match=r"MODEL.BACKBONE.DEPTH = 4: cifar_resnet has depths \[18, 34, 50\]"):
        build_backbone(_cfg(make_tiny_cfg, depth=4))
    with pytest.raises(ValueError, match="width must be >= 1"):
        CifarResNet(18, 0)


def test_teacher_batchnorm_statistics_follow_the_student_by_ema(make_tiny_cfg):
    model = build_model(_cfg(make_tiny_cfg))
    ema = build_ema(_cfg(make_tiny_cfg), model.student, model.teacher)
    model.student.train()
    model.student(torch.randn(4, 3, 28, 28) * 3 + 1)  # moves the student's running statistics
    s_bn, t_bn = model.student.backbone.stem[1], model.teacher.backbone.stem[1]
    before = t_bn.running_mean.clone()
    ema.update(0.9)
    # t = 0.9 t + 0.1 s, for buffers as for parameters; the batch counter is copied.
    torch.testing.assert_close(t_bn.running_mean, 0.9 * before + 0.1 * s_bn.running_mean)
    assert t_bn.num_batches_tracked.item() == s_bn.num_batches_tracked.item() == 1


def test_channels_last_keeps_values_keys_and_gradients(make_tiny_cfg):
    """MODEL.BACKBONE.CHANNELS_LAST changes the memory layout only: the same forward values, the
    same state-dict keys, and the same DINO loss and gradients from the same weights (up to float32
    summation order; compared before the optimizer, whose first Adam step is ~lr * sign(grad) and
    would turn a rounding difference of a near-zero gradient into a full step)."""

    def cfg(channels_last):
        c = _cfg(make_tiny_cfg)
        c.defrost()
        c.MODEL.BACKBONE.CHANNELS_LAST = channels_last
        return c

    torch.manual_seed(0)
    plain, fast = build_model(cfg(False)), build_model(cfg(True))
    fast.load_state_dict(plain.state_dict())
    assert set(plain.state_dict()) == set(fast.state_dict())
    conv = fast.student.backbone.stem[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    x = torch.randn(4, 3, 28, 28)
    torch.testing.assert_close(fast.student.backbone(x), plain.student.backbone(x), rtol=1e-5, atol=1e-5)
    crops = [torch.randn(4, 3, 28, 28) for _ in range(2)] + [torch.randn(4, 3, 14, 14) for _ in range(2)]
    assert_same_loss_and_gradients(plain, fast, crops)
