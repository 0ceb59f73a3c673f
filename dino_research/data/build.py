"""Data registries: augmentations (image -> crops) and datasets (root -> images)."""

from __future__ import annotations

from typing import Callable

import torch
from fvcore.common.registry import Registry
from torch.utils.data import Dataset, Subset

from ..config import ConfigError
from ..config.checks import declare_registry_key
from ..utils.errors import UserError
from ..utils.registry import lookup


class DatasetError(UserError, ValueError):
    """Data that no run can use: a missing or empty root, a wrong layout, a broken list or idx file, a
    subset larger than the dataset. The message names the root or file and the expected layout; the
    tools report it in one line (a ``ValueError`` too, for code that caught those before)."""

AUGMENTATION_REGISTRY = Registry("AUGMENTATION")
AUGMENTATION_REGISTRY.__doc__ = """
Pretraining augmentations, selected by ``INPUT.AUGMENTATION``.

Called as ``obj(cfg) -> callable``; the callable maps one RGB ``PIL.Image`` to a list of float tensors
``(3, h_i, w_i)``, normalized, the crops the teacher sees (the global crops) first. Its attribute
``num_global_crops: int`` says how many of the leading crops are global. Randomness comes from
``random`` and ``torch``'s global generators, so seeding a data-loader worker makes it reproducible.

An augmentation may split its work with the training device (``INPUT.DEVICE_AUGMENTATION``): its
callable then returns a dict sample and it has ``finish_batch(batch, device) -> batch``, which turns
the collated batch into the model's (normalized crops on ``device``); see ``DINOMultiCrop``.
"""

DATASET_REGISTRY = Registry("DATASET")
DATASET_REGISTRY.__doc__ = """
Datasets, selected by ``DATASETS.TRAIN`` (and the evaluation keys).

Called as ``obj(cfg, root: str, train: bool, transform: callable | None) -> torch.utils.data.Dataset``
whose items are ``(transform(image), label: int)``, ``image`` an RGB ``PIL.Image``; ``label`` is -1
where there is none. ``root`` is a local path or an iopath URI. Builders check that the data exist
and fail with a message naming ``root`` otherwise; they never download unless a config key asks.
"""


for _key, _registry in (("INPUT.AUGMENTATION", AUGMENTATION_REGISTRY), ("DATASETS.TRAIN", DATASET_REGISTRY),
                        ("TEST.DATASET", DATASET_REGISTRY)):
    declare_registry_key(_key, _registry)


def build_augmentation(cfg) -> Callable:
    """Build ``INPUT.AUGMENTATION``: a callable ``PIL.Image -> list[Tensor (3, h, w)]``."""
    aug = lookup(AUGMENTATION_REGISTRY, cfg.INPUT.AUGMENTATION, "INPUT.AUGMENTATION")(cfg)
    assert callable(aug), f"augmentation {cfg.INPUT.AUGMENTATION} must be callable"
    return aug


def device_stage(cfg, augmentation) -> Callable | None:
    """``augmentation.finish_batch`` when ``INPUT.DEVICE_AUGMENTATION`` is on (the trainer runs it on
    each batch), else None. Raises ``ConfigError`` for an augmentation without a device stage."""
    if not cfg.INPUT.DEVICE_AUGMENTATION:
        return None
    finish = getattr(augmentation, "finish_batch", None)
    if finish is None or not getattr(augmentation, "device_augmentation", False):
        raise ConfigError(f"INPUT.DEVICE_AUGMENTATION True: INPUT.AUGMENTATION {cfg.INPUT.AUGMENTATION!r} has no "
                          f"device stage (finish_batch); use DINOMultiCrop or set INPUT.DEVICE_AUGMENTATION False")
    return finish


def build_dataset(cfg, name: str, root: str, train: bool, transform: Callable | None,
                  key: str = "DATASETS.TRAIN"):
    """Build the registered dataset ``name`` at ``root`` with ``transform`` applied to each image;
    ``key`` is the config key that named it (in the error for an unknown name)."""
    return lookup(DATASET_REGISTRY, name, key)(cfg, root=root, train=train, transform=transform)


# Stream tag of the subset draw: it never coincides with the sampler's or the augmentations' seeds.
_SUBSET_STREAM = 0x53554253  # "SUBS"


def fixed_subset(dataset: Dataset, size: int, seed: int, key: str = "DATASETS.TRAIN_SUBSET") -> Dataset:
    """``size`` items of ``dataset`` drawn at random from ``seed`` (the same on every rank, machine and
    resume), kept in dataset order; ``dataset`` itself when ``size`` is 0. ``key`` names the config key
    in errors."""
    from .samplers import derive_seed

    if size == 0:
        return dataset
    if not 0 < size <= len(dataset):
        raise DatasetError(f"{key} = {size}: must be 0 (all) or between 1 and the dataset's {len(dataset)} images")
    generator = torch.Generator().manual_seed(derive_seed(_SUBSET_STREAM, seed) % 2**63)
    indices = torch.randperm(len(dataset), generator=generator)[:size].sort().values
    return Subset(dataset, indices.tolist())
