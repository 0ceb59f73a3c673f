"""Attention maps: a hand-built ViT whose [CLS] attention is a known softmax, hand-made masks, figures."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from dino_research.config import get_cfg
from dino_research.evaluation.attention import (
    attention_figure,
    check_attention_backbone,
    colorize,
    crop_to_patch_multiple,
    last_self_attention_maps,
    prepare_image,
    threshold_masks,
    upsample,
)
from dino_research.modeling import build_backbone
from dino_research.modeling.backbones import DINOVisionTransformer

VIRIDIS_LOW, VIRIDIS_HIGH = (0x44, 0x01, 0x54), (0xFD, 0xE7, 0x25)  # matplotlib's viridis at 0 and 1


# ------------------------------------------------------------------------------ the maps themselves
# Columns of M: three zero-mean, mutually orthogonal vectors of squared norm 4 (rows of a Hadamard
# matrix). A patch of constant colour c (|c| = 1) embeds to the token M c, which has mean 0 and
# variance 1, so the block's LayerNorm leaves it unchanged (up to eps 1e-6).
M = torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]])  # (D=4, 3)
GAIN = 3.0  # the attention logit of a patch is GAIN * (its red value) for head 0, its green for head 1


def _hand_built_vit(patch=4):
    """Depth 1, D = 4, two heads of dim 2. Head h's [CLS]-to-patch logit is GAIN * c_j[h] for a patch
    of colour c_j, and 0 for [CLS] itself (zero [CLS] token and positional embedding, so its
    normalized token is 0 and its key too). Patch queries differ from the [CLS] query, so a map taken
    from another row than [CLS]'s would not match."""
    vit = DINOVisionTransformer(patch_size=patch, embed_dim=4, depth=1, num_heads=2, img_size=4 * patch).eval()
    D, hd = 4, 2
    with torch.no_grad():
        for param in vit.parameters():
            param.zero_()
        vit.blocks[0].norm1.weight.fill_(1.0)
        vit.patch_embed.proj.weight.copy_((M / patch**2)[:, :, None, None].expand(D, 3, patch, patch))
        qkv = vit.blocks[0].attn.qkv
        for h in range(2):
            # [CLS]: q = (gamma, 0) (bias only); patch j: k_j = (c_j[h], 0).
            qkv.bias[h * hd] = GAIN * math.sqrt(hd)  # the model multiplies q.k by hd ** -0.5
            qkv.weight[h * hd] = M[:, 0]  # patch queries get 4 * c_j[0] more: [CLS] (token 0) does not
            qkv.weight[D + h * hd] = M[:, h] / 4  # (M[:, h] / 4) . (M c) = c[h] since M^T M = 4 I
    return vit


def _patch_image(colors, patch=4):
    """colors (h, w, 3) -> image (3, h*p, w*p), every patch one colour."""
    return colors.permute(2, 0, 1).repeat_interleave(patch, 1).repeat_interleave(patch, 2)


def test_maps_of_hand_built_vit_are_the_closed_form_softmax():
    theta = torch.tensor([[[0.0, 0.4, 0.9], [1.3, 2.0, 2.8]], [[3.5, 4.1, 5.0], [5.5, 0.2, 1.7]]])  # (B, h, w)
    colors = torch.stack([theta.cos(), theta.sin(), torch.zeros_like(theta)], dim=-1)  # unit norm
    images = torch.stack([_patch_image(c) for c in colors])  # (2, 3, 8, 12): a 2 x 3 patch grid
    maps = last_self_attention_maps(_hand_built_vit(), images)
    assert maps.shape == (2, 2, 2, 3)
    for b in range(2):
        for head, channel in ((0, theta[b].cos()), (1, theta[b].sin())):
            exp_patches = torch.exp(GAIN * channel)  # exp(logit) of each patch, in grid layout
            total = 1.0 + exp_patches.sum()  # exp(0) for [CLS] itself
            torch.testing.assert_close(maps[b, head], exp_patches / total, atol=1e-6, rtol=1e-5)
            # the full softmax row, [CLS] column included, sums to 1
            torch.testing.assert_close(maps[b, head].sum() + 1.0 / total, torch.tensor(1.0))


def test_maps_of_a_config_built_vit_are_row_zero_of_the_attention():
    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.BACKBONE.NAME", "vit_tiny", "MODEL.BACKBONE.PATCH_SIZE", 8, "MODEL.BACKBONE.DEPTH", 2])
    vit = build_backbone(cfg, drop_path_rate=0.0).eval()
    x = torch.randn(2, 3, 40, 56)  # 5 x 7 patches
    maps = last_self_attention_maps(vit, x)
    with torch.no_grad():
        attn = vit.get_last_selfattention(x)  # (2, 3, 36, 36)
    assert maps.shape == (2, 3, 5, 7) and not maps.requires_grad
    assert maps[1, 2, 3, 4] == attn[1, 2, 0, 1 + 3 * 7 + 4]  # row-major patch order
    torch.testing.assert_close(maps.sum((-2, -1)) + attn[:, :, 0, 0], torch.ones(2, 3))
    torch.testing.assert_close(last_self_attention_maps(vit, x[0]), maps[:1])  # one image (3, H, W)


