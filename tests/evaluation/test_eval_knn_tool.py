"""tools/eval_knn.py end to end on the Synthetic dataset: a tiny checkpoint, saved features reloaded,
and the raw-pixel baseline on two gloo workers."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tool_utils import load_tool

from dino_research.checkpoint import Checkpointer
from dino_research.data import build_dataset, build_eval_transform
from dino_research.engine import load_config
from dino_research.evaluation.features import extract_features, load_features
from dino_research.evaluation.knn import knn_classifier_multi_k
from dino_research.evaluation.weights import load_backbone
from dino_research.modeling import build_model

REPO = Path(__file__).resolve().parents[2]

KS = [1, 5, 20, 100]  # 100 > the 40 training images: clamped
EVAL = [
    "TEST.DATASET", "Synthetic", "DATASETS.SYNTHETIC_SIZE", "40", "DATASETS.SYNTHETIC_IMAGE_SIZE", "36",
    "TEST.RESIZE_SIZE", "32", "TEST.CROP_SIZE", "32", "TEST.BATCH_SIZE", "16", "TEST.KNN.K", str(tuple(KS)),
    "TEST.KNN.CHUNK_SIZE", "7", "DATALOADER.NUM_WORKERS", "0", "MODEL.DEVICE", "cpu",
]


def run_tool(output_dir, *args):
    cmd = [sys.executable, str(REPO / "tools" / "eval_knn.py"), *args, *EVAL, "OUTPUT_DIR", str(output_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((Path(output_dir) / "knn.json").read_text()), proc.stdout


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A training checkpoint of a 2-block ViT-tiny (config stored inside, as the trainer writes it)."""
    from conftest import tiny_cfg

    cfg = tiny_cfg(**{"MODEL.BACKBONE.DEPTH": 2})
    folder = tmp_path_factory.mktemp("ckpt")
    return Checkpointer(str(folder), build_model(cfg)).save("model.pth", iteration=2, config=cfg.dump())


def splits(cfg):
    transform = build_eval_transform(cfg)
    return [build_dataset(cfg, "Synthetic", "", train=train, transform=transform) for train in (True, False)]


def test_backbone_features_dumped_reloaded_and_classified(tmp_path, tiny_checkpoint):
    dump = tmp_path / "features.pth"
    summary, stdout = run_tool(tmp_path / "run", "--weights", tiny_checkpoint, "--checkpoint-key", "student",
                               "--dump-features", str(dump))
    assert summary["weights"] == tiny_checkpoint and summary["checkpoint_key"] == "student"
    assert summary["num_train"] == 40 and summary["num_test"] == 40 and summary["temperature"] == 0.07
    assert list(summary["results"]) == [str(k) for k in KS]
    assert "|     k |   top-1 |   top-5 |" in stdout

    # The tool extracted the train split, then the test split, with the checkpoint's student backbone
    # (a 2-block ViT-tiny, taken from the stored config though the command line did not say so).
    cfg = load_config("", EVAL)
    backbone = load_backbone(cfg, tiny_checkpoint, "student")
    assert len(backbone.blocks) == 2
    train, test = [extract_features(backbone, d, batch_size=16, device="cpu", progress=False) for d in splits(cfg)]
    dumped = load_features(str(dump))
    for got, want in zip(dumped, (*train, *test)):
        torch.testing.assert_close(got, want)
    assert dumped[1].tolist() == [i % 10 for i in range(40)]
    assert not torch.equal(dumped[0], dumped[2])  # train and test images differ
    expected = knn_classifier_multi_k(*dumped, KS, 0.07)
    assert summary["results"] == {str(k): {"top1": t1, "top5": t5} for k, (t1, t5) in expected.items()}

    # Rerun from the saved features, with another temperature: no images, no weights. In-process
    # (the tool's own parser and main) to spare a Python start-up; the CLI path is covered above.
    tool = load_tool("eval_knn")
    tool.main(tool.build_parser().parse_args(["--load-features", str(dump), *EVAL, "TEST.KNN.TEMPERATURE", "0.5",
                                              "OUTPUT_DIR", str(tmp_path / "rerun")]))
    rerun = json.loads((tmp_path / "rerun" / "knn.json").read_text())
    assert rerun["features"] == f"loaded from {dump}"
    assert rerun["temperature"] == 0.5 and rerun["num_train"] == 40
    assert rerun["results"] == {str(k): {"top1": t1, "top5": t5}
                                for k, (t1, t5) in knn_classifier_multi_k(*dumped, KS, 0.5).items()}


def test_raw_pixel_baseline_on_two_workers(tmp_path):
    dump = tmp_path / "pixels.pth"
    summary, _ = run_tool(tmp_path / "run", "--pixels", "--num-gpus", "2", "--dump-features", str(dump))
    assert summary["weights"] == "" and summary["features"] == "pixels"
    # Features are the eval-transformed images, flattened and L2-normalized, in dataset order
    # (40 images sharded over 2 gloo workers and gathered back).
    cfg = load_config("", EVAL)
    want = []
    for dataset in splits(cfg):
        images, labels = zip(*(dataset[i] for i in range(len(dataset))))
        want += [F.normalize(torch.stack(images).flatten(1), dim=1), torch.tensor(labels)]
    dumped = load_features(str(dump))
    assert dumped[0].shape == (40, 3 * 32 * 32)
    for got, expected in zip(dumped, want):
        torch.testing.assert_close(got, expected)
    results = {int(k): (v["top1"], v["top5"]) for k, v in summary["results"].items()}
    assert results == knn_classifier_multi_k(*want, KS, 0.07)
    # Synthetic classes differ in colour and stripes: raw pixels beat the 10% chance level.
    assert results[5][0] > 20.0


def test_random_init_is_the_backbone_a_training_run_starts_from(tmp_path):
    """--random-init: the teacher backbone of a run with this config before its first step."""
    from dino_research.engine import DINOTrainer

    tiny = ["MODEL.BACKBONE.NAME", "vit_tiny", "MODEL.BACKBONE.DEPTH", "2", "MODEL.HEAD.OUT_DIM", "64",
            "DATASETS.TRAIN", "Synthetic", "SOLVER.BATCH_SIZE_PER_GPU", "8", "SOLVER.AMP.ENABLED", "False", "SEED", "3"]
    dump = tmp_path / "init.pth"
    summary, _ = run_tool(tmp_path / "run", "--random-init", "--dump-features", str(dump), *tiny)
    assert summary["features"] == "random-init backbone" and summary["weights"] == ""
    cfg = load_config("", [*EVAL, *tiny, "OUTPUT_DIR", str(tmp_path / "trainer")])
    teacher = DINOTrainer(cfg).model.teacher.backbone
    train, _ = [extract_features(teacher, d, batch_size=16, device="cpu", progress=False) for d in splits(cfg)]
    torch.testing.assert_close(load_features(str(dump))[0], train[0], rtol=0, atol=0)
