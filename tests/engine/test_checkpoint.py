"""Checkpoint files: atomic writes, safe loading, official DINO formats in and out."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dino_research.checkpoint import (
    CheckpointError,
    atomic_save,
    capture_rng_state,
    load_file,
    load_pretrained,
    restore_rng_state,
)
from dino_research.modeling import build_model

REPO = Path(__file__).resolve().parents[2]


def test_atomic_save_keeps_the_old_file_when_a_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pth"
    atomic_save({"x": torch.ones(3)}, str(path))

    def exploding_save(obj, f):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", exploding_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"x": torch.zeros(3)}, str(path))
    assert torch.equal(load_file(str(path))["x"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]  # no temporary left behind


def test_truncated_file_and_pickled_code_are_refused_clearly(tmp_path):
    good = tmp_path / "good.pth"
    atomic_save({"x": torch.ones(100)}, str(good))
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated.pth.*truncated or corrupt"):
        load_file(str(truncated))
    evil = tmp_path / "evil.pth"
    torch.save({"args": argparse.Namespace(lr=0.1), "x": torch.ones(1)}, evil)
    with pytest.raises(CheckpointError, match="pickled Python objects.*convert_checkpoint.py --trust-pickle"):
        load_file(str(evil))
    with pytest.raises(CheckpointError, match="not found"):
        load_file(str(tmp_path / "missing.pth"))


def test_convert_tool_makes_an_official_style_file_loadable(tmp_path):
    src, dst = tmp_path / "official.pth", tmp_path / "plain.pth"
    torch.save({"args": argparse.Namespace(arch="vit_small", lr=0.0005), "epoch": 3, "teacher": {"w": torch.ones(2)}}, src)
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), "--trust-pickle", str(src), str(dst)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    data = load_file(str(dst))
    assert data["args"] == {"arch": "vit_small", "lr": 0.0005} and data["epoch"] == 3
    assert torch.equal(data["teacher"]["w"], torch.ones(2))
    refused = subprocess.run([sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), str(src), str(dst)],
                             capture_output=True, text=True)
    assert refused.returncode != 0 and "--trust-pickle" in refused.stderr


def test_rng_state_round_trip_is_weights_only(tmp_path):
    import random

    import numpy as np

    state = capture_rng_state()
    atomic_save(state, str(tmp_path / "rng.pth"))
    expected = (random.random(), np.random.rand(), torch.rand(1))
    restore_rng_state(load_file(str(tmp_path / "rng.pth")))
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])


def _official_full_checkpoint(model):
    """The reference's layout: DDP student (module.backbone./module.head.), plain teacher, weight norm."""
    student = {"module." + k: v.clone() + 1.0 for k, v in model.student.state_dict().items()}
    teacher = {k: v.clone() + 2.0 for k, v in model.teacher.state_dict().items()}
    return {"student": student, "teacher": teacher, "dino_loss": {"center": torch.full_like(model.loss.center, 0.5)},
            "epoch": 10}


def test_official_full_checkpoint_loads_student_teacher_head_and_center(tmp_path, make_tiny_cfg):
    cfg = make_tiny_cfg()
    source = build_model(cfg)
    path = tmp_path / "full.pth"
    torch.save(_official_full_checkpoint(source), path)
    assert "last_layer.weight_g" in "".join(_official_full_checkpoint(source)["teacher"])
    model = build_model(cfg)
    assert load_pretrained(model, str(path)) == "official_full"
    for k, v in source.student.state_dict().items():
        assert torch.equal(model.student.state_dict()[k], v + 1.0), k
    for k, v in source.teacher.state_dict().items():
        assert torch.equal(model.teacher.state_dict()[k], v + 2.0), k
    assert torch.equal(model.loss.center, torch.full_like(model.loss.center, 0.5))


def test_official_backbone_file_loads_into_both_backbones(tmp_path, make_tiny_cfg):
    cfg = make_tiny_cfg()
    source = build_model(cfg)
    state = {k: v + 3.0 for k, v in source.teacher.backbone.state_dict().items()}
    torch.save(state, tmp_path / "backbone.pth")
    torch.save({"teacher": {"module.backbone." + k: v for k, v in state.items()}}, tmp_path / "wrapped.pth")
    for name in ("backbone.pth", "wrapped.pth"):
        model = build_model(cfg)
        head_before = model.student.head.mlp[0].weight.clone()
        assert load_pretrained(model, str(tmp_path / name)) in ("official_backbone", "official_full")
        for net in (model.student, model.teacher):
            for k, v in state.items():
                assert torch.equal(net.backbone.state_dict()[k], v), (name, k)
        assert torch.equal(model.student.head.mlp[0].weight, head_before)


def test_backbone_that_does_not_fit_fails_naming_the_keys(tmp_path, make_tiny_cfg):
    small = build_model(make_tiny_cfg(**{"MODEL.BACKBONE.NAME": "vit_small"})).teacher.backbone.state_dict()
    torch.save(small, tmp_path / "small.pth")
    with pytest.raises(CheckpointError, match=r"do not fit.*cls_token.*PATCH_SIZE"):
        load_pretrained(build_model(make_tiny_cfg()), str(tmp_path / "small.pth"))
    torch.save({"unrelated": torch.ones(1)}, tmp_path / "unrelated.pth")
    with pytest.raises(CheckpointError, match="none of its 1 keys"):
        load_pretrained(build_model(make_tiny_cfg()), str(tmp_path / "unrelated.pth"))


def test_export_backbone_tool(tmp_path, make_tiny_cfg):
    from dino_research.checkpoint import Checkpointer

    model = build_model(make_tiny_cfg())
    Checkpointer(str(tmp_path), model).save("last_checkpoint.pth", iteration=0)
    out = tmp_path / "student.pth"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "export_backbone.py"), str(tmp_path / "last_checkpoint.pth"),
                           str(out), "--which", "student"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    exported = load_file(str(out))
    assert exported.keys() == model.student.backbone.state_dict().keys()


def test_write_failures_are_diagnosed_whatever_the_exception_type():
    """torch.save may keep no errno at all (its zip writer's RuntimeError): the room left decides."""
    import errno
    import resource

    from dino_research.checkpoint.diagnose import write_failure

    if resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
        pytest.skip("this process runs under a file-size limit, which the diagnosis would name first")
    mb = 2**20
    unexpected_pos = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 832 vs 726")
    assert write_failure(unexpected_pos, 5 * mb, 10 * mb, free=0)[0].startswith("the file system is full (RuntimeError")
    assert write_failure(unexpected_pos, 5 * mb, 10 * mb, free=100 * 2**30) is None  # room left: another fault
    try:  # what a file object raised survives as the context of torch's error
        try:
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        except OSError:
            raise unexpected_pos  # noqa: B904 (the implicit context is what the test needs)
    except RuntimeError as e:
        assert write_failure(e, 5 * mb, 10 * mb, free=100 * 2**30)[0] == os.strerror(errno.EDQUOT)
    reason, fix = write_failure(OSError(errno.EFBIG, "File too large"), 4 * 2**30, 5 * 2**30, free=100 * 2**30)
    assert reason.startswith("File too large: the file system takes no file this large") and "Move OUTPUT_DIR" in fix
