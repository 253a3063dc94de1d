"""Pictures of what the prompts learned: the frequency masks of the teacher's prompts.

``render_prompt_masks(teacher, taps, loss, image, path)`` runs the teacher on one image,
computes the prompt masks of its tapped features and writes a labelled PNG
(:func:`prompt_mask_figure`): a title, one row per distilled layer (named by its tap and its
feature grid), and the columns

- ``image``: the input;
- ``teacher |level 1|``: the teacher's finest detail band, ``mean |coefficient|`` over channels
  and orientations, scaled to its maximum (what the prompts look at);
- ``mask: low band``, ``mask: level j``: the mask of each band, mean over the ``T`` tokens (and
  orientations), on the band's own grid;
- ``level 1, token t``: each token's mask of the finest level;
- ``overlay: level 1``: the mean mask of the finest level blended over the image;

every tile upscaled to at least 128 px (masks with nearest neighbours, so the band's grid stays
visible) and a color bar for the mask values (0 to 1). The PNG's text chunks record the title,
the column and row titles and the tile size (``PIL.Image.open(path).text``).
``prompt_mask_grid`` is the bare tile grid as a tensor (no labels).

Only PIL (a torchvision dependency) is used for drawing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._deprecation import renamed
from .losses.freekd import FreeKDLoss
from .prompts import PromptMasks
from .taps import FeatureTaps
from .wavelets import dwt2

__all__ = [
    "MIN_TILE",
    "MaskFigure",
    "colorize",
    "draw_prompt_masks",
    "prompt_mask_figure",
    "prompt_mask_grid",
    "render_prompt_masks",
]

# Anchor colors of a perceptually ordered map (dark blue -> teal -> yellow), interpolated.
_ANCHORS = torch.tensor(
    [
        [0.27, 0.00, 0.33],
        [0.23, 0.32, 0.55],
        [0.13, 0.57, 0.55],
        [0.37, 0.79, 0.38],
        [0.99, 0.91, 0.14],
    ]
)


def colorize(values: Tensor) -> Tensor:
    """``values: [H, W]`` in ``[0, 1]`` -> ``[3, H, W]`` RGB in ``[0, 1]``."""
    scaled = values.clamp(0, 1) * (len(_ANCHORS) - 1)
    low = scaled.floor().long().clamp(max=len(_ANCHORS) - 2)
    frac = (scaled - low).unsqueeze(-1)
    rgb = _ANCHORS[low] * (1 - frac) + _ANCHORS[low + 1] * frac  # [H, W, 3]
    return rgb.permute(2, 0, 1)


def _to_display(image: Tensor) -> Tensor:
    """An image ``[3, H, W]`` (any range, e.g. normalized) stretched to ``[0, 1]`` for display."""
    image = image.detach().float().cpu()
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    low, high = image.min(), image.max()
    return (image - low) / (high - low).clamp_min(1e-8)


def _overlay(image: Tensor, mask: Tensor, alpha: float = 0.6) -> Tensor:
    """Blend ``mask: [h, w]`` (in ``[0, 1]``, upsampled to the image) over ``image: [3, H, W]``."""
    size = image.shape[-2:]
    mask = F.interpolate(mask[None, None].float(), size=size, mode="bilinear", align_corners=False)
    return (1 - alpha) * image + alpha * colorize(mask[0, 0])


def prompt_mask_grid(
    image: Tensor, layer_masks: Sequence[PromptMasks], image_index: int = 0
) -> Tensor:
    """The bare tile grid (no titles, native size) as a tensor ``[3, rows * H, cols * W]`` in
    ``[0, 1]``: per layer the image, then the low band's and each level's mean mask and each
    token's mask of the finest level, blended over the image. :func:`prompt_mask_figure` draws
    the labelled picture.

    Args:
        image: the input image ``[3, H, W]``.
        layer_masks: per distilled layer, ``(low_masks: [N, T, 1, h, w] or None,
            high_masks[j]: [N, T, k, h_j, w_j])`` as returned by ``FrequencyPrompt.masks``.
        image_index: which image of the batch the masks belong to.
    """
    base = _to_display(image)
    rows = []
    for low_masks, high_masks in layer_masks:
        tiles = [base]
        if low_masks is not None:
            tiles.append(_overlay(base, low_masks[image_index].mean(dim=(0, 1)).cpu()))
        tiles += [_overlay(base, m[image_index].mean(dim=(0, 1)).cpu()) for m in high_masks]
        finest = high_masks[0][image_index]  # [T, k, h, w]
        tiles += [_overlay(base, finest[t].mean(dim=0).cpu()) for t in range(finest.shape[0])]
        rows.append(torch.cat(tiles, dim=-1))
    width = max(row.shape[-1] for row in rows)
    rows = [F.pad(row, (0, width - row.shape[-1]), value=1.0) for row in rows]
    return torch.cat(rows, dim=-2)


def save_image(picture: Tensor, path: str | os.PathLike) -> Path:
    """Write ``picture: [3, H, W]`` in ``[0, 1]`` as a PNG."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_to_array(picture)).save(path)
    return path


