"""Backbones: official DINO checkpoint layout, DINO's ViT numerics written out by hand, and builders.

The reference computations below (``_dino_block``, ``_dino_pos_embed``, ``_manual_tokens``) restate
facebookresearch/dino's ``vision_transformer.py`` with plain tensor ops, so the timm-based model is
checked against DINO's formulas, not against itself.
"""

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision import models as tv_models

from dino_research.config import get_cfg
from dino_research.modeling import build_backbone
from dino_research.modeling.backbones import DINOVisionTransformer

EPS = 1e-6  # DINO's LayerNorm eps


def _cfg(name="vit_tiny", patch_size=16, **extra):
    cfg = get_cfg()
    opts = ["MODEL.BACKBONE.NAME", name, "MODEL.BACKBONE.PATCH_SIZE", patch_size]
    for key, value in extra.items():
        opts += [f"MODEL.BACKBONE.{key}", value]
    cfg.merge_from_list(opts)
    return cfg


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return build_backbone(_cfg("vit_tiny", 16), drop_path_rate=0.0).eval()


def _official_keys(depth):
    """Keys of the official DINO ViT backbone checkpoints (e.g. dino_deitsmall16_pretrain.pth)."""
    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    for i in range(depth):
        for name in ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]:
            keys += [f"blocks.{i}.{name}.weight", f"blocks.{i}.{name}.bias"]
    return keys + ["norm.weight", "norm.bias"]


def _dino_block(blk, x):
    """DINO's Block.forward (eval: no drop path): x + attn(norm1(x)), then x + mlp(norm2(x))."""
    B, N, D = x.shape
    heads = blk.attn.num_heads
    y = F.layer_norm(x, (D,), blk.norm1.weight, blk.norm1.bias, EPS)
    q, k, v = F.linear(y, blk.attn.qkv.weight, blk.attn.qkv.bias).reshape(B, N, 3, heads, D // heads).permute(
        2, 0, 3, 1, 4
    )
    attn = ((q @ k.transpose(-2, -1)) * (D // heads) ** -0.5).softmax(dim=-1)
    y = (attn @ v).transpose(1, 2).reshape(B, N, D)
    x = x + F.linear(y, blk.attn.proj.weight, blk.attn.proj.bias)
    y = F.layer_norm(x, (D,), blk.norm2.weight, blk.norm2.bias, EPS)
    y = F.gelu(F.linear(y, blk.mlp.fc1.weight, blk.mlp.fc1.bias))
    y = F.linear(y, blk.mlp.fc2.weight, blk.mlp.fc2.bias)
    return x + y, attn


def _dino_pos_embed(pos_embed, h, w):
    """DINO's interpolate_pos_encoding for an (h, w) patch grid, with a direct F.interpolate call."""
    n = pos_embed.shape[1] - 1
    side, dim = int(math.sqrt(n)), pos_embed.shape[-1]
    if (h, w) == (side, side):
        return pos_embed
    grid = pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    scale = ((h + 0.1) / math.sqrt(n), (w + 0.1) / math.sqrt(n))
    out = F.interpolate(grid, scale_factor=scale, mode="bicubic", align_corners=False)
    assert out.shape[-2:] == (h, w)
    return torch.cat([pos_embed[:, :1], out.permute(0, 2, 3, 1).reshape(1, h * w, dim)], dim=1)


def _manual_tokens(model, x):
    """DINO's prepare_tokens: conv patchify, flatten row-major, prepend CLS, add positional embedding."""
    p = model.patch_size
    h, w = x.shape[-2] // p, x.shape[-1] // p
    t = F.conv2d(x, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=p)
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), t], dim=1)
    return t + _dino_pos_embed(model.pos_embed, h, w)


def _manual_block_outputs(model, x):
    """Outputs of every block (before the final norm) and the last block's attention."""
    t, outs = _manual_tokens(model, x), []
    for blk in model.blocks:
        t, attn = _dino_block(blk, t)
        outs.append(t)
    return outs, attn


def _final_norm(model, t):
    return F.layer_norm(t, (model.embed_dim,), model.norm.weight, model.norm.bias, EPS)


