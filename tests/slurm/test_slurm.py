"""The SLURM wrapper: argument expansion and submission logic on submitit's local executor, and
real jobs (DDP, sweep, preemption with requeue) on the single-node cluster of local_cluster.sh.

The real-cluster tests need `sbatch` and a running cluster (`.ci/run` starts one); they are skipped
only where `sbatch` is absent.
"""

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dino_research.checkpoint import LAST_CHECKPOINT, load_file
from dino_research.engine import default_argument_parser
from dino_research.engine.slurm import parse_sweep, read_status, run_name, wait_for

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "engine"))
from test_training import TINY  # noqa: E402

HAS_SLURM = shutil.which("sbatch") is not None
needs_slurm = pytest.mark.skipif(not HAS_SLURM, reason="sbatch not installed (CI installs slurm-wlm)")


# ------------------------------------------------------------------------------ pure logic
def test_sweep_grid_and_run_names():
    grid = parse_sweep(["SOLVER.BASE_LR=0.0005,0.001", "MODEL.HEAD.OUT_DIM=4096,65536"])
    assert grid == [
        ["SOLVER.BASE_LR", "0.0005", "MODEL.HEAD.OUT_DIM", "4096"],
        ["SOLVER.BASE_LR", "0.0005", "MODEL.HEAD.OUT_DIM", "65536"],
        ["SOLVER.BASE_LR", "0.001", "MODEL.HEAD.OUT_DIM", "4096"],
        ["SOLVER.BASE_LR", "0.001", "MODEL.HEAD.OUT_DIM", "65536"],
    ]
    assert parse_sweep(["INPUT.GLOBAL_CROPS_SCALE=(0.4,1.0),(0.3,1.0)"]) == [
        ["INPUT.GLOBAL_CROPS_SCALE", "(0.4,1.0)"], ["INPUT.GLOBAL_CROPS_SCALE", "(0.3,1.0)"]]
    assert run_name(grid[0]) == "SOLVER.BASE_LR=0.0005_MODEL.HEAD.OUT_DIM=4096"
    assert parse_sweep([]) == [[]]
    with pytest.raises(ValueError, match="KEY=V1,V2"):
        parse_sweep(["SOLVER.BASE_LR"])


def test_sweep_file(tmp_path):
    f = tmp_path / "sweep.yaml"
    f.write_text("SOLVER.BASE_LR: [0.1, 0.2]\nSEED: [0, 1, 2]\n")
    assert len(parse_sweep([], str(f))) == 6


def test_dry_run_prints_the_sbatch_script(tmp_path):
    cmd = [sys.executable, str(REPO / "tools" / "train_net.py"), "--slurm-dry-run", "--nodes", "2",
           "--gpus-per-node", "8", "--partition", "learnlab", "--timeout-min", "600", "--account", "vision",
           "--job-dir", str(tmp_path / "jobs"), "--sweep", "SOLVER.BASE_LR=0.0005,0.001", "OUTPUT_DIR", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for expected in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                     "#SBATCH --partition=learnlab", "#SBATCH --time=600", "#SBATCH --account=vision",
                     "#SBATCH --signal=USR2@120", "nothing submitted"):
        assert expected in out, expected
    assert out.count("OUTPUT_DIR") == 2 and "SOLVER.BASE_LR=0.001" in out
    assert not (tmp_path / "jobs").exists() or not list((tmp_path / "jobs").rglob("*.pkl"))


def test_eval_tools_accept_the_same_flags():
    parser = default_argument_parser()
    args = parser.parse_args(["--slurm", "--nodes", "3", "--qos", "high", "--constraint", "volta32gb",
                              "--comment", "deadline", "--mem-gb", "200", "--cpus-per-task", "8"])
    assert (args.nodes, args.qos, args.constraint, args.comment, args.mem_gb) == (3, "high", "volta32gb", "deadline", 200)
    for tool in ("eval_knn.py", "eval_linear.py"):
        proc = subprocess.run([sys.executable, str(REPO / "tools" / tool), "--help"], capture_output=True, text=True)
        assert "--slurm-dry-run" in proc.stdout and "--timeout-min" in proc.stdout


