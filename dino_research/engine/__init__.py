"""Training engine: launch (processes), default set-up, the DINO trainer and its hooks."""

from .defaults import default_argument_parser, default_setup, load_config, resolve_device, seed_all
from .launch import launch
from .trainer import DINOTrainer, NonFiniteLossError

__all__ = [
    "DINOTrainer",
    "NonFiniteLossError",
    "default_argument_parser",
    "default_setup",
    "launch",
    "load_config",
    "resolve_device",
    "seed_all",
]
