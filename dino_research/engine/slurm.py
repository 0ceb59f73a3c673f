"""SLURM through submitit: one wrapper for every tool (train, k-NN, linear), sweeps as job arrays,
and requeue on preemption or time limit.

A tool adds the flags with :func:`add_slurm_arguments` and starts with
``if not submit_if_requested(args, main): launch(main, ...)``. On the cluster each task (one per
GPU, or per CPU worker) joins the job's process group from SLURM's variables and runs the tool's
``main(args)``. SLURM's warning signal (``--signal=USR2@120`` from submitit) makes training
checkpoint at the end of the current iteration; rank 0 then requeues the job, which resumes from
that checkpoint. A real error fails the job and is never requeued.

Each run keeps ``OUTPUT_DIR/job_status.json`` (``state``: running, done, failed, preempted;
``requeues``; ``job_id``; ``error``), which ``tools/collect_results.py`` reads.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from typing import Callable, Optional

logger = logging.getLogger("dino_research")

STATUS_FILE = "job_status.json"
MANIFEST = "manifest.json"


def add_slurm_arguments(parser: argparse.ArgumentParser) -> None:
    """The SLURM flags shared by every tool."""
    g = parser.add_argument_group("SLURM (submitit): submit instead of running here")
    g.add_argument("--slurm", action="store_true", help="submit to SLURM through submitit")
    g.add_argument("--slurm-dry-run", action="store_true", help="print the sbatch script, submit nothing")
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--gpus-per-node", type=int, default=1, help="0 for CPU-only jobs")
    g.add_argument("--tasks-per-node", type=int, default=0,
                   help="processes per node (default: one per GPU; required >= 1 with --gpus-per-node 0)")
    g.add_argument("--cpus-per-task", type=int, default=10)
    g.add_argument("--mem-gb", type=int, default=0, help="memory per node (0: the partition's default)")
    g.add_argument("--partition", default="")
    g.add_argument("--timeout-min", type=int, default=72 * 60)
    g.add_argument("--account", default="")
    g.add_argument("--qos", default="")
    g.add_argument("--constraint", default="")
    g.add_argument("--comment", default="")
    g.add_argument("--job-dir", default="", help="submitit logs and pickles (default: ./slurm_jobs/NAME)")
    g.add_argument("--job-name", default="", help="default: the tool and config names")
    g.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                   help="one axis of a grid sweep (repeatable), e.g. SOLVER.BASE_LR=0.0005,0.001")
    g.add_argument("--sweep-file", default="", help="YAML mapping KEY: [values, ...], one axis per key")
    g.add_argument("--slurm-cluster", default="slurm", choices=("slurm", "local"), help=argparse.SUPPRESS)


# ------------------------------------------------------------------------------ sweeps
def parse_sweep(axes: list[str], sweep_file: str = "") -> list[list[str]]:
    """Expand ``KEY=V1,V2`` axes (and a YAML file of lists) to the grid of override lists."""
    grid: list[tuple[str, list[str]]] = []
    for axis in axes:
        key, sep, values = axis.partition("=")
        if not sep or not key or not values:
            raise ValueError(f"--sweep {axis!r}: expected KEY=V1,V2,... e.g. SOLVER.BASE_LR=0.0005,0.001")
        grid.append((key.strip(), [v.strip() for v in _split_values(values)]))
    if sweep_file:
        import yaml

        with open(sweep_file) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict) or not all(isinstance(v, list) and v for v in data.values()):
            raise ValueError(f"{sweep_file}: expected a mapping KEY: [value, ...] with non-empty lists")
        grid += [(k, [str(v) for v in vs]) for k, vs in data.items()]
    if not grid:
        return [[]]
    keys = [k for k, _ in grid]
    return [[x for pair in zip(keys, combo) for x in pair] for combo in itertools.product(*(v for _, v in grid))]


def _split_values(values: str) -> list[str]:
    """Split on commas outside brackets, so ``INPUT.GLOBAL_CROPS_SCALE=(0.4,1.0),(0.3,1.0)`` works."""
    out, depth, current = [], 0, ""
    for ch in values:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(current)
            current = ""
        else:
            current += ch
    return out + [current]


def run_name(overrides: list[str]) -> str:
    """A folder name from overrides: ``SOLVER.BASE_LR=0.001_MODEL.HEAD.OUT_DIM=4096``."""
    if not overrides:
        return "run"
    parts = [f"{k}={v}" for k, v in zip(overrides[0::2], overrides[1::2])]
    return re.sub(r"[^A-Za-z0-9._=,+-]", "", "_".join(parts))[:200]


# ------------------------------------------------------------------------------ status files
def write_status(output_dir: str, **fields) -> None:
    path = os.path.join(output_dir, STATUS_FILE)
    status = read_status(output_dir)
    status.update(fields, updated=time.strftime("%Y-%m-%d %H:%M:%S"))
    os.makedirs(output_dir, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(status, f, indent=1)
    os.replace(tmp, path)


def read_status(output_dir: str) -> dict:
    try:
        with open(os.path.join(output_dir, STATUS_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


# ------------------------------------------------------------------------------ the job
class SlurmJob:
    """What each SLURM task runs: distributed environment from SLURM, the tool's main, requeue.

    Picklable (submitit sends it to the cluster). ``main`` is the tool's ``main(args)``.
    """

    def __init__(self, main: Callable, args: argparse.Namespace, output_dir: str):
        self.main, self.args, self.output_dir = main, args, output_dir

    def __call__(self):
        import submitit

        from .launch import launch
        from .preemption import REQUEUE_SIGNALS, stop_requested

        env = submitit.JobEnvironment()
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        if env.global_rank == 0:
            write_status(self.output_dir, state="running", job_id=str(env.job_id), error="")
        try:
            launch(self.main, args=(self.args,), timeout=dist_timeout(self.args))
        except BaseException as e:  # a real error: recorded, never requeued
            if env.global_rank == 0:
                write_status(self.output_dir, state="failed", error=f"{type(e).__name__}: {e}"[:2000])
            raise
        signum = stop_requested()
        if signum in REQUEUE_SIGNALS:
            if env.global_rank == 0:
                status = read_status(self.output_dir)
                write_status(self.output_dir, state="preempted", requeues=int(status.get("requeues", 0)) + 1)
                _requeue(str(env.job_id))
            return "preempted"
        if env.global_rank == 0:
            write_status(self.output_dir, state="done" if signum is None else "stopped")
        return "done"


def _requeue(job_id: str) -> None:
    """``scontrol requeue``: the same job id goes back to the queue and reruns the same pickle."""
    logger.warning("requeuing SLURM job %s", job_id)
    subprocess.run(["scontrol", "requeue", job_id], check=True)


# ------------------------------------------------------------------------------ submission
def _output_dir_of(opts: list[str], default: str) -> str:
    for key, value in zip(opts[0::2], opts[1::2]):
        if key == "OUTPUT_DIR":
            return value
    return default


def _executor(args: argparse.Namespace, folder: str, tasks_per_node: int):
    import submitit

    executor = submitit.AutoExecutor(folder=folder, cluster=args.slurm_cluster)
    params = dict(nodes=args.nodes, tasks_per_node=tasks_per_node, gpus_per_node=args.gpus_per_node,
                  cpus_per_task=args.cpus_per_task, timeout_min=args.timeout_min, name=args.job_name,
                  slurm_signal_delay_s=120)
    if args.mem_gb:
        params["mem_gb"] = args.mem_gb
    for flag in ("partition", "account", "qos", "constraint", "comment"):
        if getattr(args, flag):
            params[f"slurm_{flag}"] = getattr(args, flag)
    executor.update_parameters(**params)
    return executor


def submit_if_requested(args: argparse.Namespace, main: Callable, tool: str = "") -> bool:
    """Submit ``main(args)`` (or a sweep of it) when ``--slurm``/``--slurm-dry-run``; else return False.

    Prints job ids, log and output folders and how to follow the job. OUTPUT_DIR (default
    ``./output/NAME``) and the job dir (``./slurm_jobs/NAME``) are made absolute here, so the job
    finds them whatever its working directory.
    """
    if not (args.slurm or args.slurm_dry_run):
        return False
    tool = tool or os.path.splitext(os.path.basename(sys.argv[0]))[0]
    config_name = os.path.splitext(os.path.basename(args.config_file))[0] if args.config_file else "default"
    args.job_name = args.job_name or f"{tool}_{config_name}"
    tasks = args.tasks_per_node or args.gpus_per_node
    if tasks < 1:
        raise SystemExit("--gpus-per-node 0 needs --tasks-per-node N (CPU worker processes per node)")
    job_dir = os.path.abspath(args.job_dir or os.path.join("slurm_jobs", args.job_name))
    grid = parse_sweep(args.sweep, args.sweep_file)
    base_out = os.path.abspath(_output_dir_of(args.opts, os.path.join("output", args.job_name)))
    runs = []
    for overrides in grid:
        out = os.path.join(base_out, run_name(overrides)) if len(grid) > 1 else base_out
        run_args = argparse.Namespace(**vars(args))
        run_args.slurm = run_args.slurm_dry_run = False
        run_args.sweep, run_args.sweep_file = [], ""
        run_args.opts = list(args.opts) + overrides + ["OUTPUT_DIR", out]
        runs.append((overrides, out, run_args))
    executor = _executor(args, os.path.join(job_dir, "%j"), tasks)
    if args.slurm_dry_run:
        inner = getattr(executor, "_executor", executor)
        print(inner._make_submission_file_text(inner._submitit_command_str, "DRY_RUN"))
        print(f"# dry run: {len(runs)} run(s), {tasks} task(s) per node x {args.nodes} node(s); nothing submitted")
        for overrides, out, _ in runs:
            print(f"#   OUTPUT_DIR {out}  {' '.join(overrides)}")
        return True
    with executor.batch():  # one job array for a sweep
        jobs = [executor.submit(SlurmJob(main, run_args, out)) for _, out, run_args in runs]
    manifest = {"tool": tool, "command": " ".join(shlex.quote(a) for a in sys.argv), "job_dir": job_dir,
                "runs": [{"name": run_name(o), "overrides": o, "output_dir": out, "job_id": job.job_id}
                         for (o, out, _), job in zip(runs, jobs)]}
    if len(runs) > 1 or args.sweep or args.sweep_file:
        os.makedirs(base_out, exist_ok=True)
        with open(os.path.join(base_out, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        print(f"sweep of {len(runs)} runs; manifest: {os.path.join(base_out, MANIFEST)}")
        print(f"summary: python tools/collect_results.py {base_out}")
    for (overrides, out, _), job in zip(runs, jobs):
        print(f"submitted job {job.job_id} {' '.join(overrides)}")
        print(f"  OUTPUT_DIR: {out}")
        print(f"  logs: {job.paths.stdout}  (follow: tail -f {job.paths.stdout}; squeue -j {job.job_id})")
    return True


def wait_for(job_ids: list[str], timeout_s: float = 600.0, poll_s: float = 2.0) -> None:
    """Block until none of ``job_ids`` is pending or running (``squeue``); for tests and scripts."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        out = subprocess.run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i %T"], capture_output=True,
                             text=True).stdout
        if not out.strip():
            return
        time.sleep(poll_s)
    raise TimeoutError(f"jobs {job_ids} still queued or running after {timeout_s:.0f} s")