# ---------------------------------------------------------------------------------------------- ViT layout
@pytest.mark.parametrize(
    "name, dim, heads, patch",
    [("vit_tiny", 192, 3, 16), ("vit_small", 384, 6, 16), ("vit_base", 768, 12, 16),
     ("vit_tiny", 192, 3, 8), ("vit_small", 384, 6, 8), ("vit_base", 768, 12, 8)],
)
def test_vit_state_dict_matches_official_checkpoint_layout(name, dim, heads, patch):
    with torch.device("meta"):  # layout only: no memory, no init cost
        model = build_backbone(_cfg(name, patch))
    sd = model.state_dict()
    assert list(sd) == _official_keys(12)
    grid = (224 // patch) ** 2
    assert sd["cls_token"].shape == (1, 1, dim)
    assert sd["pos_embed"].shape == (1, 1 + grid, dim)
    assert sd["patch_embed.proj.weight"].shape == (dim, 3, patch, patch)
    assert sd["blocks.11.attn.qkv.weight"].shape == (3 * dim, dim)
    assert sd["blocks.11.mlp.fc1.weight"].shape == (4 * dim, dim)
    assert (model.embed_dim, model.patch_size, model.num_heads) == (dim, patch, heads)


def test_vit_init_is_dinos(vit):
    for p in (vit.cls_token, vit.pos_embed, vit.blocks[0].attn.qkv.weight, vit.blocks[5].mlp.fc2.weight):
        assert abs(p.std().item() - 0.02) < 0.004  # trunc_normal std 0.02 (timm draws cls_token at 1e-6)
    for name, p in vit.named_parameters():
        if name.endswith("bias") and "patch_embed" not in name:
            assert torch.all(p == 0), name  # Linear biases 0, LayerNorm biases 0
        if "norm" in name and name.endswith("weight"):
            assert torch.all(p == 1), name
    assert vit.norm.eps == EPS and vit.blocks[0].norm1.eps == EPS


def test_vit_drop_path_is_linear_in_depth():
    model = build_backbone(_cfg("vit_tiny"))  # MODEL.BACKBONE.DROP_PATH_RATE default: 0.1
    expected = torch.linspace(0, 0.1, 12)
    got = [getattr(b.drop_path1, "drop_prob", 0.0) for b in model.blocks]
    assert got == pytest.approx(expected.tolist())
    teacher = build_backbone(_cfg("vit_tiny"), drop_path_rate=0.0)
    assert all(isinstance(b.drop_path1, torch.nn.Identity) for b in teacher.blocks)


# ---------------------------------------------------------------------------------------------- ViT numerics
@pytest.mark.parametrize("size", [(224, 224), (96, 96), (64, 128)])
def test_vit_forward_equals_dino_formula(vit, size):
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        out = vit(x)
        outs, _ = _manual_block_outputs(vit, x)
        expected = _final_norm(vit, outs[-1])[:, 0]
    assert out.shape == (2, 192)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_native_grid_uses_stored_pos_embed(vit):
    assert vit.interpolate_pos_encoding(14, 14) is vit.pos_embed  # no resize at 224 / 16


@pytest.mark.parametrize("grid", [(6, 6), (4, 8), (28, 14), (3, 20)])
def test_pos_embed_interpolation_is_dinos(vit, grid):
    h, w = grid
    with torch.no_grad():
        got = vit.interpolate_pos_encoding(h, w)
        patches = vit.pos_embed[:, 1:].reshape(1, 14, 14, 192).permute(0, 3, 1, 2)
        ref = F.interpolate(patches, scale_factor=((h + 0.1) / 14, (w + 0.1) / 14), mode="bicubic",
                            align_corners=False)
    assert ref.shape[-2:] == (h, w)
    assert got.shape == (1, 1 + h * w, 192)
    torch.testing.assert_close(got[:, 0], vit.pos_embed[:, 0])  # the CLS entry is never resized
    torch.testing.assert_close(got[:, 1:], ref.permute(0, 2, 3, 1).reshape(1, h * w, 192))
    # DINO's scale_factor also sets the sampling positions: a size= resize (or timm's antialiased
    # one) would give other values, which official checkpoints were not trained with.
    by_size = F.interpolate(patches, size=(h, w), mode="bicubic", align_corners=False)
    assert not torch.allclose(ref, by_size, atol=1e-4)


def test_bicubic_resize_keeps_a_constant_embedding():
    model = DINOVisionTransformer(embed_dim=192, num_heads=3, depth=1)
    with torch.no_grad():
        model.pos_embed.fill_(0.5)
        model.pos_embed[:, 0] = -1.0
    got = model.interpolate_pos_encoding(5, 9).detach()
    assert torch.all(got[:, 0] == -1.0)
    torch.testing.assert_close(got[:, 1:], torch.full((1, 45, 192), 0.5))


def test_forward_uses_sdpa(vit, monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    with torch.no_grad():
        vit(torch.randn(1, 3, 32, 32))
    assert len(calls) == 12


def test_last_selfattention_is_softmax_of_last_block(vit):
    x = torch.randn(2, 3, 48, 80)  # 3 x 5 patches: non-square, N + 1 = 16
    with torch.no_grad():
        attn = vit.get_last_selfattention(x)
        _, expected = _manual_block_outputs(vit, x)
    assert attn.shape == (2, 3, 16, 16)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 3, 16))
    torch.testing.assert_close(attn, expected, atol=1e-6, rtol=1e-5)


