"""DINO's multi-crop augmentation, registered in ``AUGMENTATION_REGISTRY``.

``DINOMultiCrop`` reproduces ``DataAugmentationDINO`` of the reference implementation (Caron et al.
2021, ``main_dino.py``): two global crops and ``LOCAL_CROPS_NUMBER`` local crops, each a
RandomResizedCrop (bicubic) followed by flip, color jitter, grayscale, Gaussian blur and, on global
crops, solarization, then ToTensor and Normalize. The operations, their order, their parameters and
the random numbers each one draws (same generator, same order) are the reference's, so with the same
seeds every crop box, flip, jitter factor and order, grayscale, blur radius and solarization equals
the reference's. Only the pixel arithmetic is faster, and equal to it up to rounding:

- crop and resize are one call to torch's uint8 antialiased bicubic resampling (PIL's kernel, AVX2)
  instead of PIL's resize. It rounds the 8-bit intermediate of its two passes differently: a few %
  of values differ, nearly all by one level; by more (up to ~20 on pure noise) where the bicubic
  overshoot is clipped between passes, as PIL sometimes resamples vertically first;
- brightness, contrast, saturation, hue and grayscale run on float32 numpy arrays holding integers
  and replay PIL's arithmetic (blend with float32 weights and truncation, the L conversion, the 8-bit
  HSV round trip of torchvision's ``adjust_hue``): the same bytes (checked on all 2**24 colors);
- the Gaussian blur is PIL's own; ToTensor + Normalize is one multiply-add (float32 rounding).

``tests/data/test_augmentations.py`` checks against the reference pipeline that the draws are the
same, that crops needing no resize have the same 8-bit values and that resized crops are close.
The public interface is ``DINOMultiCrop(cfg)`` or ``DINOMultiCrop(**kwargs)``, then
``aug(image) -> list[Tensor (3, h, w)]``. With ``device_augmentation`` (``INPUT.DEVICE_AUGMENTATION``)
the same draws split the work: ``aug(image)`` returns the resized, flipped uint8 crops and their draws,
and ``aug.finish_batch(batch, device)`` does the pixel operations on the collated batch
(``device_augmentation.py``; the same bytes on a CPU).
"""

from __future__ import annotations

import random
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T

from ..config import configurable
from ..config.checks import check_value
from .build import AUGMENTATION_REGISTRY
from .datasets import to_rgb
from .device_augmentation import CropDraw, encode_draw, finish_crops
from .pixel_ops import adjust_contrast_, adjust_hue, blend_, gaussian_blur, luma, solarize_, truncate_

__all__ = ["DINOMultiCrop", "RandomGaussianBlur", "RandomSolarize"]

_f32 = np.float32


class RandomGaussianBlur:
    """With probability ``p``, PIL's ``GaussianBlur`` with a radius drawn uniformly in ``radius``.

    Draws from Python's ``random`` (one number, two when applied), as the reference does. The
    reference tests ``random() <= p``; ``<`` here makes p = 0 exact and differs only on a draw equal
    to p (probability ~2**-53).
    """

    def __init__(self, p: float, radius: tuple[float, float]):
        self.p = p
        self.radius = radius

    def draw(self) -> float | None:
        """The radius to blur with, or None: the random draws of one call, without an image."""
        return random.uniform(*self.radius) if random.random() < self.p else None

    def __call__(self, image: Image.Image) -> Image.Image:
        radius = self.draw()
        return image if radius is None else image.filter(ImageFilter.GaussianBlur(radius=radius))

    def __repr__(self) -> str:
        return f"GaussianBlur(p={self.p}, radius={tuple(self.radius)})"


class RandomSolarize:
    """With probability ``p``, PIL's ``ImageOps.solarize``: every value ``v >= threshold`` becomes
    ``255 - v``. Draws one number from Python's ``random``, as the reference does."""

    def __init__(self, p: float, threshold: int):
        self.p = p
        self.threshold = threshold

    def draw(self) -> bool:
        """Whether to solarize: the random draw of one call, without an image."""
        return random.random() < self.p

    def __call__(self, image: Image.Image) -> Image.Image:
        return ImageOps.solarize(image, self.threshold) if self.draw() else image

    def __repr__(self) -> str:
        return f"Solarize(p={self.p}, threshold={self.threshold})"


def _torch_uniform() -> float:
    """One draw of ``torch.rand(1)`` (torch's global generator), as a Python float."""
    return torch.rand(1).item()


class _CropSpec(NamedTuple):
    """What differs between the kinds of crop: box and size, blur, solarization (None: absent)."""

    crop: T.RandomResizedCrop
    blur: RandomGaussianBlur | None
    solarize: RandomSolarize | None


def _key(arg: str) -> str:
    """Config key of an ``__init__`` argument (they correspond one to one)."""
    return f"INPUT.{arg.upper()}"


