"""COCO box mAP with ``COCOeval``, on any detection data loader.

Backend (``backend=``): ``"faster_coco_eval"`` (the faster-coco-eval package, a drop-in
reimplementation of pycocotools in C++: ``COCO``, ``COCOeval_faster``), ``"pycocotools"``,
or ``"auto"`` (default: faster-coco-eval when installed, else pycocotools). Both give the same
12 numbers (tests/test_coco_backends.py; benchmarks/coco_eval_speed.py times them). A backend
asked for by name that is not installed raises ``ModuleNotFoundError`` naming the package; it
is never replaced by the other.

The ground truth is built in memory from the loader's targets (any dataset works), or read from
the dataset's COCO annotation file (``annotation_file=``, the official protocol: crowd regions and
COCO's mask areas as in the file). Scores are in **percent** (``AP = 37.4``), as papers print
them; a value COCO leaves undefined (e.g. ``APs`` when no ground-truth box is small) is ``NaN``
(pycocotools prints -1).

Conventions (pycocotools'): AP averaged over IoU 0.50:0.05:0.95 and over the categories that
have ground truth (false positives of a category absent from the ground truth do not count);
up to 100 detections per image; areas small < 32^2 <= medium < 96^2 <= large, measured on the
target's ``area`` when given (COCO: the mask area) else the box area, in the pixels of the images
the loader yields. Targets may flag crowd regions with ``iscrowd`` (matched detections are
ignored, not counted as false positives).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import Tensor, nn

from .._checks import check_choice
from .._io import atomic_write
from ..models._common import eval_mode, model_device
from ..models.detection import detection_predict, split_detection_batch

__all__ = [
    "COCO_BACKENDS",
    "DETECTION_METRICS",
    "COCOBackend",
    "COCOEvaluator",
    "evaluate_detection",
    "resolve_coco_backend",
]

logger = logging.getLogger("freekd")

DETECTION_METRICS = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)
"""Keys of :meth:`COCOEvaluator.compute`, in the order of ``COCOeval.stats``."""

LabelMap = Mapping[int, int] | Callable[[int], int]

COCOBackend = Literal["auto", "faster_coco_eval", "pycocotools"]
"""Which COCO API computes the metrics (``"auto"``: faster-coco-eval when installed)."""
COCO_BACKENDS: tuple[str, ...] = get_args(COCOBackend)

_PACKAGES = {"faster_coco_eval": "faster-coco-eval", "pycocotools": "pycocotools"}
"""The pip package of each backend's module."""
_EXTRAS = {"faster_coco_eval": "fast-eval", "pycocotools": "pipeline"}
"""The freekd extra that installs each backend."""


@dataclass(frozen=True)
class _COCOAPI:
    """One backend's ``COCO`` class and its ``COCOeval`` (bbox) with printing on or off."""

    name: str
    coco: type
    make_eval: Callable[[Any, Any, bool], Any]


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def resolve_coco_backend(backend: str = "auto") -> str:
    """The backend that ``backend`` stands for: itself when named and installed, for
    ``"auto"`` ``"faster_coco_eval"`` when installed else ``"pycocotools"``.

    Raises ``ValueError`` for an unknown name and ``ModuleNotFoundError`` (naming the package
    and the extra) for a named backend, or for ``"auto"`` both, that is not installed.
    """
    check_choice("COCO backend", backend, COCO_BACKENDS)
    if backend == "auto":
        found = [name for name in ("faster_coco_eval", "pycocotools") if _importable(name)]
        if not found:
            raise ModuleNotFoundError(
                "COCO evaluation needs pycocotools or faster-coco-eval, and neither is "
                "installed: pip install 'freekd[fast-eval]' (or 'freekd[pipeline]')",
                name="pycocotools",
            )
        return found[0]
    if not _importable(backend):
        other = "pycocotools" if backend == "faster_coco_eval" else "faster_coco_eval"
        raise ModuleNotFoundError(
            f"the COCO backend {backend!r} needs the {_PACKAGES[backend]} package, which is "
            f"not installed: pip install 'freekd[{_EXTRAS[backend]}]', or choose the "
            f"{other!r} backend (or 'auto')",
            name=backend,
        )
    return backend


