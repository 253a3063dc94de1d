"""Quality benchmark v2: FreeKD against MSE, CWD and MGD in a regime FreeKD is meant for.

Segmentation of 128-px digit scenes (``freekd.data.DigitScenes``: 3-8 small digits each) with
smp FPN segmenters: teacher ResNet-34 with a 128-channel pyramid, student MobileNetV3-Small-0.5 with
a 64-channel pyramid (both from scratch: no weights can be downloaded here). Distilled: the FPN
pyramid ``decoder.p2 / p3 / p4`` (32x32, 16x16, 8x8, fine to coarse), through a 1x1-conv
projection 64 -> 128 on every layer for every method (``projection: always``). FreeKD uses
3 / 3 / 2 wavelet levels (``freekd.auto_levels``: no band smaller than 2x2).

The protocol, every method under the same rules:

1. **Splits**: train (train digit pool, scene seed 0), selection (train digit pool, scene seed
   1: scenes training never sees) and test (the val digit pool: digits no other split has).
2. **Teacher** trained once; its pyramid features on the train scenes are cached, so a student
   step costs only the student.
3. **Plateau check**: one long undistilled student run at constant learning rate, scored on the
   selection split every ``plateau_every`` steps; the student schedule is the first step count
   after which 20% more steps gain less than 0.5 mIoU (twice in a row).
4. **Prompts** (FreeKD variants): stage 1 once per variant on the frozen teacher, reused by
   every ``mu`` and seed; the diagnostic (clean vs re-synthesised task loss, mask saturation,
   relational effective channels) is recorded.
5. **Calibration**: ``mu0 = freekd.calibrate_weight(...)`` at initialization (seed 0), so that
   ``||grad(mu0 * L_kd)|| = ||grad(L_task)||`` on the student's tapped features.
6. **Sweep**: ``mu in {mu0 / 3, mu0, 3 mu0}`` on seed 0, scored on the selection split; the best
   is each method's ``mu``.
7. **Seeds**: every method at its ``mu`` on seeds 0..S-1; within a seed all methods share the
   student initialization and the batch order. Test-split mIoU, mean +- std and the paired
   per-seed differences against MSE and CWD ("beats" only when every difference is positive).

Everything is cached under ``--out`` (default ``runs/quality_v2/<preset>``) by its settings, so
an interrupted invocation continues where it stopped. ``--workers 2`` runs two students at once,
one thread each (the fastest use of a 2-core CPU).

    .venv/bin/python benchmarks/quality_v2.py --preset quick            # ~30 min, 2-core CPU
    .venv/bin/python benchmarks/quality_v2.py --preset full --workers 2 # ~3 h, 2-core CPU
    .venv/bin/python benchmarks/quality_v2.py --preset full --phase ablations --workers 2
    .venv/bin/python benchmarks/quality_v2.py --preset full --report    # tables from the cache
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import fractions
import hashlib
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from freekd import auto_levels
from freekd.calibration import calibrate_weight
from freekd.data.digits import DigitScenes
from freekd.distill import Projection
from freekd.evaluation.segmentation import ConfusionMatrix
from freekd.losses import (
    ChannelWiseDistillation,
    FeatureMSE,
    FreeKDLoss,
    FrequencyL1,
    MaskedGenerativeDistillation,
)
from freekd.taps import FeatureTaps
from freekd.tuning import PromptTuner

log = logging.getLogger("quality_v2")

IGNORE_INDEX = 255
NUM_CLASSES = 11
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

# ----------------------------------------------------------------------------- protocol


@dataclass(frozen=True)
class Protocol:
    """Everything a result depends on (its hash names the cache folder)."""

    image_size: int = 128
    train_scenes: int = 3000
    selection_scenes: int = 300
    test_scenes: int = 300
    min_digits: int = 3
    max_digits: int = 8
    digit_scale: tuple[float, float] = (0.12, 0.25)
    teacher_encoder: str = "resnet34"
    teacher_pyramid: int = 128
    student_encoder: str = "tu-mobilenetv3_small_050"
    student_pyramid: int = 64
    taps: tuple[str, ...] = ("decoder.p2", "decoder.p3", "decoder.p4")
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    teacher_steps: int = 2000
    plateau_steps: int = 4000
    plateau_every: int = 250
    student_steps: int | None = None  # None: from the plateau check
    prompt_steps: int = 200
    prompt_lr: float = 0.01
    calibration_batches: int = 4
    seeds: tuple[int, ...] = (0, 1, 2)
    mu_factors: tuple[float, ...] = (1 / 3, 1.0, 3.0)
    methods: tuple[str, ...] = ()
    ablations: tuple[str, ...] = ()

    def key(self, *fields: str) -> str:
        """Short hash of the named fields (the cache key of what depends on just them)."""
        values = {name: getattr(self, name) for name in fields}
        return hashlib.sha1(json.dumps(values, sort_keys=True).encode()).hexdigest()[:10]


DATA_FIELDS = (
    "image_size",
    "train_scenes",
    "selection_scenes",
    "test_scenes",
    "min_digits",
    "max_digits",
    "digit_scale",
)
TEACHER_FIELDS = (
    *DATA_FIELDS,
    "teacher_encoder",
    "teacher_pyramid",
    "batch_size",
    "lr",
    "weight_decay",
    "warmup_steps",
    "teacher_steps",
    "taps",
)
PROMPT_FIELDS = (*TEACHER_FIELDS, "prompt_steps", "prompt_lr")
STUDENT_FIELDS = (
    *TEACHER_FIELDS,
    "student_encoder",
    "student_pyramid",
    "prompt_steps",
    "prompt_lr",
    "calibration_batches",
)

MAIN_METHODS = (
    "none",
    "mse",
    "cwd",
    "mgd",
    "freekd-official",
    "freekd-paper",
    "freekd-stable",
    "freekd-stable+mse",
)

PRESETS: dict[str, Protocol] = {
    "full": Protocol(methods=MAIN_METHODS),
    # One seed, mu0 only, fixed schedule: for iterating on a method (numbers are indicative).
    "quick": Protocol(
        train_scenes=1500,
        selection_scenes=200,
        test_scenes=200,
        teacher_steps=1000,
        student_steps=500,
        prompt_steps=100,
        seeds=(0,),
        mu_factors=(1.0,),
        methods=("none", "mse", "freekd-official", "freekd-stable"),
    ),
    # Seconds: every path runs (the tests use it); its numbers mean nothing.
    "smoke": Protocol(
        image_size=64,
        train_scenes=16,
        selection_scenes=8,
        test_scenes=8,
        digit_scale=(0.2, 0.3),
        teacher_encoder="resnet18",
        teacher_pyramid=64,
        student_pyramid=32,
        batch_size=4,
        warmup_steps=1,
        teacher_steps=2,
        plateau_steps=4,
        plateau_every=2,
        prompt_steps=2,
        calibration_batches=1,
        seeds=(0, 1),
        mu_factors=(1.0, 3.0),
        methods=("none", "mse", "cwd", "freekd-stable"),
        ablations=("stable-no-masks",),
    ),
}


# ----------------------------------------------------------------------------- splits and data


def build_splits(protocol: Protocol) -> dict[str, DigitScenes]:
    """The three splits: ``train`` and ``selection`` draw digits from the train pool (different
    scenes: scene seeds 0 and 1), ``test`` from the val pool (digits no other split uses)."""
    common = dict(
        task="segmentation",
        size=protocol.image_size,
        min_digits=protocol.min_digits,
        max_digits=protocol.max_digits,
        digit_scale=protocol.digit_scale,
    )
    return {
        "train": DigitScenes("train", length=protocol.train_scenes, seed=0, **common),
        "selection": DigitScenes("train", length=protocol.selection_scenes, seed=1, **common),
        "test": DigitScenes("val", length=protocol.test_scenes, seed=0, **common),
    }


def render(scenes: DigitScenes) -> dict[str, Tensor]:
    """All scenes of a split as ``images: uint8 [N, 3, H, W]``, ``masks: uint8 [N, H, W]``."""
    images, masks = [], []
    for index in range(len(scenes)):
        image, mask = scenes[index]
        images.append((image * 255).round().to(torch.uint8))
        masks.append(mask.to(torch.uint8))
    return {"images": torch.stack(images), "masks": torch.stack(masks)}


def load_data(protocol: Protocol, out: Path) -> dict[str, dict[str, Tensor]]:
    path = out / f"data-{protocol.key(*DATA_FIELDS)}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    log.info(
        "rendering the scenes (%s)",
        ", ".join(f"{k} {len(v)}" for k, v in build_splits(protocol).items()),
    )
    data = {name: render(scenes) for name, scenes in build_splits(protocol).items()}
    _atomic_save(data, path)
    return data


def normalize(images: Tensor) -> Tensor:
    """uint8 ``[N, 3, H, W]`` -> float, ImageNet mean / std."""
    return (images.float() / 255 - MEAN) / STD


# ----------------------------------------------------------------------------- models


def build_fpn(encoder: str, pyramid: int) -> nn.Module:
    """An smp FPN from scratch (no dropout, so that a run's only randomness is its seed's)."""
    return smp.FPN(
        encoder,
        encoder_weights=None,
        classes=NUM_CLASSES,
        decoder_pyramid_channels=pyramid,
        decoder_segmentation_channels=max(32, pyramid // 2),  # GroupNorm(32) needs 32k
        decoder_dropout=0.0,
    )


def task_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    images, masks = batch
    return F.cross_entropy(model(images), masks, ignore_index=IGNORE_INDEX)


def schedule(
    optimizer: torch.optim.Optimizer, warmup: int, steps: int, constant: bool = False
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine to 0 over ``steps`` (or constant)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if constant:
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def batch_order(count: int, batch_size: int, steps: int, seed: int) -> list[Tensor]:
    """The index batches of a run: epochs of a seeded permutation (the same for every method)."""
    generator = torch.Generator().manual_seed(seed)
    batches: list[Tensor] = []
    while len(batches) < steps:
        order = torch.randperm(count, generator=generator)
        batches += list(order[: count - count % batch_size].split(batch_size))
    return batches[:steps]


@torch.no_grad()
def miou(model: nn.Module, split: dict[str, Tensor], batch_size: int = 32) -> float:
    model.eval()
    matrix = ConfusionMatrix(NUM_CLASSES, IGNORE_INDEX)
    for start in range(0, len(split["images"]), batch_size):
        images = normalize(split["images"][start : start + batch_size])
        matrix.update(model(images).argmax(1), split["masks"][start : start + batch_size].long())
    model.train()
    return float(matrix.compute()["mIoU"])


# ----------------------------------------------------------------------------- teacher


def ensure_teacher(protocol: Protocol, data: dict, out: Path) -> tuple[nn.Module, dict]:
    """Train (once) and score the teacher; cache its pyramid features on the train scenes."""
    folder = out / f"teacher-{protocol.key(*TEACHER_FIELDS)}"
    folder.mkdir(parents=True, exist_ok=True)
    weights, record_path = folder / "teacher.pt", folder / "teacher.json"
    teacher = build_fpn(protocol.teacher_encoder, protocol.teacher_pyramid)
    record = _read_json(record_path)
    if record is not None and weights.is_file():
        teacher.load_state_dict(torch.load(weights, weights_only=True))
        return teacher.eval(), record
    log.info("training the teacher (%d steps)", protocol.teacher_steps)
    torch.manual_seed(1000)
    start = time.perf_counter()
    optimizer = torch.optim.AdamW(
        teacher.parameters(), lr=protocol.lr, weight_decay=protocol.weight_decay
    )
    scheduler = schedule(optimizer, protocol.warmup_steps, protocol.teacher_steps)
    train = data["train"]
    order = batch_order(len(train["images"]), protocol.batch_size, protocol.teacher_steps, 1000)
    for step, indices in enumerate(order):
        loss = task_loss(
            teacher, (normalize(train["images"][indices]), train["masks"][indices].long())
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        _progress("teacher", step, len(order), start, loss)
    teacher.eval()
    record = {
        "selection": miou(teacher, data["selection"]),
        "test": miou(teacher, data["test"]),
        "seconds": round(time.perf_counter() - start, 1),
        "parameters": sum(p.numel() for p in teacher.parameters()),
    }
    _atomic_save(teacher.state_dict(), weights)
    _write_json(record, record_path)
    return teacher, record


def teacher_features(protocol: Protocol, teacher: nn.Module, data: dict, out: Path) -> list[Tensor]:
    """The teacher's tapped features on every train scene, float16 ``[N, C, h_i, w_i]`` each."""
    path = out / f"teacher-{protocol.key(*TEACHER_FIELDS)}" / "features.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    images = data["train"]["images"]
    chunks: list[list[Tensor]] = [[] for _ in protocol.taps]
    with torch.no_grad(), FeatureTaps(teacher, list(protocol.taps)) as taps:
        for start in range(0, len(images), 32):
            teacher(normalize(images[start : start + 32]))
            for chunk, feature in zip(chunks, taps.features, strict=True):
                chunk.append(feature.half())
    features = [torch.cat(chunk) for chunk in chunks]
    _atomic_save(features, path)
    return features


