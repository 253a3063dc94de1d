"""Argument checks that raise one clear message: what is wrong and how to fix it."""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

from torch import Tensor

__all__ = [
    "check_channel_list",
    "check_choice",
    "check_feature_lists",
    "check_nonnegative_int",
    "check_positive_float",
    "check_positive_int",
    "did_you_mean",
    "preview",
    "quoted",
]

Choice = TypeVar("Choice")


def quoted(choices: Iterable[object]) -> str:
    """The choices as a message lists them: ``"'a', 'b', 'c'"``."""
    return ", ".join(repr(c) for c in choices)


def did_you_mean(value: object, choices: Iterable[object], cutoff: float = 0.6) -> str:
    """``" (did you mean 'x'?)"`` for the choice closest to ``value`` (difflib, at least
    ``cutoff`` similar), or ``""`` when none is close."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=cutoff)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_choice(name: str, value: Any, choices: Sequence[Choice]) -> Choice:
    """``value`` when it is one of ``choices``.

    Raises:
        ValueError: "unknown {name} {value!r} (did you mean 'x'?); choose one of 'a', 'b'",
            the hint only when a choice is close.

    Example:
        >>> check_choice("granularity", "band", ("level", "band"))
        'band'
        >>> check_choice("granularity", "bands", ("level", "band"))
        Traceback (most recent call last):
        ...
        ValueError: unknown granularity 'bands' (did you mean 'band'?); choose one of ...
    """
    if value in choices:
        return value
    raise ValueError(
        f"unknown {name} {value!r}{did_you_mean(value, choices)}; choose one of {quoted(choices)}"
    )


def preview(items: Sequence[Any], count: int = 5) -> str:
    """The first ``count`` items, joined, and how many more: ``"a, b, c and 4 more"``."""
    shown = ", ".join(str(item) for item in items[:count])
    more = len(items) - count
    return shown + (f" and {more} more" if more > 0 else "")


def check_positive_int(name: str, value: object) -> None:
    """Raise a ``ValueError`` unless ``value`` is an integer >= 1."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def check_nonnegative_int(name: str, value: object) -> None:
    """Raise a ``ValueError`` unless ``value`` is an integer >= 0."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


def check_positive_float(name: str, value: object) -> float:
    """``value`` as a float; a ``ValueError`` naming ``name`` unless it is a finite number > 0."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_channel_list(owner: str, channels: Sequence[int]) -> list[int]:
    """``channels`` (one positive count per distilled layer) as a list of ints; a ``ValueError``
    naming ``owner`` otherwise."""
    if isinstance(channels, int) or not isinstance(channels, Sequence) or len(channels) == 0:
        raise ValueError(
            f"{owner}: channels must list the channel count of each distilled layer, e.g. "
            f"[256, 256], got {channels!r}"
        )
    for index, count in enumerate(channels):
        check_positive_int(f"channels[{index}]", count)
    return [int(c) for c in channels]


def check_feature_lists(
    loss: str,
    student_feats: Sequence[Tensor],
    teacher_feats: Sequence[Tensor],
    channels: Sequence[int] | None = None,
) -> None:
    """Raise a clear error unless the two lists hold one non-empty ``[N, C, H, W]``
    floating-point tensor per layer each, of equal shapes and on one device (and with
    ``channels[i]`` channels at layer ``i`` when ``channels`` is given). ``loss`` names the
    caller in the messages."""
    for name, feats in (("student_feats", student_feats), ("teacher_feats", teacher_feats)):
        if isinstance(feats, Tensor) or not isinstance(feats, Sequence):
            raise TypeError(
                f"{loss}: {name} must be a list of [N, C, H, W] tensors (one per layer), got "
                f"{type(feats).__name__}: wrap a single feature as [feature]"
            )
    expected = len(channels) if channels is not None else len(teacher_feats)
    if len(student_feats) != len(teacher_feats) or len(teacher_feats) != expected or not expected:
        built = f" distills {expected} layers (channels={list(channels)});" if channels else ":"
        raise ValueError(
            f"{loss}{built} got {len(student_feats)} student and {len(teacher_feats)} teacher "
            f"features: pass one student feature per distilled teacher layer"
        )
    for index, (s, t) in enumerate(zip(student_feats, teacher_feats, strict=True)):
        where = f"{loss} layer {index}"
        for name, feat in (("student", s), ("teacher", t)):
            if not isinstance(feat, Tensor) or feat.dim() != 4:
                shape = tuple(feat.shape) if isinstance(feat, Tensor) else type(feat).__name__
                raise ValueError(
                    f"{where}: {name} feature must be [N, C, H, W], got {shape}: distill maps "
                    f"(add a batch dimension with feature[None])"
                )
            if not feat.is_floating_point():
                raise TypeError(
                    f"{where}: {name} feature must be floating point, got {feat.dtype}: "
                    f"convert it with .float()"
                )
        if s.shape != t.shape:
            raise ValueError(
                f"{where}: student feature {tuple(s.shape)} differs from teacher "
                f"{tuple(t.shape)}: project the student (Distiller's projection='auto')"
            )
        if t.numel() == 0:
            raise ValueError(
                f"{where}: the features {tuple(t.shape)} are empty (a size is 0): pass a "
                f"non-empty batch and tap a layer with a spatial map"
            )
        if s.device != t.device:
            raise ValueError(
                f"{where}: student feature on {s.device}, teacher on {t.device}: move teacher "
                f"and student to one device"
            )
        if channels is not None and t.shape[1] != channels[index]:
            raise ValueError(
                f"{where}: features have {t.shape[1]} channels, the loss was built for "
                f"{channels[index]}: pass channels={[f.shape[1] for f in teacher_feats]}"
            )
