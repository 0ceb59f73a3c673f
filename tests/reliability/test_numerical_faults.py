"""Numerical faults: a NaN batch or gradient is skipped (SOLVER.SKIP_NONFINITE) or stops the run, every rank
agrees, weights and checkpoints stay finite; collapse is warned about."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from dino_research.checkpoint import LAST_CHECKPOINT, load_file
from dino_research.engine import DINOTrainer, NonFiniteLossError, default_setup
from dino_research.utils.events import EventStorage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dist_utils import run_on_gloo  # noqa: E402
from test_training import make_cfg  # noqa: E402


def poison_batches(trainer, bad_batches, ranks=None):
    """Make the loader's global batches ``bad_batches`` hold NaN pixels (on ``ranks``; all by default)."""
    iterate = trainer.loader.iterate

    def poisoned(start_batch=0):
        for k, (crops, labels) in enumerate(iterate(start_batch), start=start_batch):
            if k in bad_batches and (ranks is None or trainer.rank in ranks):
                crops = [c.clone().fill_(float("nan")) for c in crops]
            yield crops, labels

    trainer.loader.iterate = poisoned


def build(out, *extra):
    cfg = make_cfg(out, "SOLVER.CHECKPOINT_PERIOD", "1", *extra)
    default_setup(cfg)
    return DINOTrainer(cfg)


class Snapshots:
    """Record the model's state after every iteration."""

    def __init__(self, trainer):
        self.states = {}
        original = trainer.run_step

        def step():
            original()
            self.states[trainer.iter] = {k: v.clone() for k, v in trainer.model.state_dict().items()}

        trainer.run_step = step


def test_bad_batches_are_skipped_counted_and_leave_weights_unchanged(tmp_path):
    trainer = build(tmp_path, "SOLVER.SKIP_NONFINITE", "2", "LOG_PERIOD", "1")
    poison_batches(trainer, {2, 5})
    snaps = Snapshots(trainer)
    trainer.train()
    assert trainer.iter + 1 == trainer.max_iter == 8  # the run finished
    for skipped in (2, 5):  # no weight, teacher or center update at a skipped step
        for key, value in snaps.states[skipped].items():
            assert torch.equal(value, snaps.states[skipped - 1][key]), (skipped, key)
    assert not torch.equal(snaps.states[3]["teacher.head.mlp.0.weight"], snaps.states[2]["teacher.head.mlp.0.weight"])
    rows = {r["iteration"]: r for r in map(json.loads, (tmp_path / "metrics.json").read_text().splitlines())}
    assert rows[1]["nonfinite_skipped"] == 0 and rows[2]["nonfinite_skipped"] == 1
    assert rows[7]["nonfinite_skipped"] == 2
    assert all(math.isfinite(r["loss"]) for r in rows.values() if "loss" in r)
    assert "loss is nan at iteration 2 (epoch 0): step skipped, weights unchanged (1 of SOLVER.SKIP_NONFINITE 2)" \
        in (tmp_path / "log.txt").read_text()
    data = load_file(str(tmp_path / LAST_CHECKPOINT))
    assert data["nonfinite_skipped"] == 2
    assert all(torch.isfinite(v).all() for v in data["model"].values() if v.is_floating_point())


def test_more_bad_steps_than_allowed_stop_naming_iteration_and_fixes(tmp_path):
    trainer = build(tmp_path, "SOLVER.SKIP_NONFINITE", "1")
    poison_batches(trainer, {2, 5})
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at iteration 5 .*2 non-finite step\(s\), "
                                                 r"SOLVER.SKIP_NONFINITE 1.*last_checkpoint.pth \(intact\).*"
                                                 r"SOLVER.AMP.ENABLED False.*BASE_LR.*TEACHER.MOMENTUM"):
        trainer.train()
    assert load_file(str(tmp_path / LAST_CHECKPOINT))["iteration"] == 5  # written after iteration 4