# ----------------------------------------------------------------------------- methods


class WeightedSum(nn.Module):
    """``sum_k weight_k * loss_k``: several feature losses as one (same calling convention)."""

    def __init__(self, losses: dict[str, nn.Module], weights: dict[str, float]) -> None:
        super().__init__()
        self.parts = nn.ModuleDict(losses)
        self.weights = dict(weights)

    def forward(self, student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
        return sum(self.weights[k] * loss(student, teacher) for k, loss in self.parts.items())


@dataclass(frozen=True)
class Method:
    """How one method's loss is made. ``freekd``: FreeKDLoss settings (prompts tuned with
    ``tuner``); ``plus_mse``: the spatial MSE term of the official recipes added (each part
    calibrated to ratio 1 first)."""

    kind: str  # none | mse | cwd | mgd | freekd | frequency
    freekd: dict[str, Any] = field(default_factory=dict)
    tuner: dict[str, Any] = field(default_factory=dict)
    args: dict[str, Any] = field(default_factory=dict)
    plus_mse: bool = False

    def prompt_key(self) -> str:
        """Hash of what stage 1 depends on (stage-2-only settings share the prompts)."""
        stage1 = {k: v for k, v in self.freekd.items() if k not in STAGE2_ONLY}
        text = json.dumps({"freekd": stage1, "tuner": self.tuner}, sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:10]


#: FreeKDLoss settings that only stage 2 reads: variants differing only in them share prompts.
STAGE2_ONLY = frozenset(
    {
        "relational",
        "relation_temperature",
        "relation_source",
        "include_low",
        "band_weighting",
        "decoupled",
        "student_masks",
        "student_mask_warmup",
    }
)

STABLE = dict(
    preset="paper",
    mask_logits="normalized",
    relational="cosine",
    relation_temperature=0.1,
)
STABLE_TUNER = dict(resynthesis="centered")

METHODS: dict[str, Method] = {
    "none": Method("none"),
    "mse": Method("mse"),
    # CWD on features: tau 1 (the CWD authors' and the FreeKD authors' feature configs).
    "cwd": Method("cwd", args={"tau": 1.0}),
    # MGD, segmentation mask ratio 0.75; alpha only scales the loss, which calibration absorbs.
    "mgd": Method("mgd", args={"mask_ratio": 0.75}),
    "freekd-official": Method("freekd", freekd=dict(preset="official")),
    "freekd-paper": Method("freekd", freekd=dict(preset="paper")),
    "freekd-stable": Method("freekd", freekd=STABLE, tuner=STABLE_TUNER),
    "freekd-stable+mse": Method("freekd", freekd=STABLE, tuner=STABLE_TUNER, plus_mse=True),
    # ablations of freekd-stable, one part changed each (run at freekd-stable's mu)
    "stable-no-masks": Method(
        "frequency",
        args={"relational": "cosine", "relation_temperature": 0.1, "include_low": False},
    ),
    "stable-raw-logits": Method(
        "freekd", freekd={**STABLE, "mask_logits": "raw"}, tuner=STABLE_TUNER
    ),
    "stable-scaled-logits": Method(
        "freekd", freekd={**STABLE, "mask_logits": "scaled"}, tuner=STABLE_TUNER
    ),
    "stable-sum-resynthesis": Method("freekd", freekd=STABLE),
    "stable-relational-off": Method(
        "freekd", freekd={**STABLE, "relational": False}, tuner=STABLE_TUNER
    ),
    "stable-relational-raw": Method(
        "freekd", freekd={**STABLE, "relational": True}, tuner=STABLE_TUNER
    ),
    "stable-low-band": Method("freekd", freekd={**STABLE, "include_low": True}, tuner=STABLE_TUNER),
    "stable-T1": Method("freekd", freekd={**STABLE, "num_prompts": 1}, tuner=STABLE_TUNER),
    "stable-T6": Method("freekd", freekd={**STABLE, "num_prompts": 6}, tuner=STABLE_TUNER),
}
ABLATIONS = tuple(name for name in METHODS if name.startswith("stable-"))
PRESETS["full"] = dataclasses.replace(PRESETS["full"], ablations=ABLATIONS)


def freekd_loss(method: Method, channels: list[int], levels: list[int]) -> FreeKDLoss:
    settings = dict(method.freekd)
    preset = settings.pop("preset")
    return FreeKDLoss.preset(preset, channels, levels=levels, **settings)


def make_loss(
    method: Method, channels: list[int], levels: list[int], prompts: Path | None
) -> nn.Module:
    """The unweighted distillation loss of ``method`` (prompts loaded for FreeKD)."""
    if method.kind == "mse":
        return FeatureMSE()
    if method.kind == "cwd":
        return ChannelWiseDistillation(**method.args)
    if method.kind == "mgd":
        return MaskedGenerativeDistillation(channels, **method.args)
    if method.kind == "frequency":
        return FrequencyL1(channels, levels=min(levels), **method.args)
    loss = freekd_loss(method, channels, levels)
    loss.load_prompts(prompts)
    return loss


# ----------------------------------------------------------------------------- stage 1


def ensure_prompts(
    name: str, protocol: Protocol, teacher: nn.Module, data: dict, out: Path, levels: list[int]
) -> tuple[Path, dict]:
    """Tune (once per FreeKD configuration) the prompts of ``name``; returns the file and the
    stage-1 diagnostic."""
    method = METHODS[name]
    folder = out / f"prompts-{protocol.key(*PROMPT_FIELDS)}-{method.prompt_key()}"
    path, record_path = folder / "prompts.safetensors", folder / "diagnostic.json"
    record = _read_json(record_path)
    if record is not None and path.is_file():
        return path, record
    folder.mkdir(parents=True, exist_ok=True)
    channels = [protocol.teacher_pyramid] * len(protocol.taps)
    loss = freekd_loss(method, channels, levels)
    torch.manual_seed(2000)
    tuner = PromptTuner(teacher, list(protocol.taps), loss, task_loss, **method.tuner)
    optimizer = torch.optim.Adam(
        tuner.trainable_parameters(), lr=protocol.prompt_lr, weight_decay=1e-3
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, protocol.prompt_steps, eta_min=1e-6
    )
    train = data["train"]
    order = batch_order(len(train["images"]), protocol.batch_size, protocol.prompt_steps, 2000)
    probe = _batch(data["selection"], torch.arange(min(32, len(data["selection"]["images"]))))
    before = tuner.diagnostics(probe) if hasattr(tuner, "diagnostics") else None
    start = time.perf_counter()
    tuner.train()
    for step, indices in enumerate(order):
        terms = tuner(_batch(train, indices))
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()
        scheduler.step()
        _progress(f"prompts {name}", step, len(order), start, terms["loss"])
    tuner.mark_tuned()
    tuner.eval()
    record = {
        "steps": protocol.prompt_steps,
        "seconds": round(time.perf_counter() - start, 1),
        "before": _jsonable(before),
        "after": _jsonable(tuner.diagnostics(probe)) if hasattr(tuner, "diagnostics") else None,
        "effective_channels": effective_channels(loss, teacher, protocol, probe),
    }
    tuner.taps.remove()
    loss.save_prompts(path)
    _write_json(record, record_path)
    return path, record


def effective_channels(
    loss: FreeKDLoss, teacher: nn.Module, protocol: Protocol, batch: tuple[Tensor, Tensor]
) -> list[float] | None:
    """Per distilled layer, the participation ratio ``(sum w)^2 / sum w^2`` of the relational
    channel weight on the teacher's features (teacher x teacher: the student's is not trained
    yet), averaged over images; ``None`` when the relational term is off."""
    if loss.gates is None:
        return None
    with torch.no_grad(), FeatureTaps(teacher, list(protocol.taps)) as taps:
        teacher(batch[0])
        features = taps.features
    ratios = []
    for index, gate in enumerate(loss.gates):
        following = features[index + 1] if index + 1 < len(features) else None
        omega = gate(features[index], features[index], following, following)
        ratios.append(float((omega.sum(1) ** 2 / omega.pow(2).sum(1)).mean()))
    return ratios


# ----------------------------------------------------------------------------- students


@dataclass
class Student:
    """A student with its taps, projections and distillation loss, built for ``seed``."""

    model: nn.Module
    taps: FeatureTaps
    projections: nn.ModuleList
    loss: nn.Module | None

    def parameters(self) -> list[nn.Parameter]:
        extra = list(self.loss.parameters()) if self.loss is not None else []
        trainable = [*self.model.parameters(), *self.projections.parameters(), *extra]
        return [p for p in trainable if p.requires_grad]

    def step_losses(
        self, batch: tuple[Tensor, Tensor], teacher_feats: list[Tensor]
    ) -> tuple[Tensor, Tensor | None, list[Tensor]]:
        """Task loss, unweighted distillation loss and the student's tapped features."""
        task = task_loss(self.model, batch)
        features = self.taps.features
        if self.loss is None:
            return task, None, features
        projected = [phi(f) for phi, f in zip(self.projections, features, strict=True)]
        return task, self.loss(projected, teacher_feats), features


def build_student(protocol: Protocol, method: Method, seed: int, loss: nn.Module | None) -> Student:
    """The seed fixes the student's initialization; projections (and loss parts such as MGD's
    generator) are initialised from their own seeded stream, so every method's student starts
    from the same weights."""
    torch.manual_seed(seed)
    model = build_fpn(protocol.student_encoder, protocol.student_pyramid)
    with torch.random.fork_rng():
        torch.manual_seed(10_000 + seed)
        projections = nn.ModuleList(
            Projection(protocol.student_pyramid, protocol.teacher_pyramid, None, conv=True)
            for _ in protocol.taps
        )
        if loss is not None:
            for module in loss.modules():
                if module is not loss and hasattr(module, "reset_parameters"):
                    module.reset_parameters()
    torch.manual_seed(20_000 + seed)  # the stream MGD's random masks draw from
    return Student(model, FeatureTaps(model, list(protocol.taps)), projections, loss)


def _batch(split: dict[str, Tensor], indices: Tensor) -> tuple[Tensor, Tensor]:
    return normalize(split["images"][indices]), split["masks"][indices].long()


def _teacher_batch(features: list[Tensor], indices: Tensor) -> list[Tensor]:
    return [f[indices].float() for f in features]


def calibrate(
    protocol: Protocol, method: Method, loss: nn.Module, data: dict, features: list[Tensor]
) -> float:
    """``mu0`` of ``loss`` on the seed-0 student at initialization, over a few batches."""
    student = build_student(protocol, method, 0, loss)
    order = batch_order(
        len(data["train"]["images"]), protocol.batch_size, protocol.calibration_batches, 0
    )
    tasks, distills, tapped = [], [], []
    for indices in order:
        task, distill, feats = student.step_losses(
            _batch(data["train"], indices), _teacher_batch(features, indices)
        )
        tasks.append(task)
        distills.append(distill)
        tapped.append(feats)
    student.taps.remove()
    return calibrate_weight(tasks, distills, tapped)


def train_student(
    protocol: Protocol,
    name: str,
    mu: float,
    seed: int,
    steps: int,
    data: dict,
    features: list[Tensor] | None,
    prompts: Path | None,
    levels: list[int],
    evaluate_every: int | None = None,
    constant_lr: bool = False,
    stop_when: Callable[[list[list[float]]], bool] | None = None,
) -> dict[str, Any]:
    """Train one student; returns its selection and test mIoU (and the selection curve every
    ``evaluate_every`` steps, if asked; ``stop_when(curve)`` true ends the run early)."""
    method = METHODS[name]
    channels = [protocol.teacher_pyramid] * len(protocol.taps)
    loss = None if method.kind == "none" else make_loss(method, channels, levels, prompts)
    if method.plus_mse:
        loss = combined_with_mse(protocol, method, loss, data, features)
    student = build_student(protocol, method, seed, loss)
    optimizer = torch.optim.AdamW(
        student.parameters(), lr=protocol.lr, weight_decay=protocol.weight_decay
    )
    scheduler = schedule(optimizer, protocol.warmup_steps, steps, constant=constant_lr)
    order = batch_order(len(data["train"]["images"]), protocol.batch_size, steps, seed)
    curve, start = [], time.perf_counter()
    for step, indices in enumerate(order):
        teacher_feats = _teacher_batch(features, indices) if loss is not None else []
        task, distill, _ = student.step_losses(_batch(data["train"], indices), teacher_feats)
        total = task if distill is None else task + mu * distill
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        scheduler.step()
        if evaluate_every and (step + 1) % evaluate_every == 0:
            curve.append([step + 1, miou(student.model, data["selection"])])
            log.info("  %s step %d: selection mIoU %.2f", name, step + 1, curve[-1][1])
            if stop_when is not None and stop_when(curve):
                break
    student.taps.remove()
    result = {
        "method": name,
        "mu": mu,
        "seed": seed,
        "steps": steps,
        "selection": miou(student.model, data["selection"]),
        "test": miou(student.model, data["test"]),
        "seconds": round(time.perf_counter() - start, 1),
        "seconds_per_step": round((time.perf_counter() - start) / max(1, steps), 4),
    }
    if curve:
        result["curve"] = curve
    return result


def combined_with_mse(
    protocol: Protocol, method: Method, loss: nn.Module, data: dict, features: list[Tensor]
) -> WeightedSum:
    """``mu0_a * loss + mu0_mse * MSE``: each part calibrated to ratio 1 before the sum."""
    base = dataclasses.replace(method, plus_mse=False)
    mse = FeatureMSE()
    weights = {
        "freekd": calibrate(protocol, base, loss, data, features),
        "mse": calibrate(protocol, Method("mse"), mse, data, features),
    }
    return WeightedSum({"freekd": loss, "mse": mse}, weights)


# ----------------------------------------------------------------------------- the protocol


class Bench:
    """The cached phases of one preset."""

    def __init__(
        self, preset: str, out: Path, workers: int, methods: Sequence[str] | None = None
    ) -> None:
        self.preset, self.protocol = preset, PRESETS[preset]
        if methods is not None:  # a subset, in the given order (the cache is shared)
            self.protocol = dataclasses.replace(
                self.protocol,
                methods=tuple(m for m in methods if m in self.protocol.methods),
                ablations=tuple(m for m in methods if m in self.protocol.ablations),
            )
        self.out, self.workers = out, workers
        self.report_only = False
        self.out.mkdir(parents=True, exist_ok=True)
        self.runs = self.out / f"runs-{self.protocol.key(*STUDENT_FIELDS)}"
        self.runs.mkdir(exist_ok=True)
        self.data = load_data(self.protocol, out)
        self.teacher, self.teacher_record = ensure_teacher(self.protocol, self.data, out)
        self.features = teacher_features(self.protocol, self.teacher, self.data, out)
        sizes = [tuple(f.shape[-2:]) for f in self.features]
        self.levels = auto_levels(sizes, min_band=2, max_levels=3)
        self.sizes = [list(s) for s in sizes]
        self.started = time.perf_counter()

    # --------------------------------------------------------------- cached pieces

    def prompts(self, name: str) -> tuple[Path | None, dict | None]:
        method = METHODS[name]
        if method.kind != "freekd":
            return None, None
        return ensure_prompts(name, self.protocol, self.teacher, self.data, self.out, self.levels)

    def mu0(self, name: str) -> float | None:
        method = METHODS[name]
        if method.kind == "none":
            return None
        path = self.runs / "calibration.json"
        table = _read_json(path) or {}
        if name not in table:
            prompts, _ = self.prompts(name)
            channels = [self.protocol.teacher_pyramid] * len(self.protocol.taps)
            loss = make_loss(method, channels, self.levels, prompts)
            if method.plus_mse:
                loss = combined_with_mse(self.protocol, method, loss, self.data, self.features)
            table[name] = calibrate(self.protocol, method, loss, self.data, self.features)
            _write_json(table, path)
        return table[name]

    def student_steps(self) -> int:
        if self.protocol.student_steps is not None:
            return self.protocol.student_steps
        return self.plateau()["student_steps"]

    def plateau(self) -> dict[str, Any]:
        path = self.runs / "plateau.json"
        record = _read_json(path)
        if record is None:
            log.info(
                "plateau check: one undistilled student, %d steps", self.protocol.plateau_steps
            )
            result = train_student(
                self.protocol,
                "none",
                0.0,
                0,
                self.protocol.plateau_steps,
                self.data,
                None,
                None,
                self.levels,
                evaluate_every=self.protocol.plateau_every,
                constant_lr=True,
                stop_when=lambda curve: plateau_steps(curve)["reached"],
            )
            record = {"curve": result["curve"], **plateau_steps(result["curve"])}
            _write_json(record, path)
        return record

    def run(self, name: str, factor: float | None, seed: int) -> dict[str, Any]:
        """One student (cached): ``mu = factor * mu0`` (``None`` for no distillation)."""
        label = f"{name}/mu{factor:g}/seed{seed}" if factor is not None else f"{name}/seed{seed}"
        path = self.runs / (label.replace("/", "__") + ".json")
        cached = _read_json(path)
        if cached is not None:
            return cached
        return {"pending": label, "path": str(path), "name": name, "factor": factor, "seed": seed}

    def execute(self, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Run the pending jobs (``--workers`` at a time), caching each result."""
        pending = [j for j in jobs if "pending" in j]
        done = [j for j in jobs if "pending" not in j]
        if not pending or self.report_only:
            return done
        # prompts and calibration first, in this process (they are shared by the jobs)
        specs = []
        for job in pending:
            prompts, _ = self.prompts(job["name"])
            mu0 = self.mu0(job["name"])
            mu = 0.0 if mu0 is None else job["factor"] * mu0
            specs.append((job, prompts, mu))
        steps = self.student_steps()
        log.info("%d students to train (%d cached), %d steps each", len(specs), len(done), steps)
        arguments = [
            (self.preset, str(self.out), job["name"], mu, job["seed"], steps, prompts, self.levels)
            for job, prompts, mu in specs
        ]
        start = time.perf_counter()
        if self.workers > 1:
            with concurrent.futures.ProcessPoolExecutor(
                self.workers, initializer=_worker_init
            ) as pool:
                futures = {
                    pool.submit(_worker_run, *a): s for a, s in zip(arguments, specs, strict=True)
                }
                for count, future in enumerate(concurrent.futures.as_completed(futures), 1):
                    job = futures[future][0]
                    done.append(self._store(job, future.result(), count, len(specs), start))
        else:
            for count, (job, prompts, mu) in enumerate(specs, 1):
                result = train_student(
                    self.protocol,
                    job["name"],
                    mu,
                    job["seed"],
                    steps,
                    self.data,
                    self.features,
                    prompts,
                    self.levels,
                )
                done.append(self._store(job, result, count, len(specs), start))
        return done

    def _store(self, job: dict, result: dict, count: int, total: int, start: float) -> dict:
        result["factor"] = job["factor"]
        _write_json(result, Path(job["path"]))
        elapsed = time.perf_counter() - start
        log.info(
            "run %d of %d: %s -> selection %.2f, test %.2f (%.0f s; %.1f min elapsed, "
            "~%.1f min left)",
            count,
            total,
            job["pending"],
            result["selection"],
            result["test"],
            result["seconds"],
            elapsed / 60,
            elapsed / count * (total - count) / 60,
        )
        return result

    # --------------------------------------------------------------- phases

    def sweep(self) -> dict[str, float]:
        """Each method's chosen factor (best selection mIoU on seed 0)."""
        methods = [m for m in self.protocol.methods if METHODS[m].kind != "none"]
        jobs = [self.run(m, f, 0) for m in methods for f in self.protocol.mu_factors]
        results = self.execute(jobs)
        chosen = {}
        for name in methods:
            rows = [r for r in results if r["method"] == name]
            chosen[name] = max(rows, key=lambda r: r["selection"])["factor"]
        return chosen

    def seeds(self, chosen: dict[str, float]) -> list[dict[str, Any]]:
        jobs = []
        for name in self.protocol.methods:
            factor = chosen.get(name)
            jobs += [self.run(name, factor, seed) for seed in self.protocol.seeds]
        return self.execute(jobs)

    def ablations(self, chosen: dict[str, float]) -> list[dict[str, Any]]:
        factor = chosen.get("freekd-stable", 1.0)
        jobs = [self.run(name, factor, 0) for name in self.protocol.ablations]
        # the ablations are calibrated like every method, then run at freekd-stable's factor
        return self.execute(jobs)


def plateau_steps(curve: list[list[float]], gain: float = 0.5, extra: float = 0.2) -> dict:
    """The first evaluated step count ``s`` from which ``1.2 s`` steps gain less than ``gain``
    mIoU, twice in a row (scores interpolated linearly between evaluations)."""
    steps = [c[0] for c in curve]
    scores = [c[1] for c in curve]

    def score_at(step: float) -> float | None:
        if step > steps[-1]:
            return None
        points = list(zip(steps, scores, strict=True))
        for (s0, v0), (s1, v1) in zip(points, points[1:], strict=False):
            if s0 <= step <= s1:
                return v0 + (v1 - v0) * (step - s0) / (s1 - s0)
        return scores[0]

    gains = []
    for step, score in zip(steps, scores, strict=True):
        later = score_at(step * (1 + extra))
        if later is None:
            break
        gains.append((step, later - score))
    for (step, first), (_, second) in zip(gains, gains[1:], strict=False):
        if first < gain and second < gain:
            return {"student_steps": int(step), "gains": gains, "reached": True}
    return {"student_steps": int(steps[-1]), "gains": gains, "reached": False}


# ----------------------------------------------------------------------------- workers


_WORKER: dict[str, Any] = {}


def _worker_init() -> None:
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)


def _worker_run(preset, out, name, mu, seed, steps, prompts, levels) -> dict[str, Any]:
    if _WORKER.get("key") != (preset, out):
        protocol = PRESETS[preset]
        data = load_data(protocol, Path(out))
        teacher, _ = ensure_teacher(protocol, data, Path(out))
        _WORKER.update(
            key=(preset, out),
            data=data,
            features=teacher_features(protocol, teacher, data, Path(out)),
        )
    return train_student(
        PRESETS[preset],
        name,
        mu,
        seed,
        steps,
        _WORKER["data"],
        _WORKER["features"],
        prompts,
        levels,
    )


# ----------------------------------------------------------------------------- report


def paired(results: list[dict], name: str, reference: str) -> list[float]:
    by_seed = {r["seed"]: r["test"] for r in results if r["method"] == reference}
    return [
        round(r["test"] - by_seed[r["seed"]], 3)
        for r in results
        if r["method"] == name and r["seed"] in by_seed
    ]


REFERENCES = ("mse", "cwd", "mgd", "freekd-stable")
"""The methods every row of a ``--runs`` table is paired against (when they were run)."""


def runs_table(results: list[dict], references: Sequence[str] = REFERENCES) -> dict[str, dict]:
    """The students of ``--runs`` grouped by method and weight factor: per-seed scores, the
    test mean +- std, and the paired test differences (shared seeds) against each reference
    method's row with the most seeds."""
    rows: dict[str, dict] = {}
    for r in sorted(results, key=lambda r: (r["method"], r["factor"] or 0.0, r["seed"])):
        label = r["method"] if r["factor"] is None else f"{r['method']} x{r['factor']:.3g}"
        row = rows.setdefault(
            label, {"method": r["method"], "factor": r["factor"], "mu": r["mu"], "seeds": {}}
        )
        row["seeds"][r["seed"]] = {"selection": r["selection"], "test": r["test"]}
    for row in rows.values():
        test = [v["test"] for v in row["seeds"].values()]
        row["mean"] = statistics.fmean(test)
        row["std"] = statistics.stdev(test) if len(test) > 1 else 0.0
    chosen = {}
    for label, row in rows.items():
        best = chosen.get(row["method"])
        if row["method"] in references and (
            best is None or len(row["seeds"]) > len(rows[best]["seeds"])
        ):
            chosen[row["method"]] = label
    for label, row in rows.items():
        row["paired"] = {}
        for reference, other in chosen.items():
            if other == label:
                continue
            shared = sorted(set(row["seeds"]) & set(rows[other]["seeds"]))
            row["paired"][reference] = {
                "seeds": shared,
                "test": [
                    round(row["seeds"][s]["test"] - rows[other]["seeds"][s]["test"], 3)
                    for s in shared
                ],
            }
    return rows


def runs_markdown(rows: dict[str, dict], references: Sequence[str] = REFERENCES) -> str:
    """``runs_table`` as a markdown table (test mIoU; selection in parentheses)."""
    present = [m for m in references if any(r["method"] == m for r in rows.values())]
    lines = [
        "| method | mu | test per seed (selection) | test mean ± std | "
        + " | ".join(f"vs {m} (test, per seed)" for m in present)
        + " |",
        "|---|---|---|---|" + "---|" * len(present),
    ]
    for label, row in rows.items():
        seeds = ", ".join(
            f"s{s}: {v['test']:.2f} ({v['selection']:.2f})" for s, v in row["seeds"].items()
        )
        cells = []
        for m in present:
            pair = row["paired"].get(m)
            diffs = pair["test"] if pair else []
            cells.append(
                f"{verdict(diffs)} ({', '.join(f'{d:+.2f}' for d in diffs)})" if diffs else ""
            )
        mu = "" if row["factor"] is None else f"{row['mu']:.3g}"
        lines.append(
            f"| {label} | {mu} | {seeds} | {row['mean']:.2f} ± {row['std']:.2f} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines) + "\n"


def verdict(differences: list[float]) -> str:
    if not differences:
        return "n/a"
    if all(d > 0 for d in differences):
        return "beats"
    if all(d < 0 for d in differences):
        return "loses"
    return "within noise"


def protocol_record(bench: Bench) -> dict[str, Any]:
    """What the results depend on: data, models, schedule, splits, machine."""
    protocol = bench.protocol
    plateau = (
        bench.plateau() if protocol.student_steps is None else {"fixed": protocol.student_steps}
    )
    return {
        "task": "segmentation",
        "preset": bench.preset,
        "image_size": protocol.image_size,
        "distilled_maps": bench.sizes,
        "wavelet_levels": bench.levels,
        "taps": list(protocol.taps),
        "teacher": f"smp FPN {protocol.teacher_encoder}, pyramid {protocol.teacher_pyramid}",
        "student": f"smp FPN {protocol.student_encoder}, pyramid {protocol.student_pyramid}",
        "projection": "always (1x1 conv per layer)",
        "initialization": "from scratch (no pretrained weights)",
        "student_steps": bench.student_steps(),
        "batch_size": protocol.batch_size,
        "optimizer": (
            f"AdamW lr {protocol.lr}, weight decay {protocol.weight_decay}, "
            f"{protocol.warmup_steps} warm-up steps, cosine to 0"
        ),
        "prompt_steps": protocol.prompt_steps,
        "plateau": plateau,
        "seeds": list(protocol.seeds),
        "mu_factors": list(protocol.mu_factors),
        "splits": {
            "train": f"{protocol.train_scenes} scenes, train digit pool, scene seed 0",
            "selection": f"{protocol.selection_scenes} scenes, train digit pool, scene seed 1",
            "test": f"{protocol.test_scenes} scenes, val digit pool (disjoint digits)",
        },
        "machine": machine(),
        "torch": torch.__version__,
    }


def summary(bench: Bench, chosen: dict, seeds: list[dict], ablations: list[dict]) -> dict:
    protocol = bench.protocol
    methods = {}
    sweep_rows = [_read_json(p) for p in sorted(bench.runs.glob("*__mu*__seed0.json"))]
    calibration = _read_json(bench.runs / "calibration.json") or {}
    for name in protocol.methods:
        rows = sorted((r for r in seeds if r["method"] == name), key=lambda r: r["seed"])
        test = [r["test"] for r in rows]
        entry = {
            "mu": rows[0]["mu"] if rows else None,
            "mu0": calibration.get(name),
            "factor": chosen.get(name),
            "mu_sweep": {
                f"{r['mu']:.4g}": r["selection"] for r in sweep_rows if r and r["method"] == name
            },
            "test": test,
            "selection": [r["selection"] for r in rows],
            "mean": statistics.fmean(test) if test else None,
            "std": statistics.stdev(test) if len(test) > 1 else 0.0,
            "seconds_per_step": statistics.median(r["seconds_per_step"] for r in rows)
            if rows
            else None,
        }
        methods[name] = entry
    pairs = {
        name: {"vs_mse": paired(seeds, name, "mse"), "vs_cwd": paired(seeds, name, "cwd")}
        for name in protocol.methods
        if name not in ("mse", "cwd", "none")
    }
    diagnostics = {}
    for name in protocol.methods + protocol.ablations:
        if METHODS[name].kind == "freekd":
            _, record = bench.prompts(name)
            diagnostics[name] = record
    return {
        "protocol": protocol_record(bench),
        "teacher_score": bench.teacher_record,
        "methods": methods,
        "paired": pairs,
        "ablations": {
            r["method"]: {"mu": r["mu"], "selection": r["selection"], "test": r["test"]}
            for r in ablations
        },
        "diagnostics": diagnostics,
        "detection": None,
    }


def markdown(result: dict) -> str:
    p = result["protocol"]
    lines = [
        f"Quality benchmark v2 ({p['preset']}): {p['task']} at {p['image_size']} px, "
        f"distilled maps "
        f"{p['distilled_maps']} (wavelet levels {p['wavelet_levels']}), teacher {p['teacher']} "
        f"(test mIoU {result['teacher_score']['test']:.2f}), student {p['student']}, "
        f"{p['student_steps']} steps, seeds {p['seeds']}; {p['machine']}, torch {p['torch']}.",
        "",
        "| method | mu (x mu0) | test mIoU | per seed | vs MSE (per seed) | vs CWD (per seed) "
        "| s/step |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in result["methods"].items():
        if m["mean"] is None:
            continue
        pair = result["paired"].get(name, {})
        cells = []
        for key in ("vs_mse", "vs_cwd"):
            diffs = pair.get(key, [])
            cells.append(
                f"{verdict(diffs)} ({', '.join(f'{d:+.2f}' for d in diffs)})" if diffs else ""
            )
        mu = "" if m["mu"] is None or m["factor"] is None else f"{m['mu']:.3g} ({m['factor']:.3g})"
        lines.append(
            f"| {name} | {mu} | {m['mean']:.2f} ± {m['std']:.2f} | "
            f"{', '.join(f'{v:.2f}' for v in m['test'])} | {cells[0]} | {cells[1]} | "
            f"{m['seconds_per_step'] or 0:.3f} |"
        )
    if result["ablations"]:
        lines += ["", "| ablation (seed 0) | mu | selection | test |", "|---|---|---|---|"]
        for name, a in result["ablations"].items():
            lines.append(f"| {name} | {a['mu']:.3g} | {a['selection']:.2f} | {a['test']:.2f} |")
    return "\n".join(lines) + "\n"


def plots(result: dict, folder: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install matplotlib): no plots")
        return []
    written = []
    plateau = result["protocol"]["plateau"]
    if "curve" in plateau:
        figure, axis = plt.subplots(figsize=(5, 3.5))
        steps, scores = zip(*plateau["curve"], strict=True)
        axis.plot(steps, scores, marker="o", label="no distillation (constant lr)")
        axis.axvline(plateau["student_steps"], color="tab:red", linestyle="--", label="schedule")
        axis.set_xlabel("student steps")
        axis.set_ylabel("selection mIoU")
        axis.set_title("plateau check")
        axis.legend()
        figure.tight_layout()
        written.append(folder / "quality_v2_plateau.png")
        figure.savefig(written[-1], dpi=120)
        plt.close(figure)
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for name, m in result["methods"].items():
        if m["mu_sweep"]:
            mus = sorted(m["mu_sweep"], key=float)
            factors = [float(mu) / m["mu0"] for mu in mus]
            axis.plot(factors, [m["mu_sweep"][mu] for mu in mus], marker="o", label=name)
    axis.set_xscale("log")
    axis.set_xlabel("mu / mu0 (mu0: calibrated gradient ratio 1)")
    axis.set_ylabel("selection mIoU (seed 0)")
    axis.set_title("loss-weight sweeps")
    axis.legend(fontsize=7)
    figure.tight_layout()
    written.append(folder / "quality_v2_sweeps.png")
    figure.savefig(written[-1], dpi=120)
    plt.close(figure)
    names = [n for n, m in result["methods"].items() if m["mean"] is not None]
    if names:
        figure, axis = plt.subplots(figsize=(7, 3.8))
        means = [result["methods"][n]["mean"] for n in names]
        stds = [result["methods"][n]["std"] for n in names]
        axis.bar(range(len(names)), means, yerr=stds, capsize=4)
        axis.axhline(
            result["teacher_score"]["test"], color="tab:red", linestyle="--", label="teacher"
        )
        axis.set_xticks(range(len(names)), names, rotation=35, ha="right")
        seeds = len(result["protocol"]["seeds"])
        axis.set_ylabel(f"test mIoU (mean ± std over {seeds} seeds)")
        axis.legend()
        figure.tight_layout()
        written.append(folder / "quality_v2.png")
        figure.savefig(written[-1], dpi=120)
        plt.close(figure)
    return written


# ----------------------------------------------------------------------------- helpers


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{cpu_model()} ({platform.machine()}), {os.cpu_count()} cores"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux): results differ between models in the
    last bits, so a retrained teacher on another machine is another teacher."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _progress(label: str, step: int, total: int, start: float, loss: Tensor) -> None:
    every = max(1, total // 10)
    if (step + 1) % every == 0 or step + 1 == total:
        elapsed = time.perf_counter() - start
        log.info(
            "  %s: step %d/%d, loss %.4f, %.0f s elapsed, ~%.0f s left",
            label,
            step + 1,
            total,
            float(loss.detach()),
            elapsed,
            elapsed / (step + 1) * (total - step - 1),
        )


def _jsonable(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.tolist() if value.dim() else float(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _write_json(data: Any, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(_jsonable(data), indent=2) + "\n")
    tmp.replace(path)


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


# ----------------------------------------------------------------------------- main


PHASES = ("prompts", "plateau", "sweep", "seeds", "ablations", "all")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--out", type=Path, help="cache folder (default runs/quality_v2/PRESET)")
    parser.add_argument(
        "--phase",
        choices=PHASES,
        default="all",
        help="run up to this phase (prompts: only stage 1 of every FreeKD variant)",
    )
    parser.add_argument("--workers", type=int, default=1, help="students trained at once")
    parser.add_argument("--threads", type=int, help="torch threads of this process")
    parser.add_argument(
        "--methods",
        help="comma-separated subset of the preset's methods and ablations, run in this order",
    )
    parser.add_argument(
        "--runs",
        help="run exactly these students (cached like the phases) and list them: comma-separated "
        "METHOD:FACTOR:SEED, FACTOR a number or fraction (1/3) times the method's mu0, '-' for "
        "none; e.g. mse:1:0,mgd:1/3:0,none:-:2",
    )
    parser.add_argument(
        "--report", action="store_true", help="only write the report from the cache"
    )
    parser.add_argument(
        "--results",
        type=Path,
        help="also write the JSON here (e.g. benchmarks/results/quality_v2.json)",
    )
    args = parser.parse_args(argv)
    args.out = args.out or Path("runs/quality_v2") / args.preset
    if args.methods is not None:
        args.methods = args.methods.split(",")
        known = (*PRESETS[args.preset].methods, *PRESETS[args.preset].ablations)
        unknown = [m for m in args.methods if m not in known]
        if unknown:
            parser.error(
                f"unknown methods {unknown} for --preset {args.preset}: choose from {known}"
            )
    if args.runs is not None:
        args.runs = [_parse_run(parser, item, args.preset) for item in args.runs.split(",")]
    return args


def _parse_run(
    parser: argparse.ArgumentParser, item: str, preset: str
) -> tuple[str, float | None, int]:
    """``METHOD:FACTOR:SEED`` of ``--runs`` as ``(method, factor or None, seed)``."""
    parts = item.split(":")
    known = (*PRESETS[preset].methods, *PRESETS[preset].ablations)
    if len(parts) != 3 or parts[0] not in known:
        parser.error(f"--runs {item!r}: give METHOD:FACTOR:SEED with METHOD one of {known}")
    name, factor, seed = parts
    try:
        value = None if factor == "-" else float(fractions.Fraction(factor))
        return name, value, int(seed)
    except ValueError:
        parser.error(f"--runs {item!r}: FACTOR is a number, a fraction such as 1/3, or '-'")
    raise AssertionError  # parser.error exits


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    if args.threads:
        torch.set_num_threads(args.threads)
    bench = Bench(args.preset, args.out, args.workers, args.methods)
    bench.report_only = args.report
    log.info(
        "teacher: selection %.2f, test %.2f mIoU; maps %s, levels %s",
        bench.teacher_record["selection"],
        bench.teacher_record["test"],
        bench.sizes,
        bench.levels,
    )
    if args.runs is not None:
        jobs = [bench.run(name, factor, seed) for name, factor, seed in args.runs]
        results = bench.execute(jobs)
        table = runs_table(results)
        text = runs_markdown(table)
        (args.out / "runs.md").write_text(text)
        result = {
            "protocol": protocol_record(bench),
            "teacher_score": bench.teacher_record,
            "runs": results,
            "table": table,
        }
        if args.results:
            args.results.parent.mkdir(parents=True, exist_ok=True)
            _write_json(result, args.results)
        print(text)
        return result
    if args.phase == "prompts":
        for name in (*bench.protocol.methods, *bench.protocol.ablations):
            bench.prompts(name)
        return {}
    bench.student_steps()
    chosen: dict[str, float] = {}
    seeds: list[dict] = []
    ablations: list[dict] = []
    phase = PHASES.index(args.phase)
    if phase >= PHASES.index("sweep"):
        chosen = bench.sweep() if not args.report else _cached_choice(bench)
    if phase >= PHASES.index("seeds"):
        seeds = [r for r in bench.seeds(chosen) if "pending" not in r]
    if phase >= PHASES.index("ablations"):
        ablations = [r for r in bench.ablations(chosen) if "pending" not in r]
    result = summary(bench, chosen, seeds, ablations)
    text = markdown(result)
    (args.out / "results.md").write_text(text)
    _write_json(result, args.out / "quality_v2.json")
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        _write_json(result, args.results)
    written = plots(result, args.out)
    print(text)
    print(
        "written:",
        ", ".join(
            str(p) for p in [args.out / "results.md", args.out / "quality_v2.json", *written]
        ),
    )
    return result


def _cached_choice(bench: Bench) -> dict[str, float]:
    chosen = {}
    for name in bench.protocol.methods:
        rows = [bench.run(name, f, 0) for f in bench.protocol.mu_factors]
        rows = [r for r in rows if "pending" not in r]
        if rows and METHODS[name].kind != "none":
            chosen[name] = max(rows, key=lambda r: r["selection"])["factor"]
    return chosen


if __name__ == "__main__":
    main()
