"""tools/eval_linear.py end to end on the Synthetic dataset with a tiny checkpoint: the paper's protocol
(with a finished run resumed) and the fast grid (features dumped, checked, reloaded). The tool runs in
this process; DDP is tested on the library functions in test_linear.py."""

import json
import sys
from pathlib import Path

import pytest
import torch
from tool_utils import load_tool

from dino_research.checkpoint import Checkpointer, load_file
from dino_research.data import build_dataset, build_eval_transform
from dino_research.engine import load_config
from dino_research.evaluation.linear import LINEAR_CHECKPOINT, block_features
from dino_research.evaluation.linear_fast import FAST_CLASSIFIER
from dino_research.evaluation.weights import load_backbone
from dino_research.modeling import build_model

REPO = Path(__file__).resolve().parents[2]

EVAL = [
    "TEST.DATASET", "Synthetic", "DATASETS.SYNTHETIC_SIZE", "40", "DATASETS.SYNTHETIC_IMAGE_SIZE", "36",
    "TEST.RESIZE_SIZE", "32", "TEST.CROP_SIZE", "32", "TEST.BATCH_SIZE", "16", "TEST.LINEAR.BATCH_SIZE", "8",
    "TEST.LINEAR.EPOCHS", "2", "DATALOADER.NUM_WORKERS", "0", "MODEL.DEVICE", "cpu", "LOG_PERIOD", "2",
]


TOOL = load_tool("eval_linear")


def run_tool(output_dir, *args, monkeypatch):
    """The tool's own command line, in this process (a fresh interpreter per run costs ~10 s of imports
    on a loaded machine): parse, launch on one process, read linear.json and the log."""
    monkeypatch.setattr(sys, "argv", ["eval_linear.py", *args, *EVAL, "OUTPUT_DIR", str(output_dir)])
    parsed = TOOL.parse_args()
    TOOL.main_or_submit(TOOL.main, parsed)
    return json.loads((Path(output_dir) / "linear.json").read_text()), (Path(output_dir) / "log.txt").read_text()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A training checkpoint of a 4-block ViT-tiny (config stored inside, as the trainer writes it)."""
    from conftest import tiny_cfg

    cfg = tiny_cfg(**{"MODEL.BACKBONE.DEPTH": 4})
    folder = tmp_path_factory.mktemp("ckpt")
    return Checkpointer(str(folder), build_model(cfg)).save("ckpt.pth", iteration=0, config=cfg.dump())


def test_full_protocol_writes_results_and_a_finished_run_resumes_without_training(tmp_path, tiny_checkpoint,
                                                                                  monkeypatch):
    out = tmp_path / "full"
    result, log = run_tool(out, "--weights", tiny_checkpoint, monkeypatch=monkeypatch)
    assert result["mode"] == "full" and result["epochs"] == 2 and result["total_batch"] == 8
    assert [h["epoch"] for h in result["history"]] == [0, 1]
    for key in ("best", "last"):
        entry = result[key]
        assert entry["n_last_blocks"] == 4 and entry["avgpool"] is False  # paper default for ViT-S
        assert entry["lr"] == pytest.approx(0.001 * 8 / 256) and entry["base_lr"] == 0.001
        assert 0.0 <= entry["top1"] <= entry["top5"] <= 100.0
    assert result["last"]["epoch"] == 1
    assert result["best"]["top1"] == max(h["top1"] for h in result["history"])
    assert "linear epoch 2/2" in log and "best top-1" in log
    state = load_file(str(out / LINEAR_CHECKPOINT))
    assert state["epoch"] == 2 and state["classifier"]["linear.weight"].shape == (10, 4 * 192)  # 4 CLS tokens

    again, log = run_tool(out, "--weights", tiny_checkpoint, monkeypatch=monkeypatch)
    assert "resumed from" in log and "linear epoch" not in log.split("resumed from")[1]
    assert again == result


def test_fast_grid_with_features_dumped_then_reloaded(tmp_path, tiny_checkpoint, monkeypatch):
    dump = tmp_path / "features.pth"
    grid = ["TEST.LINEAR.LR_GRID", "(0.01, 1.0)", "TEST.LINEAR.N_LAST_BLOCKS", "2"]
    result, log = run_tool(tmp_path / "fast", "--weights", tiny_checkpoint, "--fast",
                           "--dump-features", str(dump), *grid, monkeypatch=monkeypatch)
    assert result["mode"] == "fast" and result["total_batch"] == 8
    got = [(c["n_last_blocks"], c["avgpool"], c["base_lr"]) for c in result["classifiers"]]
    assert got == [(n, pool, lr) for n in (1, 2) for pool in (False, True) for lr in (0.01, 1.0)]
    assert all(c["lr"] == pytest.approx(c["base_lr"] * 8 / 256) for c in result["classifiers"])
    best = max(result["classifiers"], key=lambda c: c["top1"])
    assert result["best"]["top1"] == best["top1"] == result["last"]["top1"]
    assert {"top1", "top5", "lr", "n_last_blocks", "avgpool"} <= set(result["best"])
    saved = load_file(str(tmp_path / "fast" / FAST_CLASSIFIER))
    assert saved["top1"] == result["best"]["top1"]
    dim = (result["best"]["n_last_blocks"] + result["best"]["avgpool"]) * 192
    assert saved["classifier"]["linear.weight"].shape == (10, dim)
    assert "fast linear best" in log

    # The dump holds the checkpoint backbone's features of center crops: 2 CLS tokens + patch mean.
    cfg = load_config("", EVAL)
    backbone = load_backbone(cfg, tiny_checkpoint)
    val = build_dataset(cfg, "Synthetic", "", train=False, transform=build_eval_transform(cfg))
    images = torch.stack([val[i][0] for i in range(40)])
    with torch.no_grad():
        expected = block_features(backbone, images, 2)
    dumped = load_file(str(dump))
    assert dumped["format"] == "dino_research.features/1" and dumped["meta"]["n_blocks"] == 2
    dumped = dumped["splits"]  # the evaluations' one features-file layout
    torch.testing.assert_close(dumped["val"]["features"], expected, rtol=1e-4, atol=1e-5)
    assert dumped["val"]["labels"].tolist() == [i % 10 for i in range(40)]
    assert dumped["train"]["features"].shape == (40, 3, 192)

    # From the dump: no weights needed, the same grid result.
    rerun, _ = run_tool(tmp_path / "reload", "--fast", "--load-features", str(dump), *grid, monkeypatch=monkeypatch)
    assert rerun["classifiers"] == result["classifiers"]


def test_feature_files_need_the_fast_mode(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_tool(tmp_path, "--dump-features", str(tmp_path / "f.pth"), monkeypatch=monkeypatch)
    assert exit_info.value.code == 2 and "need --fast" in capsys.readouterr().err
