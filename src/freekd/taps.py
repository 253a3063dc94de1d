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

**Transformer features.** A tap ending in ``"@tokens"`` (``"blocks.11@tokens"``,
``"blocks.11@tokens=32x64+1"``) turns a token sequence ``[N, L, C]`` into its patch-grid map
``[N, C, h, w]``, and back (the prefix tokens untouched) when the feature is replaced; ``"@nhwc"``
permutes channels-last maps. The layouts and conversions live in :mod:`freekd.tokens`
(``TokenLayout``, ``tokens_to_map``, ``map_to_tokens`` are importable from here too).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .frozen import eval_mode
from .tokens import (
    TapError,
    TokenLayout,
    map_to_tokens,
    parse_layout,
    patch_grid,
    resolve_layout,
    token_owner,
    tokens_to_map,
)

__all__ = [
    "FeatureTaps",
    "TapError",
    "TokenLayout",
    "map_to_tokens",
    "parse_tap",
    "parse_tap_spec",
    "probe_features",
    "tokens_to_map",
]

Replacement = Callable[[int, Tensor], Tensor]


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once all taps have fired."""


# ---------------------------------------------------------------------------- tap specs


@dataclass(frozen=True)
class _Tap:
    module_name: str
    key: str | None  # None: the whole output (a tensor, or all entries of a list/dict)
    layout: TokenLayout | None = None  # None: the output is already a map


def parse_tap_spec(spec: str) -> tuple[str, str | None, TokenLayout | None]:
    """Split a tap into module path, entry key and token layout:
    ``"encoder.blocks.11@tokens=8x8+1"`` -> ``("encoder.blocks.11", None, TokenLayout(...))``."""
    if not isinstance(spec, str):
        raise TapError(f"a tap is a module path such as 'encoder.layer4' or 'neck:0', got {spec!r}")
    path, at, layout_text = spec.partition("@")
    module_name, key = parse_tap(path) if path else ("", None)
    if not module_name:
        raise TapError(f"a tap is a module path such as 'encoder.layer4' or 'neck:0', got {spec!r}")
    return module_name, key, (parse_layout(layout_text, spec) if at else None)


def parse_tap(spec: str) -> tuple[str, str | None]:
    """Split a tap: ``"fpn:pool"`` -> ``("fpn", "pool")``; ``"layer4"`` -> ``("layer4", None)``
    (a ``"@tokens"`` layout is dropped: see :func:`parse_tap_spec`)."""
    path = spec.partition("@")[0] if isinstance(spec, str) else ""
    module_name, _, key = path.partition(":")
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

    Raises:
        TapError: a tap names no submodule (the closest names are listed), is listed twice, or
            (at run time) selects no tensor or does not fit its token layout.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))
        >>> with FeatureTaps(model, ["0", "2"]) as taps:
        ...     _ = model(torch.zeros(1, 3, 8, 8))
        ...     [tuple(f.shape) for f in taps.features]
        [(1, 4, 8, 8), (1, 2, 8, 8)]
        >>> zero = lambda index, feature: torch.zeros_like(feature)  # the model goes on with it
        >>> with torch.no_grad(), FeatureTaps(model, ["1"], replace=zero):
        ...     output = model(torch.randn(1, 3, 8, 8))
        >>> torch.allclose(output, model[2].bias.detach().view(1, 2, 1, 1).expand(1, 2, 8, 8))
        True
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
        self._taps = [_Tap(*parse_tap_spec(spec)) for spec in self.specs]
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
        self._counts: dict[int, int] = {}  # features each tap gave when it last fired
        self._assumed: dict[int, int] = {}  # counts assumed this pass for taps not yet fired
        self._original: dict[int, list[Tensor]] = {}
        self._handles = [
            modules[name].register_forward_hook(self._make_hook(name)) for name in self._by_module
        ]
        # token layouts: the enclosing transformer of each "@tokens" tap, and its input size
        self._owners: dict[int, str | None] = {}
        self._input_sizes: dict[str, tuple[int, int]] = {}
        for index, tap in enumerate(self._taps):
            if tap.layout is not None and tap.layout.kind == "tokens":
                self._owners[index] = token_owner(tap.module_name, modules)
        for owner in sorted({o for o in self._owners.values() if o is not None}):
            self._handles.append(
                modules[owner].register_forward_pre_hook(self._make_size_hook(owner))
            )
        self._modules = modules

    @staticmethod
    def _unknown_module_message(spec: str, name: str, modules: Mapping[str, nn.Module]) -> str:
        close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.5)
        top_level = [n for n in modules if n and "." not in n]
        hint = f"closest: {close}" if close else f"top-level modules: {top_level}"
        return f"tap {spec!r}: the model has no submodule {name!r}; {hint}"

    def _make_size_hook(self, owner: str):
        def hook(module: nn.Module, inputs: Any) -> None:
            images = inputs[0] if isinstance(inputs, tuple) and inputs else None
            if isinstance(images, Tensor) and images.dim() == 4:
                self._input_sizes[owner] = (int(images.shape[-2]), int(images.shape[-1]))

        return hook

    def _layout(self, index: int, length: int) -> tuple[tuple[int, int] | None, int | str]:
        """``(grid, prefix_tokens)`` for :func:`tokens_to_map` of tap ``index``: the tap's own
        values, else the enclosing transformer's, else ``None`` / ``"auto"``."""
        layout = self._taps[index].layout
        assert layout is not None
        grid, prefix = layout.grid, layout.prefix_tokens
        owner_name = self._owners.get(index)
        owner = self._modules[owner_name] if owner_name is not None else None
        if prefix is None and owner is not None:
            count = getattr(owner, "num_prefix_tokens", None)
            prefix = int(count) if isinstance(count, int) else None
        if grid is None and owner is not None and owner_name in self._input_sizes:
            grid = patch_grid(owner, self._input_sizes[owner_name])
            if grid is not None and grid[0] * grid[1] + (prefix or 0) != length:
                grid = None  # e.g. a pooled stage: let the length decide
        return grid, ("auto" if prefix is None else prefix)

    def _to_map(self, index: int, value: Tensor) -> tuple[Tensor, Tensor | None]:
        """A tapped output as a map ``[N, C, H, W]``, and the prefix tokens to restore."""
        layout = self._taps[index].layout
        spec = self.specs[index]
        if layout is None:
            return value, None
        if layout.kind == "nhwc":
            if value.dim() != 4:
                raise TapError(
                    f"tap {spec!r}: '@nhwc' takes a channels-last map [N, H, W, C], got "
                    f"{tuple(value.shape)}"
                )
            return value.permute(0, 3, 1, 2), None
        if value.dim() != 3:
            raise TapError(
                f"tap {spec!r}: '@tokens' takes a token sequence [N, L, C], got "
                f"{tuple(value.shape)}; drop '@tokens' for a module that returns maps"
            )
        grid, prefix = self._layout(index, value.shape[1])
        (height, width), count = resolve_layout(
            value.shape[1], grid, prefix, f"tap {spec!r}", self._taps[index].module_name
        )
        return tokens_to_map(value, (height, width), count), value[:, :count]

    def _from_map(self, index: int, feature: Tensor, prefix: Tensor | None) -> Tensor:
        """The inverse of :meth:`_to_map` for a replaced feature."""
        layout = self._taps[index].layout
        if layout is None:
            return feature
        if layout.kind == "nhwc":
            return feature.permute(0, 2, 3, 1)
        return map_to_tokens(feature, prefix)

    def _make_hook(self, module_name: str):
        def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
            replacements: dict[Any, Tensor] = {}
            for index in self._by_module[module_name]:
                pairs = _entries(output, self._taps[index], self.specs[index])
                converted = [(key, *self._to_map(index, value)) for key, value in pairs]
                self._original[index] = [feature for _, feature, _ in converted]
                if self.replace is None:
                    self._captured[index] = self._original[index]
                    continue
                self._check_assumed_count(index, len(converted))
                new_values = []
                offset = self._flat_offset(index)
                for key, feature, prefix in converted:
                    new_value = self.replace(offset + len(new_values), feature)
                    replacements[key] = self._from_map(index, new_value, prefix)
                    new_values.append(new_value)
                self._captured[index] = new_values
            if self._stopping and len(self._captured) == len(self._taps):
                raise _StopForward
            return _rebuild(output, replacements) if replacements else None

        return hook

    def _flat_offset(self, index: int) -> int:
        """Flat position of tap ``index``'s first feature, whatever order the taps fire in.

        A tap that has not fired yet in this pass counts with the number of features it gave in
        an earlier pass, or 1 before it has ever fired (a plain tensor output, or one key);
        :meth:`_check_assumed_count` refuses the pass if that guess turns out wrong.
        """
        offset = 0
        for earlier in range(index):
            if earlier in self._captured:
                offset += len(self._captured[earlier])
            else:
                count = self._counts.get(earlier, 1)
                self._assumed[earlier] = count
                offset += count
        return offset

    def _check_assumed_count(self, index: int, count: int) -> None:
        """Refuse a pass in which tap ``index`` gave ``count`` features after a later-listed tap
        that fired first assumed another number."""
        assumed = self._assumed.pop(index, None)
        self._counts[index] = count
        if assumed is not None and assumed != count:
            raise TapError(
                f"tap {self.specs[index]!r} yields {count} features and fired after later-listed "
                f"taps: with replace=..., list the taps in the order the model computes them, or "
                f"tap its features one by one ('path:key')"
            )

    def clear(self) -> None:
        """Forget the features of the last forward pass."""
        self._captured.clear()
        self._original.clear()
        self._assumed.clear()

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


def probe_features(model: nn.Module, taps: Sequence[str], inputs: Any) -> list[torch.Size]:
    """The shapes of the features ``taps`` capture when ``model(inputs)`` runs, flat, in tap order.

    A dry run: eval mode (every submodule's own flag restored afterwards), ``no_grad``, stopped
    once every tap has fired; no hook is left on ``model``. Use it to size what a loss needs, e.g.
    ``FreeKDLoss(channels=[s[1] for s in probe_features(teacher, taps, images)])``.

    Returns:
        One ``torch.Size`` per tapped feature (``[N, C, H, W]`` for a map).

    Raises:
        TapError: a tap names no submodule, selects no tensor, or did not fire.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 4, 1))
        >>> probe_features(model, ["0", "2"], torch.zeros(2, 3, 33, 33))
        [torch.Size([2, 8, 16, 16]), torch.Size([2, 4, 16, 16])]
    """
    with eval_mode(model), torch.no_grad(), FeatureTaps(model, taps, stop_after_capture=True) as t:
        t.run(model, inputs)
        return [feature.shape for feature in t.features]
