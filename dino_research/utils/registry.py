"""Registry lookup with an error that lists what *is* registered.

fvcore's ``Registry.get`` raises a ``KeyError`` that does not say which names exist; every builder in
dino_research goes through :func:`lookup` instead.
"""

from __future__ import annotations

from typing import Any

from fvcore.common.registry import Registry


def lookup(registry: Registry, name: str, config_key: str) -> Any:
    """Return ``registry.get(name)``; on a miss raise ``KeyError`` naming the config key and the
    registered names, so the user sees both what went wrong and what would be valid."""
    try:
        return registry.get(name)
    except KeyError:
        names = ", ".join(sorted(dict(registry)))
        raise KeyError(
            f"{config_key} = {name!r} is not a registered {registry._name.lower()}; "
            f"registered names: {names}. A component from outside the package must be imported "
            f"(which registers it) before the model is built."
        ) from None