def _checked(arg: str, value):
    """``value`` of argument ``arg`` if it satisfies the rule of its config key ``INPUT.ARG`` (the one
    table of value rules, ``config.checks``), else a ``ConfigError`` naming the key."""
    return check_value(_key(arg), value)


def _floats(arg: str, value) -> tuple[float, ...]:
    return tuple(float(v) for v in _checked(arg, value))


@AUGMENTATION_REGISTRY.register()
class DINOMultiCrop:
    """PIL image -> ``[global_1, global_2, local_1, ..., local_N]``, normalized float tensors.

    Global crops are ``(3, global_crop_size, global_crop_size)``, local crops
    ``(3, local_crop_size, local_crop_size)``. Every crop: RandomResizedCrop (bicubic) -> horizontal
    flip -> color jitter (applied with ``color_jitter_prob``) -> grayscale -> Gaussian blur ->
    solarization (global crops; left out where its probability is 0, as the reference has none on
    the first global crop and the local crops) -> ToTensor -> Normalize. With the paper's settings the
    first global crop is always blurred and never solarized, the second rarely blurred and sometimes
    solarized: the asymmetry makes the two teacher views differ.

    Randomness comes from ``torch``'s global generator (crop, flip, jitter, grayscale, as
    torchvision) and Python's ``random`` (blur, solarization), exactly as in the reference. Input
    images of any mode are converted to RGB first (:func:`~dino_research.data.datasets.to_rgb`).
    Every argument is the lower-case name of an ``INPUT`` config key; the defaults are the paper's.
    """

    # The first two crops are global: the teacher sees only these.
    num_global_crops = 2

    @configurable
    def __init__(
        self,
        *,
        global_crop_size: int = 224,
        global_crops_scale: tuple[float, float] = (0.4, 1.0),
        local_crops_number: int = 8,
        local_crop_size: int = 96,
        local_crops_scale: tuple[float, float] = (0.05, 0.4),
        crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        flip_prob: float = 0.5,
        color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
        color_jitter_prob: float = 0.8,
        grayscale_prob: float = 0.2,
        blur_radius: tuple[float, float] = (0.1, 2.0),
        global_blur_probs: tuple[float, float] = (1.0, 0.1),
        local_blur_prob: float = 0.5,
        global_solarize_probs: tuple[float, float] = (0.0, 0.2),
        solarize_threshold: int = 128,
        mean: tuple[float, float, float] = (0.485, 0.456, 0.406),
        std: tuple[float, float, float] = (0.229, 0.224, 0.225),
        device_augmentation: bool = False,
    ):
        self.global_crop_size = _checked("global_crop_size", global_crop_size)
        self.local_crop_size = _checked("local_crop_size", local_crop_size)
        self.local_crops_number = _checked("local_crops_number", local_crops_number)
        self.global_crops_scale = _floats("global_crops_scale", global_crops_scale)
        self.local_crops_scale = _floats("local_crops_scale", local_crops_scale)
        self.crop_ratio = _floats("crop_ratio", crop_ratio)
        self.flip_prob = float(_checked("flip_prob", flip_prob))
        self.color_jitter = _floats("color_jitter", color_jitter)
        self.color_jitter_prob = float(_checked("color_jitter_prob", color_jitter_prob))
        self.grayscale_prob = float(_checked("grayscale_prob", grayscale_prob))
        self.blur_radius = _floats("blur_radius", blur_radius)
        self.global_blur_probs = _floats("global_blur_probs", global_blur_probs)
        self.local_blur_prob = float(_checked("local_blur_prob", local_blur_prob))
        self.global_solarize_probs = _floats("global_solarize_probs", global_solarize_probs)
        # Values >= the threshold are inverted: 0 inverts every value, 256 none.
        self.solarize_threshold = _checked("solarize_threshold", solarize_threshold)
        self.mean = _floats("mean", mean)
        self.std = _floats("std", std)
        # Colour, blur, solarization and normalization left to finish_batch (module device_augmentation).
        self.device_augmentation = bool(device_augmentation)
        self._build_pipelines()

    @classmethod
    def from_config(cls, cfg) -> dict:
        c = cfg.INPUT
        return {
            "global_crop_size": c.GLOBAL_CROP_SIZE,
            "global_crops_scale": c.GLOBAL_CROPS_SCALE,
            "local_crops_number": c.LOCAL_CROPS_NUMBER,
            "local_crop_size": c.LOCAL_CROP_SIZE,
            "local_crops_scale": c.LOCAL_CROPS_SCALE,
            "crop_ratio": c.CROP_RATIO,
            "flip_prob": c.FLIP_PROB,
            "color_jitter": c.COLOR_JITTER,
            "color_jitter_prob": c.COLOR_JITTER_PROB,
            "grayscale_prob": c.GRAYSCALE_PROB,
            "blur_radius": c.BLUR_RADIUS,
            "global_blur_probs": c.GLOBAL_BLUR_PROBS,
            "local_blur_prob": c.LOCAL_BLUR_PROB,
            "global_solarize_probs": c.GLOBAL_SOLARIZE_PROBS,
            "solarize_threshold": c.SOLARIZE_THRESHOLD,
            "mean": c.MEAN,
            "std": c.STD,
            "device_augmentation": c.DEVICE_AUGMENTATION,
        }

    # ------------------------------------------------------------------------------ pipelines
    def _build_pipelines(self) -> None:
        """Build ``self._global`` (one ``_CropSpec`` per global crop), ``self._local`` and the shared steps.

        A step whose probability is 0 is left out, so it draws no random number: the reference has
        no solarization step on the first global crop or the local crops, and keeping the random
        streams aligned with it is what makes the draws equal the reference's.
        """
        bicubic = T.InterpolationMode.BICUBIC

        def spec(size, scale, blur_prob, solarize_prob):
            return _CropSpec(
                T.RandomResizedCrop(size, scale=scale, ratio=self.crop_ratio, interpolation=bicubic),
                RandomGaussianBlur(blur_prob, self.blur_radius) if blur_prob > 0 else None,
                RandomSolarize(solarize_prob, self.solarize_threshold) if solarize_prob > 0 else None,
            )

        self._global = [
            spec(self.global_crop_size, self.global_crops_scale, blur, solarize)
            for blur, solarize in zip(self.global_blur_probs, self.global_solarize_probs)
        ]
        self._local = spec(self.local_crop_size, self.local_crops_scale, self.local_blur_prob, 0.0)
        # Holds the jitter ranges as torchvision normalizes them (None: that factor is not drawn).
        self._jitter = T.ColorJitter(*self.color_jitter) if self.color_jitter_prob > 0 else None
        # torchvision compares torch.rand(1) (float32) with p cast to float32: the same comparisons.
        probs = {"flip": self.flip_prob, "jitter": self.color_jitter_prob, "grayscale": self.grayscale_prob}
        self._p32 = {name: float(_f32(p)) for name, p in probs.items()}
        # ToTensor + Normalize as one multiply-add: (v / 255 - mean) / std = v * scale + shift.
        mean, std = np.array(self.mean).reshape(3, 1, 1), np.array(self.std).reshape(3, 1, 1)
        self._scale = (1.0 / (255.0 * std)).astype(_f32)
        self._shift = (-mean / std).astype(_f32)

    def __call__(self, image: Image.Image) -> list[torch.Tensor] | dict:
        """``image`` (PIL, any mode) -> ``2 + local_crops_number`` tensors ``(3, h, w)``, global first.

        With ``device_augmentation``: ``{"crops": [uint8 (3, h, w), ...], "crop_params": float64
        (num_crops, CROP_PARAMS)}``, the crops resized and flipped, the rest for :meth:`finish_batch`.
        """
        # (1, 3, H, W) uint8 over the (H, W, 3) pixels: the channels-last layout torch resizes fastest.
        pixels = torch.from_numpy(np.array(to_rgb(image))).permute(2, 0, 1).unsqueeze(0)
        # Reference order: global 1, global 2, then the local crops (fixes the random streams).
        specs = self._global + [self._local] * self.local_crops_number
        if self.device_augmentation:
            draws = [self._draw(pixels, spec) for spec in specs]
            crops = [torch.from_numpy(np.ascontiguousarray(self._resized(pixels, spec, d))) for spec, d in
                     zip(specs, draws)]
            return {"crops": crops, "crop_params": torch.stack([encode_draw(d) for d in draws])}
        return [self._crop(pixels, spec) for spec in specs]

    def _draw(self, pixels: torch.Tensor, spec: _CropSpec) -> CropDraw:
        """The random draws of one crop of ``pixels (1, 3, H, W)``, in the reference's order: crop box,
        flip, jitter (apply?, then order and factors), grayscale (torch); blur, solarization (Python's
        ``random``). They depend on the image's size only, never on its pixels."""
        box = spec.crop.get_params(pixels, spec.crop.scale, spec.crop.ratio)
        flip = self.flip_prob > 0 and _torch_uniform() < self._p32["flip"]
        jitter = None
        if self._jitter is not None and not self._p32["jitter"] < _torch_uniform():  # as RandomApply
            jit = self._jitter
            order, *factors = T.ColorJitter.get_params(jit.brightness, jit.contrast, jit.saturation, jit.hue)
            jitter = (tuple(order.tolist()), tuple(factors))
        gray = self.grayscale_prob > 0 and _torch_uniform() < self._p32["grayscale"]
        radius = spec.blur.draw() if spec.blur is not None else None
        solarize = spec.solarize is not None and spec.solarize.draw()
        return CropDraw(box, flip, jitter, gray, radius, solarize)

    def _resized(self, pixels: torch.Tensor, spec: _CropSpec, draw: CropDraw) -> np.ndarray:
        """The drawn box of ``pixels``, resized (bicubic, antialiased) and flipped: ``(3, size, size)`` uint8."""
        i, j, h, w = draw.box
        size = spec.crop.size
        box = pixels[:, :, i : i + h, j : j + w]
        if (h, w) != tuple(size):  # like PIL, an equal size is not resampled
            box = F.interpolate(box, size=size, mode="bicubic", antialias=True)
        crop = box[0].numpy()
        return crop[:, :, ::-1] if draw.flip else crop

    def _crop(self, pixels: torch.Tensor, spec: _CropSpec) -> torch.Tensor:
        """One crop of ``pixels (1, 3, H, W)`` uint8 -> ``(3, size, size)`` normalized, in this process."""
        draw = self._draw(pixels, spec)
        x = self._resized(pixels, spec, draw).astype(_f32, order="C")  # flipped and converted in one copy
        if draw.jitter is not None:
            order, factors = draw.jitter
            for index in order:
                factor = factors[index]
                if factor is None:
                    continue
                if index == 0:
                    truncate_(np.multiply(x, _f32(factor), out=x))  # ImageEnhance.Brightness: blend with 0
                elif index == 1:
                    adjust_contrast_(x, factor)
                elif index == 2:
                    blend_(x, luma(x), factor)  # ImageEnhance.Color: blend with the L image
                else:
                    x = adjust_hue(x, factor)
        if draw.gray:
            x[:] = luma(x)  # the L image on the three channels, as RandomGrayscale on RGB
        if draw.radius is not None:
            x = gaussian_blur(x, draw.radius)
        if draw.solarize:
            solarize_(x, self.solarize_threshold)
        x *= self._scale
        x += self._shift
        return torch.from_numpy(x)

    def finish_batch(self, batch: dict, device: torch.device | str = "cpu") -> dict:
        """The device stage of ``device_augmentation``: ``batch`` as collated from samples of
        :meth:`__call__` (uint8 crops, ``"crop_params"`` on the host) -> the same batch with
        ``"crops"`` the normalized float32 crops ``(B, 3, h, w)`` on ``device`` and ``"crop_params"``
        removed.

        Every crop gets exactly the operations, in the order and with the factors, that the
        in-worker path would apply (same bytes on a CPU): jitter, grayscale, blur, solarization,
        normalization, batched over the crops that share an operation.
        """
        batch = dict(batch)
        params = batch.pop("crop_params").cpu()  # (B, num_crops, CROP_PARAMS) float64; the loader's: no copy
        scale = torch.from_numpy(self._scale).view(1, 3, 1, 1).to(device)
        shift = torch.from_numpy(self._shift).view(1, 3, 1, 1).to(device)
        crops = []
        with torch.no_grad():
            for c, crop in enumerate(batch["crops"]):
                x = crop.to(device, non_blocking=True).float()
                x = finish_crops(x, params[:, c], self.solarize_threshold)
                x *= scale
                x += shift
                crops.append(x)
        batch["crops"] = crops
        return batch

    @property
    def num_crops(self) -> int:
        """Crops per image: ``num_global_crops + local_crops_number``."""
        return self.num_global_crops + self.local_crops_number

    def __repr__(self) -> str:
        shared = []
        if self.flip_prob > 0:
            shared.append(f"RandomHorizontalFlip(p={self.flip_prob})")
        if self._jitter is not None:
            j = self._jitter
            jitter = f"ColorJitter(brightness={j.brightness}, contrast={j.contrast}, "
            jitter += f"saturation={j.saturation}, hue={j.hue})"
            shared.append(f"RandomApply({jitter}, p={self.color_jitter_prob})")
        if self.grayscale_prob > 0:
            shared.append(f"RandomGrayscale(p={self.grayscale_prob})")
        finish = ["ToTensor()", f"Normalize(mean={self.mean}, std={self.std})"]

        def line(name, spec):
            c = spec.crop
            ratio, mode = tuple(round(r, 4) for r in c.ratio), c.interpolation.value
            crop = f"RandomResizedCrop({c.size[0]}, scale={tuple(c.scale)}, ratio={ratio}, {mode})"
            tail = [repr(step) for step in (spec.blur, spec.solarize) if step is not None]
            return f"  {name}: " + " -> ".join([crop] + shared + tail + finish)

        lines = [line(f"global crop {i + 1}", spec) for i, spec in enumerate(self._global)]
        lines.append(line(f"local crops x{self.local_crops_number}", self._local))
        return "DINOMultiCrop(\n" + "\n".join(lines) + "\n)"
