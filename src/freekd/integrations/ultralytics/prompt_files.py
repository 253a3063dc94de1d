"""Prompt files for YOLO models: freekd's prompt file (``freekd.prompt_io``) plus the taps.

Stage 1 writes the usual safetensors prompt file (tokens, and the configuration they were made
with) and adds to its metadata what stage 2 needs to rebuild the same loss on the same layers:
``taps`` (the teacher's ``Detect.f`` layers), ``preset`` (the FreeKD preset the loss was built
from) and ``imgsz`` (the image size the levels were chosen for). :func:`build_loss_from_file`
rebuilds the loss and loads the tokens, checking the file's configuration as
:meth:`freekd.FreeKDLoss.load_prompts` does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..._io import save_safetensors
from ...losses.freekd import FreeKDLoss
from ...prompt_io import read_prompt_file
from ...tuning import PromptTuner

__all__ = ["build_loss_from_file", "read_yolo_prompt_settings", "save_yolo_prompts"]

_LOSS_KEYS = ("num_prompts", "granularity", "levels", "wavelet", "mask_logits", "dissimilarity")
"""Settings of a prompt file that the loss must be built with (besides the channels)."""


def save_yolo_prompts(
    tuner: PromptTuner, path: str | os.PathLike, extra: Mapping[str, Any]
) -> Path:
    """Save the tuner's prompts (:meth:`freekd.PromptTuner.save_prompts`) with ``extra``
    (JSON-serializable values: taps, preset, imgsz, ...) added to the metadata; atomic."""
    path = Path(path)
    tuner.save_prompts(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    metadata.update({key: json.dumps(value) for key, value in extra.items()})
    return save_safetensors(tensors, path, metadata)


def read_yolo_prompt_settings(path: str | os.PathLike) -> dict[str, Any]:
    """The decoded configuration of a prompt file (``channels``, ``num_prompts``, ``levels``,
    ..., and ``taps`` / ``preset`` / ``imgsz`` when stage 1 of this adapter wrote it).

    Raises:
        FileNotFoundError, ValueError: a missing or foreign file (from ``freekd.prompt_io``).
    """
    _, config = read_prompt_file(path)
    return config


def build_loss_from_file(
    path: str | os.PathLike,
    taps: Sequence[str],
    channels: Sequence[int],
    overrides: Mapping[str, Any] | None = None,
) -> FreeKDLoss:
    """The FreeKD loss a prompt file was tuned for, holding its tokens.

    Args:
        path: a prompt file from :func:`~freekd.integrations.ultralytics.tune_prompts` (or any
            freekd prompt file; without recorded taps and preset, ``"recommended"`` is assumed).
        taps: the teacher's distilled layers (``Detect.f``), checked against the file's.
        channels: the teacher's channels at those layers, checked against the file's.
        overrides: stage-2 settings of the loss to change (e.g. ``{"relational": "off"}``);
            settings the tokens depend on cannot be changed (loading refuses them).

    Raises:
        ValueError: the file was tuned on other layers or channels (both named, with the fix).
    """
    config = read_yolo_prompt_settings(path)
    saved_taps = config.get("taps")
    if saved_taps is not None and list(saved_taps) != list(taps):
        raise ValueError(
            f"prompts in {str(path)!r} were tuned on the layers {saved_taps}, the teacher's "
            f"Detect head reads {list(taps)}: tune prompts for this teacher (tune_prompts)"
        )
    if list(config["channels"]) != list(channels):
        raise ValueError(
            f"prompts in {str(path)!r} were tuned for channels {config['channels']}, the "
            f"teacher's distilled layers have {list(channels)}: tune prompts for this teacher"
        )
    settings = {key: config[key] for key in _LOSS_KEYS if key in config}
    preset = str(config.get("preset", "recommended"))
    loss = FreeKDLoss.preset(preset, list(channels), **{**settings, **dict(overrides or {})})
    loss.load_prompts(path)
    return loss
