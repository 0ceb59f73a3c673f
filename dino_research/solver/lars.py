"""LARS (You et al. 2017), the optimizer of DINO's ResNet-50 recipe."""

from __future__ import annotations

import torch


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose step is rescaled per tensor by a trust ratio.

    For a parameter in a group with ``apply_weight_decay=True`` (weights, not biases or norms)::

        d = grad + weight_decay * p
        d = d * eta * ||p|| / ||d||     (only when both norms are > 0)
        v = momentum * v + d;  p -= lr * v

    Groups with ``apply_weight_decay=False`` skip both the decay and the trust ratio, as the
    reference does for 1-D parameters. All tensors of a group are updated by multi-tensor kernels.
    """

    def __init__(self, params, lr: float = 0.0, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001):
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError(f"invalid LARS hyper-parameters lr={lr} momentum={momentum} "
                             f"weight_decay={weight_decay} eta={eta}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            updates = [p.grad.clone() for p in params]
            if group.get("apply_weight_decay", True):
                if group["weight_decay"]:
                    torch._foreach_add_(updates, params, alpha=group["weight_decay"])
                p_norms = torch.stack(torch._foreach_norm(params))
                u_norms = torch.stack(torch._foreach_norm(updates))
                trust = group["eta"] * p_norms / u_norms
                trust = torch.where((p_norms > 0) & (u_norms > 0), trust, torch.ones_like(trust))
                torch._foreach_mul_(updates, list(trust.unbind()))
            for p in params:  # first step only: create the momentum buffers
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, updates)
            torch._foreach_add_(params, bufs, alpha=-group["lr"])
        return loss
