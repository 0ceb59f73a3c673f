"""During training: the teacher's k-NN at initialization (TEST.KNN.INIT_BASELINE) and curves.png after
every evaluation and at the end."""

import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_training import make_cfg, train  # noqa: E402

from dino_research.utils.plots import read_metrics  # noqa: E402

EVAL = ["TEST.DATASET", "Synthetic", "TEST.CROP_SIZE", "32", "TEST.RESIZE_SIZE", "32", "TEST.EVAL_PERIOD", "1",
        "TEST.KNN.K", "(1, 3)", "TEST.KNN.PIXEL_BASELINE", "True", "TEST.KNN.INIT_BASELINE", "True"]


def test_init_baseline_and_curves_png(tmp_path):
    train(make_cfg(tmp_path, *EVAL))
    metrics = read_metrics(str(tmp_path))
    assert [it for it, _ in metrics["knn_init/top1_k1"]] == [0]  # once, before the first step
    assert [it for it, _ in metrics["knn/top1_k1"]] == [3, 7]  # after each of the 2 epochs
    assert "knn_pixels/top1_k1" in metrics
    image = np.asarray(Image.open(tmp_path / "curves.png").convert("L"))
    assert image.shape[0] > 300 and image.std() > 10
    # A resumed run does not evaluate its initialization again (it is not the run's initialization).
    train(make_cfg(tmp_path, *EVAL, "SOLVER.EPOCHS", "3"))
    metrics = read_metrics(str(tmp_path))
    assert [it for it, _ in metrics["knn_init/top1_k1"]] == [0]
    assert [it for it, _ in metrics["knn/top1_k1"]] == [3, 7, 11]
