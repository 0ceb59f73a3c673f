"""DDP with a dead or hung process: the others fail with an error in bounded time instead of hanging."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from dist_utils import free_port  # noqa: E402
from test_training import TINY  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
LONG_RUN = [*TINY, "SOLVER.EPOCHS", "200", "LOG_PERIOD", "1"]


def _train_command(out, *flags):
    return [sys.executable, str(REPO / "tools" / "train_net.py"), *flags, *LONG_RUN, "OUTPUT_DIR", str(out)]


def _wait_for_iterations(out, n, procs, timeout=180):
    metrics, deadline = out / "metrics.json", time.time() + timeout
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        assert all(p.poll() is None for p in procs), "a process ended before training started"
        time.sleep(0.05)
    raise TimeoutError("training did not start")


def _start_ranks(out, *flags):
    """Two processes joined through the environment, as torchrun or SLURM start them (no agent watching)."""
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen(_train_command(out, *flags), env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True, start_new_session=True))
    return procs


def _kill_all(procs):
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()


def _seconds_until_exit(proc, limit):
    start = time.time()
    proc.wait(timeout=limit)
    return time.time() - start


def test_a_killed_rank_makes_the_other_fail_promptly(tmp_path):
    out = tmp_path / "run"
    procs = _start_ranks(out)
    try:
        _wait_for_iterations(out, 3, procs)
        os.killpg(procs[1].pid, signal.SIGKILL)
        elapsed = _seconds_until_exit(procs[0], limit=120)
        assert procs[0].returncode != 0
        assert elapsed < 60, elapsed  # gloo notices the closed connection at the next collective
        log = (out / "log.txt").read_text()
        assert "rank 0 of 2 failed at iteration" in log and "If another process of the job died" in log
        assert "last_checkpoint.pth; run the same command to resume" in log
    finally:
        _kill_all(procs)


def test_a_hung_rank_makes_the_other_fail_after_dist_timeout(tmp_path):
    """A stopped (not dead) peer keeps its sockets open: only the process-group timeout ends the wait."""
    out = tmp_path / "run"
    procs = _start_ranks(out, "--dist-timeout", "0.25")  # 15 s
    try:
        _wait_for_iterations(out, 3, procs)
        os.killpg(procs[1].pid, signal.SIGSTOP)
        elapsed = _seconds_until_exit(procs[0], limit=120)
        assert procs[0].returncode != 0
        assert 10 < elapsed < 75, elapsed
        assert "Timed out" in procs[0].stderr.read()
    finally:
        _kill_all(procs)


def _children(pid):
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and "spawn_main" in (entry / "cmdline").read_text():
                found.append(int(entry.name))
    return found


def test_a_killed_spawned_worker_ends_the_whole_job(tmp_path):
    out = tmp_path / "run"
    launcher = subprocess.Popen(_train_command(out, "--num-gpus", "2"), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for_iterations(out, 3, [launcher])
        workers = _children(launcher.pid)
        assert len(workers) == 2, workers
        os.kill(max(workers), signal.SIGKILL)
        elapsed = _seconds_until_exit(launcher, limit=120)
        assert launcher.returncode != 0 and elapsed < 60, (launcher.returncode, elapsed)
        assert "terminated with signal SIGKILL" in launcher.stderr.read()
        assert not [w for w in workers if Path(f"/proc/{w}").exists() and "Z" not in
                    Path(f"/proc/{w}/stat").read_text().rsplit(")", 1)[1].split()[0]]
    finally:
        _kill_all([launcher])
