"""Old public names kept for one release: a module ``__getattr__`` that warns and forwards."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["renamed"]

REMOVED_IN = "0.2"


def renamed(
    module: str, aliases: Mapping[str, str], namespace: Mapping[str, Any]
) -> Callable[[str], Any]:
    """A module ``__getattr__`` for names that were renamed (``{old: new}``): reading an old name
    emits a ``DeprecationWarning`` naming the new one and returns ``namespace[new]``.

    Example (in ``freekd/relation.py``)::

        __getattr__ = renamed(__name__, {"normalise_log_weight": "normalize_log_weight"}, globals())
    """

    def __getattr__(name: str) -> Any:
        if name in aliases:
            warnings.warn(
                f"{module}.{name} is deprecated and will be removed in freekd {REMOVED_IN}: use "
                f"{module}.{aliases[name]} (American spelling, as in torch)",
                DeprecationWarning,
                stacklevel=2,
            )
            return namespace[aliases[name]]
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