def test_sizes_not_multiple_of_patch_are_cropped_top_left():
    vit = _hand_built_vit()
    images = torch.randn(1, 3, 8, 12)
    padded = torch.cat([torch.cat([images, torch.randn(1, 3, 3, 12)], 2), torch.randn(1, 3, 11, 2)], 3)  # 11 x 14
    torch.testing.assert_close(last_self_attention_maps(vit, padded), last_self_attention_maps(vit, images))

    x = torch.arange(37 * 50.0).reshape(1, 37, 50)
    assert torch.equal(crop_to_patch_multiple(x, 16), x[:, :32, :48])
    assert crop_to_patch_multiple(x[:, :32, :48], 16).shape == (1, 32, 48)
    pil = Image.fromarray(np.random.randint(0, 256, (37, 50, 3), dtype=np.uint8))
    cropped = crop_to_patch_multiple(pil, 16)
    assert cropped.size == (48, 32) and np.array_equal(np.asarray(cropped), np.asarray(pil)[:32, :48])
    with pytest.raises(ValueError, match="smaller than one 16x16 patch"):
        crop_to_patch_multiple(torch.zeros(3, 12, 40), 16)


def test_non_vit_backbone_is_refused_clearly():
    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.BACKBONE.NAME", "resnet50"])
    resnet = build_backbone(cfg, drop_path_rate=0.0).eval()
    with pytest.raises(TypeError, match="attention maps need a ViT backbone.*got a ResNet"):
        last_self_attention_maps(resnet, torch.randn(1, 3, 32, 32))
    with pytest.raises(TypeError, match="need a ViT backbone.*MODEL.BACKBONE.NAME is 'resnet50'"):
        check_attention_backbone(resnet, "resnet50")
    with pytest.raises(TypeError, match="got a Sequential"):
        last_self_attention_maps(nn.Sequential(nn.Conv2d(3, 4, 3)), torch.randn(1, 3, 32, 32))


# ------------------------------------------------------------------------------------------ masks
def _mask(values, threshold):
    return threshold_masks(torch.tensor(values, dtype=torch.float32).reshape(1, 1, 2, 2), threshold).flatten().tolist()


def test_threshold_keeps_largest_patches_until_mass_reached():
    # The brief's example, shuffled in the grid: values 0.5, 0.3, 0.1, 0.1.
    assert _mask([0.1, 0.5, 0.1, 0.3], 0.6) == [False, True, False, True]  # 0.5 + 0.3 = 0.8 >= 0.6
    assert _mask([0.1, 0.5, 0.1, 0.3], 0.45) == [False, True, False, False]
    assert _mask([0.1, 0.5, 0.1, 0.3], 0.85) == [True, True, False, True]  # ties: row-major order wins
    # Exactly representable values for the boundary: reaching the threshold exactly is enough.
    assert _mask([0.5, 0.25, 0.125, 0.125], 0.5) == [True, False, False, False]
    assert _mask([0.5, 0.25, 0.125, 0.125], 0.75) == [True, True, False, False]
    assert _mask([0.5, 0.25, 0.125, 0.125], 0.751) == [True, True, True, False]
    assert _mask([0.5, 0.25, 0.125, 0.125], 1.0) == [True, True, True, True]
    # Mass is relative to the map's total (attention maps exclude [CLS], so they sum below 1).
    assert _mask([7 * 0.5, 7 * 0.25, 7 * 0.125, 7 * 0.125], 0.75) == [True, True, False, False]
    assert _mask([0.25, 0.25, 0.25, 0.25], 0.5) == [True, True, False, False]
    assert _mask([0.0, 0.0, 0.0, 0.0], 0.6) == [False] * 4
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            _mask([0.5, 0.25, 0.125, 0.125], bad)


@pytest.mark.parametrize("threshold", [0.1, 0.6, 0.9])
def test_threshold_masks_are_minimal_and_match_the_reference_rule(threshold):
    attn = torch.rand(3, 4, 5, 6, dtype=torch.float64) ** 3  # (B, heads, h, w), peaked
    masks = threshold_masks(attn, threshold)
    assert masks.shape == attn.shape and masks.dtype == torch.bool
    for a, m in zip(attn.reshape(12, 30), masks.reshape(12, 30)):
        total, kept = a.sum(), a[m]
        assert kept.sum() >= threshold * total  # enough mass...
        assert kept.sum() - kept.min() < threshold * total  # ...and no kept patch could be spared
        assert kept.min() >= a[~m].max()  # the kept patches are the largest ones
        # DINO's visualize_attention.py: sort ascending, cumsum / total, keep cumval > 1 - threshold.
        values, order = torch.sort(a)
        reference = torch.zeros(30, dtype=torch.bool)
        reference[order] = values.cumsum(0) / total > 1 - threshold
        assert torch.equal(m, reference)


