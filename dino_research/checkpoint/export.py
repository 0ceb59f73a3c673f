"""A trained backbone in the formats other code loads, each file verified where it is written.

Formats (``tools/export_model.py --format``):

* ``dino``: the official DINO backbone layout, a plain ``torch.save``-d state dict (``cls_token``,
  ``pos_embed``, ``blocks.N.*``...), what the reference code, ``MODEL.WEIGHTS`` and every evaluation
  tool read. Verified by our safe loader and backbone.
* ``timm``: a state dict that ``timm.create_model(NAME, num_classes=0, **KWARGS).load_state_dict(...)``
  loads strictly (our ViT subclasses timm's VisionTransformer with the same keys; ResNet-50 keys are
  torchvision's, which timm's ``resnet50`` shares). Verified in timm.
* ``safetensors``: the ``dino`` state dict as safetensors (no pickle), the architecture in its
  metadata. Verified by ``safetensors.torch.load_file``.
* ``onnx``: the forward pass ``images (B, 3, H, W) -> features (B, D)`` with a dynamic batch and image
  size (a ViT's H and W multiples of its patch size: DINO's positional-embedding resize is traced as
  tensor arithmetic, see ``modeling/pos_embed.py``). Verified in onnxruntime.

Verification: the written file is loaded back in its own runtime and fed the same random images as
our backbone at two resolutions (two batch sizes too); the largest difference, relative to the largest
magnitude of our features, must be within ``tolerance``. Otherwise :class:`ExportError` is raised and
no file is left: exports are written to a temporary name and renamed only once verified.
One exception, reported but not enforced: timm's ViT at another resolution than 224 needs
``dynamic_img_size=True``, and timm resizes the positional embedding its own way (``size=``,
antialiased), not DINO's, so features there differ slightly by construction.
"""

from __future__ import annotations

import copy
import importlib
import logging
import os
from typing import Callable

import torch
import torch.nn as nn

from ..utils.errors import UserError
from .checkpointer import load_backbone_state, load_file, temporary_name

__all__ = ["EXPORT_FORMATS", "ExportError", "export_model", "timm_architecture"]

logger = logging.getLogger("dino_research")

EXPORT_FORMATS = ("dino", "timm", "safetensors", "onnx")
# Packages of each format, beyond torch and timm (the `export` extra of pyproject.toml).
_REQUIRES = {"safetensors": ("safetensors",), "onnx": ("onnx", "onnxscript", "onnxruntime")}
# Image sides of the check: the ViTs' stored 224x224 grid, and another size (a multiple of 8 and 16).
DEFAULT_RESOLUTIONS = (224, 160)
# Largest accepted |ours - theirs| / max |ours|: float32 kernels of two runtimes, not a second model.
DEFAULT_TOLERANCE = 1e-4
_VIT_SIZES = {"vit_tiny": "tiny", "vit_small": "small", "vit_base": "base"}


class ExportError(UserError, RuntimeError):
    """An export that cannot be written or does not reproduce our features; nothing is left behind."""


def _require(fmt: str) -> None:
    missing = []
    for module in _REQUIRES.get(fmt, ()):
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ExportError(f"--format {fmt} needs {', '.join(missing)}, not installed here: "
                          f"pip install -e \".[export]\"")


def timm_architecture(backbone_name: str, backbone: nn.Module, timm_model: str = "") -> tuple[str, dict]:
    """``(name, kwargs)`` such that ``timm.create_model(name, num_classes=0, **kwargs)`` has the keys and
    shapes of ``backbone`` (built as ``MODEL.BACKBONE.NAME`` ``backbone_name``)."""
    import timm

    if backbone_name in _VIT_SIZES:
        size, p, depth = _VIT_SIZES[backbone_name], backbone.patch_size, len(backbone.blocks)
        name, kwargs = f"vit_{size}_patch{p}_224", {}
        if not timm.is_model(name):  # e.g. no vit_tiny_patch8_224: the /16 model with another patch
            name, kwargs = f"vit_{size}_patch16_224", {"patch_size": p}
        if depth != 12:
            kwargs["depth"] = depth
        return name, kwargs
    if backbone_name == "resnet50":
        return "resnet50", {}
    if backbone_name == "timm" and timm_model:
        return timm_model, {}
    raise ExportError(f"no timm architecture matches MODEL.BACKBONE.NAME {backbone_name}; export it as dino, "
                      f"safetensors or onnx")


def _state(backbone: nn.Module) -> dict:
    return {k: v.detach().cpu().contiguous().clone() for k, v in backbone.state_dict().items()}


def _reloaded(backbone: nn.Module, state: dict, source: str) -> nn.Module:
    fresh = copy.deepcopy(backbone)
    load_backbone_state(fresh, state, source, strict=True)
    return fresh.eval()


def _onnx_export(backbone: nn.Module, path: str, example: torch.Tensor, metadata: dict) -> None:
    import onnx

    batch = torch.export.Dim("batch", min=1, max=65536)
    p = getattr(backbone, "patch_size", None)
    if isinstance(p, int):  # sides in whole patches: the graph checks nothing else about them
        height, width = p * torch.export.Dim("h", min=1, max=1024), p * torch.export.Dim("w", min=1, max=1024)
    else:
        height, width = torch.export.Dim("height", min=32, max=16384), torch.export.Dim("width", min=32, max=16384)
    torch.onnx.export(backbone, (example,), path, dynamo=True, external_data=False, verbose=False,
                      input_names=["images"], output_names=["features"],
                      dynamic_shapes={"x": {0: batch, 2: height, 3: width}})
    model = onnx.load(path)
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=str(value))
    onnx.save(model, path)


