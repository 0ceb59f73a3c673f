"""No tool writes over its own input: export_backbone.py and convert_checkpoint.py, run as the user runs them."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dino_research.checkpoint import Checkpointer, load_file
from dino_research.modeling import build_model

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def _run(tool, *args):
    return subprocess.run([sys.executable, str(TOOLS / tool), *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def _refused_in_one_line(proc, *words):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for word in words:
        assert word in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from conftest import tiny_cfg

    out = tmp_path_factory.mktemp("run")
    Checkpointer(str(out), build_model(tiny_cfg())).save("last_checkpoint.pth", iteration=0)
    return out / "last_checkpoint.pth"


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    path = tmp_path_factory.mktemp("official") / "official.pth"
    torch.save({"args": argparse.Namespace(arch="vit_small"), "teacher": {"w": torch.ones(2)}}, path)
    return path


def _alias(kind, target, folder):
    """``target`` itself, a symbolic link to it, or a hard link to it."""
    if kind == "same":
        return target
    alias = folder / f"{kind}.pth"
    alias.unlink(missing_ok=True)
    (alias.symlink_to if kind == "symlink" else alias.hardlink_to)(target)
    return alias


ALIASES = [("same", "(the same file)"), ("symlink", "through a symbolic link"), ("hardlink", "through a hard link")]


@pytest.mark.parametrize("kind, how", ALIASES, ids=[a[0] for a in ALIASES])
def test_export_refuses_to_write_over_its_input(tmp_path, checkpoint, kind, how):
    before = checkpoint.read_bytes()
    proc = _run("export_backbone.py", checkpoint, _alias(kind, checkpoint, tmp_path))
    _refused_in_one_line(proc, "error: output ", f"is the input {checkpoint}", how, "give another output file")
    assert checkpoint.read_bytes() == before


@pytest.mark.parametrize("kind, how", ALIASES, ids=[a[0] for a in ALIASES])
def test_convert_refuses_to_write_over_its_input(tmp_path, official, kind, how):
    before = official.read_bytes()
    proc = _run("convert_checkpoint.py", "--trust-pickle", official, _alias(kind, official, tmp_path))
    _refused_in_one_line(proc, f"is the input {official}", how)
    assert official.read_bytes() == before


def test_export_into_a_directory_writes_teacher_backbone_pth(checkpoint):
    before = checkpoint.read_bytes()
    proc = _run("export_backbone.py", checkpoint, checkpoint.parent)  # the run's own OUTPUT_DIR
    assert proc.returncode == 0, proc.stderr
    written = checkpoint.parent / "teacher_backbone.pth"
    assert f"to {written}" in proc.stdout and "cls_token" in load_file(str(written))
    assert checkpoint.read_bytes() == before


def test_outputs_in_missing_folders_are_created_and_a_file_in_the_way_is_named(tmp_path, checkpoint, official):
    proc = _run("export_backbone.py", checkpoint, tmp_path / "new" / "deeper" / "b.pth")
    assert proc.returncode == 0, proc.stderr
    assert "cls_token" in load_file(str(tmp_path / "new" / "deeper" / "b.pth"))
    proc = _run("convert_checkpoint.py", "--trust-pickle", official, tmp_path / "other" / "plain.pth")
    assert proc.returncode == 0, proc.stderr
    assert load_file(str(tmp_path / "other" / "plain.pth"))["args"] == {"arch": "vit_small"}
    (tmp_path / "a_file").write_text("")
    proc = _run("export_backbone.py", checkpoint, tmp_path / "a_file" / "b.pth")
    _refused_in_one_line(proc, f"{tmp_path / 'a_file'} is a file, not a folder")


def test_convert_names_a_directory_output_and_a_missing_input(tmp_path, official):
    before = official.read_bytes()
    _refused_in_one_line(_run("convert_checkpoint.py", "--trust-pickle", official, tmp_path),
                         f"output {tmp_path} is a directory: give a file name")
    assert official.read_bytes() == before and os.listdir(tmp_path) == []
    _refused_in_one_line(_run("convert_checkpoint.py", "--trust-pickle", tmp_path / "gone.pth", tmp_path / "o.pth"),
                         "gone.pth is not there: no such file or directory")
