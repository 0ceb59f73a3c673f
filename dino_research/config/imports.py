"""``IMPORTS``: modules a config needs imported before anything is built, so what they register exists.

A project (``projects/NAME/``) or a lab's own package adds components by decorating classes with a
registry (``LOSS_REGISTRY.register()``, ...). Naming its module in the config's ``IMPORTS`` makes every
tool (``train_net.py``, the evaluation tools, every spawned worker and SLURM task, all of which load
the config) import it first, with no edit to the tools or the core.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from types import ModuleType
from typing import Sequence

from .config import ConfigError


def import_components(entries: Sequence[str]) -> list[ModuleType]:
    """Import every entry of ``IMPORTS``, in order; the imported modules.

    An entry is either a module name importable here (``my_lab.dino_parts``) or the path of a
    ``.py`` file, absolute or relative to the current directory (``projects/X/x.py``). A file is
    imported once per process, under a name made from its absolute path, so loading the config again
    (each tool and worker does) does not register its components twice.

    Raises :class:`ConfigError` naming the entry and why when one cannot be imported.
    """
    modules = []
    for entry in entries:
        if not isinstance(entry, str) or not entry:
            raise ConfigError(f"IMPORTS: every entry must be a module name or a .py path, got {entry!r}")
        modules.append(_import_file(entry) if entry.endswith(".py") else _import_module(entry))
    return modules


def _import_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ConfigError(f"IMPORTS: cannot import module {name!r} ({e}); give an importable module name "
                          "or the path of a .py file") from e


def _import_file(path: str) -> ModuleType:
    full = os.path.abspath(path)
    if not os.path.isfile(full):
        raise ConfigError(f"IMPORTS: no file {path!r} (looked at {full}; a relative path is taken from the "
                          f"current directory, {os.getcwd()})")
    stem = os.path.splitext(os.path.basename(full))[0]
    # A top-level name (no parent package to import), unique per absolute path.
    name = f"dino_research_import_{stem}_{hashlib.sha1(full.encode()).hexdigest()[:10]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, full)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it, as a normal import does (dataclasses, pickle look it up)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