def _coco_api(backend: str) -> _COCOAPI:
    """The classes of ``backend`` (a name :func:`resolve_coco_backend` returned)."""
    return _faster_coco_eval_api() if backend == "faster_coco_eval" else _pycocotools_api()


def _faster_coco_eval_api() -> _COCOAPI:
    from faster_coco_eval import COCO, COCOeval_faster

    def make_eval(gt: Any, dt: Any, verbose: bool) -> Any:
        report = print if verbose else _silent  # its summary goes through print_function
        return COCOeval_faster(gt, dt, iouType="bbox", print_function=report)

    return _COCOAPI("faster_coco_eval", COCO, make_eval)


def _pycocotools_api() -> _COCOAPI:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def make_eval(gt: Any, dt: Any, verbose: bool) -> Any:
        return COCOeval(gt, dt, iouType="bbox")  # prints: compute() redirects stdout

    return _COCOAPI("pycocotools", COCO, make_eval)


def _silent(*_: Any, **__: Any) -> None:
    """A ``print_function`` that prints nothing."""


def _is_coco(value: Any) -> bool:
    """Whether ``value`` is a loaded COCO object (of either backend)."""
    return isinstance(getattr(value, "dataset", None), dict) and hasattr(value, "getImgIds")


@dataclass
class _ImageRecord:
    """Ground truth and detections of one image (numpy, CPU); boxes ``[M, 4]`` x1, y1, x2, y2."""

    image_id: int | None
    gt_boxes: np.ndarray
    gt_labels: np.ndarray
    gt_crowd: np.ndarray
    gt_area: np.ndarray | None
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray


def _numpy(value: Any, dtype: Any, shape: tuple[int, ...] = (-1,)) -> np.ndarray:
    if isinstance(value, Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=dtype).reshape(shape)


def _xywh(boxes: np.ndarray) -> list[list[float]]:
    return [[x1, y1, x2 - x1, y2 - y1] for x1, y1, x2, y2 in boxes.tolist()]


