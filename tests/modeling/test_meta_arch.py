"""DINO meta-architecture: teacher copy, crop grouping, who sees which crops."""

import pytest
import torch

from dino_research.modeling import build_model
from dino_research.modeling.meta_arch import DINO, MultiCropNetwork


def _crops(batch=3, n_local=2, g=32, l=16):
    return [torch.randn(batch, 3, g, g) for _ in range(2)] + [torch.randn(batch, 3, l, l) for _ in range(n_local)]


def test_teacher_starts_as_exact_copy_without_gradients(make_tiny_cfg):
    model = build_model(make_tiny_cfg(**{"MODEL.BACKBONE.DROP_PATH_RATE": "0.1"}))
    assert isinstance(model, DINO)
    s, t = model.student.state_dict(), model.teacher.state_dict()
    assert s.keys() == t.keys()
    assert all(torch.equal(s[k], t[k]) for k in s)
    assert not any(p.requires_grad for p in model.teacher.parameters())
    # Stochastic depth only in the student.
    rates = lambda net: {m.drop_prob for m in net.modules() if type(m).__name__ == "DropPath"}  # noqa: E731
    assert rates(model.student) and max(rates(model.student)) == pytest.approx(0.1)
    assert not rates(model.teacher) or rates(model.teacher) == {0.0}


def test_consecutive_crops_of_one_size_share_one_backbone_pass(make_tiny_cfg):
    model = build_model(make_tiny_cfg())
    calls = {"student": [], "teacher": []}
    for name in calls:
        getattr(model, name).backbone.register_forward_hook(
            lambda mod, args, out, name=name: calls[name].append(tuple(args[0].shape)))
    out = model(_crops(batch=3, n_local=2), teacher_temp=0.04)
    assert calls["student"] == [(6, 3, 32, 32), (6, 3, 16, 16)]  # two passes for 4 crops
    assert calls["teacher"] == [(6, 3, 32, 32)]  # the teacher sees only the two global crops
    assert out["student_out"].shape == (12, 64) and out["teacher_out"].shape == (6, 64)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    assert not out["teacher_out"].requires_grad


def test_grouped_forward_equals_crop_by_crop(make_tiny_cfg):
    net = build_model(make_tiny_cfg()).student.eval()
    crops = _crops(batch=2, n_local=3)
    grouped = net(crops)
    one_by_one = torch.cat([net.head(net.backbone(c)) for c in crops])
    torch.testing.assert_close(grouped, one_by_one, rtol=1e-5, atol=1e-5)


def test_loss_matches_loss_module_and_center_not_updated(make_tiny_cfg):
    model = build_model(make_tiny_cfg())
    crops = _crops()
    out = model(crops, teacher_temp=0.05)
    assert torch.count_nonzero(model.loss.center) == 0  # the trainer updates it, once per step
    expected = model.loss(out["student_out"], out["teacher_out"], 0.05, update_state=False)
    torch.testing.assert_close(out["loss"], expected)


def test_last_layer_parameters_are_the_trainable_prototypes(make_tiny_cfg):
    model = build_model(make_tiny_cfg())
    assert [id(p) for p in model.last_layer_parameters()] == [id(model.student.head.last_layer.weight_v)]
    model = build_model(make_tiny_cfg(**{"MODEL.HEAD.NORM_LAST_LAYER": "False"}))
    assert len(model.last_layer_parameters()) == 2


def test_state_dict_uses_reference_prefixes(make_tiny_cfg):
    keys = build_model(make_tiny_cfg()).state_dict().keys()
    assert "student.backbone.cls_token" in keys and "teacher.head.last_layer.weight_g" in keys
    assert "loss.center" in keys


def test_multicrop_network_accepts_a_single_tensor(make_tiny_cfg):
    net = build_model(make_tiny_cfg()).teacher
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 64)
    assert isinstance(net, MultiCropNetwork)