def test_intermediate_layers_are_last_blocks_normed(vit):
    x = torch.randn(2, 3, 32, 64)
    with torch.no_grad():
        layers = vit.get_intermediate_layers(x, 3)
        outs, _ = _manual_block_outputs(vit, x)
        assert torch.equal(vit.get_intermediate_layers(x, 1)[0][:, 0], vit(x))
    assert len(layers) == 3 and all(t.shape == (2, 9, 192) for t in layers)
    for got, block_out in zip(layers, outs[-3:]):
        torch.testing.assert_close(got, _final_norm(vit, block_out), atol=1e-5, rtol=1e-5)
    for bad in (0, 13):
        with pytest.raises(ValueError):
            vit.get_intermediate_layers(x, bad)


def test_patch8_token_count():
    model = build_backbone(_cfg("vit_tiny", 8), drop_path_rate=0.0).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 48)).shape == (2, 192)
        assert model.get_last_selfattention(torch.randn(1, 3, 32, 48)).shape == (1, 3, 25, 25)


def test_checkpoint_from_another_instance_loads_strictly(vit):
    torch.manual_seed(1)
    other = build_backbone(_cfg("vit_tiny"), drop_path_rate=0.0).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        assert not torch.allclose(other(x), vit(x))
        buf = io.BytesIO()
        torch.save(vit.state_dict(), buf)  # as an official checkpoint file would hold it
        buf.seek(0)
        other.load_state_dict(torch.load(buf), strict=True)
        assert torch.equal(other(x), vit(x))
        assert torch.equal(other.get_last_selfattention(x), vit.get_last_selfattention(x))


@pytest.mark.parametrize("size", [(100, 96), (96, 40)])
def test_size_not_divisible_by_patch_raises(vit, size):
    x = torch.randn(1, 3, *size)
    for fn in (vit, vit.get_last_selfattention, vit.get_intermediate_layers):
        with pytest.raises(ValueError, match=rf"{size[0]}x{size[1]}.*patch size 16"):
            fn(x)


def test_invalid_patch_size_names_config_key():
    with pytest.raises(ValueError, match="MODEL.BACKBONE.PATCH_SIZE"):
        build_backbone(_cfg("vit_tiny", 0))


# ---------------------------------------------------------------------------------------------- ResNet / timm
def test_resnet50_is_torchvision_without_fc():
    model = build_backbone(_cfg("resnet50")).eval()
    expected = [k for k in tv_models.resnet50(weights=None).state_dict() if not k.startswith("fc.")]
    assert list(model.state_dict()) == expected
    assert model.embed_dim == 2048
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        stem = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        feats = model.layer4(model.layer3(model.layer2(model.layer1(stem))))
    assert out.shape == (2, 2048)
    torch.testing.assert_close(out, feats.mean(dim=(2, 3)))  # global average pool, no classifier


@pytest.mark.parametrize("name, dim", [("resnet18", 512), ("mobilenetv3_small_050", 1024)])
def test_timm_backbone_output_width_is_embed_dim(name, dim):
    model = build_backbone(_cfg("timm", TIMM_MODEL=name), drop_path_rate=0.0).eval()
    assert model.embed_dim == dim  # mobilenetv3: head_hidden_size 1024, num_features 288
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, dim)


def test_timm_backbone_gets_drop_path_rate():
    model = build_backbone(_cfg("timm", TIMM_MODEL="convnext_atto"), drop_path_rate=0.2)
    rates = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert max(rates) == pytest.approx(0.2)