def _to_array(picture: Tensor) -> Any:
    """``[3, H, W]`` in ``[0, 1]`` -> ``[H, W, 3]`` uint8 numpy array."""
    return (picture.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).contiguous().numpy()


# ---------------------------------------------------------------------------- labelled figure

MIN_TILE = 128
"""Smallest side of a tile, in pixels: smaller images and masks are upscaled to it."""
_MAX_TILE = 256
_GAP = 6
_MARGIN = 12
_COLORBAR_WIDTH = 16


@dataclass
class MaskFigure:
    """A labelled picture of prompt masks (see :func:`prompt_mask_figure`).

    ``image``: the picture (a PIL RGB image); ``title``; ``columns`` and ``rows``: the titles
    drawn above the columns and left of the rows; ``tile``: ``(height, width)`` of every tile in
    pixels; ``column_boxes``: ``(left, top, right, bottom)`` of each column title;
    ``colorbar``: the label of the color bar (``""``: none)."""

    image: Any
    title: str
    columns: list[str]
    rows: list[str]
    tile: tuple[int, int]
    column_boxes: list[tuple[int, int, int, int]] = field(default_factory=list)
    colorbar: str = ""

    def save(self, path: str | os.PathLike) -> Path:
        """Write the PNG (atomically), with the titles in its text chunks."""
        from PIL.PngImagePlugin import PngInfo

        from ._io import atomic_write

        info = PngInfo()
        info.add_text("Title", self.title)
        info.add_text("freekd:columns", json.dumps(self.columns))
        info.add_text("freekd:rows", json.dumps(self.rows))
        info.add_text("freekd:tile", f"{self.tile[0]}x{self.tile[1]}")
        info.add_text("freekd:colorbar", self.colorbar)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write(path, lambda tmp: self.image.save(tmp, format="PNG", pnginfo=info))


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _tile_size(height: int, width: int, min_tile: int) -> tuple[int, int]:
    """The tile of an ``height x width`` image: its shorter side scaled to ``min_tile`` when
    smaller, to ``_MAX_TILE`` when larger than that, aspect kept."""
    short = min(height, width)
    side = min_tile if short < min_tile else min(short, max(_MAX_TILE, min_tile))
    scale = side / short
    return max(1, round(height * scale)), max(1, round(width * scale))


