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
import os
from typing import Any, Iterable

import yaml
from fvcore.common.config import BASE_KEY
from fvcore.common.config import CfgNode as _FvcoreCfgNode
from iopath.common.file_io import g_pathmgr

from ..utils.errors import UserError


class ConfigError(UserError, ValueError):
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
        hint = (f" Did you mean: {', '.join(close)}?" if close
                else " See dino_research/config/defaults.py for every key.")
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

    # ------------------------------------------------------------------ files
    @classmethod
    def load_yaml_with_base(cls, filename: str, allow_unsafe: bool = False, _chain: tuple = ()) -> dict:
        """The mapping of ``filename`` with its ``_BASE_`` files merged underneath (a list of bases:
        merged in order), as fvcore does, but every failure is a :class:`ConfigError` naming the file:
        missing, a folder, not valid YAML (with line and column), empty, not a mapping, a ``_BASE_``
        that is not a path, a ``_BASE_`` cycle (the chain is listed), a key that is a group in the
        base but a value here. ``allow_unsafe`` is refused: configs are plain data."""
        if allow_unsafe:
            raise ConfigError(f"{filename}: allow_unsafe is not supported; config files are plain YAML data")
        if any(os.path.abspath(filename) == os.path.abspath(f) for f in _chain) and "://" not in filename:
            cycle = " -> ".join(list(_chain) + [filename])
            raise ConfigError(f"_BASE_ cycle: {cycle}. Remove the _BASE_ entry that leads back to a file of the chain.")
        where = f"{filename} (included as _BASE_ of {_chain[-1]})" if _chain else filename
        if not g_pathmgr.exists(filename):
            raise ConfigError(f"config file not found: {where}")
        if g_pathmgr.isdir(filename):
            raise ConfigError(f"config file {where} is a folder; give a .yaml file (e.g. configs/dino_vits16.yaml)")
        try:
            with g_pathmgr.open(filename, "r") as f:
                loaded = yaml.safe_load(f)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"{where} is not valid YAML{at}: {problem}. Config files are 'KEY: value' lines, "
                              f"nested by indentation with spaces (not tabs).") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{where} is not a text file ({e.reason}); give a YAML config") from None
        if loaded is None:
            raise ConfigError(f"config file {where} is empty; a config is a mapping of keys such as "
                              f"'_BASE_: Base-DINO.yaml' and 'SOLVER:\n  EPOCHS: 100'")
        if not isinstance(loaded, dict):
            raise ConfigError(f"{where}: a config file must be a mapping of keys, got {_type_name(loaded)} "
                              f"{str(loaded)[:60]!r}")
        if BASE_KEY not in loaded:
            return loaded
        bases = loaded.pop(BASE_KEY)
        bases = bases if isinstance(bases, list) else [bases]
        merged: dict = {}
        for base in bases:
            if not isinstance(base, str) or not base:
                raise ConfigError(f"{where}: _BASE_ must be a file path or a list of them, got {base!r}")
            base = os.path.expanduser(base)
            if not (os.path.isabs(base) or "://" in base):  # relative to the including file
                base = os.path.join(os.path.dirname(filename), base)
            _merge_into(cls.load_yaml_with_base(base, _chain=_chain + (filename,)), merged, base)
        _merge_into(loaded, merged, filename)
        return merged

    # ------------------------------------------------------------------ merges
    def merge_from_file(self, cfg_filename: str, allow_unsafe: bool = False) -> None:
        """Merge a YAML file (following ``_BASE_``); errors name the file (see :meth:`load_yaml_with_base`)."""
        loaded = self.load_yaml_with_base(cfg_filename, allow_unsafe=allow_unsafe)
        self._check_mapping(loaded, self, "", cfg_filename)
        loaded = type(self)(loaded)
        super().merge_from_other_cfg(loaded)

    def merge_from_other_cfg(self, cfg_other: "_FvcoreCfgNode") -> None:
        self._check_mapping(cfg_other, self, "", "config")
        super().merge_from_other_cfg(cfg_other)

    def merge_from_list(self, cfg_list: list) -> None:
        """Merge ``[KEY, VALUE, KEY, VALUE, ...]`` (command-line overrides)."""
        options = [str(x) for x in cfg_list if str(x).startswith("--")]
        if options:
            raise ConfigError(f"'{options[0]}' among the KEY VALUE overrides looks like an option: options go "
                              f"before the first override (everything after it is read as KEY VALUE pairs)")
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


def _merge_into(incoming: dict, base: dict, source: str, prefix: str = "") -> None:
    """Merge mapping ``incoming`` over ``base`` in place (nested mappings merged key by key)."""
    for key, value in incoming.items():
        if isinstance(value, dict) and key in base:
            if not isinstance(base[key], dict):
                raise ConfigError(f"{source}: '{prefix}{key}' is a group of keys here but a value "
                                  f"({base[key]!r}) in its _BASE_")
            _merge_into(value, base[key], source, f"{prefix}{key}.")
        else:
            base[key] = value


# Functions that add a project's keys to the defaults (see register_config_extension), in order.
_CONFIG_EXTENSIONS: list = []


def register_config_extension(fn):
    """Decorator: ``fn(cfg)`` adds a project's config keys, as detectron2's ``add_NAME_config(cfg)``.

    Every later :func:`get_cfg` applies it, so once the project module is imported (through the
    config's ``IMPORTS``, which ``load_config`` reads *before* merging the file) its keys exist:
    its YAML files and ``KEY VALUE`` overrides set them, and misspelled ones are still refused.
    ``fn`` may add keys and groups (with documented defaults of the intended type) but not change
    core keys. Registering the same function twice (a module imported again) is a no-op.
    """
    if fn not in _CONFIG_EXTENSIONS:
        _CONFIG_EXTENSIONS.append(fn)
    return fn


def get_cfg() -> CfgNode:
    """A fresh, mutable copy of every default (``defaults.py``, the paper's ViT-S/16 recipe) plus the
    keys of every registered project (:func:`register_config_extension`)."""
    from .defaults import _C

    cfg = _C.clone()
    for extend in _CONFIG_EXTENSIONS:
        before = flatten_config(cfg)
        extend(cfg)
        changed = [k for k, v in before.items() if flatten_config(cfg).get(k, v) != v]
        if changed:
            raise ConfigError(f"config extension {extend.__module__}.{extend.__qualname__} changed core keys "
                              f"{changed[:5]}: a project adds keys, it does not change the core's defaults")
    return cfg


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
