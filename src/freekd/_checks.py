"""Argument checks that raise one clear message: what is wrong and how to fix it."""

from __future__ import annotations


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """Raise a ``ValueError`` naming ``name``, the bad ``value`` and the valid ``choices``."""
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"unknown {name} {value!r}; choose one of {options}")


def check_positive_int(name: str, value: object) -> None:
    """Raise a ``ValueError`` unless ``value`` is an integer >= 1."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
