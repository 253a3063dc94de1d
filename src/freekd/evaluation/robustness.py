"""Corruption robustness: the task metric on corrupted copies of an evaluation set.

``evaluate_robustness(task, model, loader, corruptions="all")`` scores the model on the clean
images and on every corruption of :mod:`freekd.evaluation.corruptions` at every severity, and
summarizes them as in Michaelis et al. (2019, "Benchmarking robustness in object detection"):

- ``clean``: the metric on the clean images (``P_clean``);
- ``mPC``: the mean performance under corruption, the mean of the metric over all corruptions and
  severities;
- ``rPC``: the relative performance under corruption, ``100 * mPC / clean`` (percent).

The corruptions are applied to images in ``[0, 1]``, before normalization, as the benchmark does:
when the loader yields normalized images (the segmentation pipeline's default), pass its
``normalization=(mean, std)``; the images are un-normalized, corrupted and normalized again.
Corrupted images depend only on the seed and their position in the loader (not on the batch
size), so two runs with the same seed score the same images. :func:`format_robustness_table`
prints the result as a table with a header and the summary line.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .corruptions import SEVERITIES, corrupt, resolve_corruptions

__all__ = ["PRIMARY_METRICS", "evaluate_robustness", "format_robustness_table"]

logger = logging.getLogger("freekd")

PRIMARY_METRICS = {"segmentation": "mIoU", "detection": "AP"}
"""The metric that ``clean`` / ``mPC`` / ``rPC`` summarize, by task."""

Normalization = tuple[Sequence[float], Sequence[float]]


class _Normalizer:
    """Maps normalized images ``[N, 3, H, W]`` to ``[0, 1]`` and back."""

    def __init__(self, normalization: Normalization | None) -> None:
        self.mean: Tensor | None = None
        self.std: Tensor | None = None
        if normalization is not None:
            mean, std = normalization
            if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
                raise ValueError(
                    f"normalization must be (mean, std) of 3 values each with std > 0, got "
                    f"{normalization!r}"
                )
            self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
            self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def to_unit(self, images: Tensor) -> Tensor:
        if self.mean is None:
            return images
        mean, std = self.mean.to(images), self.std.to(images)  # type: ignore[union-attr]
        return (images * std + mean).clamp(0.0, 1.0)

    def from_unit(self, images: Tensor) -> Tensor:
        if self.mean is None:
            return images
        mean, std = self.mean.to(images), self.std.to(images)  # type: ignore[union-attr]
        return (images - mean) / std


def _corrupt_images(
    images: Tensor, name: str, severity: int, seed: int, offset: int, normalizer: _Normalizer
) -> Tensor:
    batch = images[None] if images.dim() == 3 else images
    out = normalizer.from_unit(corrupt(normalizer.to_unit(batch), name, severity, seed, offset))
    return out[0] if images.dim() == 3 else out


def _corrupted_batches(
    task: str,
    data_loader: Iterable[Any],
    name: str,
    severity: int,
    seed: int,
    normalizer: _Normalizer,
) -> Iterator[Any]:
    """The loader's batches with their images corrupted (targets / masks untouched)."""
    offset = 0
    for batch in data_loader:
        if task == "segmentation":
            from ..models.segmentation import split_segmentation_batch

            images, masks = split_segmentation_batch(batch)
            yield (
                _corrupt_images(images, name, severity, seed, offset, normalizer),
                masks,
            )
            offset += len(images)
        else:
            from ..models.detection import split_detection_batch

            images, targets = split_detection_batch(batch)
            corrupted = [
                _corrupt_images(image, name, severity, seed, offset + i, normalizer)
                for i, image in enumerate(images)
            ]
            offset += len(images)
            yield (corrupted, targets) if targets is not None else corrupted


