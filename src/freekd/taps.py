"""Capture or replace the outputs of named submodules during a forward pass (forward hooks).

A *tap* names a submodule by its dotted path in ``model.named_modules()`` (``"encoder.layer4"``,
``"backbone.fpn"``), optionally followed by ``":key"`` to pick one entry of an output that is a
list/tuple (``"neck:2"``) or a dict (``"backbone.fpn:pool"``). A tap without a key on a module whose
output is a list or dict takes all its entries, in order. Taps are listed fine to coarse; the
captured features come back flat in that order.

    with FeatureTaps(model, ["backbone.fpn"]) as taps:
        model(images)
    features = taps.features  # [P3, P4, P5, P6, P7] for torchvision's FPN

``FeatureTaps(..., replace=fn)`` calls ``fn(index, feature)`` on each tapped feature and hands the
result to the rest of the model instead (stage 1 of FreeKD re-synthesises features this way).
``stop_after_capture=True`` stops the forward pass once every tap has fired (for a teacher that is
needed only up to its taps); run the model through :meth:`FeatureTaps.run`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

__all__ = ["FeatureTaps", "TapError", "parse_tap"]

Replacement = Callable[[int, Tensor], Tensor]


class TapError(ValueError):
    """A tap names no submodule, or its output holds no tensor at the requested entry."""


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once all taps have fired."""


@dataclass(frozen=True)
class _Tap:
    module_name: str
    key: str | None  # None: the whole output (a tensor, or all entries of a list/dict)


def parse_tap(spec: str) -> tuple[str, str | None]:
    """Split a tap: ``"fpn:pool"`` -> ``("fpn", "pool")``; ``"layer4"`` -> ``("layer4", None)``."""
    module_name, _, key = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not module_name:
        raise TapError(f"a tap is a module path such as 'encoder.layer4' or 'neck:0', got {spec!r}")
    return module_name, (key or None)


def _entries(output: Any, tap: _Tap, layer: str) -> list[tuple[Any, Tensor]]:
    """``(key, tensor)`` pairs a tap selects from a module's output."""
    if isinstance(output, Tensor):
        if tap.key is not None:
            raise TapError(
                f"tap {layer!r}: the output is a single tensor, it has no entry {tap.key!r}"
            )
        return [(None, output)]
    if isinstance(output, Mapping):
        keys = list(output) if tap.key is None else [tap.key]
        missing = [k for k in keys if k not in output]
        if missing:
            raise TapError(
                f"tap {layer!r}: the output has no entry {missing[0]!r}; its entries are "
                f"{[str(k) for k in output]}"
            )
    elif isinstance(output, list | tuple):
        if tap.key is None:
            keys = list(range(len(output)))
        else:
            try:
                keys = [int(tap.key)]
                output[keys[0]]
            except (ValueError, IndexError):
                raise TapError(
                    f"tap {layer!r}: the output is a sequence of {len(output)} entries; pick one "
                    f"with an index 0..{len(output) - 1}"
                ) from None
    else:
        raise TapError(
            f"tap {layer!r}: the module returned {type(output).__name__}; a tap needs a tensor, "
            f"a list/tuple of tensors or a dict of tensors: tap a submodule that returns one"
        )
    pairs = [(k, output[k]) for k in keys]
    for k, value in pairs:
        if not isinstance(value, Tensor):
            raise TapError(
                f"tap {layer!r}: entry {k!r} is a {type(value).__name__}, not a tensor: pick the "
                f"entries that are tensors with '{tap.module_name}:KEY'"
            )
    return pairs


def _rebuild(output: Any, replacements: dict[Any, Tensor]) -> Any:
    """``output`` with the entries in ``replacements`` swapped in, same container type."""
    if isinstance(output, Tensor):
        return replacements[None]
    if isinstance(output, Mapping):
        rebuilt = dict(output.items())
        rebuilt.update(replacements)
        return type(output)(rebuilt) if type(output) is not dict else rebuilt
    items = [replacements.get(i, value) for i, value in enumerate(output)]
    if isinstance(output, tuple) and hasattr(output, "_fields"):  # namedtuple
        return type(output)(*items)
    return type(output)(items)


