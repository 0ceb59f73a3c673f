"""torch.hub entry points of dino_research's backbones, offline.

    import torch
    model = torch.hub.load("/path/to/dino_research", "dino_vits16", source="local", pretrained=False)
    model = torch.hub.load("/path/to/dino_research", "dino_vits16", source="local",
                           weights="OUTPUT/teacher_backbone.pth")   # or a checkpoint, an official DINO file
    features = model(images)   # (B, 3, H, W) normalized with the ImageNet mean/std -> (B, D)

Every entry point returns the backbone in eval mode on the CPU. Nothing is downloaded: pass
``weights=PATH`` to a local file (``pretrained=True`` raises and says so). Keyword arguments:
``weights``, ``checkpoint_key`` ("teacher" or "student" of a training checkpoint) and ``depth`` (number
of ViT blocks; 0: 12, or the checkpoint's). See ``dino_research.evaluation.hub``.
"""

from dino_research.evaluation.hub import hub_backbone as _hub_backbone

dependencies = ["torch", "torchvision", "timm", "fvcore", "iopath"]


def _vit(entry, name, patch_size, pretrained, weights, checkpoint_key, depth):
    return _hub_backbone(name, patch_size=patch_size, pretrained=pretrained, weights=weights,
                         checkpoint_key=checkpoint_key, depth=depth, entry=entry)


def dino_vitt16(pretrained=False, weights="", checkpoint_key="teacher", depth=0):
    """ViT-Tiny/16 (D=192): DINO's ViT recipe at the smallest width."""
    return _vit("dino_vitt16", "vit_tiny", 16, pretrained, weights, checkpoint_key, depth)


def dino_vitt8(pretrained=False, weights="", checkpoint_key="teacher", depth=0):
    """ViT-Tiny/8 (D=192)."""
    return _vit("dino_vitt8", "vit_tiny", 8, pretrained, weights, checkpoint_key, depth)


def dino_vits16(pretrained=False, weights="", checkpoint_key="teacher", depth=0):
    """ViT-Small/16 (D=384), the paper's main model; official file: dino_deitsmall16_pretrain.pth."""
    return _vit("dino_vits16", "vit_small", 16, pretrained, weights, checkpoint_key, depth)


def dino_vits8(pretrained=False, weights="", checkpoint_key="teacher", depth=0):
    """ViT-Small/8 (D=384); official file: dino_deitsmall8_pretrain.pth."""
    return _vit("dino_vits8", "vit_small", 8, pretrained, weights, checkpoint_key, depth)


def dino_vitb16(pretrained=False, weights="", checkpoint_key="teacher", depth=0):
    """ViT-Base/16 (D=768); official file: dino_vitbase16_pretrain.pth."""
    return _vit("dino_vitb16", "vit_base", 16, pretrained, weights, checkpoint_key, depth)


def dino_vitb8(pretrained=False, weights="", checkpoint_key="teacher", depth=0):
    """ViT-Base/8 (D=768); official file: dino_vitbase8_pretrain.pth."""
    return _vit("dino_vitb8", "vit_base", 8, pretrained, weights, checkpoint_key, depth)


def dino_resnet50(pretrained=False, weights="", checkpoint_key="teacher"):
    """torchvision's ResNet-50 without its classifier (D=2048); official file: dino_resnet50_pretrain.pth."""
    return _hub_backbone("resnet50", pretrained=pretrained, weights=weights, checkpoint_key=checkpoint_key,
                         entry="dino_resnet50")


def dino_cifar_resnet(pretrained=False, weights="", checkpoint_key="teacher", depth=18, width=64):
    """The CIFAR-style ResNet for 28-64 pixel images (depth 18, 34 or 50; base ``width``)."""
    return _hub_backbone("cifar_resnet", pretrained=pretrained, weights=weights, checkpoint_key=checkpoint_key,
                         depth=depth, width=width, entry="dino_cifar_resnet")


def dino_timm(timm_model, pretrained=False, weights="", checkpoint_key="teacher"):
    """Any timm model trained with MODEL.BACKBONE.NAME timm (``timm_model``: its TIMM_MODEL), headless."""
    return _hub_backbone("timm", timm_model=timm_model, pretrained=pretrained, weights=weights,
                         checkpoint_key=checkpoint_key, entry="dino_timm")
