"""A CIFAR-style ResNet for small images (28-64 pixels): the form solo-learn and lightly train on
CIFAR, with a 3x3 stride-1 stem and no max-pool, so a 28-pixel image keeps 28x28 feature maps in
the first stage instead of ImageNet's 7x7.

``cifar_resnet``: ``(B, 3, H, W) -> (B, 8 * width)`` globally average-pooled features; depth 18 or 34
(basic blocks) or 50 (bottlenecks, 4x wider output), base width ``MODEL.BACKBONE.RESNET_WIDTH``
(64 as the original; 32 costs ~1/4 of the compute). BatchNorm throughout: train it with
``MODEL.TEACHER.EMA ParamAndBufferEMA`` so the teacher's running statistics follow the student's.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config.checks import check_value, declare_batchnorm_backbone
from .build import BACKBONE_REGISTRY

__all__ = ["CifarResNet", "cifar_resnet"]


class _Basic(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(cin, width, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


# Blocks per stage of each depth, and the block type.
DEPTHS = {18: (_Basic, (2, 2, 2, 2)), 34: (_Basic, (3, 4, 6, 3)), 50: (_Bottleneck, (3, 4, 6, 3))}


class CifarResNet(nn.Module):
    """ResNet with a 3x3 stride-1 stem, no max-pool, four stages of strides 1, 2, 2, 2 and widths
    ``width * (1, 2, 4, 8)``, then global average pooling.

    Args:
        depth: 18, 34 or 50.
        width: channels of the stem and the first stage.

    ``forward``: ``(B, 3, H, W) -> (B, embed_dim)``, ``embed_dim = 8 * width * expansion``.
    ``forward_feature_map``: the last stage's map ``(B, embed_dim, ceil(H/8), ceil(W/8))``.
    """

    def __init__(self, depth: int = 18, width: int = 64):
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"cifar_resnet depth must be one of {sorted(DEPTHS)}, got {depth}")
        if width < 1:
            raise ValueError(f"cifar_resnet width must be >= 1, got {width}")
        block, counts = DEPTHS[depth]
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        stages, cin = [], width
        for i, (count, stride) in enumerate(zip(counts, (1, 2, 2, 2))):
            blocks = []
            for j in range(count):
                blocks.append(block(cin, width * 2**i, stride if j == 0 else 1))
                cin = width * 2**i * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.embed_dim = cin
        self.depth, self.width = depth, width
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_feature_map(x).mean(dim=(2, 3))


@BACKBONE_REGISTRY.register()
def cifar_resnet(cfg, drop_path_rate: float) -> CifarResNet:
    """CIFAR-style ResNet: depth ``MODEL.BACKBONE.DEPTH`` (0 means 18; 18, 34 or 50), base width
    ``MODEL.BACKBONE.RESNET_WIDTH``. ``drop_path_rate`` is ignored (no stochastic depth)."""
    depth = check_value("MODEL.BACKBONE.DEPTH", cfg.MODEL.BACKBONE.DEPTH) or 18
    if depth not in DEPTHS:
        raise ValueError(f"MODEL.BACKBONE.DEPTH = {depth}: cifar_resnet has depths {sorted(DEPTHS)} (0 means 18)")
    return CifarResNet(depth=depth, width=check_value("MODEL.BACKBONE.RESNET_WIDTH", cfg.MODEL.BACKBONE.RESNET_WIDTH))


declare_batchnorm_backbone("cifar_resnet")
