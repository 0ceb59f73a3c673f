"""Backbones: DINO's Vision Transformers (on timm), torchvision's ResNet-50 and any timm model.

Every builder is registered in ``BACKBONE_REGISTRY`` under its function name and called as
``builder(cfg, drop_path_rate) -> nn.Module`` (see ``build.py`` for the contract). The ViTs reproduce
``vision_transformer.py`` of facebookresearch/dino: same architecture, same initialization, same
positional-embedding interpolation and the same ``state_dict`` keys, so the official DINO backbone
checkpoints load with ``strict=True``. No builder loads weights (that is the checkpointer's job).
"""

from __future__ import annotations

import contextlib
import math
from functools import partial
from typing import List

import timm as timm_lib  # the module name `timm` is taken by the registered builder below
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer
from torchvision import models as tv_models

from ..config.checks import check_value, declare_batchnorm_backbone, declare_choices
from .build import BACKBONE_REGISTRY
from .pos_embed import exporting, resize_pos_embed_traceable

__all__ = ["DINOVisionTransformer", "vit_tiny", "vit_small", "vit_base", "resnet50", "timm"]


def _init_dino(module: nn.Module) -> None:
    """DINO's ``_init_weights``: Linear ~ trunc_normal(std 0.02) with zero bias, LayerNorm (1, 0).
    The patch-embedding Conv2d keeps PyTorch's default init, as in DINO."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class DINOAttention(Attention):
    """timm's multi-head self-attention (``F.scaled_dot_product_attention``), same parameters and same
    forward values, with the q, k, v split taken so that their gradients need one copy less.

    timm permutes the qkv projection to (3, B, heads, N, head_dim) and unbinds the first dim: the
    backward then stacks the three gradients in that order and must copy them back to the projection's
    (B, N, 3 * D) layout. Splitting the (B, N, 3, heads, head_dim) view along its own dim 2 gives q, k, v
    with the same strides, and the stacked gradients are already in the projection's layout (the CPU
    flash-attention backward returns them as (B, N, heads, head_dim) memory). DINO uses none of timm's
    options on top (qk-norm, scale-norm, gating, masks): they are rejected at construction.
    """

    # On a CPU under bfloat16/float16 autocast: run the attention kernel on float32 q, k, v (set by
    # the builder from MODEL.BACKBONE.CPU_ATTENTION_FLOAT32). torch's CPU flash attention is slower in
    # bfloat16 than in float32 without AMX tiles: 3x in the backward of ViT-S/16's step.
    cpu_float32 = False

    def __init__(self, dim: int, num_heads: int = 8, **kwargs):
        super().__init__(dim, num_heads=num_heads, **kwargs)
        # getattr: older timm 1.0.x releases have no scale-norm or gate attributes at all.
        if not (isinstance(self.q_norm, nn.Identity) and isinstance(self.k_norm, nn.Identity)
                and isinstance(getattr(self, "norm", nn.Identity()), nn.Identity)
                and getattr(self, "gate", None) is None):
            raise ValueError("DINOAttention implements plain multi-head attention (no qk/scale norm, no gate)")

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """Tokens (B, N, D) -> (B, N, D)."""
        if attn_mask is not None or is_causal:
            raise ValueError("DINOAttention takes no attention mask")
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # each (B, heads, N, head_dim)
        if self.fused_attn:
            low = self.cpu_float32 and q.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            # Autocast would cast float32 q, k, v back down for this op: it is switched off around it.
            with torch.autocast("cpu", enabled=False) if low else contextlib.nullcontext():
                if low:
                    q, k, v = q.float(), k.float(), v.float()
                x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            x = self.attn_drop(attn) @ v
        x = x.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        return self.proj_drop(self.proj(x))


class DINOVisionTransformer(VisionTransformer):
    """timm's ViT configured and initialized as DINO's, with DINO's positional-embedding interpolation.

    Pre-norm blocks (LayerNorm eps 1e-6, MLP ratio 4, qkv bias), a class token, a learned positional
    embedding for a 224x224 image and a final LayerNorm; no classifier. The normal forward uses timm's
    fused attention (``F.scaled_dot_product_attention``), which computes DINO's
    ``softmax(q k^T * scale) v`` without materializing the (N+1) x (N+1) matrix.

    Attributes: ``embed_dim`` (D), ``patch_size`` (p, int), ``num_heads``.
    """

    def __init__(
        self,
        *,
        patch_size: int = 16,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        drop_path_rate: float = 0.0,
        img_size: int = 224,
    ):
        if not 1 <= patch_size <= img_size:
            raise ValueError(f"patch size must be an integer in [1, {img_size}], got {patch_size}")
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            num_classes=0,  # headless: the DINO head lives in heads.py
            global_pool="token",
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=4.0,
            qkv_bias=True,
            class_token=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            # Crops of every size go through the same model: patch_embed returns an NHWC grid and the
            # positional embedding is resized in _pos_embed below.
            dynamic_img_size=True,
            drop_rate=0.0,
            pos_drop_rate=0.0,
            proj_drop_rate=0.0,
            attn_drop_rate=0.0,
            drop_path_rate=drop_path_rate,  # linear in depth from 0, as DINO's torch.linspace rule
            attn_layer=DINOAttention,
        )
        self.patch_size = patch_size
        self.num_heads = num_heads
        # timm reads TIMM_FUSED_ATTN from the environment; SDPA is what makes training affordable,
        # so it is forced on. get_last_selfattention computes the weights explicitly instead.
        for block in self.blocks:
            block.attn.fused_attn = True

    def init_weights(self, mode: str = "", needs_reset: bool = True) -> None:
        """DINO's initialization; timm's constructor calls it. Differs from timm's default only in
        ``cls_token`` (trunc_normal std 0.02 in DINO, normal std 1e-6 in timm)."""
        if mode:
            raise ValueError(f"DINOVisionTransformer only supports DINO's initialization, got mode={mode!r}")
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_dino)

    # ------------------------------------------------------------------ positional embedding
    def interpolate_pos_encoding(self, h: int, w: int) -> torch.Tensor:
        """Positional embedding for an (h, w) patch grid: (1, 1 + h*w, D).

        The stored embedding covers a square sqrt(N) x sqrt(N) grid (14x14 for 224 / 16). On that
        grid it is returned as is. Otherwise its patch part is resized exactly as DINO does: bicubic,
        ``align_corners=False``, no antialiasing, and through ``scale_factor=((h + 0.1) / sqrt(N),
        (w + 0.1) / sqrt(N))`` rather than ``size=(h, w)``. The +0.1 keeps floor(sqrt(N) * scale)
        from landing on h - 1; passing a scale (not a size) matters for the values too, because
        PyTorch then maps output to input coordinates with that scale. Official checkpoints were
        trained with these values, so a ``size=`` or antialiased resize (timm's default) would feed
        them slightly shifted positions. The class-token entry is never resized. While the model is
        being exported (``torch.export``, ONNX) the same values come from
        :func:`~dino_research.modeling.pos_embed.resize_pos_embed_traceable`, so the graph keeps a
        dynamic image size.
        """
        if exporting():
            # torch.export (ONNX) would freeze the branch below and the resize at the example's size;
            # the same values as tensor arithmetic keep an exported graph valid at every size.
            return resize_pos_embed_traceable(self.pos_embed, h, w)
        num_patches = self.pos_embed.shape[1] - 1
        side = int(math.sqrt(num_patches))
        assert side * side == num_patches, f"pos_embed holds {num_patches} patches, not a square grid"
        if h == side and w == side:
            return self.pos_embed
        dim = self.pos_embed.shape[-1]
        class_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        patch_pos = F.interpolate(
            patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2),  # (1, D, side, side)
            scale_factor=((h + 0.1) / math.sqrt(num_patches), (w + 0.1) / math.sqrt(num_patches)),
            mode="bicubic",
            align_corners=False,
            recompute_scale_factor=False,  # keep DINO's scale for the coordinate mapping
            antialias=False,
        )
        assert tuple(patch_pos.shape[-2:]) == (h, w), f"resized to {tuple(patch_pos.shape[-2:])}, not {h, w}"
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h * w, dim)
        return torch.cat([class_pos, patch_pos], dim=1)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch grid (B, h, w, D) -> tokens (B, 1 + h*w, D): [CLS] then patches row-major, plus the
        positional embedding (replaces timm's resize, which antialiases and uses ``size=``)."""
        B, h, w, D = x.shape
        x = torch.cat([self.cls_token.expand(B, -1, -1), x.reshape(B, h * w, D)], dim=1)
        return self.pos_drop(x + self.interpolate_pos_encoding(h, w))

    # ------------------------------------------------------------------ forward passes
    def prepare_tokens(self, x: torch.Tensor, token_mask: torch.Tensor | None = None,
                       mask_token: torch.Tensor | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) -> input tokens of the first block (B, 1 + H/p * W/p, D).

        Masked image modeling (iBOT, MAE-style methods): with ``token_mask`` bool (B, H/p, W/p), the
        embedding of every masked patch is replaced by ``mask_token`` (D,) (a parameter of the
        caller's) before the positional embedding is added, as iBOT's reference does.

        Raises ValueError if H or W is not a multiple of the patch size (DINO would silently drop
        the last rows/columns of pixels), or if the mask's shape does not fit the patch grid.
        """
        H, W = x.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(
                f"input size {H}x{W} is not divisible by the patch size {self.patch_size}; "
                f"crop or resize images to a multiple of {self.patch_size}"
            )
        x = self.patch_embed(x)  # (B, H/p, W/p, D): NHWC because dynamic_img_size defers flattening
        if token_mask is not None:
            if mask_token is None or token_mask.shape != x.shape[:3]:
                raise ValueError(f"token_mask must be bool {tuple(x.shape[:3])} (B, H/p, W/p) with a mask_token "
                                 f"(D,); got {tuple(token_mask.shape)} and {mask_token is not None}")
            x = torch.where(token_mask.unsqueeze(-1), mask_token.to(x.dtype).reshape(1, 1, 1, -1), x)
        x = self._pos_embed(x)
        return self.norm_pre(self.patch_drop(x))  # both nn.Identity with DINO's settings

    def forward_features(self, x: torch.Tensor, token_mask: torch.Tensor | None = None,
                         mask_token: torch.Tensor | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) -> final-normed tokens (B, N+1, D), N = H/p * W/p, [CLS] first; with
        ``token_mask`` and ``mask_token`` the masked patches are replaced first (see :meth:`prepare_tokens`)."""
        x = self.prepare_tokens(x, token_mask, mask_token)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W), H and W multiples of ``patch_size`` -> final-normed CLS token (B, D)."""
        return self.forward_features(x)[:, 0]

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> List[torch.Tensor]:
        """DINO's version (replaces timm's): outputs of the last ``n`` blocks, each passed through the
        final norm, CLS token included: a list of n tensors (B, N+1, D), the last block's last."""
        if not 1 <= n <= len(self.blocks):
            raise ValueError(f"n must be in [1, {len(self.blocks)}], got {n}")
        x = self.prepare_tokens(x)
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i >= len(self.blocks) - n:
                outputs.append(self.norm(x))
        return outputs

    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """Post-softmax attention of the last block: (B, heads, N+1, N+1), rows sum to 1.

        The fused attention does not return its weights, so the last block's attention is computed
        explicitly from its qkv projection: softmax(q k^T * head_dim^-0.5).
        """
        x = self.blocks[:-1](self.prepare_tokens(x))
        last = self.blocks[-1]
        attn = last.attn
        B, N, _ = x.shape
        qkv = attn.qkv(last.norm1(x)).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])  # identities for DINO (no qk-norm)
        return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def _vit(cfg, drop_path_rate: float, embed_dim: int, num_heads: int) -> DINOVisionTransformer:
    patch_size = check_value("MODEL.BACKBONE.PATCH_SIZE", cfg.MODEL.BACKBONE.PATCH_SIZE)
    depth = check_value("MODEL.BACKBONE.DEPTH", cfg.MODEL.BACKBONE.DEPTH) or 12
    num_heads = check_value("MODEL.BACKBONE.NUM_HEADS", cfg.MODEL.BACKBONE.NUM_HEADS) or num_heads
    if embed_dim % num_heads:
        raise ValueError(f"MODEL.BACKBONE.NUM_HEADS = {num_heads} does not divide the width {embed_dim} of "
                         f"{cfg.MODEL.BACKBONE.NAME}; use a divisor of {embed_dim} (0 keeps the architecture's heads)")
    vit = DINOVisionTransformer(
        patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
        drop_path_rate=drop_path_rate,
    )
    float32_attention = cpu_float32_attention(cfg.MODEL.BACKBONE.CPU_ATTENTION_FLOAT32)
    for block in vit.blocks:
        block.attn.cpu_float32 = float32_attention
    return vit


