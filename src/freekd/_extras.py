"""Optional dependencies (extras of ``pyproject.toml``): import them where a feature needs them,
or say in one line what to install."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType

__all__ = ["MissingExtraError", "require_extra"]


class MissingExtraError(ImportError):
    """A feature needs modules of an extra that is not installed; the message names them and the
    ``pip install 'freekd[extra]'`` line (the command line prints it as a user error)."""


def require_extra(extra: str, modules: Sequence[str], purpose: str) -> list[ModuleType]:
    """Import ``modules`` (top-level names) for ``purpose``, in order.

    Raises:
        MissingExtraError: "<purpose> needs <missing> (not installed): pip install
            'freekd[<extra>]'", naming every module that fails to import.
    """
    imported, missing = [], []
    for name in modules:
        try:
            imported.append(importlib.import_module(name))
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingExtraError(
            f"{purpose} needs {', '.join(missing)} (not installed): pip install 'freekd[{extra}]'"
        )
    return imported
