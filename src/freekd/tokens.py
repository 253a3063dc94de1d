"""Transformer features as maps: token sequences ``[N, L, C]`` <-> patch grids ``[N, C, h, w]``.

FreeKD distills maps ``[N, C, H, W]``. A vision transformer's blocks return token sequences
``[N, L, C]`` (``L`` = prefix tokens + ``h * w`` patch tokens; prefix tokens are the class token
and any register tokens). :func:`tokens_to_map` turns them into the patch-grid map and
:func:`map_to_tokens` back (with the prefix tokens put back in front). A tap ending in
``"@tokens"`` (see :mod:`freekd.taps`) does both for a hooked module; its layout:

- ``"blocks.11@tokens"``: grid and prefix count read from the enclosing timm model
  (``num_prefix_tokens``, and the grid of its ``patch_embed`` for the input it was called with,
  :func:`token_owner`, :func:`patch_grid`), else a square grid with the prefix count that makes
  ``L - prefix`` a square (:func:`infer_prefix`);
- ``"blocks.11@tokens=32x64"``: a 32 x 64 patch grid (rows x columns);
- ``"blocks.11@tokens=32x64+5"`` / ``"blocks.11@tokens+1"``: and 5 (1) prefix tokens.

``"@nhwc"`` permutes channels-last maps ``[N, H, W, C]`` (SAM's ViT blocks, Swin stages) to
``[N, C, H, W]``. A sequence length that fits no grid raises :class:`TapError` naming the tap,
``L``, the grid and the fix.

Example:
    >>> import torch
    >>> tokens = torch.randn(2, 1 + 4 * 6, 8)  # a class token and a 4 x 6 patch grid, C = 8
    >>> feature = tokens_to_map(tokens, grid=(4, 6), prefix_tokens=1)
    >>> feature.shape
    torch.Size([2, 8, 4, 6])
    >>> torch.equal(map_to_tokens(feature, tokens[:, :1]), tokens)
    True
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "TapError",
    "TokenLayout",
    "infer_prefix",
    "map_to_tokens",
    "parse_layout",
    "patch_grid",
    "resolve_layout",
    "token_owner",
    "tokens_to_map",
]


class TapError(ValueError):
    """A tap names no submodule, its output holds no tensor at the requested entry, or a token
    sequence does not fit the patch grid (raised by :mod:`freekd.taps` and this module)."""


def _square_side(count: int) -> int | None:
    side = math.isqrt(count) if count > 0 else 0
    return side if side > 0 and side * side == count else None


def infer_prefix(length: int, max_prefix: int = 8) -> int | None:
    """The smallest ``p`` in ``0..max_prefix`` for which ``length - p`` is a square."""
    for prefix in range(min(max_prefix, length - 1) + 1):
        if _square_side(length - prefix) is not None:
            return prefix
    return None


def resolve_layout(
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
        prefix = infer_prefix(length)
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
    (height, width), prefix = resolve_layout(length, grid, prefix_tokens, "tokens_to_map")
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


def parse_layout(text: str, spec: str) -> TokenLayout:
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


def token_owner(module_name: str, modules: Mapping[str, nn.Module]) -> str | None:
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


def patch_grid(owner: nn.Module, size: tuple[int, int]) -> tuple[int, int] | None:
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
