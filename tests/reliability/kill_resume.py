#!/usr/bin/env python
"""Kill a CPU training run with SIGKILL again and again, resume it each time, and prove nothing was lost.

    python tests/reliability/kill_resume.py [--kills 20] [--in-save 5] [--epochs 16] [--seed 0] [--workdir DIR]

1. A reference run trains uninterrupted (a tiny ViT on synthetic images, a checkpoint every iteration).
2. The same command runs again in another folder and is SIGKILLed (the whole process group, data
   workers included) ``--kills`` times: ``--in-save`` of them half-way through a checkpoint write
   (``faulty_train.py``), the others at random moments (while the trainer starts, or after 1 or 2 new
   iterations, plus a random fraction of two iterations). After every kill,
   every ``*.pth`` file on disk must load (``load_file``: readable, checksum intact); then the run is
   started again and resumes by itself.
3. After the last kill the run finishes; its final model (teacher, student, center) and optimizer state
   must equal the reference's bitwise.

Prints one line per kill and a summary, and exits non-zero on any failure. ``test_kill_resume.py`` runs
it with a few kills in the test suite; RELIABILITY.md quotes a longer run.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dino_research.checkpoint import LAST_CHECKPOINT, load_file

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

# 16 images, batch 4: 4 iterations per epoch, with a checkpoint after each and a snapshot every epoch,
# stochastic depth on (so the RNG state must be restored exactly) and one data-loader worker.
OVERRIDES = [
    "MODEL.BACKBONE.NAME", "vit_tiny", "MODEL.BACKBONE.DROP_PATH_RATE", "0.1",
    "MODEL.HEAD.OUT_DIM", "64", "MODEL.HEAD.HIDDEN_DIM", "32", "MODEL.HEAD.BOTTLENECK_DIM", "16",
    "INPUT.GLOBAL_CROP_SIZE", "32", "INPUT.LOCAL_CROP_SIZE", "16", "INPUT.LOCAL_CROPS_NUMBER", "2",
    "DATASETS.TRAIN", "Synthetic", "DATASETS.SYNTHETIC_SIZE", "16", "DATASETS.SYNTHETIC_IMAGE_SIZE", "40",
    "SOLVER.BATCH_SIZE_PER_GPU", "4", "SOLVER.WARMUP_EPOCHS", "1",
    "SOLVER.AMP.ENABLED", "False", "SOLVER.CHECKPOINT_PERIOD", "1", "SOLVER.SNAPSHOT_EPOCHS", "1",
    "DATALOADER.NUM_WORKERS", "1", "LOG_PERIOD", "1",
]


def _command(out: Path, epochs: int) -> list[str]:
    return [sys.executable, str(HERE / "faulty_train.py"), *OVERRIDES, "SOLVER.EPOCHS", str(epochs),
            "OUTPUT_DIR", str(out)]


def _started_count(out: Path) -> int:
    log = out / "log.txt"
    return log.read_text().count("DINO run:") if log.exists() else 0


def _metrics_lines(out: Path) -> list[str]:
    metrics = out / "metrics.json"
    return metrics.read_text().splitlines() if metrics.exists() else []


def _check_files(out: Path) -> tuple[int, int]:
    """Load every checkpoint file of ``out``; returns (checkpoints, leftover temporaries)."""
    checkpoints = [p for p in out.glob("*.pth")]
    for path in checkpoints:
        load_file(str(path))  # raises CheckpointError if unreadable or corrupt
    return len(checkpoints), len(list(out.glob("*.pth.tmp.*")))


def _last_iteration(out: Path) -> int:
    path = out / LAST_CHECKPOINT
    return int(load_file(str(path))["iteration"]) if path.exists() else 0


def run(kills: int, in_save: int, seed: int, workdir: Path, epochs: int = 6, log=print) -> dict:
    """Do the experiment; returns a summary dict. Raises AssertionError on any lost or unreadable state."""
    rng = random.Random(seed)
    reference = workdir / "reference"
    start = time.time()
    proc = subprocess.Popen(_command(reference, epochs), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while _started_count(reference) == 0 and proc.poll() is None:
        time.sleep(0.02)
    trained_from = time.time()
    assert proc.wait(timeout=900) == 0, f"the reference run failed; see {reference / 'log.txt'}"
    train_s = time.time() - trained_from  # from the trainer being built to the end: where kills land
    expected = load_file(str(reference / LAST_CHECKPOINT))

    out = workdir / "killed"
    iterations = int(expected["iteration"])
    iteration_s = train_s / iterations
    plan = ["save"] * in_save + ["random"] * (kills - in_save)
    rng.shuffle(plan)
    rows = []
    for number, kind in enumerate(plan, start=1):
        env = dict(os.environ)
        save_n = rng.randint(1, 3) if kind == "save" else 0
        env["DINO_KILL_IN_SAVE"] = str(save_n)
        before, lines_before = _started_count(out), len(_metrics_lines(out))
        proc = subprocess.Popen(_command(out, epochs), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
        delay = target = None
        if kind == "random":
            # Wait until the restarted run has done `target` new iterations (0: until the trainer is
            # built, i.e. while it resumes and starts its data worker), then a random fraction of
            # two iterations more: the kill lands anywhere in a step, a checkpoint write or the
            # data loading, and the run moves on by about one iteration per kill.
            target = rng.randrange(0, 3)
            while proc.poll() is None and (_started_count(out) == before if target == 0
                                           else len(_metrics_lines(out)) - lines_before < target):
                time.sleep(0.01)
            delay = rng.uniform(0.0, 2 * iteration_s)
            time.sleep(delay)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=600)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # data workers left behind by a self-kill
        except ProcessLookupError:
            pass
        stderr = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
        if proc.returncode == 0:  # the kill would have come after the end: nothing left to interrupt
            log(f"kill {number:3d}: the run finished before it; {len(plan) - number + 1} kill(s) not done")
            break
        assert proc.returncode == -signal.SIGKILL, f"run failed by itself (exit {proc.returncode}):\n{stderr[-3000:]}"
        checkpoints, temporaries = _check_files(out)
        rows.append({"kill": number, "kind": kind, "save_n": save_n, "delay_s": delay, "target": target,
                     "iteration": _last_iteration(out), "checkpoints": checkpoints, "temporaries": temporaries})
        when = f"in save #{save_n}" if save_n else (f"{target} iteration(s) + {delay:4.2f} s" if target else f"start + {delay:4.2f} s")
        log(f"kill {number:3d} {when:>20s}: "
            f"resumable at iteration {rows[-1]['iteration']:3d}; {checkpoints} checkpoint files, all readable; "
            f"{temporaries} partial temporary file(s)")

    final = subprocess.run(_command(out, epochs), capture_output=True, text=True, timeout=900)  # resumes (or no-op)
    assert final.returncode == 0, final.stderr[-3000:]
    assert not list(out.glob("*.pth.tmp.*")), "a partial temporary file survived the final run"
    got = load_file(str(out / LAST_CHECKPOINT))
    assert got["iteration"] == expected["iteration"]
    for key, value in expected["model"].items():
        assert torch.equal(value, got["model"][key]), f"model entry {key} differs from the uninterrupted run"
    for index, state in expected["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, got["optimizer"]["state"][index][name]), f"optimizer state {index}.{name}"
    summary = {"kills": len(rows), "in_save": sum(r["kind"] == "save" for r in rows),
               "temporaries_seen": sum(r["temporaries"] > 0 for r in rows),
               "iterations": int(expected["iteration"]), "train_s": train_s,
               "total_s": time.time() - start, "rows": rows}
    log(f"survived {summary['kills']} SIGKILLs ({summary['in_save']} during a checkpoint write, "
        f"{summary['temporaries_seen']} leaving a partial temporary file): final model and optimizer state "
        f"bitwise equal to the uninterrupted run of {summary['iterations']} iterations; every checkpoint "
        f"file readable after every kill ({summary['total_s']:.0f} s)")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--in-save", type=int, default=5, help="how many of the kills hit a checkpoint write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=16, help="of 4 iterations; about 1.5 per kill is enough")
    parser.add_argument("--workdir", default="", help="default: a new temporary folder")
    args = parser.parse_args()
    if not 0 <= args.in_save <= args.kills:
        parser.error("--in-save must be between 0 and --kills")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dino_kill_resume_"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"working in {workdir}")
    run(args.kills, args.in_save, args.seed, workdir, epochs=args.epochs)


if __name__ == "__main__":
    main()
