"""Data: registries and builders, then the modules that register augmentations and datasets."""

from . import augmentations, datasets, fashion_mnist, unlabeled  # noqa: F401  (registration on import)
from .build import (
                    AUGMENTATION_REGISTRY,
                    DATASET_REGISTRY,
                    DatasetError,
                    build_augmentation,
                    build_dataset,
                    device_stage,
                    fixed_subset,
)
from .datasets import UnreadableImageError
from .eval_transforms import build_eval_transform
from .loader import PretrainLoader, SeededSampleDataset, build_pretrain_loader, collate_crops
from .samplers import ResumableDistributedSampler, derive_seed

__all__ = [
    "AUGMENTATION_REGISTRY",
    "DATASET_REGISTRY",
    "DatasetError",
    "PretrainLoader",
    "ResumableDistributedSampler",
    "SeededSampleDataset",
    "UnreadableImageError",
    "build_augmentation",
    "build_dataset",
    "build_eval_transform",
    "fixed_subset",
    "build_pretrain_loader",
    "collate_crops",
    "derive_seed",
    "device_stage",
]