class FeatureTaps:
    """Forward hooks that capture (and optionally replace) the tapped features of ``model``.

    Args:
        model: any ``nn.Module``.
        taps: module paths, optionally ``"path:key"`` (see the module docstring), fine to coarse.
        replace: ``fn(index, feature) -> feature`` applied to each tapped feature; the model then
            continues with the returned tensors. ``None``: capture only.
        stop_after_capture: end the forward pass when all taps have fired (use :meth:`run`).

    ``features`` holds the captured tensors (after replacement, when ``replace`` is set, the
    original ones are in ``originals``) of the last forward pass. Hooks are added on construction
    and removed by :meth:`remove` or on leaving a ``with`` block.
    """

    def __init__(
        self,
        model: nn.Module,
        taps: Sequence[str],
        replace: Replacement | None = None,
        stop_after_capture: bool = False,
    ) -> None:
        if isinstance(taps, str) or not isinstance(taps, Sequence) or len(taps) == 0:
            raise TapError(f"taps must be a non-empty list of module paths, got {taps!r}")
        modules = dict(model.named_modules())
        self.specs = list(taps)
        self._taps = [_Tap(*parse_tap(spec)) for spec in self.specs]
        for tap, spec in zip(self._taps, self.specs, strict=True):
            if tap.module_name not in modules:
                raise TapError(self._unknown_module_message(spec, tap.module_name, modules))
        if len(set(self._taps)) != len(self._taps):
            raise TapError(f"taps {self.specs} name the same feature twice")
        self.replace = replace
        self.stop_after_capture = stop_after_capture
        self._by_module: dict[str, list[int]] = {}
        for index, tap in enumerate(self._taps):
            self._by_module.setdefault(tap.module_name, []).append(index)
        self._stopping = False
        self._captured: dict[int, list[Tensor]] = {}
        self._original: dict[int, list[Tensor]] = {}
        self._handles = [
            modules[name].register_forward_hook(self._make_hook(name)) for name in self._by_module
        ]

    @staticmethod
    def _unknown_module_message(spec: str, name: str, modules: Mapping[str, nn.Module]) -> str:
        close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.5)
        top_level = [n for n in modules if n and "." not in n]
        hint = f"closest: {close}" if close else f"top-level modules: {top_level}"
        return f"tap {spec!r}: the model has no submodule {name!r}; {hint}"

    def _make_hook(self, module_name: str):
        def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
            replacements: dict[Any, Tensor] = {}
            for index in self._by_module[module_name]:
                pairs = _entries(output, self._taps[index], self.specs[index])
                self._original[index] = [value for _, value in pairs]
                if self.replace is None:
                    self._captured[index] = self._original[index]
                    continue
                new_values = []
                offset = self._flat_offset(index)
                for key, value in pairs:
                    new_value = self.replace(offset + len(new_values), value)
                    replacements[key] = new_value
                    new_values.append(new_value)
                self._captured[index] = new_values
            if self._stopping and len(self._captured) == len(self._taps):
                raise _StopForward
            return _rebuild(output, replacements) if replacements else None

        return hook

    def _flat_offset(self, index: int) -> int:
        """Flat position of tap ``index``'s first feature: needs the earlier taps to have fired."""
        not_yet = [self.specs[i] for i in range(index) if i not in self._captured]
        if not_yet:
            raise TapError(
                f"tap {self.specs[index]!r} fired before {not_yet}: with replace=..., list the "
                f"taps in the order the model computes them"
            )
        return sum(len(self._captured[i]) for i in range(index))

    def clear(self) -> None:
        """Forget the features of the last forward pass."""
        self._captured.clear()
        self._original.clear()

    def run(self, model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """Call ``model(*args, **kwargs)`` after :meth:`clear`; returns its output, or ``None`` when
        ``stop_after_capture`` ended the pass early. Raises if a tap did not fire."""
        self.clear()
        self._stopping = self.stop_after_capture  # only inside this call: others' passes run on
        try:
            output = model(*args, **kwargs)
        except _StopForward:
            output = None
        finally:
            self._stopping = False
        self.features  # noqa: B018 - raises if a tap did not fire
        return output

    @property
    def features(self) -> list[Tensor]:
        """Tapped features of the last forward pass, flat, in tap order."""
        missing = [self.specs[i] for i in range(len(self._taps)) if i not in self._captured]
        if missing:
            raise TapError(
                f"taps {missing} did not fire during the forward pass: the model does not call "
                f"those modules for this input"
            )
        return [f for i in range(len(self._taps)) for f in self._captured[i]]

    @property
    def originals(self) -> list[Tensor]:
        """The tapped features as the model computed them, before any replacement."""
        self.features  # noqa: B018 - raises if a tap did not fire
        return [f for i in range(len(self._taps)) for f in self._original[i]]

    def remove(self) -> None:
        """Remove the hooks (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> FeatureTaps:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"FeatureTaps({self.specs}, replace={self.replace is not None})"
