"""One run per OUTPUT_DIR: a second train_net.py on a live run's folder refuses at once, naming the
holder; stale locks (dead process, reused PID, silent other host, requeued SLURM job) are taken over;
a multi-process job holds the lock once; the lock goes away on any exit."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dino_research.checkpoint import LAST_CHECKPOINT
from dino_research.utils.run_lock import LOCK_FILE, RunLock, RunLockedError, hold_run_lock

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dist_utils import run_on_gloo  # noqa: E402
from test_training import TINY  # noqa: E402


def _train_cmd(out, *extra):
    return [sys.executable, str(REPO / "tools" / "train_net.py"), *TINY, "LOG_PERIOD", "1", "OUTPUT_DIR", str(out),
            *extra]


def _wait_for(path: Path, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists():
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise TimeoutError(f"{path} did not appear")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(folder: Path, **fields) -> Path:
    info = {"host": socket.gethostname(), "pid": 1, "start_ticks": None, "started": "earlier", "slurm_job": "",
            "command": "train_net.py (the other run)", "token": "other"}
    info.update(fields)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    path.write_text(json.dumps(info))
    return path


def test_a_second_run_on_a_live_runs_folder_refuses_at_once_and_the_live_run_is_untouched(tmp_path):
    out = tmp_path / "run"
    # The live run: long enough to be caught mid-way; a checkpoint (and its temporary) every iteration.
    live = subprocess.Popen(_train_cmd(out, "SOLVER.EPOCHS", "30", "SOLVER.CHECKPOINT_PERIOD", "1",
                                       "SOLVER.SNAPSHOT_EPOCHS", "0"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(out / LAST_CHECKPOINT, live)
        holder = json.loads((out / LOCK_FILE).read_text())
        assert holder["pid"] == live.pid and holder["host"] == socket.gethostname()
        start = time.time()
        second = subprocess.run(_train_cmd(out, "SOLVER.EPOCHS", "30", "SOLVER.BASE_LR", "0.01"),
                                capture_output=True, text=True, timeout=120)
        elapsed = time.time() - start
        assert live.poll() is None, "the live run must survive the second start"
    finally:
        stdout, stderr = live.communicate(timeout=300)
    assert second.returncode == 2, second.stderr
    assert "Traceback" not in second.stderr
    assert f"is in use by another run (host {socket.gethostname()}, PID {live.pid}" in second.stderr
    assert "set another OUTPUT_DIR" in second.stderr
    assert elapsed < 30  # refused before building anything (an interpreter start and the imports)
    assert live.returncode == 0, stderr
    # The live run's files are its own: its config, its log (the second run did not even append).
    assert "0.01" not in (out / "config.yaml").read_text().split("BASE_LR:")[1].splitlines()[0]
    assert "SOLVER.BASE_LR 0.01" not in (out / "log.txt").read_text()
    assert not (out / LOCK_FILE).exists(), "released at the end"
    assert not list(out.glob("*.tmp.*"))


def test_a_lock_left_by_a_killed_run_is_taken_over_and_the_run_resumes(tmp_path):
    out = tmp_path / "run"
    first = subprocess.run(_train_cmd(out, "SOLVER.EPOCHS", "1"), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    _write_lock(out, pid=_dead_pid())  # what a SIGKILLed run leaves behind
    again = subprocess.run(_train_cmd(out, "SOLVER.EPOCHS", "2"), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "took over the lock" in again.stdout and "is no longer running" in again.stdout
    assert "resumed from" in again.stdout
    assert "took over the lock" in (out / "log.txt").read_text()
    assert not (out / LOCK_FILE).exists()


def test_stale_rules(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    lock = RunLock(str(tmp_path), stale_after_s=60)
    me = socket.gethostname()
    assert lock.stale_reason({"host": me, "pid": _dead_pid()}) is not None
    assert lock.stale_reason({"host": me, "pid": os.getppid()}) is None  # alive: pytest's parent
    # A live PID with another start time is a reused PID: the holder is gone.
    assert "no longer running" in lock.stale_reason({"host": me, "pid": os.getppid(), "start_ticks": -5})
    # Another host: judged by the heartbeat's age on the file system's clock.
    path = _write_lock(tmp_path, host="node-042", pid=123)
    assert lock.stale_reason({"host": "node-042", "pid": 123}) is None
    old = time.time() - 120
    os.utime(path, (old, old))
    assert "no heartbeat for" in lock.stale_reason({"host": "node-042", "pid": 123})
    # The same SLURM job again (requeue): taken over even with a fresh heartbeat.
    os.utime(path)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    requeued = RunLock(str(tmp_path), stale_after_s=60)
    assert "requeued" in requeued.stale_reason({"host": "node-042", "pid": 123, "slurm_job": "4242"})
    assert requeued.stale_reason({"host": "node-042", "pid": 123, "slurm_job": "999"}) is None


def test_a_live_lock_of_another_host_refuses_and_a_silent_one_is_taken_over(tmp_path):
    path = _write_lock(tmp_path, host="node-042", pid=123, slurm_job="77")
    with pytest.raises(RunLockedError, match=r"host node-042, PID 123, SLURM job 77"):
        RunLock(str(tmp_path), stale_after_s=60).acquire()
    assert json.loads(path.read_text())["host"] == "node-042"  # a refusal leaves the holder's file alone
    old = time.time() - 120
    os.utime(path, (old, old))
    with RunLock(str(tmp_path), stale_after_s=60) as lock:
        assert json.loads(path.read_text())["token"] == lock.info["token"]
        assert "node-042" in lock.took_over and "no heartbeat" in lock.took_over
    assert not path.exists()


def test_the_lock_is_released_on_an_exception_and_heartbeats_while_held(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with RunLock(str(tmp_path), heartbeat_s=0.05):
            path = tmp_path / LOCK_FILE
            first = path.stat().st_mtime_ns
            deadline = time.time() + 10
            while path.stat().st_mtime_ns == first and time.time() < deadline:
                time.sleep(0.02)
            assert path.stat().st_mtime_ns != first, "the holder touches its lock"
            raise ZeroDivisionError("an error inside the lock")
    assert not (tmp_path / LOCK_FILE).exists()


def _hold_on_every_rank(rank, world_size, folder, results):
    with hold_run_lock(folder) as lock:
        holders = len(list(Path(folder).glob(LOCK_FILE)))
        Path(results, f"rank{rank}").write_text(f"{lock is not None} {holders}")
        import torch.distributed as dist

        dist.barrier()  # rank 0 keeps the lock until every rank has counted (else a race: 'False 0')
    # Every rank refuses together when the folder is held by someone else.
    if rank == 0:
        _write_lock(Path(folder), host="node-042", pid=1)
    import torch.distributed as dist

    dist.barrier()
    try:
        with hold_run_lock(folder):
            pass
    except RunLockedError as e:
        Path(results, f"refused{rank}").write_text(str(e))


def test_a_multi_process_job_holds_the_lock_once_and_refuses_together(tmp_path):
    folder, results = tmp_path / "out", tmp_path / "results"
    results.mkdir()
    run_on_gloo(_hold_on_every_rank, 2, str(folder), str(results))
    assert (results / "rank0").read_text() == "True 1"
    assert (results / "rank1").read_text() == "False 1"
    for rank in (0, 1):
        assert "node-042" in (results / f"refused{rank}").read_text()


def test_output_dir_that_is_a_file_is_refused_before_anything_is_written(tmp_path):
    target = tmp_path / "not_a_folder"
    target.write_text("precious")
    proc = subprocess.run(_train_cmd(target), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"OUTPUT_DIR = {target} is a file" in proc.stderr
    assert target.read_text() == "precious"


def test_only_temporaries_of_dead_writers_are_removed(tmp_path):
    import torch

    from dino_research.checkpoint import Checkpointer

    me = socket.gethostname()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        files = {
            "dead": tmp_path / f"last_checkpoint.pth.tmp.{me}.{_dead_pid()}",
            "old_format_dead": tmp_path / f"checkpoint_0001.pth.tmp.{_dead_pid()}",
            "alive": tmp_path / f"teacher_backbone.pth.tmp.{me}.{sleeper.pid}",  # e.g. an export in progress
            "other_host_fresh": tmp_path / "last_checkpoint.pth.tmp.node-042.77",
            "other_host_old": tmp_path / "checkpoint_0002.pth.tmp.node-042.78",
        }
        for path in files.values():
            path.write_bytes(b"partial")
        old = time.time() - 3600
        os.utime(files["other_host_old"], (old, old))
        removed = Checkpointer(str(tmp_path), torch.nn.Linear(1, 1)).remove_stale_temporaries(stale_after_s=600)
        assert sorted(removed) == sorted(str(files[k]) for k in ("dead", "old_format_dead", "other_host_old"))
        assert files["alive"].exists() and files["other_host_fresh"].exists()
    finally:
        sleeper.kill()
