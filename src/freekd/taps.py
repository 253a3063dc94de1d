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

**Transformer features.** FreeKD distils maps ``[N, C, H, W]``. A vision transformer's blocks
return token sequences ``[N, L, C]`` (``L`` = prefix tokens + ``h * w`` patch tokens; prefix
tokens are the class token and any register tokens). A tap ending in ``"@tokens"`` turns them into
the patch-grid map ``[N, C, h, w]`` (:func:`tokens_to_map`), and back (with the prefix tokens
untouched) when the feature is replaced:

- ``"blocks.11@tokens"``: grid and prefix count read from the enclosing timm model
  (``num_prefix_tokens``, and the grid of its ``patch_embed`` for the input it was called with),
  else a square grid with the prefix count that makes ``L - prefix`` a square;
- ``"blocks.11@tokens=32x64"``: a 32 x 64 patch grid (rows x columns);
- ``"blocks.11@tokens=32x64+5"`` / ``"blocks.11@tokens+1"``: and 5 (1) prefix tokens.

``"@nhwc"`` permutes channels-last maps ``[N, H, W, C]`` (SAM's ViT blocks, Swin stages) to
``[N, C, H, W]``. A sequence length that fits no grid raises :class:`TapError` naming the tap,
``L``, the grid and the fix.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "FeatureTaps",
    "TapError",
    "TokenLayout",
    "map_to_tokens",
    "parse_tap",
    "parse_tap_spec",
    "tokens_to_map",
]

Replacement = Callable[[int, Tensor], Tensor]


