"""iBOT's inputs: the project's config keys, blockwise patch masks, and the augmentation adding them.

iBOT (Zhou et al. 2022, "Image BERT Pre-Training with Online Tokenizer") hides patches of the
student's global crops and asks the student to predict, at each hidden patch, the teacher's
output for that patch of the unmasked crop. The masks follow BEiT's blockwise masking, as iBOT's
reference (``ImageFolderMask``): a global crop is masked with probability ``IBOT.MASK_PROBABILITY``
(the reference's ``--pred_ratio 0 0.3``: no mask, or a ratio drawn from 0.3 +- 0.2), and then
rectangles of random area and aspect ratio are masked until ``ratio * patches`` are hidden.

Registered on import (the config's ``IMPORTS``): the ``IBOT`` config keys and the augmentation
``iBOTMultiCrop`` (``INPUT.AUGMENTATION``).
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch

from dino_research.config import CfgNode, configurable, register_config_extension
from dino_research.data import AUGMENTATION_REGISTRY
from dino_research.data.augmentations import DINOMultiCrop


@register_config_extension
def add_ibot_config(cfg: CfgNode) -> None:
    """iBOT's keys, with the paper's ViT-S/16 values."""
    cfg.IBOT = CfgNode()
    # Probability that a global crop of the student is masked at all (paper: 0.5; otherwise the crop
    # is seen whole and adds no patch loss).
    cfg.IBOT.MASK_PROBABILITY = 0.5
    # Fraction of a masked crop's patches hidden, drawn uniformly from this range (paper: 0.1-0.5).
    cfg.IBOT.MASK_RATIO = (0.1, 0.5)
    # Aspect ratios (height / width) of the masked blocks, drawn log-uniformly (BEiT: 0.3-1/0.3).
    cfg.IBOT.MASK_ASPECT = (0.3, 1 / 0.3)
    # Prototypes of the patch head (paper: 8192; the [CLS] head keeps MODEL.HEAD.OUT_DIM).
    cfg.IBOT.PATCH_OUT_DIM = 8192
    # One prototype layer for [CLS] and patch tokens (True; PATCH_OUT_DIM must then equal
    # MODEL.HEAD.OUT_DIM) or a separate one for the patches (False, the reference's student default).
    cfg.IBOT.SHARED_HEAD = False
    # Teacher temperature of the patch distributions: linear warmup from WARMUP_PATCH_TEACHER_TEMP
    # over MODEL.LOSS.WARMUP_TEACHER_TEMP_EPOCHS, then PATCH_TEACHER_TEMP (paper: 0.04 -> 0.07).
    cfg.IBOT.PATCH_TEACHER_TEMP = 0.07
    cfg.IBOT.WARMUP_PATCH_TEACHER_TEMP = 0.04
    # Momentum of the patch center (the mean teacher patch output), as MODEL.LOSS.CENTER_MOMENTUM.
    cfg.IBOT.PATCH_CENTER_MOMENTUM = 0.9
    # Weights of the two losses: [CLS] (DINO's) and masked patches (paper: 1 and 1).
    cfg.IBOT.CLS_WEIGHT = 1.0
    cfg.IBOT.PATCH_WEIGHT = 1.0


def block_mask(height: int, width: int, num_masked: float, aspect: tuple[float, float] = (0.3, 1 / 0.3),
               rng: random.Random | None = None) -> np.ndarray:
    """BEiT's blockwise mask of a ``height x width`` patch grid: bool (height, width) with about
    ``num_masked`` patches set (never more; fewer when no block fits any more).

    Blocks are drawn until the target is reached: area uniform in [min(h, w) // 3 squared, patches
    still to mask], aspect ratio log-uniform in ``aspect``, position uniform; a block is kept when it
    hides at least one new patch and no more than remain to be hidden (10 attempts per block). Draws
    from ``rng`` (Python's ``random`` by default, as the reference, so a seeded data worker repeats).
    """
    rng = rng or random
    mask = np.zeros((height, width), dtype=bool)
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    count = 0
    while count < num_masked:
        remaining = num_masked - count
        added = 0
        for _ in range(10):
            low = (min(height, width) // 3) ** 2
            area = rng.uniform(low, remaining)
            ratio = math.exp(rng.uniform(*log_aspect))
            h, w = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
            if w < width and h < height:
                top, left = rng.randint(0, height - h), rng.randint(0, width - w)
                new = h * w - int(mask[top:top + h, left:left + w].sum())
                if 0 < new <= remaining:
                    mask[top:top + h, left:left + w] = True
                    added = new
            if added > 0:
                break
        if added == 0:
            break
        count += added
    return mask


def draw_mask(height: int, width: int, probability: float, ratio: tuple[float, float],
              aspect: tuple[float, float], rng: random.Random | None = None) -> np.ndarray:
    """The mask of one global crop: empty with probability ``1 - probability``, else
    :func:`block_mask` of ``uniform(*ratio) * height * width`` patches."""
    rng = rng or random
    if rng.random() >= probability:
        return np.zeros((height, width), dtype=bool)
    return block_mask(height, width, rng.uniform(*ratio) * height * width, aspect, rng)


@AUGMENTATION_REGISTRY.register()
class iBOTMultiCrop:
    """DINO's multi-crop, plus a patch mask per global crop: ``image -> {"crops": [...], "masks":
    [bool (h, w) per global crop]}`` with ``(h, w) = global_crop_size / patch_size``.

    Collated (``data.loader.collate_crops``), ``batch["masks"]`` is a list of bool (B, h, w) tensors,
    one per global crop. Masks are drawn after the crops, from Python's ``random``.
    """

    num_global_crops = DINOMultiCrop.num_global_crops

    @configurable
    def __init__(self, *, crops: DINOMultiCrop, patch_size: int, global_crop_size: int, probability: float,
                 ratio: tuple[float, float], aspect: tuple[float, float]):
        if global_crop_size % patch_size:
            raise ValueError(f"INPUT.GLOBAL_CROP_SIZE {global_crop_size} is not a multiple of the patch size "
                             f"{patch_size}")
        if not 0.0 <= probability <= 1.0 or not 0.0 <= ratio[0] <= ratio[1] <= 1.0:
            raise ValueError(f"IBOT.MASK_PROBABILITY must be in [0, 1] and IBOT.MASK_RATIO a range within [0, 1]; "
                             f"got {probability} and {ratio}")
        self.crops, self.grid = crops, global_crop_size // patch_size
        self.probability, self.ratio, self.aspect = probability, tuple(ratio), tuple(aspect)

    @classmethod
    def from_config(cls, cfg) -> dict:
        return dict(crops=DINOMultiCrop(cfg), patch_size=cfg.MODEL.BACKBONE.PATCH_SIZE,
                    global_crop_size=cfg.INPUT.GLOBAL_CROP_SIZE, probability=cfg.IBOT.MASK_PROBABILITY,
                    ratio=cfg.IBOT.MASK_RATIO, aspect=cfg.IBOT.MASK_ASPECT)

    def __call__(self, image) -> dict:
        crops = self.crops(image)  # a dict with INPUT.DEVICE_AUGMENTATION (uint8 crops and their draws)
        sample = dict(crops) if isinstance(crops, dict) else {"crops": crops}
        sample["masks"] = [torch.from_numpy(draw_mask(self.grid, self.grid, self.probability, self.ratio,
                                                      self.aspect)) for _ in range(self.num_global_crops)]
        return sample

    @property
    def device_augmentation(self) -> bool:
        return self.crops.device_augmentation

    def finish_batch(self, batch: dict, device) -> dict:
        """DINOMultiCrop's device stage; the masks pass through."""
        return self.crops.finish_batch(batch, device)
