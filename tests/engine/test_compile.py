"""MODEL.COMPILE: the compiled training forward gives the plain one's loss and gradients, keeps the
checkpoint keys, and leaves the backbone that evaluations use uncompiled."""

import pytest
import torch

from dino_research.config.checks import ConfigError, check_config
from dino_research.engine.trainer import compile_networks
from dino_research.modeling import build_model


def test_compiled_networks_match_the_plain_ones(make_tiny_cfg):
    cfg = make_tiny_cfg(**{"MODEL.BACKBONE.DEPTH": "1", "INPUT.GLOBAL_CROP_SIZE": "32", "INPUT.LOCAL_CROP_SIZE": "16"})
    torch.manual_seed(0)
    plain = build_model(cfg)
    compiled = build_model(cfg)
    compiled.load_state_dict(plain.state_dict())
    assert compile_networks(compiled, dynamic=False) == 2  # student and teacher
    assert list(compiled.state_dict()) == list(plain.state_dict())
    assert type(compiled.backbone_for_eval()) is type(plain.backbone_for_eval())  # evaluations: uncompiled
    crops = [torch.randn(2, 3, 32, 32) for _ in range(2)] + [torch.randn(2, 3, 16, 16) for _ in range(2)]
    losses = []
    for model in (plain, compiled):
        model.train()
        loss = model({"crops": crops}, teacher_temp=0.04)["loss"]
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    for (name, a), b in zip(plain.named_parameters(), compiled.parameters()):
        if a.grad is None:
            assert b.grad is None, name
            continue
        scale = a.grad.abs().max().item() + 1e-12
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-4 * scale, msg=name)


def test_an_unknown_compile_mode_names_the_choices(make_tiny_cfg):
    cfg = make_tiny_cfg(**{"MODEL.COMPILE": "max-autotune"})
    with pytest.raises(ConfigError, match="MODEL.COMPILE"):
        check_config(cfg)