def main_or_submit(main: Callable, args: argparse.Namespace, launch_kwargs: Optional[dict] = None) -> None:
    """Entry point of every tool: submit when asked, else run locally through ``launch``.

    The config (``--config`` and overrides) is checked first, in this process: a bad key or value
    exits with its message before any job is submitted or any worker is spawned. A user error
    (:class:`~dino_research.utils.errors.UserError`: config, file, folder, lock) anywhere in the tool,
    in this process or in a spawned worker, ends it with one message on stderr (and in the log file)
    and exit status 2; ``--debug`` / ``DINO_RESEARCH_DEBUG=1`` shows the traceback. Bugs keep theirs.
    """
    from torch.multiprocessing import ProcessExitedException

    from ..utils.errors import DEBUG_ENV, USER_ERROR_EXIT, report_user_errors
    from .defaults import load_config
    from .launch import launch

    if getattr(args, "debug", False):
        os.environ[DEBUG_ENV] = "1"  # inherited by spawned workers
    with report_user_errors():
        if hasattr(args, "config_file") and hasattr(args, "opts"):
            load_config(args.config_file, args.opts)
        if submit_if_requested(args, main):
            return
        try:
            launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
                   dist_url=args.dist_url, args=(args,), timeout=dist_timeout(args), **(launch_kwargs or {}))
        except ProcessExitedException as e:
            if e.exit_code == USER_ERROR_EXIT:  # the worker printed its message already
                raise SystemExit(USER_ERROR_EXIT) from None
            raise


def dist_timeout(args: argparse.Namespace) -> datetime.timedelta:
    """The process-group timeout of ``--dist-timeout`` (minutes; 30 when the tool's parser lacks it)."""
    minutes = getattr(args, "dist_timeout", None)
    return datetime.timedelta(minutes=30.0 if minutes is None else minutes)
