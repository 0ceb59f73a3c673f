"""EMA rules: t = m t + (1 - m) s on parameters; buffers only for the buffer-averaging rule."""

import copy

import pytest
import torch
import torch.nn as nn

from dino_research.modeling import EMA_REGISTRY, build_ema
from dino_research.modeling.ema import ParamAndBufferEMA, ParamEMA


def _pair():
    student = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p))
    student.train()(torch.randn(8, 4))  # give the student's BatchNorm different running stats
    return student, teacher


def test_param_ema_formula_and_buffers_untouched():
    student, teacher = _pair()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    rule = ParamEMA(None, student, teacher)
    rule.update(0.9)
    for (name, t), s in zip(teacher.named_parameters(), student.parameters()):
        torch.testing.assert_close(t, 0.9 * before[name] + 0.1 * s, rtol=0, atol=1e-7)
    for name, buf in teacher.named_buffers():
        assert torch.equal(buf, before[name])


def test_momentum_one_keeps_teacher_and_zero_copies_student():
    student, teacher = _pair()
    before = copy.deepcopy(teacher.state_dict())
    ParamEMA(None, student, teacher).update(1.0)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k])
    ParamEMA(None, student, teacher).update(0.0)
    for t, s in zip(teacher.parameters(), student.parameters()):
        assert torch.equal(t, s)


def test_param_and_buffer_ema_averages_float_buffers_copies_counters():
    student, teacher = _pair()
    t_mean = teacher[1].running_mean.clone()
    ParamAndBufferEMA(None, student, teacher).update(0.75)
    torch.testing.assert_close(teacher[1].running_mean, 0.75 * t_mean + 0.25 * student[1].running_mean)
    assert teacher[1].num_batches_tracked == student[1].num_batches_tracked


def test_mismatched_architectures_and_bad_momentum_rejected():
    with pytest.raises(ValueError, match="same architecture|share one architecture"):
        ParamEMA(None, nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="student"):
        ParamEMA(None, nn.Linear(2, 3), nn.Linear(2, 2))
    with pytest.raises(ValueError, match="momentum"):
        ParamEMA(None, nn.Linear(2, 2), nn.Linear(2, 2)).update(1.5)


def test_registry_and_builder(make_tiny_cfg):
    assert {"ParamEMA", "ParamAndBufferEMA"} <= set(dict(EMA_REGISTRY))
    student, teacher = _pair()
    cfg = make_tiny_cfg(**{"MODEL.TEACHER.EMA": "ParamAndBufferEMA"})
    assert isinstance(build_ema(cfg, student, teacher), ParamAndBufferEMA)
    cfg = make_tiny_cfg(**{"MODEL.TEACHER.EMA": "Nope"})
    with pytest.raises(KeyError, match="ParamAndBufferEMA, ParamEMA"):
        build_ema(cfg, student, teacher)
