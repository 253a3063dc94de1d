"""The Ultralytics versions the adapter supports, checked once on import.

The adapter relies on Ultralytics internals that change between minor releases (the trainer's
set-up steps, the loss returning a dict of named terms, ``unwrap_model``, ``ModelEMA``); they are
pinned here and guarded by ``tests/test_ultralytics.py``.
"""

from __future__ import annotations

import re

__all__ = ["MAXIMUM", "MINIMUM", "REQUIREMENT", "check_ultralytics", "parse_version"]

MINIMUM = (8, 4, 190)
"""The oldest release the adapter is tested with (inclusive)."""
MAXIMUM = (8, 5)
"""The first release outside the supported range (exclusive)."""
REQUIREMENT = "ultralytics>=8.4.190,<8.5"
"""The requirement line of the ``freekd[ultralytics]`` extra."""


def parse_version(text: str) -> tuple[int, ...]:
    """The leading numeric release of a version string: ``"8.4.190.dev0"`` -> ``(8, 4, 190)``.

    Example:
        >>> parse_version("8.4.190"), parse_version("8.5.0rc1")
        ((8, 4, 190), (8, 5, 0))
    """
    match = re.match(r"\d+(?:\.\d+)*", text.strip())
    if match is None:
        raise ValueError(f"cannot read the Ultralytics version {text!r}")
    return tuple(int(part) for part in match.group(0).split("."))


def check_ultralytics(version: str | None = None) -> str:
    """The installed Ultralytics version, after checking it is in the supported range.

    Args:
        version: the version to check (default: the installed ``ultralytics.__version__``).

    Raises:
        ImportError: Ultralytics is missing, or its version is outside :data:`REQUIREMENT`
            (one line naming the version found and the install command).
    """
    if version is None:
        try:
            import ultralytics
        except ImportError:
            raise ImportError(
                f"freekd.integrations.ultralytics needs Ultralytics (AGPL-3.0), which is not "
                f"installed: pip install 'freekd[ultralytics]' (or '{REQUIREMENT}')"
            ) from None
        version = str(ultralytics.__version__)
    release = parse_version(version)
    if not MINIMUM <= release < MAXIMUM:
        raise ImportError(
            f"freekd.integrations.ultralytics supports {REQUIREMENT}, found ultralytics "
            f"{version}: pip install '{REQUIREMENT}'"
        )
    return version
