"""DINOHead: layer layout and keys of the reference, init, L2-normalized bottleneck, frozen gain."""

import pytest
import torch
import torch.nn.functional as F

from dino_research.modeling import build_head
from dino_research.modeling.heads import DINOHead


def test_keys_match_reference_layout():
    head = DINOHead(in_dim=12, out_dim=20, hidden_dim=16, bottleneck_dim=8, num_layers=3)
    assert list(head.state_dict()) == [
        "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mlp.4.weight", "mlp.4.bias",
        "last_layer.weight_v", "last_layer.weight_g",
    ]
    bn = DINOHead(in_dim=12, out_dim=20, hidden_dim=16, bottleneck_dim=8, num_layers=3, use_bn=True)
    linear_keys = sorted({k.rsplit(".", 1)[0] for k in bn.state_dict() if k.endswith("weight") and "mlp" in k})
    assert linear_keys == ["mlp.0", "mlp.1", "mlp.3", "mlp.4", "mlp.6"]  # Linear, BN, -, Linear, BN, -, Linear
    single = DINOHead(in_dim=12, out_dim=20, bottleneck_dim=8, num_layers=1)
    assert "mlp.weight" in single.state_dict()


def test_output_is_normalized_bottleneck_times_unit_prototypes():
    torch.manual_seed(1)
    head = DINOHead(in_dim=12, out_dim=20, hidden_dim=16, bottleneck_dim=8, num_layers=3)
    x = torch.randn(5, 12)
    out = head(x)
    assert out.shape == (5, 20)
    z = F.normalize(head.mlp(x), dim=-1)
    prototypes = head.last_layer.weight_v / head.last_layer.weight_v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(out, z @ prototypes.T)
    # Cosine similarities of unit vectors: bounded by 1 in absolute value.
    assert out.abs().max() <= 1.0 + 1e-6
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(20))


def test_gain_frozen_at_one_only_when_norm_last_layer():
    frozen = DINOHead(in_dim=4, out_dim=6, hidden_dim=8, bottleneck_dim=4, norm_last_layer=True)
    free = DINOHead(in_dim=4, out_dim=6, hidden_dim=8, bottleneck_dim=4, norm_last_layer=False)
    assert torch.equal(frozen.last_layer.weight_g, torch.ones(6, 1))
    assert not frozen.last_layer.weight_g.requires_grad
    assert free.last_layer.weight_g.requires_grad and free.last_layer.weight_v.requires_grad


def test_truncated_normal_init_and_zero_biases():
    head = DINOHead(in_dim=256, out_dim=8, hidden_dim=512, bottleneck_dim=256, num_layers=3)
    for layer in (head.mlp[0], head.mlp[2], head.mlp[4]):
        assert torch.count_nonzero(layer.bias) == 0
        assert layer.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_built_from_config_with_batchnorm(make_tiny_cfg):
    cfg = make_tiny_cfg(**{"MODEL.HEAD.USE_BN": "True", "MODEL.HEAD.NUM_LAYERS": "2"})
    head = build_head(cfg, in_dim=10)
    assert isinstance(head.mlp[1], torch.nn.BatchNorm1d)
    assert head(torch.randn(3, 10)).shape == (3, cfg.MODEL.HEAD.OUT_DIM)
    with pytest.raises(ValueError, match="NUM_LAYERS"):
        DINOHead(in_dim=4, out_dim=4, num_layers=0)
