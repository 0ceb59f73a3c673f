"""DINOMultiCrop: crop layout, exact numerics of each operation, reproducibility, input modes, checks."""

import inspect
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T

from dino_research.config import get_cfg
from dino_research.data import AUGMENTATION_REGISTRY, build_augmentation
from dino_research.data.augmentations import DINOMultiCrop
from dino_research.data.datasets import to_rgb

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


@pytest.fixture(autouse=True)
def _one_thread():
    """As in a data-loader worker: one thread. Many small tensor ops (the reference's ToTensor and
    Normalize, ``to_uint8``) are otherwise an order of magnitude slower on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def noise_image(w=64, h=48, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def identity_cfg(side):
    """Every random operation off and the crop covering the whole (square) image at its own size,
    so each crop is exactly the input before ToTensor/Normalize."""
    cfg = get_cfg()
    c = cfg.INPUT
    c.GLOBAL_CROP_SIZE = side
    c.LOCAL_CROP_SIZE = side
    c.GLOBAL_CROPS_SCALE = (1.0, 1.0)
    c.LOCAL_CROPS_SCALE = (1.0, 1.0)
    c.CROP_RATIO = (1.0, 1.0)
    c.FLIP_PROB = 0.0
    c.COLOR_JITTER_PROB = 0.0
    c.GRAYSCALE_PROB = 0.0
    c.GLOBAL_BLUR_PROBS = (0.0, 0.0)
    c.LOCAL_BLUR_PROB = 0.0
    c.GLOBAL_SOLARIZE_PROBS = (0.0, 0.0)
    return cfg


def to_uint8(crop):
    """Undo Normalize and ToTensor: (3, h, w) normalized -> (h, w, 3) uint8 values."""
    return (crop * STD + MEAN).mul(255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def seed_all(seed):
    random.seed(seed)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------ layout
def test_default_cfg_builds_ten_crops_globals_first():
    aug = build_augmentation(get_cfg())
    assert isinstance(aug, DINOMultiCrop) and AUGMENTATION_REGISTRY.get("DINOMultiCrop") is DINOMultiCrop
    crops = aug(noise_image(120, 90))
    assert aug.num_global_crops == 2 and aug.num_crops == 10
    assert [tuple(c.shape) for c in crops] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 8
    assert all(c.dtype == torch.float32 for c in crops)


@pytest.mark.parametrize("n_local", [0, 1, 3])
def test_small_sizes_and_local_number(n_local):
    cfg = get_cfg()
    cfg.INPUT.GLOBAL_CROP_SIZE = 32
    cfg.INPUT.LOCAL_CROP_SIZE = 16
    cfg.INPUT.LOCAL_CROPS_NUMBER = n_local
    crops = build_augmentation(cfg)(noise_image())
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * n_local


def test_explicit_kwargs_and_cfg_overrides():
    aug = DINOMultiCrop(global_crop_size=24, local_crop_size=8, local_crops_number=2)
    assert [tuple(c.shape) for c in aug(noise_image())] == [(3, 24, 24)] * 2 + [(3, 8, 8)] * 2
    aug = DINOMultiCrop(get_cfg(), local_crops_number=0, global_crop_size=16)
    assert [tuple(c.shape) for c in aug(noise_image())] == [(3, 16, 16)] * 2


def test_kwarg_defaults_equal_config_defaults():
    params = inspect.signature(DINOMultiCrop.__init__).parameters
    from_cfg = DINOMultiCrop.from_config(get_cfg())
    assert set(from_cfg) == {n for n in params if n != "self"}
    for name, value in from_cfg.items():
        default = params[name].default
        assert (tuple(default) if isinstance(default, tuple) else default) == pytest.approx(value), name


# ------------------------------------------------------------------------------ faithfulness
class _PaperBlur:
    """utils.GaussianBlur of the reference implementation."""

    def __init__(self, p):
        self.p = p

    def __call__(self, img):
        if random.random() <= self.p:
            return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))
        return img


class _PaperSolarize:
    def __init__(self, p):
        self.p = p

    def __call__(self, img):
        return ImageOps.solarize(img) if random.random() < self.p else img


def _paper_augmentation(image, global_size=224, local_size=96, global_scale=(0.4, 1.0),
                        local_scale=(0.05, 0.4), ratio=(3.0 / 4.0, 4.0 / 3.0)):
    """DataAugmentationDINO of facebookresearch/dino main_dino.py: torchvision on PIL, the paper's
    arguments (crop geometry overridable, to build crops that need no resampling)."""
    flip_jitter_gray = T.Compose([
        T.RandomHorizontalFlip(p=0.5),
        T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
    ])
    normalize = T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    bicubic = T.InterpolationMode.BICUBIC

    def crop(size, scale):
        return T.RandomResizedCrop(size, scale=scale, ratio=ratio, interpolation=bicubic)

    g1 = T.Compose([crop(global_size, global_scale), flip_jitter_gray, _PaperBlur(1.0), normalize])
    g2 = T.Compose([
        crop(global_size, global_scale), flip_jitter_gray, _PaperBlur(0.1), _PaperSolarize(0.2), normalize,
    ])
    local = T.Compose([crop(local_size, local_scale), flip_jitter_gray, _PaperBlur(0.5), normalize])
    return [g1(image), g2(image)] + [local(image) for _ in range(8)]


def photo_image(w=160, h=120, seed=0):
    """Photo-like: color ramps, a smooth pattern, mild sensor noise."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    pattern = 128 + 90 * np.sin(xx / 7.0) * np.cos(yy / 11.0)
    pixels = np.stack([xx * 255 / (w - 1), yy * 255 / (h - 1), pattern], -1)
    pixels += np.random.default_rng(seed).normal(0.0, 8.0, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def hard_colors_image(side=48, seed=0):
    """Every combination of 11 edge values (grays, ties, extremes), then random colors: the cases
    where HSV conversion and the blends round or branch differently."""
    edges = [0, 1, 2, 3, 126, 127, 128, 129, 253, 254, 255]
    grid = np.array(np.meshgrid(edges, edges, edges, indexing="ij")).reshape(3, -1).T
    rest = np.random.default_rng(seed).integers(0, 256, (side * side - len(grid), 3))
    return Image.fromarray(np.concatenate([grid, rest]).astype(np.uint8).reshape(side, side, 3))


def run_seeded(fn, image, seed):
    """``fn(image)`` after seeding; also returns both generators' states afterwards."""
    seed_all(seed)
    crops = fn(image)
    return crops, torch.get_rng_state(), random.getstate()


def levels(crop):
    return to_uint8(crop).astype(np.int16)


def test_equals_reference_bit_for_bit_when_no_resampling_is_needed():
    """Crops as large as the (square) image need no resize; every other step (flip, jitter with its
    random order and factors, grayscale, blur, solarization) then gives the reference's 8-bit values
    exactly, and the normalized values differ only by float32 rounding."""
    side = 48
    cfg = identity_cfg(side)
    c = cfg.INPUT
    c.FLIP_PROB, c.COLOR_JITTER_PROB, c.GRAYSCALE_PROB = 0.5, 0.8, 0.2
    c.GLOBAL_BLUR_PROBS, c.LOCAL_BLUR_PROB, c.GLOBAL_SOLARIZE_PROBS = (1.0, 0.1), 0.5, (0.0, 0.2)
    aug = build_augmentation(cfg)
    image = hard_colors_image(side)

    def reference(img):
        return _paper_augmentation(img, side, side, (1.0, 1.0), (1.0, 1.0), (1.0, 1.0))

    for seed in range(20):  # enough draws that every step occurs, solarization included
        ours, torch_state, py_state = run_seeded(aug, image, seed)
        ref, ref_torch_state, ref_py_state = run_seeded(reference, image, seed)
        assert torch.equal(torch_state, ref_torch_state) and py_state == ref_py_state
        for a, b in zip(ours, ref, strict=True):
            np.testing.assert_array_equal(levels(a), levels(b))
            assert torch.allclose(a, b, atol=1e-6, rtol=0)


def test_same_draws_and_close_pixels_as_reference():
    """With resampling, the paper's settings: the same seeds draw the same numbers in the same order
    (both generators end in the same state) and give the same crops up to rounding.

    The resize is torch's antialiased bicubic on uint8 (PIL's kernel) rather than PIL's: it rounds
    its intermediate differently, so 0.5-3% of values differ, nearly all by one level. The later steps
    can amplify such a difference locally: the byte of hue moves the middle channel by up to
    chroma / 42.5 <= 6 levels, contrast and saturation scale differences by up to 1.4 and 1.2, so a
    value may differ by up to ~12 levels (bound: 16). A crop's mean difference stays far below a
    level: a level's change of the image mean that contrast blends with moves the whole crop by at
    most |1 - factor| <= 0.4 (bound per crop: 1, over all crops: 0.05; measured ~0.005). A wrong draw
    (another crop, flip or factor) changes a crop's mean by more than 10 levels.
    """
    aug = build_augmentation(get_cfg())
    image = photo_image()
    per_crop_means, wrong_draw_means = [], []
    for seed in range(12):
        ours, torch_state, py_state = run_seeded(aug, image, seed)
        ref, ref_torch_state, ref_py_state = run_seeded(_paper_augmentation, image, seed)
        assert torch.equal(torch_state, ref_torch_state) and py_state == ref_py_state
        other, _, _ = run_seeded(_paper_augmentation, image, seed + 1000)
        for a, b, wrong in zip(ours, ref, other, strict=True):
            assert a.shape == b.shape
            diff = np.abs(levels(a) - levels(b))
            assert diff.max() <= 16
            per_crop_means.append(diff.mean())
            wrong_draw_means.append(np.abs(levels(a) - levels(wrong)).mean())
    assert max(per_crop_means) < 1.0
    assert np.mean(per_crop_means) < 0.05
    assert min(wrong_draw_means) > 10.0  # the bounds above do detect a different draw


def test_crop_boxes_and_flips_match_reference():
    """Only crop and flip on: an image whose red/green encode x/y (8 levels per pixel) shows the
    crop's box and orientation; ours lands where the reference does, to a fraction of a pixel."""
    w, h = 32, 24
    yy, xx = np.mgrid[0:h, 0:w]
    coords = np.stack([xx * 8, yy * 8, np.full_like(xx, 128)], -1).astype(np.uint8)
    image = Image.fromarray(coords)
    cfg = get_cfg()
    c = cfg.INPUT
    c.COLOR_JITTER_PROB, c.GRAYSCALE_PROB, c.GLOBAL_BLUR_PROBS, c.LOCAL_BLUR_PROB = 0.0, 0.0, (0.0, 0.0), 0.0
    c.GLOBAL_SOLARIZE_PROBS = (0.0, 0.0)
    aug = build_augmentation(cfg)
    flips = T.RandomHorizontalFlip(p=0.5)
    normalize = T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    bicubic = T.InterpolationMode.BICUBIC

    def reference(img):
        steps = [T.RandomResizedCrop(224, scale=(0.4, 1.0), interpolation=bicubic)] * 2
        steps += [T.RandomResizedCrop(96, scale=(0.05, 0.4), interpolation=bicubic)] * 8
        return [normalize(flips(step(img))) for step in steps]

    for seed in range(10):
        ours, _, _ = run_seeded(aug, image, seed)
        ref, _, _ = run_seeded(reference, image, seed)
        for a, b in zip(ours, ref, strict=True):
            diff = np.abs(levels(a) - levels(b))[..., :2]  # x and y; a pixel's shift is >= 8 levels
            assert diff.max() <= 3 and diff.mean() < 0.2


@pytest.mark.parametrize("factor", [0.0, 0.05, -0.1, 0.1, 0.5, -0.5, 0.0031])
def test_hue_equals_torchvision_on_a_color_cube(factor):
    """The most intricate step, against torchvision's PIL ``adjust_hue`` on every 3rd 8-bit value of
    each channel (~640k colors, every branch and tie of PIL's HSV conversion)."""
    from torchvision.transforms import functional as TF

    from dino_research.data.pixel_ops import adjust_hue as _adjust_hue

    values = np.arange(0, 256, 3)
    cube = np.array(np.meshgrid(values, values, values, indexing="ij")).reshape(3, -1).T.astype(np.uint8)
    image = Image.fromarray(cube.reshape(len(values) ** 2, len(values), 3))
    expected = np.asarray(TF.adjust_hue(image, factor)).transpose(2, 0, 1)
    ours = _adjust_hue(np.asarray(image).transpose(2, 0, 1).astype(np.float32), factor)
    np.testing.assert_array_equal(ours, expected)


# ------------------------------------------------------------------------------ operations
def test_normalization_is_exact_on_a_constant_image():
    value = (200, 30, 117)
    crops = build_augmentation(identity_cfg(16))(Image.new("RGB", (16, 16), value))
    expected = (torch.tensor(value, dtype=torch.float64) / 255 - MEAN.view(3).double()) / STD.view(3).double()
    for crop in crops:
        assert torch.allclose(crop.double(), expected.view(3, 1, 1).expand_as(crop), atol=1e-6, rtol=0)


def test_normalization_on_a_non_square_image():
    cfg = identity_cfg(20)  # ratio (1, 1) on 40x30 -> central 30x30 square resized to 20x20
    crops = build_augmentation(cfg)(Image.new("RGB", (40, 30), (0, 255, 128)))
    expected = (torch.tensor([0, 255, 128]) / 255 - MEAN.view(3)) / STD.view(3)
    assert torch.allclose(crops[0], expected.view(3, 1, 1).expand(3, 20, 20), atol=1e-6, rtol=0)


def test_identity_settings_reproduce_the_input():
    image = noise_image(24, 24)
    for crop in build_augmentation(identity_cfg(24))(image):
        np.testing.assert_array_equal(to_uint8(crop), np.asarray(image))


def test_solarization_only_on_second_global_crop():
    cfg = identity_cfg(32)
    cfg.INPUT.GLOBAL_SOLARIZE_PROBS = (0.0, 1.0)
    cfg.INPUT.LOCAL_CROPS_NUMBER = 2
    image = noise_image(32, 32)
    crops = [to_uint8(c).astype(int) for c in build_augmentation(cfg)(image)]
    v = np.asarray(image).astype(int)
    assert (v >= 128).any() and (v < 128).any()
    np.testing.assert_array_equal(crops[0], v)
    np.testing.assert_array_equal(crops[1], np.where(v >= 128, 255 - v, v))
    for local in crops[2:]:
        np.testing.assert_array_equal(local, v)


def test_solarize_threshold_is_used():
    cfg = identity_cfg(16)
    cfg.INPUT.GLOBAL_SOLARIZE_PROBS = (1.0, 1.0)
    cfg.INPUT.SOLARIZE_THRESHOLD = 200
    image = noise_image(16, 16)
    v = np.asarray(image).astype(int)
    for crop in build_augmentation(cfg)(image)[:2]:
        np.testing.assert_array_equal(to_uint8(crop), np.where(v >= 200, 255 - v, v))


def test_blur_probability_one_blurs_first_global_and_zero_does_not():
    side = 32
    checker = np.kron((np.indices((8, 8)).sum(0) % 2) * 255, np.ones((4, 4))).astype(np.uint8)
    image = Image.fromarray(np.stack([checker] * 3, axis=-1))
    cfg = identity_cfg(side)
    cfg.INPUT.GLOBAL_BLUR_PROBS = (1.0, 0.0)
    cfg.INPUT.BLUR_RADIUS = (1.5, 1.5)
    first, second = [to_uint8(c) for c in build_augmentation(cfg)(image)[:2]]
    np.testing.assert_array_equal(second, np.asarray(image))
    expected = np.asarray(image.filter(ImageFilter.GaussianBlur(1.5)))
    np.testing.assert_array_equal(first, expected)
    assert np.abs(first.astype(int) - np.asarray(image)).max() > 50


def test_local_blur_probability():
    image = noise_image(16, 16)
    cfg = identity_cfg(16)
    cfg.INPUT.LOCAL_BLUR_PROB = 1.0
    cfg.INPUT.LOCAL_CROPS_NUMBER = 2
    crops = [to_uint8(c) for c in build_augmentation(cfg)(image)]
    np.testing.assert_array_equal(crops[0], np.asarray(image))
    assert all(np.abs(c.astype(int) - np.asarray(image)).max() > 20 for c in crops[2:])


def test_grayscale_probability_one_gives_equal_channels():
    cfg = identity_cfg(16)
    cfg.INPUT.GRAYSCALE_PROB = 1.0
    image = noise_image(16, 16)
    gray = np.asarray(image.convert("L"))
    for crop in build_augmentation(cfg)(image):
        pixels = to_uint8(crop)
        for ch in range(3):
            np.testing.assert_array_equal(pixels[..., ch], gray)


def test_flip_probability_one_mirrors():
    cfg = identity_cfg(20)
    cfg.INPUT.FLIP_PROB = 1.0
    image = noise_image(20, 20)
    for crop in build_augmentation(cfg)(image):
        np.testing.assert_array_equal(to_uint8(crop), np.asarray(image)[:, ::-1])


def test_color_jitter_applies_only_with_its_probability():
    image = noise_image(16, 16)
    cfg = identity_cfg(16)
    cfg.INPUT.COLOR_JITTER_PROB = 1.0
    crops = [to_uint8(c) for c in build_augmentation(cfg)(image)]
    assert all(not np.array_equal(c, np.asarray(image)) for c in crops)


def test_seeding_random_and_torch_reproduces_crops():
    cfg = get_cfg()
    cfg.INPUT.GLOBAL_CROP_SIZE = 32
    cfg.INPUT.LOCAL_CROP_SIZE = 16
    aug = build_augmentation(cfg)
    image = noise_image()
    seed_all(7)
    first = aug(image)
    seed_all(7)
    second = aug(image)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    seed_all(8)
    third = aug(image)
    assert not all(torch.equal(a, b) for a, b in zip(first, third))


# ------------------------------------------------------------------------------ input modes
@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "1", "I;16", "I", "F"])
def test_any_mode_is_converted_to_rgb(mode):
    image = noise_image(16, 16).convert(mode) if mode not in ("I;16",) else Image.new("I;16", (16, 16), 1000)
    crops = build_augmentation(identity_cfg(16))(image)
    assert len(crops) == 10 and all(tuple(c.shape) == (3, 16, 16) for c in crops)
    assert to_rgb(image).mode == "RGB"


