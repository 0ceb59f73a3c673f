"""Configuration: ``get_cfg()`` returns every documented default (see ``defaults.py``)."""

from .config import CfgNode, ConfigError, configurable, flatten_config, get_cfg

__all__ = ["CfgNode", "ConfigError", "configurable", "flatten_config", "get_cfg"]
