#!/usr/bin/env python
"""Training curves of one run or several on shared axes.

    python tools/plot_metrics.py RUN_DIR [RUN_DIR ...] [--metrics loss knn/top1_k20] [--out FILE]

With one run and no ``--metrics``: the run's ``curves.png`` panels (loss, k-NN top-1 with the
random-init and raw-pixel lines, teacher entropy and KL, learning rate). Otherwise one panel per
metric, one line per run, labelled by the config keys that differ between the runs (a sweep's
overrides). Metric names are those of ``metrics.json`` (``knn/top1_k20``, ``loss``, ``lr``, ...).
Writes ``--out`` (default ``RUN_DIR/curves.png`` for one run, ``./curves.png`` for several).
"""

import argparse
import sys

from dino_research.utils.plots import plot_runs, plot_training_curves


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="OUTPUT_DIRs holding metrics.json")
    parser.add_argument("--metrics", nargs="+", default=None, metavar="NAME",
                        help="metrics to draw, one panel each (default: loss, k-NN, entropy and KL, lr)")
    parser.add_argument("--out", default="", help="PNG to write")
    args = parser.parse_args(argv)
    try:
        if len(args.runs) == 1 and args.metrics is None:
            path = plot_training_curves(args.runs[0], out=args.out or None)
        else:
            metrics = args.metrics or ["loss", "knn/top1_k20", "teacher_entropy", "lr"]
            path = plot_runs(args.runs, metrics, out=args.out or "curves.png")
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"curves written to {path}")
    return path


if __name__ == "__main__":
    main()