def test_palette_and_rgba_keep_colors():
    rgb = noise_image(16, 16)
    np.testing.assert_array_equal(np.asarray(to_rgb(rgb.convert("RGBA"))), np.asarray(rgb))
    pal = rgb.convert("P")
    np.testing.assert_array_equal(np.asarray(to_rgb(pal)), np.asarray(pal.convert("RGB")))
    pal.info["transparency"] = 0
    assert to_rgb(pal).mode == "RGB"


def test_sixteen_bit_is_scaled_not_clipped():
    values = np.array([[0, 128, 129, 1000, 32896, 65535]], dtype=np.uint16)
    expected = np.array([[0, 0, 1, 4, 128, 255]], dtype=np.uint8)  # round(v / 257)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    for img in (image, image.convert("I")):
        rgb = np.asarray(to_rgb(img))
        for ch in range(3):
            np.testing.assert_array_equal(rgb[..., ch], expected)
    # Through the augmentation: a constant 16-bit image of 32896 becomes 128/255 after ToTensor.
    crop = build_augmentation(identity_cfg(8))(Image.new("I;16", (8, 8), 32896))[0]
    np.testing.assert_array_equal(to_uint8(crop), np.full((8, 8, 3), 128, np.uint8))


def test_non_pil_input_is_rejected():
    with pytest.raises(TypeError, match="PIL"):
        build_augmentation(identity_cfg(8))(torch.zeros(3, 8, 8))