def _gather(records: list[_ImageRecord]) -> list[_ImageRecord]:
    """All processes' records (in rank order) when running distributed, else ``records``."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return records
    world = torch.distributed.get_world_size()
    if world == 1:
        return records
    gathered: list[list[_ImageRecord] | None] = [None] * world
    torch.distributed.all_gather_object(gathered, records)
    return [record for part in gathered for record in part or []]


class COCOEvaluator:
    """Accumulates detections and ground truth; :meth:`compute` runs ``COCOeval`` (bbox).

    Args:
        annotation_file: a COCO json (or a loaded ``COCO`` object of either backend) to take
            the ground truth from; images are then identified by each target's ``image_id`` and
            predictions must be in the file's (original) image coordinates. ``None``: ground
            truth from the targets passed to :meth:`update`.
        label_to_category_id: maps the model's labels ``1..K`` to COCO category ids (a dict or a
            function); identity when ``None``. Needed with an annotation file whose category ids
            are not the labels; otherwise it only names the categories in :meth:`results`.
        backend: ``"auto"`` | ``"faster_coco_eval"`` | ``"pycocotools"`` (module docstring);
            :attr:`backend` is then the one in use.

    Under ``torch.distributed`` each process calls :meth:`update` on its shard and
    :meth:`compute` gathers all of them (with an annotation file, duplicate ``image_id`` from a
    padded sampler are evaluated once).
    """

    def __init__(
        self,
        annotation_file: str | os.PathLike | Any | None = None,
        label_to_category_id: LabelMap | None = None,
        backend: COCOBackend = "auto",
    ) -> None:
        self.backend = resolve_coco_backend(backend)
        self._api = _coco_api(self.backend)
        self.coco_gt = self._load_ground_truth(annotation_file)
        self.label_to_category_id = label_to_category_id
        self._records: list[_ImageRecord] = []

    def _load_ground_truth(self, annotation_file: str | os.PathLike | Any | None) -> Any:
        """The backend's ``COCO`` of ``annotation_file`` (a path, or a ``COCO`` object of
        either backend, rebuilt from its ``dataset`` when of the other); ``None`` stays."""
        if annotation_file is None:
            return None
        if _is_coco(annotation_file):
            if isinstance(annotation_file, self._api.coco):
                return annotation_file
            return _coco(self._api, annotation_file.dataset)
        if not os.path.isfile(annotation_file):
            raise FileNotFoundError(f"annotation file {str(annotation_file)!r} does not exist")
        with contextlib.redirect_stdout(io.StringIO()):
            return self._api.coco(str(annotation_file))

    def reset(self) -> None:
        self._records = []

    def __len__(self) -> int:
        return len(self._records)

    def _category(self, label: int) -> int:
        mapping = self.label_to_category_id
        if mapping is None:
            return int(label)
        try:
            return int(mapping[label] if isinstance(mapping, Mapping) else mapping(label))
        except (KeyError, IndexError):
            raise ValueError(f"label_to_category_id has no entry for label {label}") from None

    def update(
        self, predictions: Sequence[Mapping[str, Any]], targets: Sequence[Mapping[str, Any]]
    ) -> None:
        """Add one batch: per image, a prediction ``{boxes [D, 4], scores [D], labels [D]}`` and
        a target ``{boxes [M, 4], labels [M]}`` (optional ``iscrowd [M]``, ``area [M]``,
        ``image_id``; with an annotation file only ``image_id`` is read), boxes as
        ``(x1, y1, x2, y2)`` pixels."""
        if len(predictions) != len(targets):
            raise ValueError(
                f"{len(predictions)} predictions for {len(targets)} targets: one of each per image"
            )
        for prediction, target in zip(predictions, targets, strict=True):
            image_id = target.get("image_id")
            if self.coco_gt is not None and image_id is None:
                raise ValueError("with an annotation file every target needs its 'image_id'")
            if self.coco_gt is None and ("boxes" not in target or "labels" not in target):
                raise ValueError(
                    "every target needs 'boxes' and 'labels' (or pass annotation_file=)"
                )
            labels = _numpy(target.get("labels", ()), np.int64)
            self._records.append(
                _ImageRecord(
                    image_id=None if image_id is None else int(_numpy(image_id, np.int64)[0]),
                    gt_boxes=_numpy(target.get("boxes", ()), np.float64, (-1, 4)),
                    gt_labels=labels,
                    gt_crowd=(
                        _numpy(target["iscrowd"], np.int64)
                        if "iscrowd" in target
                        else np.zeros_like(labels)
                    ),
                    gt_area=_numpy(target["area"], np.float64) if "area" in target else None,
                    boxes=_numpy(prediction["boxes"], np.float64, (-1, 4)),
                    scores=_numpy(prediction["scores"], np.float64),
                    labels=_numpy(prediction["labels"], np.int64),
                )
            )

    # ------------------------------------------------------------------ COCO objects

    def _detections(self, records: Sequence[_ImageRecord], ids: Sequence[int]) -> list[dict]:
        results = []
        for record, image_id in zip(records, ids, strict=True):
            for box, score, label in zip(
                _xywh(record.boxes), record.scores.tolist(), record.labels.tolist(), strict=True
            ):
                results.append(
                    {
                        "image_id": image_id,
                        "category_id": self._category(label),
                        "bbox": box,
                        "score": score,
                    }
                )
        return results

    def _ground_truth(self, records: Sequence[_ImageRecord]) -> Any:
        annotations, categories = [], set()
        for image_id, record in enumerate(records):
            areas = record.gt_area
            boxes = _xywh(record.gt_boxes)
            for index, (box, label, crowd) in enumerate(
                zip(boxes, record.gt_labels.tolist(), record.gt_crowd.tolist(), strict=True)
            ):
                category = self._category(label)
                categories.add(category)
                annotations.append(
                    {
                        "id": len(annotations) + 1,  # pycocotools treats id 0 as "unmatched"
                        "image_id": image_id,
                        "category_id": category,
                        "bbox": box,
                        "area": float(areas[index]) if areas is not None else box[2] * box[3],
                        "iscrowd": int(crowd),
                    }
                )
        dataset = {
            "images": [{"id": i} for i in range(len(records))],
            "categories": [{"id": c} for c in sorted(categories)],
            "annotations": annotations,
        }
        return _coco(self._api, dataset)

    def _result_coco(self, gt: Any, detections: list[dict]) -> Any:
        """Like ``gt.loadRes(detections)``, which fails on an empty list."""
        annotations = []
        for index, detection in enumerate(detections, start=1):
            w, h = detection["bbox"][2:]
            annotations.append({**detection, "id": index, "area": w * h, "iscrowd": 0})
        dataset = {
            "images": gt.dataset["images"],
            "categories": gt.dataset.get("categories", []),
            "annotations": annotations,
        }
        return _coco(self._api, dataset)

    def _prepare(self) -> tuple[Any, list[dict], list[int]]:
        records = _gather(self._records)
        if self.coco_gt is None:
            ids = list(range(len(records)))
            gt = self._ground_truth(records)
        else:
            unique: dict[int, _ImageRecord] = {}
            for record in records:
                unique.setdefault(record.image_id, record)
            known = set(self.coco_gt.getImgIds())
            stray = [i for i in unique if i not in known]
            if stray:
                raise ValueError(
                    f"image ids {stray[:5]} are not in the annotation file: do the targets' "
                    f"'image_id' come from that file?"
                )
            records, ids, gt = list(unique.values()), list(unique), self.coco_gt
        return gt, self._detections(records, ids), ids

    def results(self) -> list[dict]:
        """The accumulated detections in COCO's results format (``image_id``, ``category_id``,
        ``bbox`` as x, y, w, h, ``score``); in-memory image ids are positions in update order."""
        return self._prepare()[1]

    def compute(self, verbose: bool = False) -> dict[str, float]:
        """``{AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl}`` in percent.

        ``verbose`` prints the backend's summary table.
        """
        gt, detections, ids = self._prepare()
        if not ids:
            raise ValueError("no images to evaluate: call update() first")
        if not gt.getAnnIds(imgIds=ids, iscrowd=False):
            logger.warning("COCO evaluation: the images hold no ground-truth boxes; AP is NaN")
            return dict.fromkeys(DETECTION_METRICS, math.nan)
        evaluator = self._api.make_eval(gt, self._result_coco(gt, detections), verbose)
        evaluator.params.imgIds = sorted(ids)
        output = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
        with output:
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        stats = list(evaluator.stats)[: len(DETECTION_METRICS)]
        return {
            name: (100.0 * float(value) if value >= 0 else math.nan)
            for name, value in zip(DETECTION_METRICS, stats, strict=True)
        }


def _coco(api: _COCOAPI, dataset: dict) -> Any:
    """A ``COCO`` object of ``api``'s backend holding ``dataset`` (indexed)."""
    coco = api.coco()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def evaluate_detection(
    model: nn.Module,
    data_loader: Iterable[Any],
    label_to_category_id: LabelMap | None = None,
    device: str | torch.device | None = None,
    annotation_file: str | os.PathLike | None = None,
    results_path: str | os.PathLike | None = None,
    verbose: bool = False,
    backend: COCOBackend = "auto",
) -> dict[str, float]:
    """COCO box mAP (percent) of ``model`` on ``data_loader``.

    Args:
        model: a detector that returns ``[{boxes, scores, labels}]`` in eval mode (torchvision);
            moved to ``device`` (default: it stays where it is) and run in eval mode under
            ``no_grad`` (its modes are restored).
        data_loader: yields ``(images, targets)`` batches (see
            :func:`freekd.models.detection.split_detection_batch`).
        label_to_category_id: see :class:`COCOEvaluator`.
        device: where the model runs (default: where its parameters are).
        annotation_file: the dataset's COCO json, for the official ground truth (see
            :class:`COCOEvaluator`); ``None``: ground truth from the targets.
        results_path: also write the detections as a COCO results json there.
        verbose: print the backend's summary table.
        backend: ``"auto"`` (faster-coco-eval when installed, else pycocotools),
            ``"faster_coco_eval"`` or ``"pycocotools"`` (see :class:`COCOEvaluator`).

    Returns ``{AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl}``.
    """
    evaluator = COCOEvaluator(annotation_file, label_to_category_id, backend)
    device = model_device(model) if device is None else torch.device(device)
    model.to(device)
    with eval_mode(model):
        for batch in data_loader:
            images, targets = split_detection_batch(batch)
            if targets is None:
                raise ValueError("evaluate_detection needs batches of (images, targets)")
            predictions = detection_predict(model, [image.to(device) for image in images])
            evaluator.update(predictions, targets)
    scores = evaluator.compute(verbose=verbose)
    if results_path is not None:
        text = json.dumps(evaluator.results())
        atomic_write(results_path, lambda path: Path(path).write_text(text))
    return scores
