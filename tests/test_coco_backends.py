"""The two COCO evaluation backends (faster-coco-eval, pycocotools) give the same 12 numbers on
generated ground truth and detections (several categories, crowd regions, empty images, mask
areas, ties in score, images over the 100-detection cap), in memory and from an annotation
file; a backend asked for by name is never replaced by the other."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from freekd.evaluation import COCOEvaluator
from freekd.evaluation.detection import (
    COCO_BACKENDS,
    DETECTION_METRICS,
    evaluate_detection,
    resolve_coco_backend,
)

pytest.importorskip("pycocotools")
pytest.importorskip("faster_coco_eval")

IMAGE_SIZE = 640


def random_boxes(rng: np.random.Generator, count: int) -> np.ndarray:
    """``[count, 4]`` x1, y1, x2, y2 boxes with sides of 4 to 300 px (all three COCO area
    ranges) inside an image."""
    sides = np.exp(rng.uniform(np.log(4), np.log(300), (count, 2)))
    corners = rng.uniform(0, IMAGE_SIZE - sides)
    return np.concatenate([corners, corners + sides], axis=1)


def jittered(rng: np.random.Generator, boxes: np.ndarray, amount: float) -> np.ndarray:
    """``boxes`` moved and resized by up to ``amount`` of their sides (some still match)."""
    sides = np.concatenate([boxes[:, 2:] - boxes[:, :2]] * 2, axis=1)
    return boxes + rng.uniform(-amount, amount, boxes.shape) * sides


def generated_case(seed: int, images: int = 60) -> list[tuple[dict, dict]]:
    """``(prediction, target)`` per image: 5 categories, about 1 image in 6 without ground
    truth and 1 in 8 without detections, crowd regions, mask areas on every other image,
    scores rounded to 2 decimals (ties), one image with 150 detections, and detections of a
    category that has no ground truth."""
    rng = np.random.default_rng(seed)
    pairs = []
    for index in range(images):
        count = 0 if rng.random() < 1 / 6 else int(rng.integers(1, 9))
        gt_boxes = random_boxes(rng, count)
        labels = rng.integers(1, 6, count)
        target: dict[str, Any] = {
            "boxes": torch.tensor(gt_boxes, dtype=torch.float32),
            "labels": torch.tensor(labels),
            "iscrowd": torch.tensor((rng.random(count) < 0.15).astype(np.int64)),
        }
        if index % 2:  # a mask area: a share of the box area
            areas = np.prod(gt_boxes[:, 2:] - gt_boxes[:, :2], axis=1)
            target["area"] = torch.tensor(areas * rng.uniform(0.3, 1.0, count))
        found = rng.random(count) < 0.8
        hits = jittered(rng, gt_boxes[found], 0.15)
        hit_labels = np.where(rng.random(found.sum()) < 0.9, labels[found], rng.integers(1, 6))
        extra = 150 if index == 7 else int(rng.integers(0, 12))
        boxes = np.concatenate([hits, random_boxes(rng, extra)])
        det_labels = np.concatenate([hit_labels, rng.integers(1, 7, extra)])  # 6: no ground truth
        scores = np.concatenate([rng.uniform(0.3, 1, len(hits)), rng.uniform(0, 0.7, extra)])
        if rng.random() < 1 / 8:
            boxes, det_labels, scores = boxes[:0], det_labels[:0], scores[:0]
        prediction = {
            "boxes": torch.tensor(boxes, dtype=torch.float32),
            "scores": torch.tensor(np.round(scores, 2), dtype=torch.float32),
            "labels": torch.tensor(det_labels),
        }
        pairs.append((prediction, target))
    return pairs


def scores_of(backend: str, pairs: list[tuple[dict, dict]], **kwargs: Any) -> dict[str, float]:
    evaluator = COCOEvaluator(backend=backend, **kwargs)
    assert evaluator.backend == backend
    for prediction, target in pairs:
        evaluator.update([prediction], [target])
    return evaluator.compute()


def assert_same_scores(first: dict[str, float], second: dict[str, float]) -> None:
    assert list(first) == list(second) == list(DETECTION_METRICS)
    for name in DETECTION_METRICS:
        a, b = first[name], second[name]
        assert (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=0, abs_tol=1e-9), (
            name,
            a,
            b,
        )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_both_backends_give_the_same_twelve_numbers(seed):
    pairs = generated_case(seed)
    faster = scores_of("faster_coco_eval", pairs)
    reference = scores_of("pycocotools", pairs)
    assert_same_scores(faster, reference)
    assert 5 < reference["AP50"] < 95  # a case with hits and misses, not all 0 or 100


def coco_file(pairs: list[tuple[dict, dict]], path: Path) -> list[dict]:
    """Write the ground truth of ``pairs`` as a COCO json (image ids 100, 101, ...; category ids
    10 x label); the targets that refer to it."""
    images, annotations, targets = [], [], []
    for index, (_, target) in enumerate(pairs):
        image_id = 100 + index
        images.append({"id": image_id, "width": IMAGE_SIZE, "height": IMAGE_SIZE})
        areas = target.get("area")
        boxes, labels = target["boxes"].tolist(), target["labels"].tolist()
        for k, (box, label) in enumerate(zip(boxes, labels, strict=True)):
            x1, y1, x2, y2 = box
            area = float(areas[k]) if areas is not None else (x2 - x1) * (y2 - y1)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": 10 * label,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": area,
                    "iscrowd": int(target["iscrowd"][k]),
                }
            )
        targets.append({"image_id": torch.tensor([image_id])})
    categories = [{"id": 10 * label, "name": f"c{label}"} for label in range(1, 7)]
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return targets


def test_both_backends_agree_on_an_annotation_file_and_take_each_others_coco(tmp_path):
    pairs = generated_case(3)
    targets = coco_file(pairs, tmp_path / "instances.json")
    predictions = [prediction for prediction, _ in pairs]
    mapping = {label: 10 * label for label in range(1, 7)}
    results = {}
    for backend in ("faster_coco_eval", "pycocotools"):
        evaluator = COCOEvaluator(tmp_path / "instances.json", mapping, backend=backend)
        evaluator.update(predictions, targets)
        results[backend] = evaluator.compute()
    assert_same_scores(results["faster_coco_eval"], results["pycocotools"])
    from pycocotools.coco import COCO

    loaded = COCO(str(tmp_path / "instances.json"))  # a pycocotools object, to the other backend
    evaluator = COCOEvaluator(loaded, mapping, backend="faster_coco_eval")
    assert type(evaluator.coco_gt).__module__.startswith("faster_coco_eval")
    evaluator.update(predictions, targets)
    assert_same_scores(evaluator.compute(), results["pycocotools"])


def test_auto_prefers_faster_coco_eval_and_falls_back_to_pycocotools(monkeypatch):
    assert COCO_BACKENDS == ("auto", "faster_coco_eval", "pycocotools")
    assert resolve_coco_backend() == "faster_coco_eval"
    assert COCOEvaluator().backend == "faster_coco_eval"
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # not installed
    assert resolve_coco_backend("auto") == "pycocotools"
    assert COCOEvaluator(backend="auto").backend == "pycocotools"


def test_a_backend_asked_for_by_name_is_never_replaced(monkeypatch):
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)
    with pytest.raises(
        ModuleNotFoundError,
        match=r"^the COCO backend 'faster_coco_eval' needs the faster-coco-eval package, which "
        r"is not installed: pip install 'freekd\[fast-eval\]', or choose the 'pycocotools' "
        r"backend \(or 'auto'\)$",
    ):
        evaluate_detection(torch.nn.Identity(), [], backend="faster_coco_eval")
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    with pytest.raises(ModuleNotFoundError, match="needs pycocotools or faster-coco-eval"):
        COCOEvaluator()
    with pytest.raises(ValueError, match=r"unknown COCO backend 'fast'.*choose one of 'auto'"):
        resolve_coco_backend("fast")


def test_freekd_evaluate_uses_the_backend_asked_for_and_records_it(tmp_path):
    from freekd.checkpoints import export_student
    from freekd.pipeline import evaluate_model, load_config, recipe_path
    from freekd.pipeline.builders import build_spec

    overrides = [f"run_dir={tmp_path / 'run'}", "device=cpu", "data.args.size=64"]
    overrides += ["data.val_args.length=4", "data.val_batch_size=4"]
    overrides += ["student.args={min_size: 64, max_size: 64}"]
    config = load_config(recipe_path("digits_demo_detection"), overrides)
    torch.manual_seed(0)
    student = build_spec(config, config.student, num_classes=10).model
    weights = export_student(student, tmp_path / "student.safetensors")
    results = {}
    for backend in ("pycocotools", "faster_coco_eval"):
        output = tmp_path / f"{backend}.json"
        result = evaluate_model(config, "student", weights, output, coco_backend=backend)
        assert json.loads(output.read_text())["coco_backend"] == backend
        results[backend] = result["scores"]
    assert_same_scores(results["pycocotools"], results["faster_coco_eval"])
    segmentation = load_config(recipe_path("digits_demo_segmentation"), overrides[:2])
    with pytest.raises(ValueError, match="coco_backend='pycocotools' is for detection"):
        evaluate_model(segmentation, "student", coco_backend="pycocotools")


def test_the_speed_benchmark_runs_and_reports_both_backends(tmp_path, capsys):
    import importlib.util

    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(benchmarks))
    try:
        spec = importlib.util.spec_from_file_location(
            "coco_eval_speed", benchmarks / "coco_eval_speed.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        results = module.main(
            [
                "--images",
                "6",
                "--detections",
                "20",
                "--repeats",
                "1",
                "--out",
                str(tmp_path / "r.md"),
            ]
        )
    finally:
        sys.path.remove(str(benchmarks))
    assert set(results) == {"pycocotools", "faster_coco_eval"}
    assert all(len(r["seconds"]) == 1 for r in results.values())
    assert_same_scores(results["pycocotools"]["scores"], results["faster_coco_eval"]["scores"])
    report = (tmp_path / "r.md").read_text()
    assert "| pycocotools |" in report and "| faster_coco_eval |" in report
    assert "largest difference over the 12 numbers: " in report
