"""Training engine: launch (processes), default set-up, the DINO trainer and its hooks."""

from .defaults import (
    default_argument_parser,
    default_setup,
    eval_argument_parser,
    load_config,
    resolve_device,
    seed_all,
    write_results,
)
from .health import NonFiniteLossError
from .launch import launch
from .preemption import TrainingStopped, install_stop_handlers, stop_requested
from .trainer import DINOTrainer

__all__ = [
    "DINOTrainer",
    "NonFiniteLossError",
    "TrainingStopped",
    "default_argument_parser",
    "default_setup",
    "eval_argument_parser",
    "install_stop_handlers",
    "launch",
    "load_config",
    "resolve_device",
    "seed_all",
    "write_results",
    "stop_requested",
]
