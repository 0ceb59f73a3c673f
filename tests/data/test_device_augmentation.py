"""INPUT.DEVICE_AUGMENTATION: the split augmentation gives the in-worker path's bytes; Pillow's blur replayed."""

import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from dino_research.config import ConfigError, get_cfg
from dino_research.data import batched_pixel_ops as B
from dino_research.data import collate_crops, device_stage
from dino_research.data import pixel_ops as P
from dino_research.data.augmentations import DINOMultiCrop
from dino_research.data.device_augmentation import CROP_PARAMS


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def integer_images(n=6, h=13, w=17, seed=0):
    """``(n, 3, h, w)`` float32 integers in [0, 255], with saturated, gray and dark pixels mixed in."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 3, h, w)).astype(np.float32)
    x[:, :, 0, :] = 255.0
    x[:, :, 1, :] = x[:, 0:1, 1, :]  # gray rows: chroma 0
    x[:, :, 2, :] = 0.0
    return x


def per_crop_numpy(fn, x, factors):
    return np.stack([fn(x[i].copy(), float(f)) for i, f in enumerate(factors)])


@pytest.mark.parametrize("name", ["brightness", "contrast", "saturation", "hue"])
def test_each_batched_colour_operation_gives_pixel_ops_bytes(name):
    x = integer_images()
    factors = torch.tensor([0.6, 1.0, 1.37, 0.0, 1.4, 0.93], dtype=torch.float64)
    if name == "hue":
        factors = torch.tensor([-0.1, -0.0371, 0.0, 0.004, 0.05, 0.1], dtype=torch.float64)
    numpy_ops = {
        "brightness": lambda a, f: P.truncate_(np.multiply(a, np.float32(f), out=a)),
        "contrast": P.adjust_contrast_,
        "saturation": lambda a, f: P.blend_(a, P.luma(a), f),
        "hue": P.adjust_hue,
    }
    torch_ops = {
        "brightness": lambda t, f: B.truncate_(t.mul_(f.float().view(-1, 1, 1, 1))),
        "contrast": B.adjust_contrast_,
        "saturation": lambda t, f: B.blend_(t, B.luma(t), f),
        "hue": B.adjust_hue,
    }
    expected = per_crop_numpy(numpy_ops[name], x, factors)
    got = torch_ops[name](torch.from_numpy(x.copy()), factors).numpy()
    np.testing.assert_array_equal(got, expected)


def test_hue_shift_is_torchvisions_byte_offset():
    factors = [-0.1, -0.0039, -0.004, 0.0, 0.0039, 0.004, 0.1]
    expected = [int(f * 255) % 256 for f in factors]
    assert B.hue_shift(torch.tensor(factors, dtype=torch.float64)).tolist() == expected


def test_luma_and_solarize_match_pixel_ops():
    x = integer_images(n=2)
    np.testing.assert_array_equal(B.luma(torch.from_numpy(x))[:, 0].numpy(), np.stack([P.luma(c) for c in x]))
    np.testing.assert_array_equal(B.solarize_(torch.from_numpy(x.copy()), 128).numpy(),
                                  np.stack([P.solarize_(c.copy(), 128) for c in x]))


def test_box_parameters_of_a_known_radius_and_of_zero():
    # sigma 2, 3 passes: sigma^2 / 3 = 4/3, L = sqrt(17), l = 1, a = 3 (2 - 4) / (6 (4/3 - 4)) = 0.375:
    # box radius 1.375, so r = 1, ww = int(2**24 / 3.75), fw = (2**24 - 3 ww) // 2.
    ww = int(np.float32(2**24) / np.float32(3.75))
    assert B.pil_box_blur_params(2.0) == (1, ww, (2**24 - 3 * ww) // 2)
    assert B.pil_box_blur_params(0.0) == (0, 2**24, 0)  # the identity


@pytest.mark.parametrize("seed", range(4))
def test_gaussian_blur_equals_pillows_byte_for_byte(seed):
    rng = np.random.default_rng(seed)
    sizes = [(1, 1), (1, 9), (7, 3), (24, 31)]
    radii = [float(r) for r in rng.uniform(0.1, 2.0, 3)] + [0.0, 1e-3, float(rng.uniform(2, 15))]
    for h, w in sizes:
        images = rng.integers(0, 256, (len(radii), h, w, 3), dtype=np.uint8)
        expected = np.stack([np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(r)))
                             for img, r in zip(images, radii)]).transpose(0, 3, 1, 2)
        boxes = torch.tensor([B.pil_box_blur_params(r) for r in radii], dtype=torch.float64)
        x = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32))
        np.testing.assert_array_equal(B.gaussian_blur(x, boxes).numpy(), expected, err_msg=f"{h}x{w} {radii}")


def photo(w=90, h=70, seed=0):
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    pixels = np.stack([xx * 255 / w, yy * 255 / h, 128 + 100 * np.sin(xx / 7.0)], -1) + rng.normal(0, 25, (h, w, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def split_and_plain(n, **kwargs):
    """``n`` samples of the same image from the same seeds, through the in-worker path and through
    the split one (worker part, collation, ``finish_batch``)."""
    plain, split = DINOMultiCrop(**kwargs), DINOMultiCrop(device_augmentation=True, **kwargs)
    image, outs, samples = photo(), [], []
    for seed in range(n):
        random.seed(seed), torch.manual_seed(seed)
        outs.append(plain(image))
        random.seed(seed), torch.manual_seed(seed)
        samples.append((split(image), seed))
    return split, outs, samples


SMALL = dict(global_crop_size=40, local_crop_size=24, local_crops_number=3)


@pytest.mark.parametrize("settings", [
    {},  # the paper's probabilities
    dict(color_jitter_prob=1.0, grayscale_prob=0.5, local_blur_prob=1.0, global_solarize_probs=(1.0, 1.0),
         blur_radius=(0.1, 6.0), solarize_threshold=60),
], ids=["paper", "every-operation-often"])
def test_the_split_augmentation_gives_the_in_worker_bytes(settings):
    split, outs, samples = split_and_plain(10, **SMALL, **settings)
    sample = samples[0][0]
    assert [c.dtype for c in sample["crops"]] == [torch.uint8] * 5
    assert [tuple(c.shape) for c in sample["crops"]] == [(3, 40, 40)] * 2 + [(3, 24, 24)] * 3
    assert tuple(sample["crop_params"].shape) == (5, CROP_PARAMS)
    batch, labels = collate_crops(samples)
    finished = split.finish_batch(batch, "cpu")
    assert set(finished) == {"crops"} and labels.tolist() == list(range(10))
    for c, crops in enumerate(finished["crops"]):
        assert crops.dtype == torch.float32
        torch.testing.assert_close(crops, torch.stack([o[c] for o in outs]), rtol=0, atol=0, msg=f"crop {c}")


def test_the_draws_cover_every_operation_in_the_mixed_settings():
    """The equality above is only worth something if the batch really mixes the operations."""
    _, _, samples = split_and_plain(10, **SMALL, color_jitter_prob=1.0, grayscale_prob=0.5, local_blur_prob=1.0,
                                    global_solarize_probs=(1.0, 1.0))
    params = torch.cat([s["crop_params"] for s, _ in samples])
    assert params[:, 0].all()  # jitter applied everywhere, in different orders
    assert len({tuple(row) for row in params[:, 1:5].tolist()}) > 5
    assert 0 < params[:, 9].sum() < len(params)  # some gray, some not
    assert 0 < params[:, 10].sum() < len(params) and params[:, 14].any()  # the 2nd global crop: blur p 0.1


def test_device_stage_follows_the_key_and_names_it_for_an_augmentation_without_one():
    cfg = get_cfg()
    assert device_stage(cfg, DINOMultiCrop(cfg)) is None
    cfg.INPUT.DEVICE_AUGMENTATION = True
    aug = DINOMultiCrop(cfg)
    assert aug.device_augmentation and device_stage(cfg, aug) == aug.finish_batch
    with pytest.raises(ConfigError, match="INPUT.DEVICE_AUGMENTATION"):
        device_stage(cfg, lambda image: [image])


def test_training_with_the_device_stage_equals_training_without(tmp_path):
    """Same seeds, same draws, same bytes: the two runs' weights are equal, not just close."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
    from test_training import TINY

    from dino_research.checkpoint import LAST_CHECKPOINT, load_file
    from dino_research.engine import DINOTrainer, load_config

    models = {}
    for flag in ("False", "True"):
        cfg = load_config("", TINY + ["OUTPUT_DIR", str(tmp_path / flag), "INPUT.DEVICE_AUGMENTATION", flag])
        trainer = DINOTrainer(cfg)
        assert (trainer.batch_transform is not None) == (flag == "True")
        trainer.train()
        models[flag] = load_file(str(tmp_path / flag / LAST_CHECKPOINT))["model"]
    assert models["True"].keys() == models["False"].keys()
    for key, value in models["False"].items():
        assert torch.equal(models["True"][key], value), key