def _write_and_load(fmt: str, backbone: nn.Module, tmp: str, backbone_name: str, timm_model: str,
                    metadata: dict, example: torch.Tensor) -> tuple[Callable, str]:
    """Write ``backbone`` to ``tmp`` as ``fmt`` and load it back in that format's own runtime.

    Returns ``(run(images, native: bool) -> features, how to load the file)``; ``native`` is True at
    the first resolution of the check."""
    if fmt == "dino":
        torch.save(_state(backbone), tmp)
        loaded = _reloaded(backbone, load_file(tmp), tmp)  # our safe loader: weights_only
        return (lambda x, native: loaded(x)), "MODEL.WEIGHTS PATH / --weights PATH; the reference's vision_transformer"
    if fmt == "safetensors":
        from safetensors.torch import load_file as load_safetensors
        from safetensors.torch import save_file

        save_file(_state(backbone), tmp, metadata={k: str(v) for k, v in metadata.items()})
        loaded = _reloaded(backbone, load_safetensors(tmp), tmp)
        return (lambda x, native: loaded(x)), "safetensors.torch.load_file(PATH); MODEL.WEIGHTS PATH"
    if fmt == "timm":
        import timm

        name, kwargs = timm_architecture(backbone_name, backbone, timm_model)
        torch.save(_state(backbone), tmp)
        state = torch.load(tmp, map_location="cpu", weights_only=True)
        models = {}
        for native in (True, False):
            extra = {} if native or backbone_name not in _VIT_SIZES else {"dynamic_img_size": True}
            models[native] = timm.create_model(name, pretrained=False, num_classes=0, **kwargs, **extra)
            models[native].load_state_dict(state, strict=True)
            models[native].eval()
        call = ", ".join([repr(name), "num_classes=0", *(f"{k}={v!r}" for k, v in kwargs.items())])
        return (lambda x, native: models[native](x)), f"timm.create_model({call}).load_state_dict(torch.load(PATH))"
    import onnxruntime

    _onnx_export(backbone, tmp, example, metadata)
    session = onnxruntime.InferenceSession(tmp, providers=["CPUExecutionProvider"])

    def run(x, native):
        return torch.from_numpy(session.run(["features"], {"images": x.numpy()})[0])

    return run, "onnxruntime.InferenceSession(PATH).run(['features'], {'images': x})"


@torch.no_grad()
def export_model(backbone: nn.Module, fmt: str, path: str, *, backbone_name: str, timm_model: str = "",
                 metadata: dict | None = None, resolutions=DEFAULT_RESOLUTIONS,
                 tolerance: float = DEFAULT_TOLERANCE) -> dict:
    """Write ``backbone`` (a copy of it, on the CPU, in eval mode) to ``path`` as ``fmt``, verified.

    Args:
        backbone_name: its ``MODEL.BACKBONE.NAME`` (``timm_model``: ``TIMM_MODEL`` for "timm").
        metadata: plain values stored in the file where the format has room (safetensors, onnx).
        resolutions: image sides of the check, multiples of the patch size; the first is the one
            the timm ViT takes without ``dynamic_img_size``.
        tolerance: largest accepted difference relative to the largest magnitude of our features.

    Returns ``{"format", "path", "load": how to load it, "checks": [{"size", "batch", "max_diff",
    "relative", "enforced"}]}``. Raises :class:`ExportError` (no file written) when a package is missing
    or an enforced check exceeds ``tolerance``.
    """
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    _require(fmt)
    backbone = copy.deepcopy(backbone).cpu().eval()  # the caller's module keeps its device and mode
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(2 + i, 3, s, s, generator=generator) for i, s in enumerate(resolutions)]
    metadata = {"format": "dino_research.backbone", "backbone": backbone_name, **(metadata or {})}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temporary_name(path) + os.path.splitext(path)[1]
    try:
        run, how = _write_and_load(fmt, backbone, tmp, backbone_name, timm_model, metadata, inputs[0])
        checks = []
        for i, x in enumerate(inputs):
            ours = backbone(x).float()
            theirs = run(x, i == 0).float()
            diff = float((ours - theirs).abs().max())
            relative = diff / max(float(ours.abs().max()), 1e-12)
            # timm's ViT resizes positions its own way away from 224: not DINO's values (see above).
            enforced = not (fmt == "timm" and backbone_name in _VIT_SIZES and i > 0)
            checks.append({"size": int(x.shape[-1]), "batch": int(x.shape[0]), "max_diff": diff,
                           "relative": relative, "enforced": enforced})
        bad = [c for c in checks if c["enforced"] and not c["relative"] <= tolerance]
        if bad:
            shown = ", ".join(f"{c['size']}x{c['size']}: {c['max_diff']:.3g} ({c['relative']:.3g} relative)"
                              for c in bad)
            raise ExportError(f"the {fmt} export does not reproduce the backbone's features ({shown} > tolerance "
                              f"{tolerance:g}); no file was written to {path}")
        # The permissions of any file the user writes (safetensors' writer makes its file private).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return {"format": fmt, "path": path, "load": how, "checks": checks}
