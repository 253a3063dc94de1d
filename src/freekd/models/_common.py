"""Helpers shared by the model builders: weight sources, checkpoint loading, eval-mode calls."""

from __future__ import annotations

import contextlib
import difflib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from ..checkpoints import LoadReport, load_weights, read_state_dict

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".tar")


def check_name(kind: str, value: object, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``, else a ``ValueError`` naming the valid ones."""
    if isinstance(value, str) and value in choices:
        return value
    close = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    options = ", ".join(repr(c) for c in choices)
    raise ValueError(f"unknown {kind} {value!r}{hint}; choose one of {options}")


def check_num_classes(num_classes: object) -> int:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    return num_classes


def is_checkpoint_path(value: object) -> bool:
    """Whether a ``weights=`` value names a local file rather than a registered weights name.

    Paths (``os.PathLike``), strings with a path separator or a checkpoint suffix, and strings
    naming an existing file count as paths; anything else (``"DEFAULT"``, ``"COCO_V1"``) is a name.
    """
    if isinstance(value, os.PathLike):
        return True
    if not isinstance(value, str):
        return False
    return (
        "/" in value
        or os.sep in value
        or value.lower().endswith(_CHECKPOINT_SUFFIXES)
        or Path(value).is_file()
    )


def load_checkpoint(
    model: nn.Module, path: str | os.PathLike, prefix: str | None = None
) -> LoadReport:
    """Load a local checkpoint into ``model`` with :func:`freekd.checkpoints.load_weights`.

    BatchNorm's ``num_batches_tracked`` counters are dropped from the checkpoint when the model
    has none (a model trained with ``BatchNorm2d`` loaded into one built with
    ``FrozenBatchNorm2d``, as pretrained detectors are): they are step counters, not weights.
    """
    state = read_state_dict(path)
    if not any(key.endswith("num_batches_tracked") for key in model.state_dict()):
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    return load_weights(model, state, prefix=prefix)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule of ``model`` in eval mode, then restore each one's own flag.

    Restoring per module (not ``model.train(previous)``) keeps frozen norm layers of a model
    that is otherwise in train mode (a teacher) in eval mode.
    """
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter or buffer (CPU for a model with neither)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")
