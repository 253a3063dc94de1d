"""Semantic-segmentation metrics: mIoU, mean class accuracy and pixel accuracy from a confusion
matrix accumulated on the fly (``torch.bincount``).

Convention (mmsegmentation's): pixels whose ground truth is ``ignore_index`` are left out; the IoU
of class ``c`` is ``TP / (TP + FP + FN)``; a class with an empty union (absent from both the
ground truth and the predictions of the whole set) has IoU ``NaN`` and is skipped by the mean, so
mIoU averages the classes present in the ground truth or the predictions. Pixel accuracy is
``sum TP / valid pixels``; class accuracy ``TP / (TP + FN)`` (``NaN`` for classes absent from the
ground truth). All scores are in **percent** (``mIoU = 72.5``), as papers print them. Per-class
scores are keyed by the class names (the data set's ``class_names``, else ``class_0``, ...);
:func:`format_class_table` prints them with a header.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..models._common import eval_mode, model_device
from ..models.segmentation import IGNORE_INDEX, segmentation_predict, split_segmentation_batch

__all__ = [
    "ConfusionMatrix",
    "class_names_or_default",
    "evaluate_segmentation",
    "format_class_table",
    "segmentation_scores",
]


def class_names_or_default(num_classes: int, class_names: Sequence[str] | None) -> list[str]:
    """``class_names`` as a list (checked to hold ``num_classes`` names), or ``class_0``, ...
    when ``None``."""
    if class_names is None:
        return [f"class_{index}" for index in range(num_classes)]
    names = [str(name) for name in class_names]
    if len(names) != num_classes:
        raise ValueError(
            f"class_names holds {len(names)} names for {num_classes} classes: give one name per "
            f"class, in class-id order, or none"
        )
    if len(set(names)) != len(names):
        twice = sorted({name for name in names if names.count(name) > 1})
        raise ValueError(f"class_names repeats {twice}: give every class its own name")
    return names


class ConfusionMatrix:
    """``[K, K]`` pixel counts, rows = ground-truth class, columns = predicted class.

    Args:
        num_classes: ``K``.
        ignore_index: ground-truth value to leave out (255).
        class_names: ``K`` names that key the per-class scores (default ``class_0``, ...).

    :meth:`update` takes class ids ``[N, H, W]`` (or ``[H, W]``) of predictions and ground truth;
    the matrix lives on their device. :meth:`compute` all-reduces over ``torch.distributed``
    processes when initialized, then returns :func:`segmentation_scores`.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = IGNORE_INDEX,
        class_names: Sequence[str] | None = None,
    ) -> None:
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = class_names_or_default(num_classes, class_names)
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def reset(self) -> None:
        self.matrix = torch.zeros_like(self.matrix)

    def update(self, prediction: Tensor, target: Tensor) -> None:
        if prediction.shape != target.shape:
            raise ValueError(
                f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ: "
                f"pass class ids of the same size (resize the logits to the mask size)"
            )
        if prediction.is_floating_point():
            raise ValueError("predictions must be class ids (argmax of the logits), not scores")
        target = target.to(prediction.device).long()
        valid = target != self.ignore_index
        truth, predicted = target[valid], prediction[valid].long()
        k = self.num_classes
        if truth.numel():
            low, high = (int(v) for v in torch.aminmax(torch.stack([truth, predicted])))
            if low < 0 or high >= k:
                raise ValueError(
                    f"class ids range over {low}..{high}, outside 0..{k - 1} (num_classes={k}, "
                    f"ignore_index={self.ignore_index}): check num_classes and the label mapping"
                )
        counts = torch.bincount(truth * k + predicted, minlength=k * k).reshape(k, k)
        self.matrix = self.matrix.to(counts.device) + counts

    def compute(self) -> dict[str, Any]:
        matrix = self.matrix
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            matrix = matrix.clone()
            torch.distributed.all_reduce(matrix)
        return segmentation_scores(matrix, self.class_names)


def segmentation_scores(
    confusion: Tensor, class_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Scores of a ``[K, K]`` confusion matrix (rows ground truth, columns prediction).

    Returns ``{"mIoU", "mAcc", "pixel_accuracy"}`` (floats, percent) and ``"per_class_IoU"``,
    ``"per_class_accuracy"`` (``{class name: float}`` in class-id order, percent, ``NaN`` where
    undefined; names from ``class_names``, default ``class_0``, ...).
    """
    names = class_names_or_default(int(confusion.shape[0]), class_names)
    confusion = confusion.detach().double().cpu()
    true_positive = confusion.diagonal()
    truth = confusion.sum(dim=1)
    predicted = confusion.sum(dim=0)
    union = truth + predicted - true_positive
    iou = torch.where(union > 0, true_positive / union, torch.full_like(union, math.nan))
    accuracy = torch.where(truth > 0, true_positive / truth, torch.full_like(truth, math.nan))
    total = truth.sum()
    return {
        "mIoU": 100.0 * float(iou.nanmean()),
        "mAcc": 100.0 * float(accuracy.nanmean()),
        "pixel_accuracy": 100.0 * float(true_positive.sum() / total) if total > 0 else math.nan,
        "per_class_IoU": dict(zip(names, (100.0 * iou).tolist(), strict=True)),
        "per_class_accuracy": dict(zip(names, (100.0 * accuracy).tolist(), strict=True)),
    }


def format_class_table(scores: dict[str, Any]) -> str:
    """The per-class scores of :func:`segmentation_scores` as a table with a header::

        class        IoU  accuracy
        background  95.10     97.32
        ...
    ``n/a`` where a score is undefined (a class absent from the ground truth and the
    predictions)."""
    iou, accuracy = scores["per_class_IoU"], scores["per_class_accuracy"]
    width = max(len("class"), *(len(name) for name in iou))

    def cell(value: float) -> str:
        return "n/a" if math.isnan(value) else f"{value:.2f}"

    lines = [f"{'class':{width}s}  {'IoU':>6s}  {'accuracy':>8s}"]
    lines += [
        f"{name:{width}s}  {cell(value):>6s}  {cell(accuracy[name]):>8s}"
        for name, value in iou.items()
    ]
    return "\n".join(lines)


def evaluate_segmentation(
    model: nn.Module,
    data_loader: Iterable[Any],
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
    device: str | torch.device | None = None,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """mIoU, mean class accuracy and pixel accuracy (percent) of ``model`` on ``data_loader``,
    and the per-class scores keyed by ``class_names`` (default ``class_0``, ...).

    ``model(images)`` must return logits ``[N, K, h, w]``; they are resized to the mask size
    before the arg-max (:func:`freekd.models.segmentation.segmentation_predict`). The model is
    moved to ``device`` (default: it stays where it is) and run in eval mode under ``no_grad``
    (its modes are restored).
    ``data_loader`` yields ``(images [N, 3, H, W], masks [N, H, W])`` batches.

    Returns :func:`segmentation_scores` of the whole set.
    """
    matrix = ConfusionMatrix(num_classes, ignore_index, class_names)
    device = model_device(model) if device is None else torch.device(device)
    model.to(device)
    with eval_mode(model):
        for batch in data_loader:
            images, masks = split_segmentation_batch(batch)
            if masks is None:
                raise ValueError("evaluate_segmentation needs batches of (images, masks)")
            prediction = segmentation_predict(model, images.to(device), size=masks.shape[-2:])
            matrix.update(prediction, masks.to(device))
    scores = matrix.compute()
    if math.isnan(scores["pixel_accuracy"]):
        raise ValueError("no labelled pixels to evaluate (is every mask pixel ignore_index?)")
    return scores