def test_skip_count_survives_a_resume(tmp_path):
    trainer = build(tmp_path, "SOLVER.SKIP_NONFINITE", "1")
    poison_batches(trainer, {2, 5})
    with pytest.raises(NonFiniteLossError):
        trainer.train()
    resumed = build(tmp_path, "SOLVER.SKIP_NONFINITE", "1")
    resumed.resume_or_load()
    assert (resumed.start_iter, resumed.nonfinite_skipped) == (5, 1)


def test_non_finite_gradient_with_finite_loss_is_caught_before_the_update(tmp_path):
    trainer = build(tmp_path, "SOLVER.CLIP_GRAD", "0.0")  # also without the clipping pass
    weight = trainer.model.student.backbone.blocks[0].mlp.fc1.weight
    weight.register_hook(lambda g: g * float("inf") if trainer.iter == 3 else g)
    with pytest.raises(NonFiniteLossError, match=r"1 of \d+ gradients are non-finite at iteration 3"):
        trainer.train()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_checkpoint_of_non_finite_weights_is_refused(tmp_path):
    trainer = build(tmp_path)
    trainer.save_checkpoint(LAST_CHECKPOINT, next_iter=0)
    before = (tmp_path / LAST_CHECKPOINT).read_bytes()
    with torch.no_grad():
        trainer.model.teacher.head.mlp[0].bias[0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="non-finite weights.*not written"):
        trainer.save_checkpoint(LAST_CHECKPOINT, next_iter=1)
    assert (tmp_path / LAST_CHECKPOINT).read_bytes() == before


def _nan_on_rank_one(rank, world_size, out, allowed, results):
    trainer = build(Path(out), "SOLVER.SKIP_NONFINITE", str(allowed))
    poison_batches(trainer, {1}, ranks={1})
    try:
        trainer.train()
        outcome = f"finished {trainer.iter + 1} skipped {trainer.nonfinite_skipped}"
    except NonFiniteLossError as e:
        outcome = f"stopped: {e}"
    Path(results, f"rank{rank}").write_text(outcome)


@pytest.mark.parametrize("allowed", [0, 1])
def test_nan_on_one_rank_is_a_decision_of_every_rank(tmp_path, allowed):
    """Without agreement rank 1 would stop (or skip its backward) while rank 0 waits in DDP's all-reduce."""
    run_on_gloo(_nan_on_rank_one, 2, str(tmp_path / "run"), allowed, str(tmp_path))
    outcomes = [(tmp_path / f"rank{r}").read_text() for r in range(2)]
    if allowed == 0:
        assert "loss is non-finite on another rank at iteration 1" in outcomes[0]
        assert "loss is nan at iteration 1" in outcomes[1]
    else:  # 16 images / (2 ranks x 4) = 2 iterations per epoch, 2 epochs
        assert outcomes == ["finished 4 skipped 1"] * 2


def test_collapse_is_warned_about(tmp_path):
    trainer = build(tmp_path)
    k = trainer.model.loss.center.shape[-1]
    log = tmp_path / "log.txt"

    def warnings_of(teacher_out):
        before = log.read_text()
        metrics = trainer.model.health_metrics([{"teacher_out": teacher_out}], loss=3.0, teacher_temp=0.04)
        trainer.storage.put_scalars(**metrics)
        return log.read_text()[len(before):]

    with EventStorage(0) as trainer.storage:
        assert "close to ln K" in warnings_of(torch.zeros(8, k))  # uniform
        one_hot = torch.zeros(8, k)
        one_hot[:, 3] = 100.0
        assert "one dimension dominates" in warnings_of(one_hot)  # every image picks dimension 3
        assert "collapse" not in warnings_of(0.08 * torch.randn(8, k))  # healthy
        assert math.log(k) * 0.05 < trainer.storage.latest()["teacher_entropy"][0] < math.log(k) * 0.95
        sharp_but_diverse = torch.zeros(8, k)
        sharp_but_diverse[torch.arange(8), torch.arange(8)] = 100.0  # one-hot, a different dimension each
        assert "collapse" not in warnings_of(sharp_but_diverse)
        assert trainer.storage.latest()["teacher_entropy"][0] < 0.01 * math.log(k)
