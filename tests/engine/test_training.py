"""The trainer end to end on CPU: outputs, exact resume, DDP equivalence, official-format export."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dino_research.checkpoint import LAST_CHECKPOINT, TEACHER_BACKBONE, load_file
from dino_research.engine import DINOTrainer, NonFiniteLossError, default_setup, load_config
from dino_research.engine.hooks import HookBase
from dino_research.modeling import build_backbone

REPO = Path(__file__).resolve().parents[2]

TINY = [
    "MODEL.BACKBONE.NAME", "vit_tiny", "MODEL.BACKBONE.DROP_PATH_RATE", "0.1",
    "MODEL.HEAD.OUT_DIM", "64", "MODEL.HEAD.HIDDEN_DIM", "32", "MODEL.HEAD.BOTTLENECK_DIM", "16",
    "INPUT.GLOBAL_CROP_SIZE", "32", "INPUT.LOCAL_CROP_SIZE", "16", "INPUT.LOCAL_CROPS_NUMBER", "2",
    "DATASETS.TRAIN", "Synthetic", "DATASETS.SYNTHETIC_SIZE", "16", "DATASETS.SYNTHETIC_IMAGE_SIZE", "40",
    "SOLVER.BATCH_SIZE_PER_GPU", "4", "SOLVER.EPOCHS", "2", "SOLVER.WARMUP_EPOCHS", "1",
    "SOLVER.AMP.ENABLED", "False", "SOLVER.CHECKPOINT_PERIOD", "3", "SOLVER.SNAPSHOT_EPOCHS", "1",
    "DATALOADER.NUM_WORKERS", "0", "LOG_PERIOD", "2",
]


def make_cfg(output_dir, *extra):
    return load_config("", TINY + ["OUTPUT_DIR", str(output_dir), *extra])


class StopAfter(HookBase):
    """Simulate a kill: raise right after iteration ``n`` (and its checkpoint hooks) finished."""

    def __init__(self, n):
        self.n = n

    def after_step(self):
        if self.trainer.iter + 1 == self.n:
            raise KeyboardInterrupt(f"stopped after {self.n} iterations")


def train(cfg, stop_after=None):
    default_setup(cfg)
    trainer = DINOTrainer(cfg)
    if stop_after is not None:
        trainer.register_hooks([StopAfter(stop_after)])
    trainer.resume_or_load(resume=True)
    try:
        trainer.train()
    except KeyboardInterrupt:
        pass
    return trainer


def test_train_net_cli_writes_outputs(tmp_path):
    """tools/train_net.py end to end: config dump, metrics.json, TensorBoard events, checkpoints."""
    out = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "tools" / "train_net.py"), "--config", str(REPO / "configs" / "dino_vits16.yaml"),
           *TINY, "OUTPUT_DIR", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "config.yaml").is_file()
    dumped = load_config(str(out / "config.yaml"), [])
    assert dumped.MODEL.BACKBONE.NAME == "vit_tiny" and dumped.SOLVER.EPOCHS == 2
    lines = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert [row["iteration"] for row in lines] == [1, 3, 5, 7]
    for key in ("loss", "lr", "wd", "momentum", "teacher_temp", "images/s", "data_time", "teacher_entropy",
                "kl_teacher_student", "center_norm"):
        assert key in lines[-1], key
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / LAST_CHECKPOINT).is_file() and (out / "checkpoint_0001.pth").is_file()
    assert (out / "checkpoint_0002.pth").is_file() and (out / TEACHER_BACKBONE).is_file()
    log = (out / "log.txt").read_text()
    assert "total batch 4" in log and "peak lr" in log and "eta:" in log


def test_checkpoint_contents_are_weights_only(tmp_path):
    trainer = train(make_cfg(tmp_path))
    data = torch.load(tmp_path / LAST_CHECKPOINT, weights_only=True)
    assert data["iteration"] == trainer.max_iter == 8
    assert {"model", "optimizer", "scaler", "rng", "config"} <= set(data)
    assert set(data["rng"][0]) >= {"python", "numpy", "torch"}
    assert "loss.center" in data["model"] and torch.count_nonzero(data["model"]["loss.center"]) > 0


@pytest.mark.parametrize("stop_after", [3, 4, 6])  # mid-epoch, epoch boundary, mid second epoch
def test_resume_is_bitwise_equal_to_uninterrupted(tmp_path, stop_after):
    full = train(make_cfg(tmp_path / "full"))
    cfg = make_cfg(tmp_path / "resumed")
    stopped = train(cfg, stop_after=stop_after)
    assert stopped.iter + 1 == stop_after
    resumed = train(cfg)
    assert resumed.start_iter == stop_after
    expected, got = full.model.state_dict(), resumed.model.state_dict()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    opt_a, opt_b = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(opt_a[i]["exp_avg"], opt_b[i]["exp_avg"]) for i in opt_a)


def test_resume_with_data_loader_workers_is_exact(tmp_path):
    workers = ["DATALOADER.NUM_WORKERS", "2"]
    full = train(make_cfg(tmp_path / "full", *workers))
    cfg = make_cfg(tmp_path / "resumed", *workers)
    train(cfg, stop_after=5)
    resumed = train(cfg)
    for (k, a), b in zip(full.model.teacher.state_dict().items(), resumed.model.teacher.state_dict().values()):
        assert torch.equal(a, b), k


def test_exported_teacher_backbone_round_trip(tmp_path):
    trainer = train(make_cfg(tmp_path))
    state = load_file(str(tmp_path / TEACHER_BACKBONE))
    assert "cls_token" in state and "blocks.0.attn.qkv.weight" in state and not any("head" in k for k in state)
    fresh = build_backbone(trainer.cfg, drop_path_rate=0.0)
    result = fresh.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(2, 3, 32, 32)
    trainer.model.teacher.backbone.eval()
    torch.testing.assert_close(fresh.eval()(x), trainer.model.teacher.backbone(x), rtol=0, atol=0)


def test_gradient_accumulation_matches_larger_batch(tmp_path):
    """2 micro-batches of 4 == 1 batch of 8: same images, same lr, EMA and center once per step."""
    no_drop = ["MODEL.BACKBONE.DROP_PATH_RATE", "0.0", "SOLVER.EPOCHS", "1", "SOLVER.WARMUP_EPOCHS", "0"]
    big = train(make_cfg(tmp_path / "big", *no_drop, "SOLVER.BATCH_SIZE_PER_GPU", "8"))
    acc = train(make_cfg(tmp_path / "acc", *no_drop, "SOLVER.ACCUMULATE_STEPS", "2"))
    assert big.max_iter == acc.max_iter == 2
    for (k, a), b in zip(big.model.state_dict().items(), acc.model.state_dict().values()):
        # float32 sums in another order; Adam's first steps amplify such rounding near zero gradients.
        torch.testing.assert_close(a, b, rtol=1e-4, atol=5e-5, msg=k)


def test_last_layer_frozen_during_first_epoch(tmp_path):
    cfg = make_cfg(tmp_path, "SOLVER.EPOCHS", "2", "SOLVER.FREEZE_LAST_LAYER_EPOCHS", "1")
    default_setup(cfg)
    trainer = DINOTrainer(cfg)
    head = trainer.model.student.head
    before_last, before_mlp = head.last_layer.weight_v.detach().clone(), head.mlp[0].weight.detach().clone()
    trainer.register_hooks([StopAfter(trainer.iters_per_epoch)])
    try:
        trainer.train()
    except KeyboardInterrupt:
        pass
    assert torch.equal(head.last_layer.weight_v, before_last)  # frozen during epoch 0 (no decay either)
    assert not torch.equal(head.mlp[0].weight, before_mlp)  # while the rest trained
    trainer.register_hooks([StopAfter(trainer.iters_per_epoch + 1)])  # one step into epoch 1
    trainer.start_iter = trainer.iters_per_epoch
    try:
        trainer.train()
    except KeyboardInterrupt:
        pass
    assert not torch.equal(head.last_layer.weight_v, before_last)


def test_non_finite_loss_stops_naming_iteration_and_checkpoint(tmp_path):
    cfg = make_cfg(tmp_path)
    default_setup(cfg)
    trainer = DINOTrainer(cfg)

    class Poison(HookBase):
        def after_step(self):
            if self.trainer.iter == 3:  # after the checkpoint of iteration 3 was written
                with torch.no_grad():
                    self.trainer.model.student.head.mlp[0].weight.fill_(float("nan"))

    trainer.register_hooks([Poison()])
    with pytest.raises(NonFiniteLossError, match=r"iteration 4 .*last_checkpoint.pth"):
        trainer.train()
    data = load_file(str(tmp_path / LAST_CHECKPOINT))
    assert data["iteration"] == 4  # written at the epoch end, before the bad step
    assert all(torch.isfinite(v).all() for v in data["model"].values() if v.is_floating_point())


def test_amp_float16_on_cpu_is_refused_with_the_fix(tmp_path):
    cfg = make_cfg(tmp_path, "SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.DTYPE", "float16")
    with pytest.raises(ValueError, match="SOLVER.AMP.DTYPE bfloat16 or SOLVER.AMP.ENABLED False"):
        DINOTrainer(cfg)


def test_bf16_autocast_trains_on_cpu(tmp_path):
    trainer = train(make_cfg(tmp_path, "SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.DTYPE", "bfloat16",
                             "SOLVER.EPOCHS", "1"))
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert trainer.model.teacher.backbone.cls_token.dtype == torch.float32


def test_knn_eval_hook_logs_scores_during_training(tmp_path):
    """TEST.EVAL_PERIOD 1: k-NN of the teacher after each epoch, with the raw-pixel baseline once."""
    cfg = make_cfg(tmp_path, "TEST.EVAL_PERIOD", "1", "TEST.DATASET", "Synthetic", "TEST.RESIZE_SIZE", "32",
                   "TEST.CROP_SIZE", "32", "TEST.KNN.K", "(1, 5)", "TEST.KNN.PIXEL_BASELINE", "True",
                   "TEST.BATCH_SIZE", "8")
    trainer = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    evals = [r for r in rows if "knn/top1_k5" in r]
    assert [r["iteration"] for r in evals] == [3, 7]  # after epochs 1 and 2 (4 iterations each)
    for r in evals:
        assert 0.0 <= r["knn/top1_k1"] <= 100.0 and r["knn/top1_k5"] <= r["knn/top5_k5"]
    assert sum("knn_pixels/top1_k5" in r for r in rows) == 1  # the baseline is computed once
    log = (tmp_path / "log.txt").read_text()
    assert "k-NN after 8 iterations (epoch 2)" in log and "raw pixels top-1" in log
    # The evaluation does not disturb training: same weights as a run without it.
    plain = train(make_cfg(tmp_path / "plain"))
    for k, v in plain.model.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[k], v), k
