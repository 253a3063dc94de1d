"""Helpers shared by the model builders: weight sources, checkpoint loading, downloads,
eval-mode calls."""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import urllib.error
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoints import LoadReport, checkpoint_origin, load_weights, read_state_dict
from ..frozen import eval_mode, model_device

__all__ = [
    "WeightsUnavailableError",
    "downloads",
    "eval_mode",
    "is_checkpoint_path",
    "load_checkpoint",
    "model_device",
]

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".tar")


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
    model: nn.Module,
    path: str | os.PathLike,
    prefix: str | None = None,
    prefixes: Sequence[str] = (),
) -> LoadReport:
    """Load a local checkpoint into ``model`` with :func:`freekd.checkpoints.load_weights`.

    ``prefixes``: key prefixes to try in order when ``prefix`` is ``None`` (the first one that
    some key starts with is removed; e.g. ``distiller.student.`` of a distillation run's
    ``.ckpt``); with none of them, the prefix is found automatically. BatchNorm's
    ``num_batches_tracked`` counters are dropped from the checkpoint when the model has none (a
    model trained with ``BatchNorm2d`` loaded into one built with ``FrozenBatchNorm2d``, as
    pretrained detectors are): they are step counters, not weights. A checkpoint that does not
    fit raises ``ValueError`` naming the file and what it holds (from its metadata).
    """
    state = read_state_dict(path)
    if prefix is None:
        prefix = next((p for p in prefixes if any(key.startswith(p) for key in state)), None)
    if not any(key.endswith("num_batches_tracked") for key in model.state_dict()):
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    try:
        return load_weights(model, state, prefix=prefix)
    except ValueError as error:
        origin = checkpoint_origin(path)
        holds = f" (it holds {origin})" if origin else ""
        raise ValueError(f"{path}{holds}: {error}") from None


_NETWORK_ERRORS = (
    urllib.error.URLError,
    http.client.HTTPException,
    ConnectionError,
    TimeoutError,
    socket.timeout,
)
_NETWORK_MODULES = ("huggingface_hub", "requests", "urllib3", "httpx")


def _is_network_error(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is a failed download."""
    while error is not None:
        if isinstance(error, _NETWORK_ERRORS):
            return True
        if type(error).__module__.split(".")[0] in _NETWORK_MODULES:
            return True
        error = error.__cause__ or error.__context__
    return False


class WeightsUnavailableError(ValueError):
    """Pretrained weights named by a builder argument could not be downloaded (offline, or the
    server failed); ``setting`` is the argument (``weights_backbone``, ``encoder_weights``)."""

    def __init__(self, setting: str, value: Any, reason: str, cache_file: Path | None) -> None:
        self.setting, self.value, self.reason, self.cache_file = setting, value, reason, cache_file
        where = (
            f"copy {cache_file.name} into {cache_file.parent} (torchvision then reads it there "
            f"without a download)"
            if cache_file is not None
            else "pass a local checkpoint file"
        )
        super().__init__(
            f"{setting}={str(value)!r}: the pretrained weights could not be downloaded ({reason}); "
            f"offline, {where}, or set {setting} to null (random initial weights)"
        )

    def named(self, setting: str) -> WeightsUnavailableError:
        """The same error, naming the setting as the caller knows it (``student.args.X``)."""
        return WeightsUnavailableError(setting, self.value, self.reason, self.cache_file)


@contextlib.contextmanager
def downloads(setting: str, value: Any, weights: Any = None) -> Iterator[None]:
    """Turn a failed download of pretrained weights inside the block into a
    :class:`WeightsUnavailableError` naming ``setting`` (the builder argument) and the offline
    fixes; ``weights``: the torchvision ``WeightsEnum`` member, for the cache file's name."""
    try:
        yield
    except Exception as error:
        if not _is_network_error(error):
            raise
        cache_file = None
        url = getattr(weights, "url", None)
        if isinstance(url, str):
            cache_file = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
        reason = " ".join(str(error).split())[:160] or type(error).__name__
        raise WeightsUnavailableError(setting, value, reason, cache_file) from None
