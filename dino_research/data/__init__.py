"""Data: registries and builders, then the modules that register augmentations and datasets."""

from .build import AUGMENTATION_REGISTRY, DATASET_REGISTRY, build_augmentation, build_dataset
from . import augmentations, datasets  # noqa: F401  (registration on import)

__all__ = ["AUGMENTATION_REGISTRY", "DATASET_REGISTRY", "build_augmentation", "build_dataset"]
