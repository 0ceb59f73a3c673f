"""The config object: fvcore's yacs ``CfgNode`` with errors a user can act on.

fvcore already provides ``_BASE_`` inheritance (paths relative to the including file), ``freeze``
and ``dump``. What it lacks are helpful failures: a misspelled key raises a bare ``KeyError`` and a
wrong type a message without the expected type. ``CfgNode`` here checks every incoming key and value
*before* merging, so a bad override never leaves a half-merged config behind, and the error names
the key, the closest valid keys, and the expected type.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from typing import Any, Iterable

from fvcore.common.config import CfgNode as _FvcoreCfgNode


class ConfigError(ValueError):
    """A config file or override that cannot be applied; the message says why and what is valid."""


def _flat_keys(node: "_FvcoreCfgNode", prefix: str = "") -> list[str]:
    keys = []
    for name, value in node.items():
        full = f"{prefix}{name}"
        keys.append(full)
        if isinstance(value, _FvcoreCfgNode):
            keys.extend(_flat_keys(value, full + "."))
    return keys


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _compatible(new: Any, old: Any) -> bool:
    """Same rule as yacs' coercion: equal types, list<->tuple, or either side None."""
    if type(new) is type(old) or new is None or old is None:
        return True
    return isinstance(new, (list, tuple)) and isinstance(old, (list, tuple))


class CfgNode(_FvcoreCfgNode):
    """fvcore ``CfgNode`` whose merges validate keys and types first.

    Raises:
        ConfigError: on an unknown key (with the closest valid keys) or a value whose type differs
            from the default's (with the expected type). The config is left unchanged.
    """

    # ------------------------------------------------------------------ validation
    def _unknown_key_error(self, full_key: str, source: str) -> ConfigError:
        valid = _flat_keys(self)
        close = difflib.get_close_matches(full_key, valid, n=3, cutoff=0.6)
        if not close:  # a typo in the last component: compare with siblings of the same parent
            leaf = full_key.rsplit(".", 1)[-1]
            close = [k for k in valid if difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1]], cutoff=0.75)][:3]
        hint = f" Did you mean: {', '.join(close)}?" if close else " See dino_research/config/defaults.py for every key."
        return ConfigError(f"{source}: unknown config key '{full_key}'.{hint}")

    def _check_value(self, full_key: str, new: Any, old: Any, source: str) -> None:
        if isinstance(old, _FvcoreCfgNode):
            if not isinstance(new, dict):
                raise ConfigError(
                    f"{source}: config key '{full_key}' is a group of keys ({', '.join(sorted(old.keys()))}); "
                    f"got {_type_name(new)} {new!r}. Set its sub-keys, e.g. {full_key}.{sorted(old.keys())[0]}."
                )
            self._check_mapping(new, old, full_key + ".", source)
            return
        new = self._decode_cfg_value(new)  # as yacs does on merge: "(0.4, 1.0)" is a tuple
        if not _compatible(new, old):
            hint = ""
            if isinstance(old, float) and isinstance(new, int) and not isinstance(new, bool):
                hint = f" Write it as a float, e.g. {float(new)!r}."
            raise ConfigError(
                f"{source}: config key '{full_key}' expects {_type_name(old)} (default {old!r}); "
                f"got {_type_name(new)} {new!r}.{hint}"
            )

    def _check_mapping(self, incoming: dict, node: "_FvcoreCfgNode", prefix: str, source: str) -> None:
        for name, value in incoming.items():
            full = prefix + name
            if name not in node:
                if node.is_new_allowed():
                    continue
                raise self._unknown_key_error(full, source)
            self._check_value(full, value, node[name], source)

    # ------------------------------------------------------------------ merges
    def merge_from_file(self, cfg_filename: str, allow_unsafe: bool = False) -> None:
        """Merge a YAML file (following ``_BASE_``); errors name the file."""
        try:
            loaded = self.load_yaml_with_base(cfg_filename, allow_unsafe=allow_unsafe)
        except FileNotFoundError as e:
            raise ConfigError(f"config file not found: {e.filename or cfg_filename}") from e
        if loaded is None:
            return
        if not isinstance(loaded, dict):
            raise ConfigError(f"{cfg_filename}: a config file must be a mapping of keys, got {_type_name(loaded)}")
        self._check_mapping(loaded, self, "", cfg_filename)
        loaded = type(self)(loaded)
        super().merge_from_other_cfg(loaded)

    def merge_from_other_cfg(self, cfg_other: "_FvcoreCfgNode") -> None:
        self._check_mapping(cfg_other, self, "", "config")
        super().merge_from_other_cfg(cfg_other)

    def merge_from_list(self, cfg_list: list) -> None:
        """Merge ``[KEY, VALUE, KEY, VALUE, ...]`` (command-line overrides)."""
        if len(cfg_list) % 2 != 0:
            raise ConfigError(
                f"overrides must be KEY VALUE pairs; got an odd number of items: {list(cfg_list)}"
            )
        for full_key, raw in zip(cfg_list[0::2], cfg_list[1::2]):
            node: _FvcoreCfgNode = self
            parts = str(full_key).split(".")
            for part in parts[:-1]:
                if part not in node or not isinstance(node[part], _FvcoreCfgNode):
                    raise self._unknown_key_error(full_key, "command-line override")
                node = node[part]
            if parts[-1] not in node:
                raise self._unknown_key_error(full_key, "command-line override")
            self._check_value(full_key, raw, node[parts[-1]], "command-line override")
        super().merge_from_list(cfg_list)


def get_cfg() -> CfgNode:
    """A fresh, mutable copy of every default (``defaults.py``); the paper's ViT-S/16 recipe."""
    from .defaults import _C

    return _C.clone()


def configurable(init_func):
    """Let ``__init__(self, *, a, b)`` also be called as ``Cls(cfg, **overrides)``.

    The class defines ``from_config(cls, cfg, **kwargs) -> dict`` which reads the config and returns
    the keyword arguments of ``__init__``; explicit keyword arguments override what it returns. All
    config reading then lives in ``from_config`` and the component stays buildable by hand.
    """

    @functools.wraps(init_func)
    def wrapped(self, *args, **kwargs):
        if args and isinstance(args[0], _FvcoreCfgNode):
            from_config = type(self).from_config
            params = inspect.signature(from_config).parameters
            accepted = {k: kwargs.pop(k) for k in list(kwargs) if k in params}
            init_kwargs = from_config(*args, **accepted)
            init_kwargs.update(kwargs)
            init_func(self, **init_kwargs)
        else:
            init_func(self, *args, **kwargs)

    return wrapped


def flatten_config(cfg: Iterable) -> dict:
    """``{"SOLVER.BASE_LR": 0.0005, ...}``: every leaf key of a config, for logging and manifests."""
    out = {}

    def walk(node, prefix):
        for name, value in node.items():
            if isinstance(value, _FvcoreCfgNode):
                walk(value, prefix + name + ".")
            else:
                out[prefix + name] = value

    walk(cfg, "")
    return out
