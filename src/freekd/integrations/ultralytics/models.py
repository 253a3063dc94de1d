"""Ultralytics detection models as FreeKD sees them: loading a teacher, and the distilled layers.

FreeKD distills the neck features that a YOLO ``Detect`` head reads: the layers listed in its
``f`` attribute (e.g. ``[15, 18, 21]`` for YOLOv8, ``[16, 19, 22]`` for YOLO11 / YOLO26), the
strides 8, 16 and 32, fine to coarse. :func:`detect_taps` names them as
:mod:`freekd.taps` paths (``"model.15"``), read from the model itself, so any model size and any
YAML works without a table of channel counts.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from ultralytics.nn.modules.head import Detect
from ultralytics.nn.tasks import DetectionModel, load_checkpoint

from ...taps import probe_features

__all__ = ["ModelSource", "detect_head", "detect_taps", "load_detection_model", "tap_shapes"]

ModelSource = str | os.PathLike | nn.Module | Any
"""A ``.pt`` checkpoint path, an ``ultralytics.YOLO`` object or a ``DetectionModel``."""


def detect_head(model: nn.Module) -> Detect:
    """The ``Detect`` head of an Ultralytics detection model (its last layer).

    Raises:
        ValueError: the model has no ``Detect`` head as its last layer (named, with the fix).
    """
    layers = getattr(model, "model", None)
    head = layers[-1] if isinstance(layers, nn.Sequential) and len(layers) else None
    if not isinstance(head, Detect):
        found = type(head).__name__ if head is not None else type(model).__name__
        raise ValueError(
            f"expected an Ultralytics detection model whose last layer is a Detect head, got "
            f"{found}: pass a YOLO detection model (e.g. built from yolov8n.yaml or a detect "
            f"checkpoint)"
        )
    return head


def detect_taps(model: nn.Module) -> list[str]:
    """The layers the ``Detect`` head reads, as tap paths, fine to coarse.

    Example:
        >>> from ultralytics.nn.tasks import DetectionModel
        >>> detect_taps(DetectionModel("yolov8n.yaml", verbose=False))
        ['model.15', 'model.18', 'model.21']
    """
    sources = detect_head(model).f
    sources = [sources] if isinstance(sources, int) else list(sources)
    return [f"model.{index}" for index in sources]


def tap_shapes(model: nn.Module, imgsz: int, channels: int = 3) -> list[torch.Size]:
    """The shapes ``[1, C_i, H_i, W_i]`` of the tapped features for a square ``imgsz`` image
    (one dry run, see :func:`freekd.probe_features`)."""
    device = next(model.parameters()).device
    images = torch.zeros(1, channels, imgsz, imgsz, device=device)
    return probe_features(model, detect_taps(model), images)


def load_detection_model(source: ModelSource, role: str = "teacher") -> DetectionModel:
    """A float32 Ultralytics detection model from a checkpoint path, a ``YOLO`` object or a
    model; objects are copied, so the caller's model is left as it was.

    Args:
        source: a ``.pt`` file written by Ultralytics (e.g. ``runs/detect/train/weights/best.pt``),
            an ``ultralytics.YOLO`` object, or a ``DetectionModel``.
        role: what the model is, for the error messages (``"teacher"``).

    Raises:
        FileNotFoundError: the checkpoint path does not exist.
        ValueError: a model YAML (untrained), or something that is not a detection model.
    """
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if path.suffix in (".yaml", ".yml"):
            raise ValueError(
                f"{role} {str(path)!r} is a model YAML, i.e. an untrained model: pass the trained "
                f"weights (a .pt file, e.g. runs/detect/train/weights/best.pt)"
            )
        if not path.is_file():
            raise FileNotFoundError(
                f"{role} checkpoint {str(path)!r} does not exist: train the {role} first or fix "
                f"the path"
            )
        model, _ = load_checkpoint(path)
    else:
        inner = getattr(source, "model", None)  # a YOLO object holds its DetectionModel there
        is_wrapper = isinstance(inner, nn.Module) and not isinstance(inner, nn.Sequential)
        model = inner if is_wrapper else source
        if not isinstance(model, nn.Module):
            raise ValueError(
                f"{role} must be a .pt path, an ultralytics.YOLO object or a DetectionModel, got "
                f"{type(source).__name__}"
            )
        model = copy.deepcopy(model)
    detect_head(model)
    return model.float()
