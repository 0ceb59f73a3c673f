#!/usr/bin/env python
"""Summarize a sweep (or any folder of runs) as one table.

    python tools/collect_results.py SWEEP_DIR [--csv FILE]

Reads SWEEP_DIR/manifest.json (written by ``--slurm --sweep``) or, without one, every sub-folder
holding a config.yaml. Per run: overrides, status (running, done, failed, preempted, with the number
of requeues), last iteration and loss (metrics.json), k-NN top-1 (knn.json or the last knn/top1_k20
logged during training) and linear top-1 (linear.json). Prints Markdown; ``--csv`` also writes CSV.
"""

import argparse
import csv
import json
import os
import sys

from dino_research.engine.slurm import MANIFEST, read_status

COLUMNS = ["run", "overrides", "status", "requeues", "iteration", "loss", "knn_top1", "linear_top1", "output_dir"]


def _last_metrics(output_dir: str) -> dict:
    """Latest value of each metric over metrics.json (JSON lines; a resumed run appends)."""
    latest: dict = {}
    try:
        with open(os.path.join(output_dir, "metrics.json")) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a line cut by a kill
                latest.update({k: v for k, v in row.items()})
    except OSError:
        pass
    return latest


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def collect(sweep_dir: str) -> list[dict]:
    manifest = _read_json(os.path.join(sweep_dir, MANIFEST))
    runs = manifest.get("runs") or [
        {"name": name, "overrides": [], "output_dir": os.path.join(sweep_dir, name)}
        for name in sorted(os.listdir(sweep_dir)) if os.path.isfile(os.path.join(sweep_dir, name, "config.yaml"))
    ]
    rows = []
    for run in runs:
        out = run["output_dir"]
        status, metrics = read_status(out), _last_metrics(out)
        knn = _read_json(os.path.join(out, "knn.json")).get("results", {})
        knn_top1 = knn.get("20", {}).get("top1") if knn else metrics.get("knn/top1_k20")
        linear = _read_json(os.path.join(out, "linear.json")).get("best", {})
        state = status.get("state") or ("done" if os.path.exists(os.path.join(out, "teacher_backbone.pth"))
                                        else "not started" if not metrics else "unknown")
        rows.append({
            "run": run["name"], "overrides": " ".join(run.get("overrides", [])), "status": state,
            "requeues": status.get("requeues", 0), "iteration": metrics.get("iteration"),
            "loss": metrics.get("loss"), "knn_top1": knn_top1, "linear_top1": linear.get("top1"), "output_dir": out,
        })
    return rows


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir")
    parser.add_argument("--csv", default="", help="also write the table as CSV to this file")
    args = parser.parse_args()
    if not os.path.isdir(args.sweep_dir):
        sys.exit(f"{args.sweep_dir} is not a folder")
    rows = collect(args.sweep_dir)
    if not rows:
        sys.exit(f"no runs found in {args.sweep_dir} (no {MANIFEST}, no sub-folder with a config.yaml)")
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(_fmt(row[c]) for c in COLUMNS) + " |")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        print(f"CSV written to {args.csv}")


if __name__ == "__main__":
    main()
