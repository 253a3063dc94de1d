"""Pictures of what the prompts learned: the frequency masks over an input image.

``prompt_mask_grid(image, layer_masks)`` draws one row per distilled layer: the input image, then
for the low band and each level ``j`` the mask averaged over the ``T`` tokens (and orientations),
then each token's mask of the finest level, every map upsampled to the image and blended over it
with a color map. ``render_prompt_masks(teacher, taps, loss, image, path)`` runs the teacher on
one image, computes the masks from its tapped features and writes the picture (PNG).

Only PIL (a torchvision dependency) is used for drawing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._deprecation import renamed
from .losses.freekd import FreeKDLoss
from .prompts import PromptMasks
from .taps import FeatureTaps
from .wavelets import dwt2

__all__ = ["colorize", "prompt_mask_grid", "render_prompt_masks"]

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
    """The picture as a tensor ``[3, rows * H, cols * W]`` in ``[0, 1]``.

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
    array = (picture.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).contiguous().numpy()
    Image.fromarray(array).save(path)
    return path


@torch.no_grad()
def render_prompt_masks(
    teacher: nn.Module,
    taps: Sequence[str],
    loss: FreeKDLoss,
    image: Tensor,
    path: str | os.PathLike,
    model_input: object | None = None,
) -> Path:
    """Run ``teacher`` on one ``image: [3, H, W]`` and draw the masks of its tapped features.

    ``model_input`` is what the teacher is called with (default ``image[None]``; a detector takes
    ``[image]``). Rows: layers; columns: input, low band, levels 1..J (mean over tokens), then the
    tokens of level 1. Returns the PNG path.
    """
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
    layer_masks = [
        prompt.masks(dwt2(feature.float(), prompt.levels, loss.wavelet), include_low=True)
        for prompt, feature in zip(loss.prompts, features, strict=True)
    ]
    return save_image(prompt_mask_grid(image, layer_masks), path)


__getattr__ = renamed(__name__, {"colourise": "colorize"}, globals())