def test_timm_output_stride_keeps_a_larger_last_map_with_the_same_weights():
    plain = build_backbone(_cfg("timm", TIMM_MODEL="resnet18"), drop_path_rate=0.0).eval()
    dilated = build_backbone(_cfg("timm", TIMM_MODEL="resnet18", TIMM_OUTPUT_STRIDE=8), drop_path_rate=0.0).eval()
    assert list(dilated.state_dict()) == list(plain.state_dict())  # dilation, not new layers
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert plain.forward_features(x).shape[-2:] == (1, 1)  # 28 / 32, rounded up
        assert dilated.forward_features(x).shape[-2:] == (4, 4)  # 28 / 8, rounded up
        assert dilated(x).shape == (2, 512)
    with pytest.raises(ValueError, match="TIMM_OUTPUT_STRIDE"):
        build_backbone(_cfg("timm", TIMM_MODEL="vit_tiny_patch16_224", TIMM_OUTPUT_STRIDE=8))


@pytest.mark.parametrize("name", ["", "not_a_timm_model_xyz"])
def test_timm_unknown_or_empty_name_raises(name):
    with pytest.raises(ValueError, match=r"MODEL\.BACKBONE\.TIMM_MODEL.*list_models"):
        build_backbone(_cfg("timm", TIMM_MODEL=name))


def test_unknown_backbone_lists_registered_names():
    with pytest.raises(KeyError, match="resnet50.*timm.*vit_base.*vit_small.*vit_tiny"):
        build_backbone(_cfg("vit_huge"))


def test_depth_override_builds_a_shallower_vit():
    from dino_research.config import get_cfg
    from dino_research.modeling import build_backbone

    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.BACKBONE.NAME", "vit_tiny", "MODEL.BACKBONE.DEPTH", "4"])
    model = build_backbone(cfg)
    assert len(model.blocks) == 4 and "blocks.3.mlp.fc2.bias" in model.state_dict()
    assert "blocks.4.norm1.weight" not in model.state_dict()
    cfg.merge_from_list(["MODEL.BACKBONE.DEPTH", "-1"])
    with pytest.raises(ValueError, match="MODEL.BACKBONE.DEPTH"):
        build_backbone(cfg)


# ---------------------------------------------------------------------------------------------- attention layer
@pytest.mark.parametrize("fused", [True, False])
def test_dino_attention_equals_timm_attention_forward_and_backward(fused):
    """DINOAttention only changes how q, k, v are split from the projection (one gradient copy less):
    outputs and every gradient must be timm's, fused (SDPA) or not."""
    from timm.layers import Attention

    from dino_research.modeling.backbones import DINOAttention

    torch.manual_seed(0)
    ours, theirs = DINOAttention(48, num_heads=4, qkv_bias=True), Attention(48, num_heads=4, qkv_bias=True)
    theirs.load_state_dict(ours.state_dict())
    ours.fused_attn = theirs.fused_attn = fused
    x = torch.randn(3, 17, 48)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ours, out_theirs = ours(x_ours), theirs(x_theirs)
    torch.testing.assert_close(out_ours, out_theirs, atol=1e-6, rtol=1e-5)
    grad_out = torch.randn_like(out_ours)
    out_ours.backward(grad_out)
    out_theirs.backward(grad_out)
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, atol=1e-6, rtol=1e-5)
    theirs_params = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, theirs_params[name].grad, atol=1e-6, rtol=1e-5, msg=name)


def test_dino_attention_refuses_options_it_does_not_implement():
    from dino_research.modeling.backbones import DINOAttention

    with pytest.raises(ValueError, match="no qk/scale norm"):
        DINOAttention(48, num_heads=4, qk_norm=True, norm_layer=torch.nn.LayerNorm)
    with pytest.raises(ValueError, match="no attention mask"):
        DINOAttention(48, num_heads=4)(torch.randn(1, 5, 48), attn_mask=torch.zeros(5, 5))


