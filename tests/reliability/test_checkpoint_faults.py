"""Damaged checkpoints: detected on resume, the newest readable snapshot is used, never a silent restart."""

import errno
import os
import sys
from pathlib import Path

import pytest
import torch

from dino_research.checkpoint import LAST_CHECKPOINT, CheckpointError, atomic_save, load_file
from dino_research.engine import DINOTrainer, default_setup

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from test_training import make_cfg, train  # noqa: E402


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


@pytest.mark.parametrize("damage", [_truncate, _flip_a_weight_byte, _zero_bytes], ids=["truncated", "bit-flip", "empty"])
def test_damaged_last_checkpoint_falls_back_to_newest_snapshot(tmp_path, finished_run, damage):
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


def test_a_full_disk_stops_the_run_clearly_and_it_resumes_once_space_is_back(tmp_path, finished_run, monkeypatch):
    real_save, calls = torch.save, []

    def save_until_the_disk_fills(obj, f):
        calls.append(1)
        if len(calls) < 2:  # last_checkpoint.pth after iteration 3 is written, the one after 4 is not
            return real_save(obj, f)
        f.write(b"\0" * 3 * 2**20)  # what the write manages before the file system is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", save_until_the_disk_fills)
    with pytest.raises(CheckpointError, match=r"writing .*\.pth failed: No space left on device \(\d+ MB free in "
                                              r".*needs more than 3 MB\)\. The previous file is intact\..*"
                                              r"run the same command to resume"):
        train(make_cfg(tmp_path))
    monkeypatch.setattr(torch, "save", real_save)
    assert not list(tmp_path.glob("*.tmp.*"))  # the partial write is gone
    kept = load_file(str(tmp_path / LAST_CHECKPOINT))  # and the checkpoint before it still loads
    assert kept["iteration"] == 3

    resumed = train(make_cfg(tmp_path))  # space is back: the same command finishes the run
    assert resumed.start_iter == kept["iteration"]
    expected = load_file(str(finished_run / LAST_CHECKPOINT))["model"]
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_low_disk_space_is_warned_about_after_a_checkpoint(tmp_path, monkeypatch, caplog):
    from dino_research.checkpoint import checkpointer

    monkeypatch.setattr(checkpointer, "free_bytes", lambda folder: 2**20)  # 1 MB left
    with caplog.at_level("WARNING", logger="dino_research.checkpoint.checkpointer"):
        checkpointer.Checkpointer(str(tmp_path), torch.nn.Linear(512, 512)).save("x.pth")
    assert any("only 1 MB free in" in r.message and "each checkpoint takes 1 MB" in r.message
               for r in caplog.records)
