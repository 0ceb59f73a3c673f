"""Evaluation protocols of the paper as library functions: k-NN, linear probe, attention maps."""

from .weights import config_from_checkpoint, load_backbone

__all__ = ["config_from_checkpoint", "load_backbone"]