def _resized(picture: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    """``picture: [C, h, w]`` -> ``[C, *size]``."""
    if tuple(picture.shape[-2:]) == size:
        return picture
    options = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(picture[None].float(), size=size, mode=mode, **options)[0]


def _scaled(values: Tensor) -> Tensor:
    """``values: [h, w]`` >= 0 divided by their maximum."""
    return values / values.max().clamp_min(1e-12)


def _wrapped(draw: Any, text: str, font: Any, width: int) -> str:
    """``text`` broken at spaces into lines no wider than ``width`` pixels (where it can be)."""
    lines: list[str] = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and draw.textlength(candidate, font=font) <= width:
            lines[-1] = candidate
        else:
            lines.append(word)
    return "\n".join(lines)


def prompt_mask_figure(
    image: Tensor,
    layer_masks: Sequence[PromptMasks],
    teacher_bands: Sequence[Tensor] | None = None,
    row_names: Sequence[str] | None = None,
    title: str = "FreeKD prompt masks",
    image_index: int = 0,
    min_tile: int = MIN_TILE,
) -> MaskFigure:
    """The labelled figure of the masks of one image (see the module docstring for the columns).

    Args:
        image: the input image ``[3, H, W]`` (any range: stretched for display).
        layer_masks: per distilled layer, ``(low_masks: [N, T, 1, h, w] or None,
            high_masks[j]: [N, T, k, h_j, w_j])`` as returned by ``FrequencyPrompt.masks``.
        teacher_bands: per layer, the teacher's finest detail band ``[N, C, 3, h_1, w_1]``
            (the ``teacher |level 1|`` column; left out when ``None``).
        row_names: a title per layer (default ``layer 0``, ...).
        title: drawn above the figure.
        image_index: which image of the batch the masks belong to.
        min_tile: smallest tile side in pixels.
    """
    from PIL import Image, ImageDraw

    if not layer_masks:
        raise ValueError("prompt_mask_figure needs the masks of at least one layer")
    if row_names is not None and len(row_names) != len(layer_masks):
        raise ValueError(f"{len(row_names)} row names for {len(layer_masks)} layers")
    if teacher_bands is not None and len(teacher_bands) != len(layer_masks):
        raise ValueError(f"{len(teacher_bands)} teacher bands for {len(layer_masks)} layers")
    base = _to_display(image)
    tile = _tile_size(*base.shape[-2:], min_tile)
    shown_image = _resized(base, tile, "bilinear").clamp(0, 1)

    # Columns: the most any layer has (layers may have different levels or tokens).
    def layer_tiles(index: int) -> list[tuple[str, Tensor]]:
        low_masks, high_masks = layer_masks[index]
        tiles = [("image", shown_image)]
        if teacher_bands is not None:
            band = teacher_bands[index][image_index].detach().float().abs().mean(dim=(0, 1))
            tiles.append(("teacher |level 1|", colorize(_scaled(band.cpu()))))
        if low_masks is not None:
            tiles.append(
                ("mask: low band", colorize(low_masks[image_index].mean(dim=(0, 1)).cpu()))
            )
        for level, masks in enumerate(high_masks, start=1):
            tiles.append(
                (f"mask: level {level}", colorize(masks[image_index].mean(dim=(0, 1)).cpu()))
            )
        finest = high_masks[0][image_index]  # [T, k, h, w]
        for token in range(finest.shape[0]):
            tiles.append((f"level 1, token {token + 1}", colorize(finest[token].mean(dim=0).cpu())))
        overlay = _overlay(shown_image, high_masks[0][image_index].mean(dim=(0, 1)).cpu())
        tiles.append(("overlay: level 1", overlay))
        return [(name, _resized(picture.float(), tile, "nearest")) for name, picture in tiles]

    grid = [layer_tiles(index) for index in range(len(layer_masks))]
    columns: list[str] = []
    for row in grid:
        for name, _ in row:
            if name not in columns:
                columns.append(name)
    rows = list(row_names) if row_names is not None else [f"layer {i}" for i in range(len(grid))]
    for index, masks in enumerate(layer_masks):  # the feature grid of each layer
        finest = masks[1][0]
        rows[index] += f"\nlevel 1 band: {finest.shape[-2]}x{finest.shape[-1]}"

    title_font, label_font, small_font = _font(16), _font(12), _font(11)
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    headers = [_wrapped(scratch, name, label_font, tile[1]) for name in columns]
    header_height = max(
        scratch.multiline_textbbox((0, 0), text, font=label_font)[3] for text in headers
    )
    label_width = max(scratch.multiline_textbbox((0, 0), text, font=label_font)[2] for text in rows)
    title_height = scratch.textbbox((0, 0), title, font=title_font)[3]
    note = (
        "masks: sigmoid of token x teacher band, mean over tokens (and orientations), on each "
        "band's grid; teacher |level 1|: mean |coefficient| over channels, scaled to its maximum"
    )
    note = _wrapped(scratch, note, small_font, len(columns) * (tile[1] + _GAP) + label_width)
    note_height = scratch.multiline_textbbox((0, 0), note, font=small_font)[3]
    colorbar_label = "mask value"
    tick_width = _COLORBAR_WIDTH + 5 + scratch.textlength("0.5", font=small_font)
    label_space = max(tick_width, scratch.textlength(colorbar_label, font=small_font))
    colorbar_space = _GAP * 2 + int(label_space) + _MARGIN

    left = _MARGIN + label_width + _GAP * 2
    top = _MARGIN + title_height + _GAP * 2 + header_height + _GAP
    grid_width = len(columns) * tile[1] + (len(columns) - 1) * _GAP
    grid_height = len(grid) * tile[0] + (len(grid) - 1) * _GAP
    width = left + grid_width + colorbar_space
    height = top + grid_height + _GAP * 2 + note_height + _MARGIN
    canvas = Image.new("RGB", (int(width), int(height)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((_MARGIN, _MARGIN), title, fill="black", font=title_font)

    boxes = []
    for column, text in enumerate(headers):
        x = left + column * (tile[1] + _GAP)
        y = top - _GAP - header_height
        draw.multiline_text((x, y), text, fill="black", font=label_font)
        boxes.append((x, y, x + tile[1], top - _GAP))
    for row_index, row in enumerate(grid):
        y = top + row_index * (tile[0] + _GAP)
        draw.multiline_text((_MARGIN, y), rows[row_index], fill="black", font=label_font)
        for name, picture in row:
            x = left + columns.index(name) * (tile[1] + _GAP)
            canvas.paste(Image.fromarray(_to_array(picture)), (x, y))

    # Color bar over the height of the grid: 1 at the top, 0 at the bottom.
    bar_left = left + grid_width + _GAP * 2
    ramp = torch.linspace(1, 0, grid_height)[:, None].expand(grid_height, _COLORBAR_WIDTH)
    canvas.paste(Image.fromarray(_to_array(colorize(ramp))), (bar_left, top))
    draw.rectangle(
        (bar_left, top, bar_left + _COLORBAR_WIDTH - 1, top + grid_height - 1), outline="black"
    )
    for value in (1.0, 0.5, 0.0):
        y = top + (1 - value) * (grid_height - 1)
        draw.line((bar_left + _COLORBAR_WIDTH, y, bar_left + _COLORBAR_WIDTH + 3, y), "black")
        anchor = "lt" if value == 1.0 else "lb" if value == 0.0 else "lm"
        draw.text(
            (bar_left + _COLORBAR_WIDTH + 5, y), f"{value:g}", "black", small_font, anchor=anchor
        )
    draw.text((bar_left, top - _GAP), colorbar_label, fill="black", font=small_font, anchor="lb")
    draw.multiline_text(
        (_MARGIN, top + grid_height + _GAP * 2), note, fill=(80, 80, 80), font=small_font
    )
    return MaskFigure(
        canvas, title, columns, [r.replace("\n", " ") for r in rows], tile, boxes, colorbar_label
    )


def _row_names(taps: Sequence[str], count: int) -> list[str]:
    """One name per tapped feature: the taps, or ``tap[i]`` when one tap yields ``count``
    features (a feature pyramid's dict), else ``layer i``."""
    if len(taps) == count:
        return list(taps)
    if len(taps) == 1:
        return [f"{taps[0]}[{index}]" for index in range(count)]
    return [f"layer {index}" for index in range(count)]


@torch.no_grad()
def render_prompt_masks(
    teacher: nn.Module,
    taps: Sequence[str],
    loss: FreeKDLoss,
    image: Tensor,
    path: str | os.PathLike,
    model_input: object | None = None,
    title: str | None = None,
) -> Path:
    """Run ``teacher`` on one ``image: [3, H, W]`` and write the labelled figure of the masks of
    its tapped features (:func:`prompt_mask_figure`; rows named by the taps) as a PNG.

    ``model_input`` is what the teacher is called with (default ``image[None]``; a detector takes
    ``[image]``). Returns the PNG path.
    """
    return draw_prompt_masks(teacher, taps, loss, image, model_input, title).save(path)


@torch.no_grad()
def draw_prompt_masks(
    teacher: nn.Module,
    taps: Sequence[str],
    loss: FreeKDLoss,
    image: Tensor,
    model_input: object | None = None,
    title: str | None = None,
) -> MaskFigure:
    """:func:`render_prompt_masks` without writing: the :class:`MaskFigure`."""
    was_training = teacher.training
    teacher.eval()
    try:
        with FeatureTaps(teacher, taps, stop_after_capture=True) as tapped:
            tapped.run(teacher, image[None] if model_input is None else model_input)
            features = tapped.features
    finally:
        teacher.train(was_training)
    if len(features) != len(loss.prompts):
        raise ValueError(
            f"taps {list(taps)} yield {len(features)} features, the loss has prompts for "
            f"{len(loss.prompts)}"
        )
    bands = [
        dwt2(feature.float(), prompt.levels, loss.wavelet)
        for prompt, feature in zip(loss.prompts, features, strict=True)
    ]
    layer_masks = [
        prompt.masks(band, include_low=True)
        for prompt, band in zip(loss.prompts, bands, strict=True)
    ]
    tokens = loss.prompts[0].tokens.shape[-2]
    return prompt_mask_figure(
        image,
        layer_masks,
        teacher_bands=[highs[0] for _, highs in bands],
        row_names=_row_names(taps, len(features)),
        title=title or f"FreeKD prompt masks (T = {tokens} tokens per band) of the teacher",
    )


__getattr__ = renamed(__name__, {"colourise": "colorize"}, globals())
