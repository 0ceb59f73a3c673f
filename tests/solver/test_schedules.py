"""Schedules against the reference's numpy formulas, at end points and the warmup boundary."""

import math

import numpy as np
import pytest

from dino_research.solver import SCHEDULER_REGISTRY, build_schedules, scaled_lr


def reference_cosine(base, final, epochs, niter, warmup_epochs=0, start_warmup=0.0):
    """The reference's cosine_scheduler, rewritten: linspace warmup then a half cosine."""
    warmup_iters = warmup_epochs * niter
    warmup = np.linspace(start_warmup, base, warmup_iters) if warmup_iters > 0 else np.array([])
    iters = np.arange(epochs * niter - warmup_iters)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup, cosine))


def _cfg(make_tiny_cfg, **kw):
    base = {"SOLVER.EPOCHS": "5", "SOLVER.WARMUP_EPOCHS": "2", "SOLVER.BATCH_SIZE_PER_GPU": "32"}
    base.update(kw)
    return make_tiny_cfg(**base)


def test_lr_warmup_then_cosine_with_linear_scaling(make_tiny_cfg):
    cfg = _cfg(make_tiny_cfg)
    niter, world = 7, 4
    sched = build_schedules(cfg, niter, world_size=world)["lr"]
    peak = 0.0005 * 32 * 4 / 256
    assert scaled_lr(cfg, world) == pytest.approx(peak)
    assert sched(0) == 0.0  # warmup starts at 0
    assert sched(2 * niter - 1) == pytest.approx(peak)  # last warmup iteration reaches the peak
    assert sched(2 * niter) == pytest.approx(peak)  # cosine starts at the peak
    assert sched(niter) == pytest.approx(peak * niter / (2 * niter - 1))  # linear in between
    remaining = 3 * niter
    last = 1e-6 + 0.5 * (peak - 1e-6) * (1 + math.cos(math.pi * (remaining - 1) / remaining))
    assert sched(5 * niter - 1) == pytest.approx(last)
    expected = reference_cosine(peak, 1e-6, 5, niter, warmup_epochs=2)
    np.testing.assert_allclose([sched(i) for i in range(5 * niter)], expected, rtol=1e-12, atol=1e-15)
    with pytest.raises(IndexError):
        sched(5 * niter)


def test_weight_decay_and_momentum_cosines(make_tiny_cfg):
    cfg = _cfg(make_tiny_cfg)
    niter = 3
    s = build_schedules(cfg, niter, world_size=1)
    np.testing.assert_allclose([s["weight_decay"](i) for i in range(15)], reference_cosine(0.04, 0.4, 5, niter))
    np.testing.assert_allclose([s["momentum"](i) for i in range(15)], reference_cosine(0.996, 1.0, 5, niter))
    assert s["momentum"](0) == pytest.approx(0.996) and s["momentum"](14) == pytest.approx(1.0, abs=1e-3)
    assert s["momentum"](14) < 1.0  # the reference's cosine never quite reaches its end value


def test_teacher_temperature_linear_per_epoch_then_constant(make_tiny_cfg):
    cfg = _cfg(make_tiny_cfg, **{"MODEL.LOSS.WARMUP_TEACHER_TEMP_EPOCHS": "3",
                                 "MODEL.LOSS.WARMUP_TEACHER_TEMP": "0.04", "MODEL.LOSS.TEACHER_TEMP": "0.07"})
    niter = 4
    temp = build_schedules(cfg, niter, world_size=1)["teacher_temp"]
    expected_per_epoch = np.concatenate((np.linspace(0.04, 0.07, 3), np.ones(2) * 0.07))
    for it in range(5 * niter):
        assert temp(it) == pytest.approx(expected_per_epoch[it // niter])
    assert temp(0) == temp(niter - 1) == pytest.approx(0.04)  # constant within an epoch
    assert temp(2 * niter) == pytest.approx(0.07)  # warmup's last epoch reaches the target


def test_shapes_registered_and_selectable(make_tiny_cfg):
    assert {"cosine", "linear", "constant"} <= set(dict(SCHEDULER_REGISTRY))
    cfg = _cfg(make_tiny_cfg, **{"SOLVER.WEIGHT_DECAY_SCHEDULER": "constant", "SOLVER.LR_SCHEDULER": "linear"})
    s = build_schedules(cfg, 2, world_size=1)
    assert s["weight_decay"](0) == s["weight_decay"](9) == pytest.approx(0.04)
    peak = 0.0005 * 32 / 256
    assert s["lr"](4) == pytest.approx(peak)
    assert s["lr"](7) == pytest.approx(peak + (1e-6 - peak) * 3 / 6)


def test_invalid_settings_name_the_key(make_tiny_cfg):
    with pytest.raises(ValueError, match="SOLVER.WARMUP_EPOCHS"):
        build_schedules(_cfg(make_tiny_cfg, **{"SOLVER.WARMUP_EPOCHS": "9"}), 2, world_size=1)
    with pytest.raises(KeyError, match="SOLVER.LR_SCHEDULER.*registered names: constant, cosine, linear"):
        build_schedules(_cfg(make_tiny_cfg, **{"SOLVER.LR_SCHEDULER": "step"}), 2, world_size=1)
    with pytest.raises(ValueError, match="iters_per_epoch"):
        build_schedules(_cfg(make_tiny_cfg), 0, world_size=1)
