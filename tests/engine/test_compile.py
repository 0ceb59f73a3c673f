"""MODEL.COMPILE: the compiled training forward gives the plain one's loss and gradients, keeps the
checkpoint keys, and leaves the backbone that evaluations use uncompiled."""

import os
import shutil

import pytest
import torch
from step_compare import assert_same_loss_and_gradients

from dino_research.config.checks import ConfigError, check_config
from dino_research.engine.trainer import compile_networks
from dino_research.modeling import build_model

# torch.compile's CPU backend writes and builds C++ kernels: it needs a compiler (CI installs g++).
needs_compiler = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                                    reason="no C++ compiler for torch.compile's CPU backend (apt-get install g++)")


@needs_compiler
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
    assert_same_loss_and_gradients(plain, compiled, crops)


def test_an_unknown_compile_mode_names_the_choices(make_tiny_cfg):
    cfg = make_tiny_cfg(**{"MODEL.COMPILE": "max-autotune"})
    with pytest.raises(ConfigError, match="MODEL.COMPILE"):
        check_config(cfg)
