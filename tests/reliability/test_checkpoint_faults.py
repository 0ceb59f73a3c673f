"""Damaged checkpoints: detected on resume, the newest readable snapshot is used, never a silent restart.
Write failures for real: a full tmpfs and a file-size limit stop the run clearly, and it resumes."""

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dino_research.checkpoint import LAST_CHECKPOINT, CheckpointError, atomic_save, load_file
from dino_research.engine import DINOTrainer, default_setup

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from test_training import TINY, make_cfg, train  # noqa: E402

TRAIN_NET = Path(__file__).resolve().parents[2] / "tools" / "train_net.py"


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_a_weight_byte(path):
    """Flip one byte inside tensor data: torch.load still reads the file, only the checksum notices."""
    data = bytearray(path.read_bytes())
    probe = load_file(str(path))["model"]["teacher.backbone.cls_token"].flatten()[0].item()
    needle = torch.tensor([probe]).numpy().tobytes()
    at = data.find(needle)
    assert at > 0
    data[at] ^= 0x40
    path.write_bytes(bytes(data))


def _zero_bytes(path):
    path.write_bytes(b"")


# What a sync or download leaves in place of a checkpoint: each is unreadable, none is a pickle.
def _text(path):
    path.write_text("checkpoint moved to /data/old_runs, ask Jo\n")


def _html(path):
    path.write_text("<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body><form>...</form></body></html>\n")


def _json(path):
    path.write_text(json.dumps({"error": {"code": 404, "message": "Not Found"}}))


