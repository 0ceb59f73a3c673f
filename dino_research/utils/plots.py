"""Training curves from ``metrics.json``: one run's ``curves.png`` and several runs on shared axes.

matplotlib draws them (Agg, no display needed): axes, legends and ticks are what a plotting library
is for, and the figures look like every paper's. It is imported only when a figure is drawn.
"""

from __future__ import annotations

import json
import math
import os
from typing import Iterable, Optional, Sequence

__all__ = ["read_metrics", "run_labels", "plot_training_curves", "plot_runs", "DEFAULT_CURVES"]

# (title, [metric names drawn on one axis]) of curves.png; "{k}" is the run's k-NN k (20 when it
# was evaluated, else the smallest one).
DEFAULT_CURVES = (
    ("loss", ["loss"]),
    ("k-NN top-1 (k={k}), %", ["knn/top1_k{k}"]),
    ("collapse indicators", ["teacher_entropy", "kl_teacher_student"]),
    ("learning rate", ["lr"]),
)
# Reference lines drawn on the k-NN axis when the run has them: the network before training
# (TEST.KNN.INIT_BASELINE), and k-NN on raw pixels (TEST.KNN.PIXEL_BASELINE), with their labels.
BASELINES = {"knn_init/top1_k{k}": "at initialization", "knn_pixels/top1_k{k}": "raw pixels"}


def _knn_k(metrics: dict) -> int:
    ks = sorted(int(name.rsplit("_k", 1)[1]) for name in metrics if name.startswith("knn/top1_k"))
    return 20 if 20 in ks or not ks else ks[0]


def read_metrics(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(iteration, value), ...]}`` sorted by iteration from ``run_dir/metrics.json``; for an
    iteration written twice (a resumed run repeats the iterations after its checkpoint) the last line
    wins. Raises ``FileNotFoundError`` naming the file when there is none."""
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no metrics.json in {run_dir}: is it a training run's OUTPUT_DIR?")
    by_iter: dict[int, dict] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except ValueError:  # a line cut by a kill: the rest is still good
                continue
            if isinstance(record, dict) and "iteration" in record:
                by_iter.setdefault(int(record["iteration"]), {}).update(record)
    out: dict[str, list[tuple[int, float]]] = {}
    for it in sorted(by_iter):
        for name, value in by_iter[it].items():
            if name != "iteration" and isinstance(value, (int, float)):
                out.setdefault(name, []).append((it, float(value)))
    return out


def _flat_config(run_dir: str) -> dict:
    import yaml

    path = os.path.join(run_dir, "config.yaml")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except (OSError, ValueError):
        return {}
    flat = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[prefix + key] = value

    walk(data, "")
    return flat


def run_labels(run_dirs: Sequence[str]) -> list[str]:
    """A legend label per run: the config keys whose values differ between the runs (a sweep's
    overrides, ``OUTPUT_DIR`` excluded), else the folder name."""
    configs = [_flat_config(d) for d in run_dirs]
    keys = sorted({k for c in configs for k in c} - {"OUTPUT_DIR"})
    differing = [k for k in keys if len({repr(c.get(k)) for c in configs}) > 1]
    labels = []
    for d, c in zip(run_dirs, configs):
        parts = [f"{k}={c.get(k)}" for k in differing[:3]]
        labels.append(", ".join(parts) if len(run_dirs) > 1 and parts else os.path.basename(os.path.normpath(d)))
    return labels


def _figure(n_axes: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 2 if n_axes > 1 else 1
    rows = math.ceil(n_axes / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.0 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[n_axes:]:
        ax.set_visible(False)
    return plt, fig, list(axes.flat[:n_axes])


def save_figure(fig, out: str) -> str:
    """Write matplotlib ``fig`` to the PNG ``out`` (its folder created) through a temporary and a
    rename, so a viewer or a sync never sees half a file, then close it; returns ``out``."""
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp.{os.getpid()}.png"
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


def _draw(ax, series: list[tuple[int, float]], label: str, **style) -> None:
    xs, ys = zip(*series)
    marker = "o" if len(series) <= 20 else None  # sparse metrics (evaluations) as points
    ax.plot(xs, ys, label=label, marker=marker, markersize=4, **style)


def plot_training_curves(run_dir: str, out: Optional[str] = None,
                         curves: Iterable[tuple[str, list[str]]] = DEFAULT_CURVES) -> str:
    """Draw ``run_dir``'s curves (loss, k-NN top-1 with its random-init and raw-pixel lines, teacher
    entropy and KL, learning rate; metrics the run lacks are skipped) to ``out`` (default
    ``run_dir/curves.png``); returns the path."""
    metrics = read_metrics(run_dir)
    k = _knn_k(metrics)
    curves = [(title.format(k=k), [n.format(k=k) for n in names if n.format(k=k) in metrics])
              for title, names in curves]
    curves = [(title, names) for title, names in curves if names]
    if not curves:
        raise ValueError(f"{run_dir}/metrics.json holds none of the plotted metrics")
    # One iteration range on every panel: a run's single k-NN point sits at the end of the run,
    # not alone in the middle of an axis of its own.
    last = max(it for series in metrics.values() for it, _ in series)
    plt, fig, axes = _figure(len(curves))
    for ax, (title, names) in zip(axes, curves):
        for name in names:
            _draw(ax, metrics[name], name)
        if any(n.startswith("knn/") for n in names):
            for key, label in BASELINES.items():
                key = key.format(k=k)
                if key in metrics:
                    value = metrics[key][-1][1]
                    ax.axhline(value, linestyle="--", color="grey" if "init" in key else "black", linewidth=1,
                               label=f"{label} ({value:.1f})")
        if title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.set_xlim(0, max(last, 1) * 1.03)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(os.path.basename(os.path.normpath(run_dir)))
    fig.tight_layout()
    out = out or os.path.join(run_dir, "curves.png")
    return save_figure(fig, out)


def plot_runs(run_dirs: Sequence[str], metrics: Sequence[str], out: str,
              labels: Optional[Sequence[str]] = None) -> str:
    """One axis per metric, one line per run (legend: :func:`run_labels`), written to ``out``.

    Raises ``ValueError`` naming the metric when no run has it, listing the metrics they have."""
    data = [read_metrics(d) for d in run_dirs]
    labels = list(labels) if labels is not None else run_labels(run_dirs)
    for name in metrics:
        if not any(name in m for m in data):
            available = sorted({k for m in data for k in m})
            raise ValueError(f"no run has metric {name!r}; available: {', '.join(available)}")
    plt, fig, axes = _figure(len(metrics))
    for ax, name in zip(axes, metrics):
        for m, label in zip(data, labels):
            if name in m:
                _draw(ax, m[name], label)
        ax.set_title(name)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out)
