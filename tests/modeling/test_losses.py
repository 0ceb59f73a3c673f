"""DINOLoss against the written-out double sum of the paper, and the center update."""

import math

import pytest
import torch
import torch.nn.functional as F

from dino_research.modeling import build_loss
from dino_research.modeling.losses import DINOLoss


def double_sum_loss(student_out, teacher_out, center, student_temp, teacher_temp, n_crops):
    """The paper's Algorithm 1, one pair at a time."""
    student_views = (student_out / student_temp).chunk(n_crops)
    teacher_views = F.softmax((teacher_out - center) / teacher_temp, dim=-1).chunk(2)
    total, pairs = 0.0, 0
    for i, q in enumerate(teacher_views):
        for v, s in enumerate(student_views):
            if v == i:
                continue
            total = total + torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
            pairs += 1
    return total / pairs, pairs


@pytest.mark.parametrize("n_crops", [2, 3, 10])
def test_loss_equals_double_sum_over_pairs(n_crops):
    batch, k = 5, 32
    loss_fn = DINOLoss(out_dim=k, student_temp=0.1, center_momentum=0.9)
    loss_fn.center.copy_(torch.randn(1, k))
    center = loss_fn.center.clone()
    student = torch.randn(n_crops * batch, k, dtype=torch.float64).float()
    teacher = torch.randn(2 * batch, k)
    expected, pairs = double_sum_loss(student, teacher, center, 0.1, 0.04, n_crops)
    assert pairs == 2 * n_crops - 2  # 18 for 10 crops
    got = loss_fn(student, teacher, 0.04)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_hand_made_case_uniform_student_gives_log_k():
    """A student with equal logits predicts 1/K everywhere: every cross-entropy is log K."""
    k = 4
    loss_fn = DINOLoss(out_dim=k)
    student = torch.zeros(3 * 2, k)
    teacher = torch.tensor([[5.0, 0, 0, 0], [0, 5.0, 0, 0], [1.0, 2, 3, 4], [0, 0, 0, 9]])
    assert loss_fn(student, teacher, 0.04).item() == pytest.approx(math.log(k), abs=1e-6)


def test_gradient_flows_to_student_only():
    loss_fn = DINOLoss(out_dim=8)
    student = torch.randn(4 * 3, 8, requires_grad=True)
    teacher = torch.randn(2 * 3, 8, requires_grad=True)
    loss_fn(student, teacher, 0.04).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_center_update_formula_and_opt_out():
    k = 6
    loss_fn = DINOLoss(out_dim=k, center_momentum=0.9)
    teacher1, teacher2 = torch.randn(2 * 4, k), torch.randn(2 * 4, k)
    loss_fn(torch.randn(8, k), teacher1, 0.04)
    c1 = 0.1 * teacher1.mean(0, keepdim=True)
    torch.testing.assert_close(loss_fn.center, c1)
    loss_fn(torch.randn(8, k), teacher2, 0.04, update_state=False)
    torch.testing.assert_close(loss_fn.center, c1)  # unchanged
    loss_fn.update_state(teacher2)
    torch.testing.assert_close(loss_fn.center, 0.9 * c1 + 0.1 * teacher2.mean(0, keepdim=True))
    assert loss_fn.center.shape == (1, k)


def test_center_is_used_before_its_update():
    """The loss of a step uses the center of the previous steps, then updates it."""
    k = 5
    loss_fn = DINOLoss(out_dim=k)
    student, teacher = torch.randn(4, k), torch.randn(4, k)
    expected, _ = double_sum_loss(student, teacher, torch.zeros(1, k), 0.1, 0.07, 2)
    torch.testing.assert_close(loss_fn(student, teacher, 0.07), expected)


def test_loss_stays_float32_under_bf16_autocast():
    k, batch = 64, 4
    loss_fn = DINOLoss(out_dim=k)
    student, teacher = torch.randn(6 * batch, k), torch.randn(2 * batch, k)
    expected, _ = double_sum_loss(student, teacher, torch.zeros(1, k), 0.1, 0.04, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss_fn(student, teacher, 0.04, update_state=False)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_shape_errors_are_explicit():
    loss_fn = DINOLoss(out_dim=4)
    with pytest.raises(ValueError, match="teacher_out"):
        loss_fn(torch.randn(6, 4), torch.randn(3, 4), 0.04)
    with pytest.raises(ValueError, match="student_out"):
        loss_fn(torch.randn(7, 4), torch.randn(4, 4), 0.04)
    with pytest.raises(ValueError, match="STUDENT_TEMP"):
        DINOLoss(out_dim=4, student_temp=0.0)


def test_built_from_config(make_tiny_cfg):
    cfg = make_tiny_cfg(**{"MODEL.LOSS.STUDENT_TEMP": 0.2, "MODEL.LOSS.CENTER_MOMENTUM": 0.5})
    loss_fn = build_loss(cfg)
    assert isinstance(loss_fn, DINOLoss)
    assert loss_fn.student_temp == 0.2 and loss_fn.center_momentum == 0.5
    assert loss_fn.center.shape == (1, cfg.MODEL.HEAD.OUT_DIM)


def _center_worker(rank, world_size, out_path):
    loss_fn = DINOLoss(out_dim=3, center_momentum=0.5)
    loss_fn.update_state(torch.full((4, 3), float(rank + 1)))  # rank 0 sees 1s, rank 1 sees 2s
    if rank == 0:
        torch.save(loss_fn.center, out_path)


def test_center_mean_is_averaged_over_ranks(tmp_path):
    from dist_utils import run_on_gloo

    run_on_gloo(_center_worker, 2, str(tmp_path / "center.pt"))
    center = torch.load(tmp_path / "center.pt")
    torch.testing.assert_close(center, torch.full((1, 3), 0.5 * 1.5))