def _git_lfs_pointer(path):
    size = path.stat().st_size
    path.write_text(f"version https://git-lfs.github.com/spec/v1\noid sha256:{'4d7a2146' * 8}\nsize {size}\n")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 2-epoch run (8 iterations; snapshots after epochs 1 and 2)."""
    out = tmp_path_factory.mktemp("finished")
    train(make_cfg(out))
    return out


def _copy_run(src, dst, files):
    dst.mkdir()
    for name in files:
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


@pytest.mark.parametrize("damage, kind", [
    (_truncate, "cut short after"), (_flip_a_weight_byte, "does not match the checksum"), (_zero_bytes, "an empty file"),
    (_text, "plain text, not weights"), (_html, "an HTML page, not weights: the download saved an error or login page"),
    (_json, "a JSON document (keys ['error'])"), (_git_lfs_pointer, "a git-lfs pointer, not the file"),
], ids=["truncated", "bit-flip", "empty", "text", "html", "json", "git-lfs-pointer"])
def test_damaged_last_checkpoint_falls_back_to_newest_snapshot(tmp_path, finished_run, damage, kind):
    out = _copy_run(finished_run, tmp_path / "run", [LAST_CHECKPOINT, "checkpoint_0001.pth", "checkpoint_0002.pth"])
    # Make "last" newer than every snapshot, then damage it and the newest snapshot.
    damage(out / LAST_CHECKPOINT)
    damage(out / "checkpoint_0002.pth")
    with pytest.raises(CheckpointError):
        load_file(str(out / LAST_CHECKPOINT))
    cfg = make_cfg(out)
    default_setup(cfg)
    trainer = DINOTrainer(cfg)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 4  # checkpoint_0001.pth: after epoch 1 of 4 iterations
    log = (out / "log.txt").read_text()
    assert "resuming from" in log and "checkpoint_0001.pth (iteration 4)" in log
    assert f"cannot resume from {out / LAST_CHECKPOINT}" in log and "checkpoint_0002.pth" in log  # both named
    # Each file is described by what it is, and none is called a pickle to convert with --trust-pickle.
    assert log.count(kind) >= 2 and "--trust-pickle" not in log, log
    expected = load_file(str(finished_run / "checkpoint_0001.pth"))["model"]
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_resumed_from_snapshot_finishes_like_the_uninterrupted_run(tmp_path, finished_run):
    out = _copy_run(finished_run, tmp_path / "run", [LAST_CHECKPOINT, "checkpoint_0001.pth"])
    _truncate(out / LAST_CHECKPOINT)
    resumed = train(make_cfg(out))
    assert resumed.start_iter == 4
    expected = load_file(str(finished_run / LAST_CHECKPOINT))["model"]
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_no_readable_checkpoint_stops_instead_of_starting_over(tmp_path, finished_run):
    out = _copy_run(finished_run, tmp_path / "run", [LAST_CHECKPOINT, "checkpoint_0001.pth"])
    _truncate(out / LAST_CHECKPOINT)
    _flip_a_weight_byte(out / "checkpoint_0001.pth")
    cfg = make_cfg(out)
    default_setup(cfg)
    trainer = DINOTrainer(cfg)
    with pytest.raises(CheckpointError, match=r"(?s)none is readable.*last_checkpoint.pth.*checkpoint_0001.pth"
                                              r".*does not match the checksum.*Refusing to start from scratch"):
        trainer.resume_or_load(resume=True)
    assert (out / LAST_CHECKPOINT).stat().st_size > 0  # nothing was overwritten


def test_only_snapshots_left_resumes_from_the_newest(tmp_path, finished_run):
    out = _copy_run(finished_run, tmp_path / "run", ["checkpoint_0001.pth", "checkpoint_0002.pth"])
    cfg = make_cfg(out)
    default_setup(cfg)
    trainer = DINOTrainer(cfg)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 8


def test_stale_temporary_of_a_killed_write_is_removed_at_start(tmp_path, finished_run):
    out = _copy_run(finished_run, tmp_path / "run", [LAST_CHECKPOINT])
    stale = out / f"{LAST_CHECKPOINT}.tmp.12345"
    stale.write_bytes((out / LAST_CHECKPOINT).read_bytes()[:1000])
    cfg = make_cfg(out)
    default_setup(cfg)
    DINOTrainer(cfg).resume_or_load(resume=True)
    assert not stale.exists() and "interrupted checkpoint write" in (out / "log.txt").read_text()


def test_checksum_is_written_and_checked(tmp_path):
    trainer = train(make_cfg(tmp_path))
    data = load_file(str(tmp_path / LAST_CHECKPOINT))
    assert data["integrity"]["algorithm"] == "crc32-v1"
    # Any change of content, not only of tensors, is noticed: here the stored iteration.
    data["iteration"] = 7
    atomic_save(data, str(tmp_path / "edited.pth"))
    with pytest.raises(CheckpointError, match="does not match the checksum"):
        load_file(str(tmp_path / "edited.pth"))
    assert trainer.max_iter == 8


class _Payload:
    """Unpickling this runs ``os.system``: what a malicious checkpoint would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickled_code_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.ones(1)}, "payload": _Payload(marker)}, evil)
    with pytest.raises(CheckpointError, match="pickled Python objects.*--trust-pickle"):
        load_file(str(evil))
    assert not marker.exists()
    # Loaded without weights_only, the same file does run the code: the payload is real.
    torch.load(evil, weights_only=False)
    assert marker.exists()


def _assert_equals_the_uninterrupted_run(out, finished_run):
    expected = load_file(str(finished_run / LAST_CHECKPOINT))
    got = load_file(str(out / LAST_CHECKPOINT))
    assert got["iteration"] == expected["iteration"] == 8
    for key, value in expected["model"].items():
        assert torch.equal(value, got["model"][key]), key