def test_local_executor_runs_the_job_and_records_status(tmp_path):
    """The whole wrapper (submission, distributed env, status file) on submitit's local executor."""
    cmd = [sys.executable, str(REPO / "tools" / "train_net.py"), "--slurm", "--slurm-cluster", "local",
           "--gpus-per-node", "0", "--tasks-per-node", "1", "--job-dir", str(tmp_path / "jobs"), *TINY,
           "SOLVER.EPOCHS", "1", "OUTPUT_DIR", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "submitted job" in proc.stdout and "tail -f" in proc.stdout
    deadline = time.time() + 240
    while read_status(str(tmp_path / "out")).get("state") not in ("done", "failed") and time.time() < deadline:
        time.sleep(1)
    status = read_status(str(tmp_path / "out"))
    assert status["state"] == "done", (status, [p.read_text()[-2000:] for p in (tmp_path / "jobs").rglob("*.err")])
    assert load_file(str(tmp_path / "out" / LAST_CHECKPOINT))["iteration"] == 4


# ------------------------------------------------------------------------------ real SLURM
def _submit(tmp_path, *overrides, tasks=1, flags=()):
    cmd = [sys.executable, str(REPO / "tools" / "train_net.py"), "--slurm", "--gpus-per-node", "0",
           "--tasks-per-node", str(tasks), "--cpus-per-task", "1", "--timeout-min", "30",
           "--job-dir", str(tmp_path / "jobs"), *flags, *TINY, *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return re.findall(r"submitted job (\S+)", proc.stdout), proc.stdout


def _job_logs(tmp_path) -> str:
    return "\n".join(p.read_text()[-1500:] for p in (tmp_path / "jobs").rglob("*_log.err"))


@needs_slurm
def test_two_task_ddp_job_finishes_with_checkpoint_and_metrics(tmp_path):
    out = tmp_path / "ddp"
    jobs, _ = _submit(tmp_path, "OUTPUT_DIR", str(out), tasks=2)
    wait_for(jobs, timeout_s=600)
    assert read_status(str(out)).get("state") == "done", _job_logs(tmp_path)
    ckpt = load_file(str(out / LAST_CHECKPOINT))
    assert ckpt["iteration"] == 4 and len(ckpt["rng"]) == 2  # 16 images / (4 x 2 ranks) x 2 epochs
    assert (out / "metrics.json").read_text().strip() and (out / "log_rank1.txt").is_file()


@needs_slurm
def test_sweep_is_one_array_and_collect_results_lists_both_runs(tmp_path):
    sweep = tmp_path / "sweep"
    jobs, stdout = _submit(tmp_path, "SOLVER.EPOCHS", "1", "OUTPUT_DIR", str(sweep),
                           flags=("--sweep", "SOLVER.BASE_LR=0.0005,0.001"))
    assert len(jobs) == 2 and len({j.split("_")[0] for j in jobs}) == 1  # one array, two tasks
    manifest = json.loads((sweep / "manifest.json").read_text())
    assert [r["overrides"] for r in manifest["runs"]] == [["SOLVER.BASE_LR", "0.0005"], ["SOLVER.BASE_LR", "0.001"]]
    wait_for(jobs, timeout_s=600)
    table = subprocess.run([sys.executable, str(REPO / "tools" / "collect_results.py"), str(sweep), "--csv",
                            str(tmp_path / "r.csv")], capture_output=True, text=True)
    assert table.returncode == 0, table.stderr
    lines = [line for line in table.stdout.splitlines() if line.startswith("| SOLVER")]
    assert len(lines) == 2 and all("| done |" in line for line in lines), table.stdout + _job_logs(tmp_path)
    assert (tmp_path / "r.csv").read_text().count("\n") == 3


@needs_slurm
def test_preempted_job_checkpoints_requeues_and_matches_uninterrupted(tmp_path):
    long = ["SOLVER.EPOCHS", "8", "SOLVER.CHECKPOINT_PERIOD", "1000", "SOLVER.SNAPSHOT_EPOCHS", "0"]
    ref_jobs, _ = _submit(tmp_path, *long, "OUTPUT_DIR", str(tmp_path / "ref"))
    jobs, _ = _submit(tmp_path, *long, "OUTPUT_DIR", str(tmp_path / "pre"))
    metrics = tmp_path / "pre" / "metrics.json"
    deadline = time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert time.time() < deadline, _job_logs(tmp_path)
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR2", jobs[0]], check=True)  # SLURM's preemption warning
    deadline = time.time() + 300
    while read_status(str(tmp_path / "pre")).get("requeues", 0) < 1:
        assert time.time() < deadline, _job_logs(tmp_path)
        time.sleep(0.5)
    wait_for(ref_jobs + jobs, timeout_s=900)
    status = read_status(str(tmp_path / "pre"))
    assert status["state"] == "done" and status["requeues"] == 1, (status, _job_logs(tmp_path))
    ref, got = load_file(str(tmp_path / "ref" / LAST_CHECKPOINT)), load_file(str(tmp_path / "pre" / LAST_CHECKPOINT))
    assert got["iteration"] == ref["iteration"] == 32
    for key, value in ref["model"].items():
        assert torch.equal(got["model"][key], value), key
    assert "stopped by SIGUSR2" in (tmp_path / "pre" / "log.txt").read_text()


def test_a_real_error_fails_the_job_without_requeue(tmp_path):
    """A job whose training raises is recorded as failed, with the error, and never requeued."""
    cmd = [sys.executable, str(REPO / "tools" / "train_net.py"), "--slurm", "--slurm-cluster", "local",
           "--gpus-per-node", "0", "--tasks-per-node", "1", "--job-dir", str(tmp_path / "jobs"), *TINY,
           "DATASETS.TRAIN", "ImageFolder", "DATASETS.TRAIN_ROOT", str(tmp_path / "missing"),
           "OUTPUT_DIR", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    deadline = time.time() + 240
    while read_status(str(tmp_path / "out")).get("state") not in ("done", "failed") and time.time() < deadline:
        time.sleep(1)
    status = read_status(str(tmp_path / "out"))
    assert status["state"] == "failed" and "missing" in status["error"]
    assert status.get("requeues", 0) == 0
