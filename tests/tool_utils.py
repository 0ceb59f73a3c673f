"""Load a script of ``tools/`` as a module, to call its parser and ``main`` in-process (no interpreter start)."""

import importlib.util
from pathlib import Path
from types import ModuleType

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def load_tool(name: str) -> ModuleType:
    """A fresh module of ``tools/NAME.py`` (``tools`` is not a package), executed once per call."""
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
