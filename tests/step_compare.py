"""One DINO forward + backward of two models from the same weights, compared: how a speed option
(channels-last, torch.compile) is shown to leave the step's numbers alone."""

import torch


def assert_same_loss_and_gradients(plain, fast, crops, rel_loss=1e-5, rtol=1e-3, atol_of_max=1e-4):
    """Run ``model({"crops": crops})`` + backward for both DINO models; the losses agree to
    ``rel_loss`` and each parameter's gradient to ``rtol`` and ``atol_of_max`` x its largest entry
    (float32 summation order differs). Gradients are compared before any optimizer: Adam's first step
    is ~lr * sign(grad) and would turn a rounding difference of a near-zero gradient into a full step."""
    losses = []
    for model in (plain, fast):
        model.train()
        loss = model({"crops": crops}, teacher_temp=0.04)["loss"]
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) <= rel_loss * abs(losses[0]), losses
    for (name, a), b in zip(plain.named_parameters(), fast.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is None:  # no gradient (the frozen weight-norm magnitude of the last layer)
            continue
        scale = a.grad.abs().max().item() + 1e-12
        torch.testing.assert_close(b.grad, a.grad, rtol=rtol, atol=atol_of_max * scale, msg=name)
