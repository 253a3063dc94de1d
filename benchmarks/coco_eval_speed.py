"""Speed benchmark: COCO box mAP with faster-coco-eval against pycocotools, side by side.

Generated ground truth and detections (default 300 images, 100 detections each: 30k; 5
categories; crowd regions; some images without ground truth), accumulated once in a
``freekd.evaluation.COCOEvaluator`` per backend; then ``compute()`` (building the COCO objects,
``evaluate``, ``accumulate``, ``summarize``) is timed ``--repeats`` times per backend, the two
backends alternating so that other load on the machine falls on both alike. Prints a markdown
table (median and range per backend, the ratio) and whether the 12 numbers agree.

    .venv/bin/python benchmarks/coco_eval_speed.py                # 300 images / 30k detections
    .venv/bin/python benchmarks/coco_eval_speed.py --images 5000 --repeats 3 --out coco.md
"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from loss_speed import _cpu_busy, _cpu_model

from freekd.evaluation import COCOEvaluator
from freekd.evaluation.detection import DETECTION_METRICS

BACKENDS = ("pycocotools", "faster_coco_eval")
IMAGE_SIZE = 640


def _boxes(rng: np.random.Generator, count: int) -> np.ndarray:
    """``[count, 4]`` x1, y1, x2, y2 boxes with sides of 4 to 300 px inside an image."""
    sides = np.exp(rng.uniform(np.log(4), np.log(300), (count, 2)))
    corners = rng.uniform(0, IMAGE_SIZE - sides)
    return np.concatenate([corners, corners + sides], axis=1)


def generated_images(
    images: int, detections: int, seed: int
) -> list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """``(prediction, target)`` per image: 0-15 ground-truth boxes (none on about 1 image in
    10, 10% crowd), ``detections`` detections of which up to one per box is a jittered copy
    of it and the rest random, 5 categories."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(images):
        count = 0 if rng.random() < 0.1 else int(rng.integers(1, 16))
        truth = _boxes(rng, count)
        labels = rng.integers(1, 6, count)
        hits = min(count, detections)
        sides = np.concatenate([truth[:hits, 2:] - truth[:hits, :2]] * 2, axis=1)
        copies = truth[:hits] + rng.uniform(-0.15, 0.15, (hits, 4)) * sides
        boxes = np.concatenate([copies, _boxes(rng, detections - hits)])
        det_labels = np.concatenate([labels[:hits], rng.integers(1, 6, detections - hits)])
        scores = np.concatenate([rng.uniform(0.3, 1, hits), rng.uniform(0, 0.7, detections - hits)])
        target = {
            "boxes": torch.tensor(truth, dtype=torch.float32),
            "labels": torch.tensor(labels),
            "iscrowd": torch.tensor((rng.random(count) < 0.1).astype(np.int64)),
        }
        prediction = {
            "boxes": torch.tensor(boxes, dtype=torch.float32),
            "scores": torch.tensor(scores, dtype=torch.float32),
            "labels": torch.tensor(det_labels),
        }
        pairs.append((prediction, target))
    return pairs


def _evaluator(backend: str, pairs: list[tuple[dict, dict]]) -> COCOEvaluator:
    evaluator = COCOEvaluator(backend=backend)
    for prediction, target in pairs:
        evaluator.update([prediction], [target])
    return evaluator


def measure(pairs: list[tuple[dict, dict]], repeats: int) -> dict[str, dict[str, Any]]:
    """Per backend: the seconds of each timed ``compute()`` (after one untimed warm-up, the
    backends alternating) and its scores."""
    evaluators = {backend: _evaluator(backend, pairs) for backend in BACKENDS}
    results: dict[str, dict[str, Any]] = {b: {"seconds": []} for b in BACKENDS}
    for backend, evaluator in evaluators.items():
        results[backend]["scores"] = evaluator.compute()  # warm-up (imports, caches)
    for _ in range(repeats):
        for backend, evaluator in evaluators.items():
            start = time.perf_counter()
            evaluator.compute()
            results[backend]["seconds"].append(time.perf_counter() - start)
    return results


def largest_difference(first: dict[str, float], second: dict[str, float]) -> float:
    """The largest |difference| of the 12 numbers (in AP points; NaN where only one is NaN)."""
    differences = []
    for name in DETECTION_METRICS:
        a, b = first[name], second[name]
        if math.isnan(a) and math.isnan(b):
            continue
        differences.append(abs(a - b))
    return max(differences) if differences else 0.0


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def render(results: dict[str, dict[str, Any]], args: argparse.Namespace, busy: str) -> str:
    """The markdown report: header lines, the table, agreement."""
    medians = {b: statistics.median(results[b]["seconds"]) for b in BACKENDS}
    lines = [
        f"# COCO evaluation speed ({args.images} images, {args.images * args.detections} "
        f"detections, {args.repeats} repeats)",
        "",
        f"- CPU: {_cpu_model()}, {os.cpu_count()} cores; busy before the run: {busy}",
        f"- Python {platform.python_version()}, pycocotools {_version('pycocotools')}, "
        f"faster-coco-eval {_version('faster-coco-eval')}, numpy {np.__version__}",
        f"- command: {' '.join([Path(sys.executable).name, *sys.argv])}",
        "- timed: `COCOEvaluator.compute()` (COCO objects, evaluate, accumulate, summarize)",
        "",
        "| backend | median s | min s | max s | vs pycocotools |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for backend in BACKENDS:
        seconds = results[backend]["seconds"]
        ratio = medians["pycocotools"] / medians[backend]
        lines.append(
            f"| {backend} | {medians[backend]:.3f} | {min(seconds):.3f} | {max(seconds):.3f} "
            f"| {ratio:.1f}x |"
        )
    scores = [results[b]["scores"] for b in BACKENDS]
    difference = largest_difference(*scores)
    lines += [
        "",
        f"AP {scores[0]['AP']:.3f} (pycocotools), {scores[1]['AP']:.3f} (faster-coco-eval); "
        f"largest difference over the 12 numbers: {difference:.2g} AP points",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300, help="generated images (300)")
    parser.add_argument("--detections", type=int, default=100, help="detections per image (100)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per backend (5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated data (0)")
    parser.add_argument("--out", type=Path, default=None, help="also write the report there")
    args = parser.parse_args(argv)
    for name in ("images", "detections", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    args = parse_args(argv)
    busy = _cpu_busy()
    pairs = generated_images(args.images, args.detections, args.seed)
    results = measure(pairs, args.repeats)
    report = render(results, args, busy)
    print(report)
    if args.out is not None:
        args.out.write_text(report + "\n", encoding="utf-8")
    return results


if __name__ == "__main__":
    main()