declare_choices("MODEL.BACKBONE.CPU_ATTENTION_FLOAT32", ("auto", "on", "off"))


def cpu_float32_attention(setting: str) -> bool:
    """``MODEL.BACKBONE.CPU_ATTENTION_FLOAT32``: "auto" is on unless this CPU has AMX tiles (whose
    bfloat16 attention kernels are the fast ones), "on" / "off" force it."""
    if setting == "auto":
        # A private torch helper: a torch without it is treated as having no AMX.
        return not getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return setting == "on"


@BACKBONE_REGISTRY.register()
def vit_tiny(cfg, drop_path_rate: float) -> DINOVisionTransformer:
    """ViT-Tiny/p, p = ``MODEL.BACKBONE.PATCH_SIZE``: D=192, 12 blocks (MODEL.BACKBONE.DEPTH), 3 heads
    (5.5M parameters)."""
    return _vit(cfg, drop_path_rate, embed_dim=192, num_heads=3)


@BACKBONE_REGISTRY.register()
def vit_small(cfg, drop_path_rate: float) -> DINOVisionTransformer:
    """ViT-Small/p, p = ``MODEL.BACKBONE.PATCH_SIZE``: D=384, 12 blocks (MODEL.BACKBONE.DEPTH), 6 heads
    (21M parameters)."""
    return _vit(cfg, drop_path_rate, embed_dim=384, num_heads=6)


