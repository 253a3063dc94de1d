"""Reading and writing images and label masks (PIL), with errors that name the file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

__all__ = ["load_image", "load_mask", "save_image", "save_mask", "to_uint8_image"]


def load_image(path: str | os.PathLike, what: str = "image") -> torch.Tensor:
    """Read an image file as ``FloatTensor [3, H, W]`` in ``[0, 1]`` (grey and RGBA become RGB).

    Raises ``FileNotFoundError`` when the file is missing and ``ValueError`` when PIL cannot
    decode it; both name the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        with Image.open(path) as opened:
            array = np.asarray(opened.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(
            f"cannot read {what} {path}: {error}; the file is not a readable image "
            "(re-export it as PNG or JPEG)"
        ) from error
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def load_mask(path: str | os.PathLike) -> torch.Tensor:
    """Read a label mask (one channel: PIL mode ``L``, ``P``, ``I`` or ``I;16``; the pixel
    values are the class ids, palette indices for ``P``) as ``Int64Tensor [H, W]``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask file not found: {path}")
    try:
        with Image.open(path) as opened:
            mode = opened.mode
            if mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
                raise ValueError(
                    f"mask {path} has PIL mode {mode!r} ({len(opened.getbands())} channels); "
                    "masks must be single-channel PNGs (mode L or P) whose pixel values are the "
                    "class ids: convert color-coded masks to class ids first"
                )
            array = np.array(opened)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(
            f"cannot read mask {path}: {error}; the file is not a readable PNG"
        ) from error
    return torch.from_numpy(array.astype(np.int64))


def to_uint8_image(image: torch.Tensor, what: str = "image") -> np.ndarray:
    """``FloatTensor [3, H, W]`` in ``[0, 1]`` -> ``uint8 [H, W, 3]`` (rounded).

    Raises ``ValueError`` for other shapes or for values clearly outside ``[0, 1]`` (a normalized
    image): pass the dataset without its ``Normalize`` transform.
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"{what} must be a [3, H, W] tensor, got shape {tuple(image.shape)}")
    low, high = float(image.min()), float(image.max())
    if low < -1e-3 or high > 1 + 1e-3:
        raise ValueError(
            f"{what} values lie in [{low:.3f}, {high:.3f}], not [0, 1]: it looks normalized; "
            "write the dataset without its Normalize transform"
        )
    array = image.detach().cpu().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return array.permute(1, 2, 0).numpy()


def save_image(image: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write ``FloatTensor [3, H, W]`` in ``[0, 1]`` as an 8-bit RGB file (format from the
    suffix: ``.png``, ``.jpg``)."""
    path = Path(path)
    array = to_uint8_image(image, what=f"image for {path.name}")
    options = {"quality": 95} if path.suffix.lower() in (".jpg", ".jpeg") else {}
    Image.fromarray(array).save(path, **options)
    return path


def save_mask(mask: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write ``Int64Tensor [H, W]`` with values in ``0..255`` as a mode-``L`` PNG."""
    path = Path(path)
    if mask.ndim != 2:
        raise ValueError(f"mask for {path.name} must be [H, W], got shape {tuple(mask.shape)}")
    if mask.numel() and (int(mask.min()) < 0 or int(mask.max()) > 255):
        raise ValueError(
            f"mask for {path.name} has values outside 0..255 "
            f"({int(mask.min())}..{int(mask.max())}); an 8-bit PNG cannot store them"
        )
    Image.fromarray(mask.detach().cpu().numpy().astype(np.uint8)).save(path)
    return path
