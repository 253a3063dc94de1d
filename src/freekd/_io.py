"""Atomic file writes: a temporary file in the target folder, then a rename."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["atomic_write", "save_safetensors"]


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(temporary_path)`` and rename the result to ``path``; on any failure the
    previous file at ``path`` (if any) is left intact and the temporary file removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]
) -> Path:
    """Write ``tensors`` (copied to CPU, unshared) and string ``metadata`` atomically."""
    import safetensors.torch

    plain = {key: value.detach().to("cpu").contiguous().clone() for key, value in tensors.items()}
    return atomic_write(
        path, lambda tmp: safetensors.torch.save_file(plain, tmp, metadata=metadata)
    )
