"""Checking plain data (parsed YAML) against dataclasses: unknown keys, types, missing values.

:func:`from_dict` builds a dataclass from a mapping, recursively, and raises :class:`ConfigError`
naming the dotted key of the offending value (``student.train.optimizer.lr``). Type hints drive
the checks: ``int``, ``float`` (an ``int`` or a numeric string such as YAML 1.1's ``1e-4`` is
accepted), ``bool``, ``str``, ``Path``, ``None``, ``list[X]``, ``tuple[X, ...]``,
``dict[str, X]``, ``Literal[...]``, unions, ``Any`` and nested dataclasses. A dataclass may
define ``_prepare(raw) -> raw`` (fill values that depend on others) and its own
``__post_init__`` checks, whose ``ValueError`` / ``TypeError`` is reported at its key.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union

from .._checks import did_you_mean, quoted

__all__ = ["ConfigError", "check_value", "choice_problem", "from_dict", "to_dict"]

_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


class ConfigError(ValueError):
    """A configuration value is wrong; ``key`` is the dotted path of the value (``""``: the
    whole document) and ``problem`` says what is wrong and how to fix it."""

    def __init__(self, key: str, problem: str, source: str | None = None) -> None:
        self.key, self.problem, self.source = key, problem, source
        super().__init__(self._text())

    def _text(self) -> str:
        where = f"{self.source}: " if self.source else ""
        return f"{where}{self.key}: {self.problem}" if self.key else f"{where}{self.problem}"

    def with_source(self, source: str) -> ConfigError:
        """The same error, naming where the value came from (a file, a ``--set`` option)."""
        return ConfigError(self.key, self.problem, source)


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if hint is Any:
        return "anything"
    if hint is type(None):
        return "null"
    if origin is Literal:
        return " or ".join(repr(v) for v in typing.get_args(hint))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if origin in (list, tuple):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        inner = _type_name(args[0]) if args else "anything"
        return f"a list of ({inner})"
    if origin is dict or hint is dict:
        return "a mapping"
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        hint, "a path" if hint is Path else getattr(hint, "__name__", str(hint))
    )


def choice_problem(value: Any, choices: tuple[Any, ...]) -> str:
    """What :class:`ConfigError` says of a ``value`` that is not one of ``choices``: "'x' is not
    valid (did you mean 'y'?); choose one of 'a', 'b'"."""
    return f"{value!r} is not valid{did_you_mean(value, choices)}; choose one of {quoted(choices)}"


def check_value(hint: Any, value: Any, key: str) -> Any:
    """``value`` checked (and lightly converted) against the type ``hint``; ``ConfigError``
    naming ``key`` otherwise."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(key, f"expected null, got {_describe(value)}")
    if origin is Literal:
        choices = typing.get_args(hint)
        if value in choices and type(value) in {type(c) for c in choices}:
            return value
        raise ConfigError(key, choice_problem(value, choices))
    if origin in (Union, types.UnionType):
        errors = []
        for option in typing.get_args(hint):
            try:
                return check_value(option, value, key)
            except ConfigError as error:
                errors.append(error)
        raise ConfigError(key, f"expected {_type_name(hint)}, got {_describe(value)}")
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key)
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(key, f"expected {_type_name(hint)}, got {_describe(value)}")
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        inner = args[0] if args else Any
        items = [check_value(inner, item, _join(key, i)) for i, item in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"expected a mapping, got {_describe(value)}")
        args = typing.get_args(hint)
        inner = args[1] if len(args) == 2 else Any
        result = {}
        for name, item in value.items():
            if not isinstance(name, str):
                raise ConfigError(key, f"keys must be strings, got {_describe(name)}")
            result[name] = check_value(inner, item, _join(key, name))
        return result
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT.match(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is Path:
        if isinstance(value, str | Path) and str(value):
            return str(value)
    else:  # pragma: no cover - a hint this checker does not know
        raise TypeError(f"schema: unsupported type hint {hint!r} at {key}")
    raise ConfigError(key, f"expected {_type_name(hint)}, got {_describe(value)}")


def from_dict(cls: type, raw: Any, key: str = "") -> Any:
    """An instance of the dataclass ``cls`` from the mapping ``raw`` (checked recursively)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(key, f"expected a mapping of settings, got {_describe(raw)}")
    prepare = getattr(cls, "_prepare", None)
    raw = dict(prepare(dict(raw)) if prepare is not None else raw)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for name in raw:
        if name not in fields:
            raise ConfigError(
                _join(key, str(name)),
                f"unknown key{did_you_mean(name, fields)}; valid keys here: {', '.join(fields)}",
            )
    values = {}
    for name, field in fields.items():
        if name in raw:
            values[name] = check_value(hints[name], raw[name], _join(key, name))
        elif dataclasses.is_dataclass(hints[name]) and field.default_factory is hints[name]:
            values[name] = from_dict(hints[name], {}, _join(key, name))  # its _prepare runs
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(
                _join(key, name), f"missing: this setting is required ({_type_name(hints[name])})"
            )
    try:
        return cls(**values)
    except ConfigError as error:
        raise ConfigError(_join(key, error.key) if error.key else key, error.problem) from None
    except (ValueError, TypeError) as error:
        raise ConfigError(key or cls.__name__, str(error)) from None


def to_dict(instance: Any) -> Any:
    """A dataclass (recursively) as plain YAML-ready data (tuples as lists, paths as strings)."""
    if dataclasses.is_dataclass(instance) and not isinstance(instance, type):
        return {
            f.name: to_dict(getattr(instance, f.name))
            for f in dataclasses.fields(instance)
            if f.init
        }
    if isinstance(instance, Mapping):
        return {str(k): to_dict(v) for k, v in instance.items()}
    if isinstance(instance, list | tuple):
        return [to_dict(v) for v in instance]
    if isinstance(instance, Path):
        return str(instance)
    return instance
