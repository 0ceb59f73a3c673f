"""Attention maps during training: fixed images, the teacher's maps, to TensorBoard and PNG files."""

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dino_research.config import ConfigError
from dino_research.engine import load_config
from dino_research.engine.hooks import attention_images
from dino_research.evaluation.attention import (
    attention_figure,
    last_self_attention_maps,
    prepare_image,
    threshold_masks,
    upsample,
)
from dino_research.utils.events import EventStorage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_training import make_cfg, train  # noqa: E402

ATTENTION = ["TEST.ATTENTION.PERIOD", "1", "TEST.ATTENTION.NUM_IMAGES", "2", "TEST.DATASET", "Synthetic",
             "TEST.RESIZE_SIZE", "32", "TEST.CROP_SIZE", "32"]


def test_teacher_attention_maps_go_to_tensorboard_and_png(tmp_path):
    trainer = train(make_cfg(tmp_path, *ATTENTION))
    pngs = sorted(p.name for p in (tmp_path / "attention").glob("*.png"))
    assert pngs == [f"iter_{it:07d}_image_{k}.png" for it in (4, 8) for k in (0, 1)]  # after epochs 1 and 2
    # The last figure is the final teacher's maps of the fixed image, drawn at 4x (32 px -> 128 px).
    image = attention_images(trainer.cfg)[1]
    _, tensor = prepare_image(image, 16, trainer.cfg.INPUT.MEAN, trainer.cfg.INPUT.STD)
    grid = last_self_attention_maps(trainer.model.backbone_for_eval().eval(), tensor)[0]
    expected = attention_figure(image.resize((128, 128), Image.NEAREST), upsample(grid, 64),
                                upsample(threshold_masks(grid, 0.6), 64))
    got = Image.open(tmp_path / "attention" / "iter_0000008_image_1.png")
    assert got.size == expected.size == (4 + 5 * 132, 4 + 2 * (14 + 128 + 4))  # image, mean, 3 heads; 2 rows
    assert np.array_equal(np.asarray(got), np.asarray(expected))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert set(events.Tags()["images"]) == {"attention/image_0", "attention/image_1"}
    logged = events.Images("attention/image_1")
    assert [e.step for e in logged] == [3, 7]  # 0-based iteration, as every scalar
    assert (logged[-1].width, logged[-1].height) == expected.size


def test_attention_images_are_fixed_and_spread_over_the_split():
    cfg = load_config("", ["TEST.DATASET", "Synthetic", "DATASETS.SYNTHETIC_SIZE", "10", "TEST.RESIZE_SIZE", "48",
                           "TEST.CROP_SIZE", "32", "TEST.ATTENTION.NUM_IMAGES", "3"])
    first, again = attention_images(cfg), attention_images(cfg)
    assert [im.size for im in first] == [(32, 32)] * 3
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, again))
    from dino_research.data.datasets import Synthetic

    labels = [Synthetic(num_images=10, image_size=64, train=False).__getitem__(i)[1] for i in (0, 3, 6)]
    assert labels == [0, 3, 6]  # indices i * 10 // 3: different classes


def test_attention_maps_need_a_vit():
    with pytest.raises(ConfigError, match="TEST.ATTENTION.PERIOD = 1: attention maps need a ViT backbone"):
        load_config("", ["MODEL.BACKBONE.NAME", "resnet50", "TEST.ATTENTION.PERIOD", "1"])


def test_put_image_checks_its_input():
    storage = EventStorage(5)
    storage.put_image("a", np.zeros((4, 6, 3), np.uint8))
    with pytest.raises(ValueError, match=r"uint8 array \(H, W, 3\)"):
        storage.put_image("b", np.zeros((4, 6), np.uint8))
    ((name, image, it),) = storage.take_images()
    assert (name, image.shape, it) == ("a", (4, 6, 3), 5) and storage.take_images() == []