# ------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    "key, value",
    [
        ("GLOBAL_CROP_SIZE", 0),
        ("LOCAL_CROP_SIZE", -5),
        ("LOCAL_CROPS_NUMBER", -1),
        ("GLOBAL_CROPS_SCALE", (0.5, 0.4)),
        ("GLOBAL_CROPS_SCALE", (0.4, 1.5)),
        ("LOCAL_CROPS_SCALE", (0.0, 0.4)),
        ("LOCAL_CROPS_SCALE", (0.05, 0.4, 0.5)),
        ("CROP_RATIO", (1.33, 0.75)),
        ("FLIP_PROB", 1.5),
        ("COLOR_JITTER", (0.4, 0.4, 0.2)),
        ("COLOR_JITTER", (0.4, -0.4, 0.2, 0.1)),
        ("COLOR_JITTER_PROB", -0.1),
        ("GRAYSCALE_PROB", 2.0),
        ("BLUR_RADIUS", (2.0, 0.1)),
        ("GLOBAL_BLUR_PROBS", (1.0, 1.1)),
        ("GLOBAL_BLUR_PROBS", (1.0,)),
        ("LOCAL_BLUR_PROB", -0.5),
        ("GLOBAL_SOLARIZE_PROBS", (0.0, 1.2)),
        ("SOLARIZE_THRESHOLD", 300),
        ("MEAN", (0.5, 0.5)),
        ("STD", (0.2, 0.0, 0.2)),
    ],
)
def test_bad_values_raise_naming_the_key(key, value):
    cfg = get_cfg()
    cfg.INPUT[key] = value
    with pytest.raises(ValueError, match=f"INPUT.{key} "):
        build_augmentation(cfg)


def test_bad_kwarg_names_the_key():
    with pytest.raises(ValueError, match="INPUT.FLIP_PROB"):
        DINOMultiCrop(flip_prob=-1.0)


def test_repr_lists_the_pipeline():
    text = repr(build_augmentation(get_cfg()))
    parts = ("global crop 1", "global crop 2", "local crops x8", "RandomResizedCrop(224", "RandomResizedCrop(96",
             "bicubic", "GaussianBlur(p=1.0", "Solarize(p=0.2", "Normalize")
    for part in parts:
        assert part in text
    assert text.count("Solarize") == 1