def _mean(values: Iterable[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def evaluate_robustness(
    task: str,
    model: nn.Module,
    data_loader: Iterable[Any],
    corruptions: str | Sequence[str] = "all",
    severities: Sequence[int] = SEVERITIES,
    seed: int = 0,
    normalization: Normalization | None = None,
    metric: str | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """The clean metric, mPC, rPC and the metric per corruption and severity.

    Args:
        task: ``"segmentation"`` or ``"detection"``.
        model: the model, as for :func:`freekd.evaluation.evaluate`.
        data_loader: the evaluation loader (iterated once per corruption and severity, plus once
            clean); batches as for :func:`freekd.evaluation.evaluate`.
        corruptions: ``"all"`` (:data:`~freekd.evaluation.corruptions.CORRUPTIONS`), a name, a
            comma-separated string or a list of names.
        severities: which of ``1..5`` to average (default all five).
        seed: fixes every random corruption (noise, motion direction, fog, elastic field).
        normalization: ``(mean, std)`` the loader's images were normalized with, or ``None``
            when they are in ``[0, 1]`` (detection pipelines).
        metric: the summarized score (default ``mIoU`` / ``AP``).
        **kwargs: passed to :func:`freekd.evaluation.evaluate` (``num_classes``, ``device``...).

    Returns:
        ``{"metric", "clean", "mPC", "rPC", "per_corruption": {name: {"1": m, ..., "5": m,
        "mean": m}}, "corruptions", "severities", "seed", "clean_scores", "seconds"}`` with
        scores in percent (as the metric) and ``rPC = 100 * mPC / clean`` (``NaN`` when the
        clean score is 0).
    """
    from . import evaluate

    names = resolve_corruptions(corruptions)
    if not names:
        raise ValueError("corruptions: name at least one corruption, or 'all'")
    severities = list(severities)
    if not severities or any(
        isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= 5 for s in severities
    ):
        raise ValueError(f"severities must be a non-empty list of integers 1..5, got {severities}")
    if task not in PRIMARY_METRICS:
        raise ValueError(f"unknown task {task!r}; choose 'detection' or 'segmentation'")
    metric = metric or PRIMARY_METRICS[task]
    normalizer = _Normalizer(normalization)
    start = time.perf_counter()
    clean_scores = evaluate(task, model, data_loader, **kwargs)
    if metric not in clean_scores:
        raise ValueError(f"metric {metric!r} is not among the scores {sorted(clean_scores)}")
    clean = float(clean_scores[metric])
    per_corruption: dict[str, dict[str, float]] = {}
    for number, name in enumerate(names, start=1):
        row: dict[str, float] = {}
        for severity in severities:
            batches = _corrupted_batches(task, data_loader, name, severity, seed, normalizer)
            row[str(severity)] = float(evaluate(task, model, batches, **kwargs)[metric])
        row["mean"] = _mean(row[str(s)] for s in severities)
        per_corruption[name] = row
        logger.info("scored %s (corruption %d of %d)", name, number, len(names))
    mpc = _mean(row["mean"] for row in per_corruption.values())
    rpc = 100.0 * mpc / clean if clean and not math.isnan(clean) else math.nan
    return {
        "metric": metric,
        "clean": clean,
        "mPC": mpc,
        "rPC": rpc,
        "per_corruption": per_corruption,
        "corruptions": names,
        "severities": severities,
        "seed": seed,
        "clean_scores": clean_scores,
        "seconds": round(time.perf_counter() - start, 2),
    }


def format_robustness_table(robustness: dict[str, Any]) -> str:
    """The result of :func:`evaluate_robustness` as a table with a header (one row per
    corruption, one column per severity and their mean) and the summary line::

        mIoU by severity      1      5   mean
        contrast          20.03   8.10  14.07
        fog               12.52   8.28  10.40
        clean 35.01, mPC 12.23 (mean over corruptions and severities), rPC 34.9% (mPC / clean)
    """
    metric, severities = robustness["metric"], robustness["severities"]
    rows = robustness["per_corruption"]
    title = f"{metric} by severity"
    width = max(len(title), *(len(name) for name in rows))
    columns = [str(s) for s in severities] + ["mean"]

    def cell(value: float) -> str:
        return "n/a" if math.isnan(value) else f"{value:.2f}"

    lines = [f"{title:{width}s}" + "".join(f"  {c:>6s}" for c in columns)]
    lines += [
        f"{name:{width}s}" + "".join(f"  {cell(row[c]):>6s}" for c in columns)
        for name, row in rows.items()
    ]
    rpc = robustness["rPC"]
    lines.append(
        f"clean {cell(robustness['clean'])}, mPC {cell(robustness['mPC'])} (mean over "
        f"corruptions and severities), rPC {'n/a' if math.isnan(rpc) else f'{rpc:.1f}%'} "
        f"(mPC / clean)"
    )
    return "\n".join(lines)
