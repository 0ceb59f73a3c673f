"""MODEL.WEIGHTS that fit only partly: an error naming the keys, unless MODEL.WEIGHTS_PARTIAL asks for it."""

import logging
import sys
from pathlib import Path

import pytest
import torch

from dino_research.checkpoint import CheckpointError, load_pretrained
from dino_research.engine import DINOTrainer, default_setup
from dino_research.evaluation.weights import load_backbone
from dino_research.modeling import build_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from test_training import make_cfg  # noqa: E402

DEPTH_4 = {"MODEL.BACKBONE.DEPTH": 4}


def _backbone_file(path, make_tiny_cfg, depth):
    """An official-format backbone file of a ViT-tiny with ``depth`` blocks, each weight + 1 (so it is seen)."""
    cfg = make_tiny_cfg(**{"MODEL.BACKBONE.DEPTH": depth})
    state = {k: v + 1.0 for k, v in build_model(cfg).teacher.backbone.state_dict().items()}
    torch.save(state, path)
    return state


@pytest.mark.parametrize("file_depth, words", [
    (12, r"96 unexpected keys \(in the file, not in the model\) \['blocks.4.norm1.weight', .*\] and 88 more; "
         r"the file has 12 transformer blocks, the model 4"),
    (2, r"24 missing keys \(in the model, not in the file\) \['blocks.2.norm1.weight', .*\] and 16 more; "
        r"the file has 2 transformer blocks, the model 4"),
], ids=["deeper-file", "blocks-missing"])
def test_a_backbone_of_another_depth_is_an_error_naming_the_keys(tmp_path, make_tiny_cfg, file_depth, words):
    _backbone_file(tmp_path / "b.pth", make_tiny_cfg, file_depth)
    model = build_model(make_tiny_cfg(**DEPTH_4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=rf"b.pth: backbone weights fit the model only partly: {words} "
                                              r"\(MODEL.BACKBONE.DEPTH.*or set MODEL.WEIGHTS_PARTIAL True"):
        load_pretrained(model, str(tmp_path / "b.pth"))
    for key, value in model.state_dict().items():  # nothing was loaded
        assert torch.equal(value, before[key]), key
    # Evaluation is strict too, with the same diagnosis (and no opt-in: a half-random backbone is no result).
    with pytest.raises(CheckpointError, match=rf"{words}") as error:
        load_backbone(make_tiny_cfg(**DEPTH_4), str(tmp_path / "b.pth"))
    assert "WEIGHTS_PARTIAL" not in str(error.value)


def test_weights_partial_loads_what_fits_and_logs_every_key(tmp_path, make_tiny_cfg, caplog):
    state = _backbone_file(tmp_path / "b.pth", make_tiny_cfg, 2)
    model = build_model(make_tiny_cfg(**DEPTH_4))
    init = {k: v.clone() for k, v in model.student.backbone.state_dict().items()}
    with caplog.at_level(logging.WARNING):
        assert load_pretrained(model, str(tmp_path / "b.pth"), partial=True) == "official_backbone"
    log = caplog.text
    missing = [k for k in init if k not in state]
    assert len(missing) == 24 and all(key in log for key in missing)  # every one, not the first few
    assert "loaded partly (MODEL.WEIGHTS_PARTIAL True)" in log
    for net in (model.student, model.teacher):
        for key, value in net.backbone.state_dict().items():
            assert torch.equal(value, state[key] if key in state else init[key]), key


def test_weights_partial_is_read_from_the_config_by_the_trainer(tmp_path, make_tiny_cfg):
    _backbone_file(tmp_path / "b.pth", make_tiny_cfg, 2)
    common = ["MODEL.BACKBONE.DEPTH", "4", "MODEL.WEIGHTS", str(tmp_path / "b.pth")]
    cfg = make_cfg(tmp_path / "strict", *common)
    default_setup(cfg)
    with pytest.raises(CheckpointError, match="WEIGHTS_PARTIAL"):
        DINOTrainer(cfg).resume_or_load(resume=True)
    cfg = make_cfg(tmp_path / "partial", *common, "MODEL.WEIGHTS_PARTIAL", "True")
    default_setup(cfg)
    DINOTrainer(cfg).resume_or_load(resume=True)
    assert "24 missing keys keep their initialization" in (tmp_path / "partial" / "log.txt").read_text()


def _official_full(model, head=True, out_dim=None):
    def net(module, shift):
        state = {k: v + shift for k, v in module.state_dict().items() if head or not k.startswith("head.")}
        if out_dim is not None:
            state["head.last_layer.weight_v"] = torch.zeros(out_dim, state["head.last_layer.weight_v"].shape[1])
        return {"module." + k: v for k, v in state.items()}

    return {"student": net(model.student, 1.0), "teacher": net(model.teacher, 2.0)}


def test_heads_missing_from_the_file_keep_their_initialization_and_say_so(tmp_path, make_tiny_cfg, caplog):
    source = build_model(make_tiny_cfg())
    torch.save(_official_full(source, head=False), tmp_path / "no_head.pth")
    model = build_model(make_tiny_cfg())
    head = {k: v.clone() for k, v in model.student.head.state_dict().items()}
    with caplog.at_level(logging.INFO):
        assert load_pretrained(model, str(tmp_path / "no_head.pth")) == "official_full"
    assert "[student] holds no head weights: the projection head keeps its initialization" in caplog.text
    for key, value in model.student.head.state_dict().items():
        assert torch.equal(value, head[key]), key
    assert torch.equal(model.teacher.backbone.cls_token, source.teacher.backbone.cls_token + 2.0)
    caplog.clear()
    torch.save(source.teacher.backbone.state_dict(), tmp_path / "backbone.pth")  # an official backbone file
    with caplog.at_level(logging.INFO):
        load_pretrained(build_model(make_tiny_cfg()), str(tmp_path / "backbone.pth"))
    assert "is a backbone file: the projection heads keep their initialization" in caplog.text


def test_head_weights_of_another_shape_are_an_error(tmp_path, make_tiny_cfg):
    source = build_model(make_tiny_cfg())
    torch.save(_official_full(source, out_dim=128), tmp_path / "other_head.pth")
    with pytest.raises(CheckpointError, match=r"other_head.pth\[student\] \(head\): head weights do not fit the model "
                                              r"\(last_layer.weight_v: file \(128, 16\) vs model \(64, 16\)\).*OUT_DIM"):
        load_pretrained(build_model(make_tiny_cfg()), str(tmp_path / "other_head.pth"), partial=True)


def test_our_own_checkpoint_of_another_depth_is_an_error_unless_partial(tmp_path, make_tiny_cfg, caplog):
    torch.save({"model": build_model(make_tiny_cfg(**{"MODEL.BACKBONE.DEPTH": 2})).state_dict(), "iteration": 8},
               tmp_path / "ours.pth")
    with pytest.raises(CheckpointError, match=r"ours.pth: model weights fit the model only partly: 48 missing keys "
                                              r"\(in the model, not in the file\) \['student.backbone.blocks.2.*"
                                              r"the file has 2 transformer blocks, the model 4"):
        load_pretrained(build_model(make_tiny_cfg(**DEPTH_4)), str(tmp_path / "ours.pth"))
    with caplog.at_level(logging.WARNING):
        assert load_pretrained(build_model(make_tiny_cfg(**DEPTH_4)), str(tmp_path / "ours.pth"), partial=True) == "ours"
    assert "48 missing keys keep their initialization" in caplog.text and "teacher.backbone.blocks.3.mlp" in caplog.text