@pytest.fixture
def small_tmpfs(tmp_path):
    """``mount(size)``: a tmpfs of ``size`` bytes at ``tmp_path/disk``; ``grow(size)`` remounts it larger."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = []

    def run(*args):
        return subprocess.run(args, capture_output=True, text=True)

    def mount(size):
        proc = run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk))
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}: mounting needs root "
                        f"with CAP_SYS_ADMIN); the RLIMIT_FSIZE test below covers a real failed write everywhere")
        mounted.append(disk)
        return disk

    def grow(size):
        assert run("mount", "-o", f"remount,size={size}", str(disk)).returncode == 0

    yield mount, grow
    for path in mounted:  # lazily: the run's log file may still be open
        run("umount", "-l", str(path))


def test_a_full_disk_stops_the_run_clearly_and_it_resumes_once_space_is_back(finished_run, small_tmpfs):
    mount, grow = small_tmpfs
    size = (finished_run / LAST_CHECKPOINT).stat().st_size
    # Room for one checkpoint and half: iteration 3's fits, iteration 4's temporary copy fills the disk.
    out = mount(size + size // 2) / "run"
    with pytest.raises(CheckpointError) as failure:
        train(make_cfg(out))
    message = str(failure.value)
    assert re.search(rf"writing {re.escape(str(out / LAST_CHECKPOINT))} failed: No space left on device \(\d+ MB free "
                     rf"in {re.escape(str(out))}; the file needs about \d+ MB, \d+ MB were written\)\. The previous "
                     rf"file is intact\. Free space there .*or move OUTPUT_DIR, then run the same command to resume",
                     message), message
    assert failure.value.__cause__ is not None  # what torch.save really raised is kept (not an injected OSError)
    assert not list(out.glob("*.tmp.*"))  # the partial write is gone
    kept = load_file(str(out / LAST_CHECKPOINT))  # and the checkpoint before it still loads, checksum included
    assert kept["iteration"] == 3
    assert "the next checkpoint write may fail" in (out / "log.txt").read_text()  # warned after iteration 3

    grow(6 * size)  # space is back: the same command finishes the run
    resumed = train(make_cfg(out))
    assert resumed.start_iter == kept["iteration"]
    _assert_equals_the_uninterrupted_run(out, finished_run)


def test_a_file_size_limit_stops_the_run_clearly_and_it_resumes_once_lifted(tmp_path, finished_run):
    out = _copy_run(finished_run, tmp_path / "run", ["checkpoint_0001.pth"])
    shutil.copyfile(out / "checkpoint_0001.pth", out / LAST_CHECKPOINT)  # the run after epoch 1 (iteration 4)
    before = (out / LAST_CHECKPOINT).read_bytes()
    limit = 16 * 2**20  # the logs fit, a checkpoint (~90 MB) does not
    assert limit < len(before)

    def under_the_limit():  # in the child: writes past the limit fail with EFBIG instead of killing it
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    command = [sys.executable, str(TRAIN_NET), *TINY, "OUTPUT_DIR", str(out)]
    proc = subprocess.run(command, preexec_fn=under_the_limit, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]  # a user error: one message
    assert re.search(rf"writing {re.escape(str(out / LAST_CHECKPOINT))} failed: the file reached this process's "
                     rf"file-size limit \(RLIMIT_FSIZE, `ulimit -f`\) of 16 MB \(\d+ MB free in {re.escape(str(out))}; "
                     rf"the file needs about \d+ MB, 16 MB were written\)\. The previous file is intact\. Raise the "
                     rf"limit \(`ulimit -f unlimited`.*run the same command to resume", proc.stderr), proc.stderr[-3000:]
    assert not list(out.glob("*.tmp.*"))
    assert (out / LAST_CHECKPOINT).read_bytes() == before  # untouched, byte for byte

    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)  # the same command, no limit
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in (out / "log.txt").read_text()
    _assert_equals_the_uninterrupted_run(out, finished_run)


def test_low_disk_space_is_warned_about_after_a_checkpoint(tmp_path, monkeypatch, caplog):
    from dino_research.checkpoint import checkpointer

    monkeypatch.setattr(checkpointer, "free_bytes", lambda folder: 2**20)  # 1 MB left
    with caplog.at_level("WARNING", logger="dino_research.checkpoint.checkpointer"):
        checkpointer.Checkpointer(str(tmp_path), torch.nn.Linear(512, 512)).save("x.pth")
    assert any("only 1 MB free in" in r.message and "each checkpoint takes 1 MB" in r.message
               for r in caplog.records)
