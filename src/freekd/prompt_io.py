"""Save and load tuned prompts as safetensors, with the configuration that made them.

The file holds one tensor per distilled layer, ``prompts.{i}.tokens: [G, T, C]``, and in its
metadata the settings the tokens only make sense with: channels, ``T``, granularity, levels (one
integer, or one per layer when they differ), wavelet, mask logits (and, for information, the
dissimilarity, the stage-1 re-synthesis when known, and the freekd version). Loading checks them
against the loss the prompts go into and refuses a mismatch, naming both values. Files written
before ``mask_logits`` existed load as ``"raw"`` (the only logits then). Writing is atomic
(temporary file in the same folder, then rename), so an interrupted save never leaves a broken file.
A safetensors file holds only tensors and strings: loading it never runs code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ._io import save_safetensors
from ._version import __version__

if TYPE_CHECKING:
    from .losses.freekd import FreeKDLoss

__all__ = ["copy_prompts", "load_prompts", "prompt_config", "read_prompt_file", "save_prompts"]

FORMAT = "freekd-prompts/1"
_CHECKED = ("channels", "num_prompts", "granularity", "levels", "wavelet", "mask_logits")
_DEFAULTS = {"mask_logits": "raw"}  # the value of a setting a file written before it lacks


def prompt_config(loss: FreeKDLoss) -> dict[str, object]:
    """The settings that prompt tokens depend on, as saved in the metadata (``levels``: an int
    when every layer has the same, else one per layer)."""
    return {
        "channels": list(loss.channels),
        "num_prompts": loss.num_prompts,
        "granularity": loss.granularity,
        "levels": loss.levels,
        "wavelet": loss.wavelet,
        "mask_logits": loss.mask_logits,
    }


def _comparable(key: str, value: object, layers: int) -> object:
    """A saved or expected setting in one form for comparison: ``levels`` as one per layer."""
    if key == "levels" and isinstance(value, int) and not isinstance(value, bool):
        return [value] * layers
    return value


def save_prompts(loss: FreeKDLoss, path: str | os.PathLike, resynthesis: str | None = None) -> Path:
    """Write ``loss``'s prompt tokens and configuration to ``path`` (atomically);
    ``resynthesis`` (the stage-1 re-synthesis, when known) is recorded for information."""
    tensors = {
        f"prompts.{i}.tokens": prompt.tokens.float() for i, prompt in enumerate(loss.prompts)
    }
    metadata = {key: json.dumps(value) for key, value in prompt_config(loss).items()}
    metadata.update(
        format=FORMAT,
        dissimilarity=json.dumps(loss.dissimilarity),
        tuned=json.dumps(all(bool(p.tuned) for p in loss.prompts)),
        freekd_version=__version__,
    )
    if resynthesis is not None:
        metadata["resynthesis"] = json.dumps(resynthesis)
    return save_safetensors(tensors, path, metadata)


def _differences(
    source: dict[str, object], expected: dict[str, object], layers: int, source_name: str
) -> list[str]:
    """``"key: <source_name> a, loss b"`` for each setting of :data:`_CHECKED` that differs."""
    return [
        f"{key}: {source_name} {source[key]!r}, loss {expected[key]!r}"
        for key in _CHECKED
        if _comparable(key, source[key], layers) != _comparable(key, expected[key], layers)
    ]


def copy_prompts(source: FreeKDLoss, target: FreeKDLoss) -> None:
    """Copy ``source``'s prompt tokens and their tuned flags into ``target`` (in memory, no file),
    after checking that both were built for the same channels, ``T``, granularity, levels,
    wavelet and mask logits.

    Raises:
        ValueError: naming each setting that differs.
    """
    differences = _differences(
        prompt_config(source), prompt_config(target), len(target.channels), "source"
    )
    if differences:
        raise ValueError(
            "cannot copy prompts made for another configuration ("
            + "; ".join(differences)
            + "): build the loss with the source's settings (FreeKDLoss.preset(..., "
            "**overrides)) or tune prompts for this one"
        )
    with torch.no_grad():
        for mine, theirs in zip(target.prompts, source.prompts, strict=True):
            mine.tokens.copy_(theirs.tokens)
            mine.tuned.copy_(theirs.tuned)
    target.reset_tuned_check()


def read_prompt_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Tensors and decoded configuration of a prompt file; clear errors for a missing or foreign
    file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"prompt file {str(path)!r} does not exist: tune prompts (stage 1) or fix the path"
        )
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except Exception as error:  # safetensors raises its own error types
        raise ValueError(
            f"{str(path)!r} is not a readable safetensors prompt file ({error}): save it "
            f"again with FreeKDLoss.save_prompts, or tune the prompts again"
        ) from None
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"{str(path)!r} is not a freekd prompt file (metadata format "
            f"{metadata.get('format')!r}, expected {FORMAT!r}); official checkpoints load with "
            f"FreeKDLoss.from_official"
        )
    config = {
        key: json.loads(value)
        for key, value in metadata.items()
        if key != "format" and key != "freekd_version"
    }
    return tensors, config


def load_prompts(loss: FreeKDLoss, path: str | os.PathLike) -> None:
    """Load the prompts saved at ``path`` into ``loss``, after checking that the file was made
    for the same channels, ``T``, granularity, levels, wavelet and mask logits. Marks them tuned
    when the file says they were."""
    tensors, config = read_prompt_file(path)
    saved = {key: config.get(key, _DEFAULTS.get(key)) for key in _CHECKED}
    differences = _differences(saved, prompt_config(loss), len(loss.channels), "file")
    if differences:
        raise ValueError(
            f"prompts in {str(path)!r} were made for another configuration ("
            + "; ".join(differences)
            + "): build the loss with the file's settings or tune prompts for this one"
        )
    with torch.no_grad():
        for i, prompt in enumerate(loss.prompts):
            key = f"prompts.{i}.tokens"
            if key not in tensors or tensors[key].shape != prompt.tokens.shape:
                found = tuple(tensors[key].shape) if key in tensors else "nothing"
                raise ValueError(
                    f"{str(path)!r}: {key} should be {tuple(prompt.tokens.shape)}, found {found}"
                )
            prompt.tokens.copy_(tensors[key])
            prompt.mark_tuned(bool(config.get("tuned", False)))
    loss.reset_tuned_check()
