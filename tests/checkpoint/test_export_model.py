"""tools/export_model.py and checkpoint/export.py: every format loaded back in its own runtime with
our features at two resolutions, failures that leave no file, and the traced positional embedding."""

import importlib
import json
import os

import numpy as np
import pytest
import torch
from tool_utils import load_tool

from dino_research.checkpoint import Checkpointer, load_file
from dino_research.checkpoint.export import ExportError, export_model, timm_architecture
from dino_research.modeling import build_backbone, build_model
from dino_research.modeling.pos_embed import resize_pos_embed_traceable

HAS_ONNXRUNTIME = importlib.util.find_spec("onnxruntime") is not None


@pytest.fixture(scope="module")
def vit():
    from conftest import tiny_cfg

    torch.manual_seed(0)
    return build_backbone(tiny_cfg(**{"MODEL.BACKBONE.DEPTH": 2}), drop_path_rate=0.0).eval()


def test_traced_positional_embedding_equals_dinos_interpolation(vit):
    for h, w in [(14, 14), (10, 12), (14, 10), (6, 6), (1, 1), (2, 30), (28, 28)]:
        torch.testing.assert_close(resize_pos_embed_traceable(vit.pos_embed, h, w), vit.interpolate_pos_encoding(h, w),
                                   rtol=0, atol=1e-6)
    assert torch.equal(resize_pos_embed_traceable(vit.pos_embed, 14, 14), vit.pos_embed)  # native: unchanged


@pytest.mark.parametrize("fmt", ["dino", "safetensors", "timm"])
def test_round_trip_parity(vit, tmp_path, fmt):
    out = tmp_path / f"model.{fmt}"
    report = export_model(vit, fmt, str(out), backbone_name="vit_tiny", metadata={"patch_size": 16})
    assert out.is_file() and [c["size"] for c in report["checks"]] == [224, 160]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # readable as any file the user writes
    enforced = [c for c in report["checks"] if c["enforced"]]
    assert all(c["relative"] <= 1e-4 for c in enforced)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ours = vit(x)
        if fmt == "timm":  # exactly the call the tool prints, loaded strictly
            import timm

            assert report["load"] == "timm.create_model('vit_tiny_patch16_224', num_classes=0, depth=2)" \
                                     ".load_state_dict(torch.load(PATH))"
            model = timm.create_model("vit_tiny_patch16_224", num_classes=0, depth=2)
            model.load_state_dict(torch.load(out, weights_only=True), strict=True)
            theirs = model.eval()(x)
            assert len(enforced) == 1  # 160 pixels: timm's own resize, reported only
        else:
            state = load_file(str(out))  # our loader reads both torch and safetensors files
            clone = build_backbone_like(vit)
            clone.load_state_dict(state, strict=True)
            theirs = clone(x)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    if fmt == "safetensors":
        from safetensors import safe_open

        with safe_open(str(out), "pt") as f:
            assert f.metadata()["backbone"] == "vit_tiny" and f.metadata()["patch_size"] == "16"


def build_backbone_like(vit):
    from conftest import tiny_cfg

    return build_backbone(tiny_cfg(**{"MODEL.BACKBONE.DEPTH": len(vit.blocks)}), drop_path_rate=0.0).eval()


@pytest.mark.skipif(not HAS_ONNXRUNTIME, reason="onnxruntime is not installed (pip install -e '.[export]')")
def test_onnx_has_a_dynamic_batch_and_image_size(vit, tmp_path):
    import onnx
    import onnxruntime

    out = tmp_path / "model.onnx"
    report = export_model(vit, "onnx", str(out), backbone_name="vit_tiny", metadata={"patch_size": 16})
    assert all(c["enforced"] and c["relative"] <= 1e-4 for c in report["checks"])
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch, (h, w) in [(1, (32, 48)), (4, (96, 64)), (2, (224, 224)), (3, (16, 16))]:
        x = torch.randn(batch, 3, h, w)
        got = session.run(["features"], {"images": x.numpy()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(got, vit(x).numpy(), atol=1e-4)
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props["backbone"] == "vit_tiny" and props["patch_size"] == "16"


def test_a_failed_check_or_a_missing_package_leaves_no_file(vit, tmp_path, monkeypatch):
    out = tmp_path / "model.pth"
    with pytest.raises(ExportError, match="does not reproduce the backbone's features.*no file was written"):
        export_model(vit, "dino", str(out), backbone_name="vit_tiny", tolerance=-1.0)
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary
    real_import = importlib.import_module

    def without_onnxruntime(name, *args):
        if name == "onnxruntime":
            raise ImportError(name)
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_onnxruntime)
    with pytest.raises(ExportError, match=r'needs onnxruntime.*pip install -e "\.\[export\]"'):
        export_model(vit, "onnx", str(tmp_path / "model.onnx"), backbone_name="vit_tiny")
    assert list(tmp_path.iterdir()) == []


def test_timm_names(make_tiny_cfg):
    tiny8 = build_backbone(make_tiny_cfg(**{"MODEL.BACKBONE.DEPTH": 1, "MODEL.BACKBONE.PATCH_SIZE": 8}), 0.0)
    assert timm_architecture("vit_tiny", tiny8) == ("vit_tiny_patch16_224", {"patch_size": 8, "depth": 1})
    small8 = build_backbone(make_tiny_cfg(**{"MODEL.BACKBONE.NAME": "vit_small", "MODEL.BACKBONE.PATCH_SIZE": 8,
                                             "MODEL.BACKBONE.DEPTH": 1}), 0.0)
    assert timm_architecture("vit_small", small8) == ("vit_small_patch8_224", {"depth": 1})
    assert timm_architecture("resnet50", None) == ("resnet50", {})
    with pytest.raises(ExportError, match="no timm architecture matches.*cifar_resnet"):
        timm_architecture("cifar_resnet", None)


def test_tool_exports_a_training_checkpoint(tmp_path, make_tiny_cfg, capsys):
    cfg = make_tiny_cfg(**{"MODEL.BACKBONE.NAME": "cifar_resnet", "MODEL.BACKBONE.RESNET_WIDTH": 8,
                           "MODEL.TEACHER.EMA": "ParamAndBufferEMA"})
    model = build_model(cfg)
    checkpoint = Checkpointer(str(tmp_path / "run"), model).save("model.pth", iteration=1, config=cfg.dump())
    tool = load_tool("export_model")
    out = tmp_path / "exports"
    out.mkdir()
    for fmt in ("dino", "safetensors"):
        report = tool.main(tool.build_parser().parse_args([checkpoint, str(out), "--format", fmt, "--which", "student"]))
        assert report["path"] == str(out / f"student_backbone.{'pth' if fmt == 'dino' else 'safetensors'}")
    printed = capsys.readouterr().out
    assert "dino: 224x224, batch 2: max |ours - exported| = 0" in printed and "wrote the student backbone" in printed
    # What was written is the student's backbone, readable as MODEL.WEIGHTS by every tool.
    from dino_research.evaluation.weights import load_backbone

    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model.student.backbone.eval()(x)
        for name in ("student_backbone.pth", "student_backbone.safetensors"):
            torch.testing.assert_close(load_backbone(cfg, str(out / name))(x), want, rtol=0, atol=0)
    with pytest.raises(ExportError, match="no timm architecture"):
        tool.main(tool.build_parser().parse_args([checkpoint, "--format", "timm", str(out)]))
    from dino_research.checkpoint import CheckpointError

    with pytest.raises(CheckpointError):  # never over its own input
        tool.main(tool.build_parser().parse_args([checkpoint, "--format", "dino", checkpoint]))
    json.dumps(report)  # plain values: the report can be logged as JSON
