"""curves.png and tools/plot_metrics.py draw images from a run's metrics.json."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tool_utils import load_tool  # noqa: E402

from dino_research.utils.plots import plot_training_curves, read_metrics, run_labels  # noqa: E402


def _fake_run(folder: Path, lr: float, resumed: bool = False) -> Path:
    folder.mkdir(parents=True)
    lines = [{"iteration": i, "loss": 5 - i / 10, "lr": lr * (1 - i / 40), "teacher_entropy": 2.0,
              "kl_teacher_student": 0.5} for i in range(0, 40, 2)]
    lines += [{"iteration": 19, "knn/top1_k20": 60.0, "knn_pixels/top1_k20": 85.7, "knn_init/top1_k20": 30.0},
              {"iteration": 39, "knn/top1_k20": 75.0}]
    if resumed:  # an interrupted run's line for iteration 38, then the resumed run's
        lines.append({"iteration": 38, "loss": 99.0})
        lines.append({"iteration": 38, "loss": 1.5})
    text = "\n".join(json.dumps(x) for x in lines) + "\n" + '{"iteration": 40, "lo'  # a line cut by a kill
    (folder / "metrics.json").write_text(text)
    (folder / "config.yaml").write_text(f"SOLVER:\n  BASE_LR: {lr}\n  EPOCHS: 2\nOUTPUT_DIR: {folder}\n")
    return folder


def _is_png_with_content(path) -> bool:
    image = np.asarray(Image.open(path).convert("L"))
    return image.shape[0] > 200 and image.shape[1] > 300 and image.std() > 10


def test_read_metrics_keeps_the_last_line_per_iteration_and_skips_a_cut_line(tmp_path):
    metrics = read_metrics(str(_fake_run(tmp_path / "a", 0.001, resumed=True)))
    assert dict(metrics["loss"])[38] == 1.5
    assert metrics["knn/top1_k20"] == [(19, 60.0), (39, 75.0)]
    with pytest.raises(FileNotFoundError, match="no metrics.json in"):
        read_metrics(str(tmp_path))


def test_curves_png_is_drawn_from_metrics(tmp_path):
    run = _fake_run(tmp_path / "run", 0.001)
    path = plot_training_curves(str(run))
    assert path == str(run / "curves.png") and _is_png_with_content(path)


def test_plot_metrics_tool_overlays_runs_labelled_by_their_differing_keys(tmp_path, capsys):
    runs = [_fake_run(tmp_path / name, lr) for name, lr in (("a", 0.001), ("b", 0.002))]
    assert run_labels([str(r) for r in runs]) == ["SOLVER.BASE_LR=0.001", "SOLVER.BASE_LR=0.002"]
    out = tmp_path / "cmp.png"
    load_tool("plot_metrics").main([str(runs[0]), str(runs[1]), "--metrics", "loss", "knn/top1_k20", "--out", str(out)])
    assert _is_png_with_content(out)
    with pytest.raises(SystemExit, match="no run has metric 'nope'; available: .*knn/top1_k20"):
        load_tool("plot_metrics").main([str(runs[0]), "--metrics", "nope"])