class TapError(ValueError):
    """A tap names no submodule, its output holds no tensor at the requested entry, or a token
    sequence does not fit the patch grid."""


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once all taps have fired."""


# ---------------------------------------------------------------------------- token maps


def _square_side(count: int) -> int | None:
    side = math.isqrt(count) if count > 0 else 0
    return side if side > 0 and side * side == count else None


def _infer_prefix(length: int, max_prefix: int = 8) -> int | None:
    """The smallest ``p`` in ``0..max_prefix`` for which ``length - p`` is a square."""
    for prefix in range(min(max_prefix, length - 1) + 1):
        if _square_side(length - prefix) is not None:
            return prefix
    return None


def _resolve_layout(
    length: int,
    grid: tuple[int, int] | None,
    prefix_tokens: int | str,
    where: str,
    module_name: str | None = None,
) -> tuple[tuple[int, int], int]:
    """``(grid, prefix)`` for a sequence of ``length`` tokens, or a :class:`TapError`."""
    if module_name is None:
        fix = (
            "pass the patch grid and the number of prefix (class + register) tokens, e.g. "
            "grid=(h, w), prefix_tokens=1"
        )
    else:
        fix = (
            f"give the patch grid (image size / patch size) and the number of prefix (class + "
            f"register) tokens in the tap, e.g. '{module_name}@tokens=HxW+P'"
        )
    if prefix_tokens == "auto":
        if grid is not None:
            prefix = length - grid[0] * grid[1]
            if prefix < 0:
                raise TapError(
                    f"{where}: {length} tokens are fewer than the {grid[0]}x{grid[1]} grid's "
                    f"{grid[0] * grid[1]} patches; {fix}"
                )
            return grid, prefix
        prefix = _infer_prefix(length)
        if prefix is None:
            raise TapError(
                f"{where}: {length} tokens do not make a square patch grid with 0..8 prefix "
                f"tokens; {fix}"
            )
        side = _square_side(length - prefix)
        return (side, side), prefix  # type: ignore[return-value]
    if isinstance(prefix_tokens, bool) or not isinstance(prefix_tokens, int) or prefix_tokens < 0:
        raise TapError(f"{where}: prefix_tokens must be an integer >= 0 or 'auto'")
    patches = length - prefix_tokens
    if grid is None:
        side = _square_side(patches)
        if side is None:
            raise TapError(
                f"{where}: {length} tokens minus {prefix_tokens} prefix tokens leave {patches}, "
                f"not a square patch grid; {fix}"
            )
        return (side, side), prefix_tokens
    if grid[0] * grid[1] != patches:
        raise TapError(
            f"{where}: {length} tokens do not fit the {grid[0]}x{grid[1]} patch grid with "
            f"{prefix_tokens} prefix tokens ({grid[0] * grid[1] + prefix_tokens} expected); {fix}"
        )
    return grid, prefix_tokens


def tokens_to_map(
    tokens: Tensor,
    grid: tuple[int, int] | None = None,
    prefix_tokens: int | str = 0,
) -> Tensor:
    """The patch tokens of a transformer feature as a map: ``[N, L, C]`` -> ``[N, C, h, w]``.

    Args:
        tokens: ``[N, L, C]`` with ``L = prefix_tokens + h * w``; the patch tokens in raster order
            (row by row), after the prefix (class / register) tokens, as timm's ViTs lay them out.
        grid: ``(h, w)``, the patch grid (image size / patch size); ``None``: a square grid.
        prefix_tokens: how many leading tokens are not patches (0; 1 for a class token; 5 for a
            class token and 4 registers); ``"auto"``: ``L - h * w`` when ``grid`` is given, else
            the smallest count in ``0..8`` that leaves a square grid.

    Raises :class:`TapError` (a ``ValueError``) when ``L`` does not fit, naming ``L``, the grid
    and the fix. The map shares no memory with ``tokens`` (a contiguous copy).
    """
    if tokens.dim() != 3:
        raise TapError(
            f"tokens_to_map takes tokens [N, L, C], got shape {tuple(tokens.shape)}: tap a "
            f"transformer block's output (a map [N, C, H, W] needs no conversion)"
        )
    count, length, channels = tokens.shape
    (height, width), prefix = _resolve_layout(length, grid, prefix_tokens, "tokens_to_map")
    patches = tokens[:, prefix:]
    return patches.transpose(1, 2).reshape(count, channels, height, width).contiguous()


def map_to_tokens(feature: Tensor, prefix: Tensor | None = None) -> Tensor:
    """The inverse of :func:`tokens_to_map`: ``[N, C, h, w]`` -> ``[N, P + h * w, C]`` with the
    ``prefix`` tokens ``[N, P, C]`` (or none) in front."""
    if feature.dim() != 4:
        raise TapError(f"map_to_tokens takes a map [N, C, h, w], got {tuple(feature.shape)}")
    tokens = feature.flatten(2).transpose(1, 2)
    if prefix is None or prefix.shape[1] == 0:
        return tokens.contiguous()
    return torch.cat([prefix.to(tokens.dtype), tokens], dim=1)


@dataclass(frozen=True)
class TokenLayout:
    """How a tap converts a transformer output to a map (the ``"@..."`` part of a tap).

    ``kind``: ``"tokens"`` (``[N, L, C]``, see :func:`tokens_to_map`) or ``"nhwc"``
    (``[N, H, W, C]``); ``grid`` ``(h, w)`` and ``prefix_tokens`` (``None``: found from the model
    or the sequence length)."""

    kind: str = "tokens"
    grid: tuple[int, int] | None = None
    prefix_tokens: int | None = None

    def __str__(self) -> str:
        if self.kind == "nhwc":
            return "@nhwc"
        text = "@tokens"
        if self.grid is not None:
            text += f"={self.grid[0]}x{self.grid[1]}"
        if self.prefix_tokens is not None:
            text += f"+{self.prefix_tokens}"
        return text


_LAYOUT = re.compile(r"^(?:nhwc|tokens(?:=(?P<h>\d+)x(?P<w>\d+))?(?:\+(?P<p>\d+))?)$")


def _parse_layout(text: str, spec: str) -> TokenLayout:
    match = _LAYOUT.match(text)
    if match is None or (match["h"] is not None and (int(match["h"]) < 1 or int(match["w"]) < 1)):
        raise TapError(
            f"tap {spec!r}: {'@' + text!r} is not a layout; use '@tokens', '@tokens=HxW', "
            f"'@tokens=HxW+P', '@tokens+P' (P prefix tokens) or '@nhwc'"
        )
    if text == "nhwc":
        return TokenLayout("nhwc")
    grid = (int(match["h"]), int(match["w"])) if match["h"] is not None else None
    prefix = int(match["p"]) if match["p"] is not None else None
    return TokenLayout("tokens", grid, prefix)


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
    return module_name, key, (_parse_layout(layout_text, spec) if at else None)


def parse_tap(spec: str) -> tuple[str, str | None]:
    """Split a tap: ``"fpn:pool"`` -> ``("fpn", "pool")``; ``"layer4"`` -> ``("layer4", None)``
    (a ``"@tokens"`` layout is dropped: see :func:`parse_tap_spec`)."""
    path = spec.partition("@")[0] if isinstance(spec, str) else ""
    module_name, _, key = path.partition(":")
    if not module_name:
        raise TapError(f"a tap is a module path such as 'encoder.layer4' or 'neck:0', got {spec!r}")
    return module_name, (key or None)


def _token_owner(module_name: str, modules: Mapping[str, nn.Module]) -> str | None:
    """The innermost module enclosing ``module_name`` (itself included) that looks like a
    vision transformer (has ``patch_embed`` or ``num_prefix_tokens``), or ``None``."""
    parts = module_name.split(".")
    for end in range(len(parts), -1, -1):
        name = ".".join(parts[:end])
        module = modules.get(name)
        if module is not None and (
            hasattr(module, "patch_embed") or hasattr(module, "num_prefix_tokens")
        ):
            return name
    return None


def _patch_grid(owner: nn.Module, size: tuple[int, int]) -> tuple[int, int] | None:
    """The patch grid of ``owner`` (a timm ViT) for an input of ``size``, when it says."""
    embed = getattr(owner, "patch_embed", None)
    if embed is None:
        return None
    if hasattr(embed, "dynamic_feat_size"):  # timm: floor, or ceil with dynamic padding
        height, width = embed.dynamic_feat_size(size)
        return int(height), int(width)
    grid = getattr(embed, "grid_size", None)
    if grid is not None and len(grid) == 2:
        return int(grid[0]), int(grid[1])
    patch = getattr(embed, "patch_size", None)
    if patch is not None:
        patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
        return size[0] // int(patch[0]), size[1] // int(patch[1])
    return None


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
                self._owners[index] = _token_owner(tap.module_name, modules)
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
            grid = _patch_grid(owner, self._input_sizes[owner_name])
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
        (height, width), count = _resolve_layout(
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
