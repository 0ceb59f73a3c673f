"""Signals: a running training checkpoints at the end of the current iteration and exits cleanly."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dino_research.checkpoint import LAST_CHECKPOINT, load_file

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_training import TINY  # noqa: E402


def _command(out, num_gpus=1, workers=0):
    return [sys.executable, str(REPO / "tools" / "train_net.py"), "--num-gpus", str(num_gpus), *TINY,
            "SOLVER.EPOCHS", "6", "SOLVER.CHECKPOINT_PERIOD", "1000", "SOLVER.SNAPSHOT_EPOCHS", "0",
            "LOG_PERIOD", "1", "DATALOADER.NUM_WORKERS", str(workers), "OUTPUT_DIR", str(out)]


def _wait_for_iterations(out, n, proc, timeout=120):
    metrics = out / "metrics.json"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise TimeoutError("training did not start")


# The loader-workers case: the group's SIGTERM reaches the data-loader workers too; they must leave
# it to the main process (which checkpoints) instead of dying and failing its next batch.
@pytest.mark.parametrize("signum,num_gpus,workers", [(signal.SIGTERM, 1, 0), (signal.SIGINT, 2, 0), (signal.SIGTERM, 1, 2)],
                         ids=["SIGTERM-1proc", "SIGINT-2proc", "SIGTERM-1proc-2workers"])
def test_signal_checkpoints_then_resume_matches_uninterrupted(tmp_path, signum, num_gpus, workers):
    full = subprocess.run(_command(tmp_path / "full", num_gpus, workers), capture_output=True, text=True,
                          timeout=300)
    assert full.returncode == 0, full.stdout[-2000:] + full.stderr[-3000:]
    out = tmp_path / "stopped"
    proc = subprocess.Popen(_command(out, num_gpus, workers), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    _wait_for_iterations(out, 3, proc)
    os.killpg(proc.pid, signum)  # the whole process group, as a terminal or a scheduler would
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    stopped_at = load_file(str(out / LAST_CHECKPOINT))["iteration"]
    done = max(json.loads(line)["iteration"] for line in (out / "metrics.json").read_text().splitlines()) + 1
    assert 3 <= stopped_at < 24 and stopped_at == done  # nothing lost: the checkpoint is the last iteration
    assert f"stopped by {signal.Signals(signum).name}" in (out / "log.txt").read_text()
    resumed = subprocess.run(_command(out, num_gpus, workers), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    expected = load_file(str(tmp_path / "full" / LAST_CHECKPOINT))["model"]
    got = load_file(str(out / LAST_CHECKPOINT))["model"]
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_stop_request_semantics():
    """The handler only records the first request; USR1/USR2 ask for a requeue, TERM/INT do not."""
    from dino_research.engine import preemption

    preemption.clear_stop_request()
    preemption._handler(signal.SIGUSR2, None)
    preemption._handler(signal.SIGTERM, None)  # a later signal does not replace the first
    assert preemption.stop_requested() == signal.SIGUSR2
    assert preemption.TrainingStopped(signal.SIGUSR2, 5, "x").should_requeue
    assert not preemption.TrainingStopped(signal.SIGTERM, 5, "x").should_requeue
    preemption._handler(signal.SIGINT, None)  # duplicate delivery within the window: ignored
    preemption._requested_at -= 10
    with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C later: immediate stop
        preemption._handler(signal.SIGINT, None)
    preemption.clear_stop_request()
    assert preemption.stop_requested() is None
