"""Evaluation of teachers and students: COCO box mAP, semantic-segmentation mIoU, and their
robustness to common image corruptions.

Scores are in percent, as papers print them. ``evaluate(task, model, data_loader, ...)``
dispatches to :func:`evaluate_detection` or :func:`evaluate_segmentation` (what
``freekd evaluate`` calls); :func:`evaluate_robustness` repeats it on corrupted images
(:func:`corrupt`, ``freekd evaluate --corruptions``) and reports the clean score, mPC and rPC.
Needs pycocotools (detection) and the model builders' packages.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from .corruptions import CORRUPTIONS, EXTRA_CORRUPTIONS, SEVERITIES, corrupt
from .detection import DETECTION_METRICS, COCOEvaluator, evaluate_detection
from .robustness import evaluate_robustness
from .segmentation import ConfusionMatrix, evaluate_segmentation, segmentation_scores

__all__ = [
    "CORRUPTIONS",
    "DETECTION_METRICS",
    "EXTRA_CORRUPTIONS",
    "SEVERITIES",
    "COCOEvaluator",
    "ConfusionMatrix",
    "corrupt",
    "evaluate",
    "evaluate_detection",
    "evaluate_robustness",
    "evaluate_segmentation",
    "segmentation_scores",
]


def evaluate(task: str, model: nn.Module, data_loader: Iterable[Any], **kwargs: Any) -> dict:
    """``evaluate_detection(model, data_loader, **kwargs)`` for ``task="detection"``,
    ``evaluate_segmentation(model, data_loader, **kwargs)`` (``num_classes=`` required) for
    ``task="segmentation"``."""
    if task == "detection":
        return evaluate_detection(model, data_loader, **kwargs)
    if task == "segmentation":
        return evaluate_segmentation(model, data_loader, **kwargs)
    raise ValueError(f"unknown task {task!r}; choose 'detection' or 'segmentation'")