@BACKBONE_REGISTRY.register()
def vit_base(cfg, drop_path_rate: float) -> DINOVisionTransformer:
    """ViT-Base/p, p = ``MODEL.BACKBONE.PATCH_SIZE``: D=768, 12 blocks (MODEL.BACKBONE.DEPTH), 12 heads
    (85M parameters)."""
    return _vit(cfg, drop_path_rate, embed_dim=768, num_heads=12)


declare_batchnorm_backbone("resnet50")


@BACKBONE_REGISTRY.register()
def resnet50(cfg, drop_path_rate: float) -> nn.Module:
    """torchvision's ResNet-50 (random init) with ``fc`` replaced by ``nn.Identity``: (B, 3, H, W) ->
    globally pooled features (B, 2048). Its ``state_dict`` is torchvision's minus ``fc.*``, the format
    of DINO's official ResNet-50 checkpoint.

    ``drop_path_rate`` is ignored: ResNet-50 has no stochastic depth (DINO trains it without).
    """
    model = tv_models.resnet50(weights=None)
    model.embed_dim = model.fc.in_features
    model.fc = nn.Identity()
    return model


@BACKBONE_REGISTRY.register()
def timm(cfg, drop_path_rate: float) -> nn.Module:
    """Any timm model named by ``MODEL.BACKBONE.TIMM_MODEL``, randomly initialized and headless
    (``num_classes=0``): (B, 3, H, W) -> pooled features (B, D) at the sizes that model accepts.

    ``embed_dim`` is the width of those pooled features: timm's ``head_hidden_size`` where the model
    has one (it differs from ``num_features`` when the pre-logits include a projection, e.g.
    MobileNetV3), else ``num_features``. It overwrites the model's own ``embed_dim`` attribute if any
    (a per-stage list in some hierarchical models). Never ``pretrained=True``: that would download.
    """
    name = cfg.MODEL.BACKBONE.TIMM_MODEL
    if not name:
        raise ValueError(
            "MODEL.BACKBONE.NAME is 'timm' but MODEL.BACKBONE.TIMM_MODEL is empty; set it to a timm "
            "model name (timm.list_models() lists them)"
        )
    if not timm_lib.is_model(name):
        raise ValueError(
            f"MODEL.BACKBONE.TIMM_MODEL = {name!r} is not a timm model; "
            f"timm.list_models('*{name.split('.')[0][:8]}*') lists similar names"
        )
    extra = {}
    if cfg.MODEL.BACKBONE.TIMM_OUTPUT_STRIDE:
        extra["output_stride"] = cfg.MODEL.BACKBONE.TIMM_OUTPUT_STRIDE
    try:
        model = timm_lib.create_model(name, pretrained=False, num_classes=0, drop_path_rate=drop_path_rate, **extra)
    except TypeError as e:
        if not extra:
            raise
        raise ValueError(f"MODEL.BACKBONE.TIMM_OUTPUT_STRIDE = {extra['output_stride']}: timm model {name!r} does "
                         f"not take an output_stride ({e}); set it to 0") from None
    model.embed_dim = int(getattr(model, "head_hidden_size", None) or model.num_features)
    return model