# --------------------------------------------------------------------------------------- upsample
def test_upsample_nearest_repeats_each_patch_value():
    maps = torch.arange(2 * 3 * 2 * 3, dtype=torch.float32).reshape(2, 3, 2, 3)
    up = upsample(maps, 4)
    assert up.shape == (2, 3, 8, 12)
    assert torch.equal(up, torch.kron(maps, torch.ones(4, 4)))
    assert up[1, 2, 5, 9] == maps[1, 2, 5 // 4, 9 // 4]
    masks = maps > 10
    assert torch.equal(upsample(masks, 4), up > 10) and upsample(masks, 4).dtype == torch.bool


def test_upsample_bilinear_is_smooth_and_checked():
    up = upsample(torch.full((1, 2, 3, 4), 0.25), 8, mode="bilinear")
    assert up.shape == (1, 2, 24, 32) and torch.allclose(up, torch.full_like(up, 0.25))
    ramp = upsample(torch.tensor([[0.0, 1.0]]), 4, mode="bilinear")[0]  # (8,): monotone between centres
    assert torch.all(ramp[1:] >= ramp[:-1]) and 0 < ramp[3] < ramp[4] < 1
    with pytest.raises(ValueError, match="float"):
        upsample(torch.ones(1, 2, 2, dtype=torch.bool), 4, mode="bilinear")
    with pytest.raises(ValueError, match="nearest"):
        upsample(torch.ones(1, 2, 2), 4, mode="bicubic")


# ---------------------------------------------------------------------------------- preprocessing
def test_prepare_image_resizes_crops_and_normalizes():
    pixels = np.random.randint(0, 256, (37, 50, 3), dtype=np.uint8)  # H 37, W 50
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    image, tensor = prepare_image(Image.fromarray(pixels), 16, mean, std)
    assert image.size == (48, 32) and tensor.shape == (1, 3, 32, 48)
    expected = (pixels[5, 7] / 255.0 - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(tensor[0, :, 5, 7].numpy(), expected, rtol=1e-5, atol=1e-6)
    # one int: the shorter side (37 -> 40, 50 -> int(50 * 40 / 37) = 54), then crop to multiples of 8
    assert prepare_image(Image.fromarray(pixels), 8, mean, std, 40)[0].size == (48, 40)
    assert prepare_image(Image.fromarray(pixels), 8, mean, std, (24, 40))[1].shape == (1, 3, 24, 40)
    gray, _ = prepare_image(Image.fromarray(pixels[..., 0]), 8, mean, std)
    assert gray.mode == "RGB"


# ---------------------------------------------------------------------------------------- figures
def test_colorize_spans_viridis_by_min_and_max():
    ramp = torch.linspace(-2.0, 5.0, 256).reshape(8, 32)
    picture = colorize(ramp)
    assert picture.mode == "RGB" and picture.size == (32, 8)
    rgb = np.asarray(picture).reshape(256, 3).astype(int)
    assert tuple(rgb[0]) == VIRIDIS_LOW and tuple(rgb[-1]) == VIRIDIS_HIGH
    luma = rgb @ np.array([299, 587, 114])  # brightness x 1000; viridis gets lighter from 0 to 1
    assert np.all(np.diff(luma[::4]) > 0) and np.all(np.diff(luma) > -500)  # up to uint8 rounding
    assert len({tuple(c) for c in rgb}) > 200
    assert np.array_equal(np.asarray(colorize(np.full((3, 4), 7.0))), np.tile(VIRIDIS_LOW, (3, 4, 1)))
    with pytest.raises(ValueError, match="NaN"):
        colorize(torch.tensor([[0.0, float("nan")]]))


def test_attention_figure_layout_and_panels():
    H, W, heads, pad, label = 20, 30, 3, 4, 14
    pixels = np.random.randint(0, 256, (H, W, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    attn = torch.rand(heads, H, W)
    masks = attn > 0.5

    def panel(figure, row, col):
        x, y = pad + col * (W + pad), pad + row * (label + H + pad) + label
        return np.asarray(figure)[y:y + H, x:x + W]

    plain = attention_figure(image, attn)
    assert plain.size == (pad + (2 + heads) * (W + pad), pad + (label + H + pad))
    figure = attention_figure(image, attn, masks)
    assert figure.size == (pad + 5 * (W + pad), pad + 2 * (label + H + pad))
    assert np.array_equal(panel(figure, 0, 0), pixels)
    assert np.array_equal(panel(figure, 0, 1), np.asarray(colorize(attn.mean(0))))
    assert np.array_equal(panel(figure, 0, 3), np.asarray(colorize(attn[1])))
    m = masks[2].numpy()
    shown = panel(figure, 1, 4).astype(int)
    assert np.array_equal(shown[m], pixels[m]) and np.array_equal(shown[~m], np.round(pixels[~m] * 0.25))
    assert np.all(panel(figure, 1, 1) == 255)  # nothing under "mean" in the mask row
    label_strip = np.asarray(figure)[pad:pad + label, pad + 2 * (W + pad):pad + 2 * (W + pad) + W]
    assert (label_strip < 128).any()  # "head 0" is written above its panel
    with pytest.raises(ValueError, match="maps are 30x20"):
        attention_figure(image.resize((20, 20)), attn)
