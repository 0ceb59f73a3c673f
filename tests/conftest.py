"""Shared fixtures: tiny configs that build in milliseconds on a CPU."""

import random

import numpy as np
import pytest
import torch

import dino_research.engine  # noqa: F401  (imports every package: their registries and choices are declared)
from dino_research.config import get_cfg


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def tiny_cfg(**overrides):
    """A ViT-tiny DINO config with a small head and 32/16-pixel crops: a step takes ~0.1 s on CPU."""
    cfg = get_cfg()
    cfg.MODEL.BACKBONE.NAME = "vit_tiny"
    cfg.MODEL.BACKBONE.DROP_PATH_RATE = 0.0
    cfg.MODEL.HEAD.OUT_DIM = 64
    cfg.MODEL.HEAD.HIDDEN_DIM = 32
    cfg.MODEL.HEAD.BOTTLENECK_DIM = 16
    cfg.INPUT.GLOBAL_CROP_SIZE = 32
    cfg.INPUT.LOCAL_CROP_SIZE = 16
    cfg.INPUT.LOCAL_CROPS_NUMBER = 2
    cfg.SOLVER.BATCH_SIZE_PER_GPU = 4
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.merge_from_list([x for kv in overrides.items() for x in kv])
    return cfg


@pytest.fixture
def make_tiny_cfg():
    return tiny_cfg