def test_masked_patch_tokens_replace_the_embedding_before_the_position(make_tiny_cfg):
    """forward_features(x, token_mask, mask_token): a masked patch's embedding is the mask token plus
    its positional embedding; unmasked tokens and an all-False mask change nothing."""
    from dino_research.modeling import build_backbone

    net = build_backbone(make_tiny_cfg(**{"MODEL.BACKBONE.DEPTH": "1", "MODEL.BACKBONE.PATCH_SIZE": "8"}),
                         drop_path_rate=0.0).eval()
    x = torch.randn(2, 3, 16, 24)  # a 2 x 3 patch grid
    mask = torch.zeros(2, 2, 3, dtype=torch.bool)
    token = torch.randn(net.embed_dim)
    torch.testing.assert_close(net.forward_features(x, mask, token), net.forward_features(x))
    mask[0, 1, 2] = True
    tokens = net.prepare_tokens(x, mask, token)
    expected = token + net.interpolate_pos_encoding(2, 3)[0, 1 + 1 * 3 + 2]
    torch.testing.assert_close(tokens[0, 1 + 5], expected)  # token 0 is [CLS]; patch (1, 2) is the 6th
    torch.testing.assert_close(tokens[1], net.prepare_tokens(x)[1])  # the other image is untouched
    with pytest.raises(ValueError, match=r"token_mask must be bool \(2, 2, 3\)"):
        net.prepare_tokens(x, mask[:, :1], token)


def test_num_heads_overrides_the_architectures_heads(make_tiny_cfg):
    from dino_research.config.checks import ConfigError
    from dino_research.modeling import build_backbone

    cfg = make_tiny_cfg(**{"MODEL.BACKBONE.NAME": "vit_tiny", "MODEL.BACKBONE.DEPTH": "1",
                           "MODEL.BACKBONE.PATCH_SIZE": "4", "MODEL.BACKBONE.NUM_HEADS": "6"})
    net = build_backbone(cfg)
    assert net.num_heads == 6 and net.blocks[0].attn.num_heads == 6
    assert net.get_last_selfattention(torch.randn(2, 3, 28, 28)).shape == (2, 6, 50, 50)
    cfg.defrost()
    cfg.MODEL.BACKBONE.NUM_HEADS = 5
    with pytest.raises(ValueError, match="NUM_HEADS = 5 does not divide the width 192"):
        build_backbone(cfg)
    cfg.MODEL.BACKBONE.NUM_HEADS = -1
    with pytest.raises(ConfigError, match="MODEL.BACKBONE.NUM_HEADS = -1"):
        build_backbone(cfg)


@pytest.mark.parametrize("setting,kernel_dtype", [("on", torch.float32), ("off", torch.bfloat16)])
def test_cpu_attention_float32_under_bfloat16_autocast(make_tiny_cfg, setting, kernel_dtype):
    """MODEL.BACKBONE.CPU_ATTENTION_FLOAT32: the attention kernel itself (the aten op, after autocast
    has cast its inputs) runs on float32 q, k, v under bfloat16 autocast ("on") or on bfloat16 ones
    ("off"), and the gradients stay within bfloat16 rounding of the float32 ones."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from dino_research.modeling import build_backbone

    class KernelDtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "scaled_dot_product" in str(func):
                self.seen.add(args[0].dtype)
            return func(*args, **(kwargs or {}))

    cfg = make_tiny_cfg(**{"MODEL.BACKBONE.NAME": "vit_tiny", "MODEL.BACKBONE.DEPTH": "2",
                           "MODEL.BACKBONE.PATCH_SIZE": "4", "MODEL.BACKBONE.CPU_ATTENTION_FLOAT32": setting})
    net = build_backbone(cfg)
    assert all(block.attn.cpu_float32 == (setting == "on") for block in net.blocks)
    x = torch.randn(4, 3, 28, 28)
    reference = net(x)
    reference.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    kernels = KernelDtypes()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with kernels:
            out = net(x)
        assert net.blocks[0].attn(torch.randn(2, 5, 192)).dtype == torch.bfloat16  # the projection's dtype
    assert kernels.seen == {kernel_dtype}
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.05)
    out.float().square().sum().backward()
    for name, p in net.named_parameters():
        scale = grads[name].abs().max().item() + 1e-12
        torch.testing.assert_close(p.grad, grads[name], rtol=0.1, atol=0.05 * scale, msg=name)


def test_cpu_attention_float32_auto_follows_amx(monkeypatch):
    from dino_research.modeling.backbones import cpu_float32_attention

    assert cpu_float32_attention("on") and not cpu_float32_attention("off")
    for amx in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        assert cpu_float32_attention("auto") is (not amx)
