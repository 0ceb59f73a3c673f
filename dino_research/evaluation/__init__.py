"""Evaluation protocols of the paper as library functions: k-NN, linear probe, attention maps."""

from .attention import (
    attention_figure,
    check_attention_backbone,
    colorize,
    crop_to_patch_multiple,
    last_self_attention_maps,
    prepare_image,
    threshold_masks,
    upsample,
)
from .features import extract_features, extract_features_multi, load_features, save_features, shard_indices
from .knn import knn_classifier, knn_classifier_multi_k
from .linear import (
    LinearClassifier,
    block_features,
    evaluate_linear,
    multiblock_features,
    run_linear_eval,
    select_features,
    train_linear,
)
from .linear_fast import LinearGrid, probe_variants, run_fast_linear_eval, train_linear_grid
from .weights import config_from_checkpoint, load_backbone

__all__ = [
    "LinearClassifier",
    "LinearGrid",
    "block_features",
    "evaluate_linear",
    "multiblock_features",
    "probe_variants",
    "run_fast_linear_eval",
    "run_linear_eval",
    "select_features",
    "train_linear",
    "train_linear_grid",
    "attention_figure",
    "check_attention_backbone",
    "colorize",
    "config_from_checkpoint",
    "crop_to_patch_multiple",
    "extract_features",
    "extract_features_multi",
    "knn_classifier",
    "knn_classifier_multi_k",
    "last_self_attention_maps",
    "load_backbone",
    "load_features",
    "prepare_image",
    "save_features",
    "shard_indices",
    "threshold_masks",
    "upsample",
]
