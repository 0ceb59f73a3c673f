"""Parameter groups, optimizers, per-parameter clipping, frozen prototype layer."""

import pytest
import torch
import torch.nn as nn

from dino_research.solver import (
    LARS,
    apply_schedules,
    build_optimizer,
    clip_grad_per_param_,
    get_param_groups,
)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, 1, 4))  # like cls_token: 3-D, decayed as the reference
        self.fc = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.norm(self.fc(x + self.token[0, 0]))


def test_no_weight_decay_on_biases_and_1d_params():
    net = Net()
    decay, no_decay = get_param_groups(net)
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(decay["params"]) == ids([net.token, net.fc.weight])
    assert ids(no_decay["params"]) == ids([net.fc.bias, net.norm.weight, net.norm.bias])
    assert no_decay["weight_decay"] == 0.0 and decay["apply_weight_decay"] and not no_decay["apply_weight_decay"]


@pytest.mark.parametrize("name,cls", [("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD), ("lars", LARS)])
def test_build_optimizer_and_schedule_application(make_tiny_cfg, name, cls):
    opt = build_optimizer(make_tiny_cfg(**{"SOLVER.OPTIMIZER": name}), Net())
    assert isinstance(opt, cls)
    apply_schedules(opt, lr=0.1, weight_decay=0.3)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.1]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.3, 0.0]


def test_unknown_optimizer_lists_choices(make_tiny_cfg):
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER.*adamw, sgd, lars"):
        build_optimizer(make_tiny_cfg(**{"SOLVER.OPTIMIZER": "adam"}), Net())


def test_weight_decay_changes_only_the_decayed_group(make_tiny_cfg):
    net = Net()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    opt = build_optimizer(make_tiny_cfg(), net)
    apply_schedules(opt, lr=0.1, weight_decay=0.5)
    before = {n: p.clone() for n, p in net.named_parameters()}
    for p in net.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    opt.step()  # zero gradients: AdamW moves only what weight decay touches
    assert torch.allclose(net.fc.weight, before["fc.weight"] * (1 - 0.1 * 0.5))
    assert torch.equal(net.fc.bias, before["fc.bias"]) and torch.equal(net.norm.weight, before["norm.weight"])


def test_parameter_without_gradient_gets_no_update(make_tiny_cfg):
    """The frozen-last-layer mechanism: a parameter whose grad is None is skipped entirely."""
    net = Net()
    opt = build_optimizer(make_tiny_cfg(), net)
    apply_schedules(opt, lr=0.1, weight_decay=0.5)
    net(torch.randn(2, 4)).sum().backward()
    net.fc.weight.grad = None
    before = net.fc.weight.clone()
    opt.step()
    assert torch.equal(net.fc.weight, before)
    assert not torch.equal(net.fc.bias.grad, torch.zeros(3))


def test_per_parameter_clipping_matches_formula():
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2, 2))
    a.grad = torch.tensor([3.0, 4.0, 0.0])  # norm 5 -> scaled to norm 2
    b.grad = torch.tensor([[0.5, 0.5], [0.5, 0.5]])  # norm 1 -> untouched
    b_before = b.grad.clone()
    norms = clip_grad_per_param_([a, b], max_norm=2.0)
    torch.testing.assert_close(norms, torch.tensor([5.0, 1.0]))
    torch.testing.assert_close(a.grad, torch.tensor([3.0, 4.0, 0.0]) * (2.0 / (5.0 + 1e-6)))
    assert torch.equal(b.grad, b_before)
    assert clip_grad_per_param_([nn.Parameter(torch.zeros(1))], 1.0) is None


def test_lars_step_matches_hand_formula():
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # norm 5
    bias = nn.Parameter(torch.tensor([1.0]))
    w.grad, bias.grad = torch.tensor([[0.0, 1.0]]), torch.tensor([2.0])
    opt = LARS([{"params": [w], "apply_weight_decay": True},
                {"params": [bias], "apply_weight_decay": False, "weight_decay": 0.0}],
               lr=0.1, momentum=0.9, weight_decay=0.5, eta=0.001)
    opt.step()
    d = torch.tensor([[0.0, 1.0]]) + 0.5 * torch.tensor([[3.0, 4.0]])
    d = d * (0.001 * 5.0 / d.norm())
    torch.testing.assert_close(w.detach(), torch.tensor([[3.0, 4.0]]) - 0.1 * d)
    torch.testing.assert_close(bias.detach(), torch.tensor([1.0 - 0.1 * 2.0]))
    opt.step()  # momentum: v = 0.9 v + d
    torch.testing.assert_close(bias.detach(), torch.tensor([1.0 - 0.2 - 0.1 * (0.9 * 2.0 + 2.0)]))
