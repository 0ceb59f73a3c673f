"""DINO's projection head: MLP -> L2 normalization -> weight-normalized prototype layer."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import configurable
from ..config.checks import check_value
from .build import HEAD_REGISTRY


class WeightNormLinear(nn.Module):
    """Bias-free Linear whose weight is ``weight_g * weight_v / ||weight_v||`` row by row.

    The parameter names ``weight_g (out, 1)`` and ``weight_v (out, in)`` are those of
    ``torch.nn.utils.weight_norm`` (dim=0), which the official DINO checkpoints store, so their
    head weights load with no renaming. Written out rather than using the deprecated hook API.

    forward: ``x (N, in_features) -> (N, out_features)``.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        # nn.Linear's default init for the direction, as the reference (its head init skips this layer).
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))

    @property
    def weight(self) -> torch.Tensor:
        """The effective ``(out, in)`` weight."""
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x @ (v * s)^T == (x @ v^T) * s^T with s = g / ||v|| per row: scaling the (N, out) outputs
        # instead of the (out, in) weight spares the step several passes over the weight (65536 x 256
        # in the paper's head) forward and backward. The product is taken in float32 (the gain's
        # dtype) and cast back, so under autocast the output keeps the matmul's dtype.
        out = F.linear(x, self.weight_v)
        scale = (self.weight_g / self.weight_v.norm(dim=1, keepdim=True)).reshape(-1)
        return (out * scale).to(out.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias=False"


@HEAD_REGISTRY.register()
class DINOHead(nn.Module):
    """``NUM_LAYERS`` Linear layers (GELU between, BatchNorm too if ``USE_BN``) down to
    ``BOTTLENECK_DIM``, L2 normalization, then a weight-normalized bias-free Linear to ``OUT_DIM``.

    The prototype layer's gain ``weight_g`` starts at 1; with ``NORM_LAST_LAYER`` it stays frozen
    at 1 (every prototype a unit vector), which the paper found stabilizes ViT-S training.
    ``forward(x (N, in_dim)) -> (N, OUT_DIM)`` logits.
    """

    @configurable
    def __init__(
        self,
        *,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ):
        super().__init__()
        check_value("MODEL.HEAD.NUM_LAYERS", num_layers)
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(d_in, d_out))
            if i < num_layers - 1:  # no activation after the bottleneck: it is normalized next
                if use_bn:
                    layers.append(nn.BatchNorm1d(d_out))
                layers.append(nn.GELU())
        # Sequential index numbering matches the reference's `mlp.N.*` checkpoint keys.
        self.mlp = nn.Sequential(*layers) if num_layers > 1 else layers[0]
        self.apply(self._init_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.last_layer.weight_g.requires_grad_(not norm_last_layer)

    @classmethod
    def from_config(cls, cfg, in_dim: int) -> dict:
        h = cfg.MODEL.HEAD
        return dict(
            in_dim=in_dim,
            out_dim=h.OUT_DIM,
            hidden_dim=h.HIDDEN_DIM,
            bottleneck_dim=h.BOTTLENECK_DIM,
            num_layers=h.NUM_LAYERS,
            use_bn=h.USE_BN,
            norm_last_layer=h.NORM_LAST_LAYER,
        )

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        # eps as the reference (F.normalize default); the prototypes then see unit vectors.
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)
