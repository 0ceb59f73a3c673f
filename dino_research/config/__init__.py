"""Configuration: ``get_cfg()`` returns every documented default (see ``defaults.py``);
``check_config`` finds the values no run can use (``checks.py``)."""

from .checks import check_amp, check_config, check_world_size
from .config import CfgNode, ConfigError, configurable, flatten_config, get_cfg, register_config_extension

__all__ = [
    "CfgNode",
    "ConfigError",
    "check_amp",
    "check_config",
    "check_world_size",
    "configurable",
    "flatten_config",
    "get_cfg",
    "register_config_extension",
]
