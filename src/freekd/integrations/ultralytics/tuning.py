"""Stage 1 for YOLO teachers: tune the frequency prompts on the frozen teacher.

:func:`tune_prompts` runs :class:`freekd.PromptTuner` on an Ultralytics detection model: the
tapped layers are the ones its ``Detect`` head reads (``Detect.f``), the task loss is the
teacher's own detection loss (box + cls + dfl per image, with the gains it was trained with),
the data comes from an Ultralytics data YAML through Ultralytics' own training loader (mosaic
and the other train-time augmentations), and the prompts are written with their taps
(:func:`~freekd.integrations.ultralytics.prompt_files.save_yolo_prompts`) for stage 2.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from ultralytics.cfg import get_cfg
from ultralytics.data import build_dataloader, build_yolo_dataset
from ultralytics.data.utils import check_det_dataset

from ..._checks import check_choice
from ...losses.freekd import PRESETS, FreeKDLoss
from ...prompts import RESYNTHESES
from ...tuning import PromptTuner, damage_warning, format_diagnostics
from ...wavelets import auto_levels
from .models import ModelSource, detect_taps, load_detection_model, tap_shapes
from .prompt_files import save_yolo_prompts

__all__ = ["TunedPrompts", "detection_task_loss", "tune_prompts", "yolo_batches"]

logger = logging.getLogger("freekd")

_HYPERPARAMETERS = ("box", "cls", "dfl")
"""The loss gains of an Ultralytics detector, taken from the teacher's own training arguments."""


@dataclass
class TunedPrompts:
    """What :func:`tune_prompts` produced.

    Attributes:
        path: the prompt file (safetensors, with ``taps``, ``preset`` and ``imgsz`` recorded).
        taps: the teacher's distilled layers (``Detect.f``), fine to coarse.
        channels: the teacher's channels at those layers.
        levels: the wavelet levels per layer (chosen from the map sizes at ``imgsz``).
        steps: optimizer steps taken.
        seconds: wall time of the tuning loop.
        last_terms: the last step's ``{"loss", "task", "dissimilarity"}`` values.
        diagnostics: :meth:`freekd.PromptTuner.diagnostics` on the last batch (the teacher's
            task loss on its own and on the re-synthesized features, mask saturation).
    """

    path: Path
    taps: list[str]
    channels: list[int]
    levels: list[int]
    steps: int
    seconds: float
    last_terms: dict[str, float] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)


def detection_task_loss(model: nn.Module, batch: Mapping[str, Any]) -> Tensor:
    """An Ultralytics detector's own loss on ``batch`` as one scalar per image: the criterion's
    ``box + cls + dfl`` (gains applied; Ultralytics returns them times the batch size) divided
    by the batch size. ``batch["img"]``: ``[N, 3, H, W]`` in ``[0, 1]``."""
    loss, _ = model.loss(batch)
    return loss.sum() / batch["img"].shape[0]


def yolo_batches(
    data: str | os.PathLike,
    imgsz: int,
    batch: int,
    stride: int,
    device: torch.device,
    workers: int = 0,
    split: str = "train",
) -> Iterator[dict[str, Any]]:
    """Endless training batches of an Ultralytics data YAML, as the trainer feeds them to the
    model: ``{"img": FloatTensor [N, 3, imgsz, imgsz] in [0, 1], "cls", "bboxes",
    "batch_idx", ...}`` on ``device`` (train-time augmentation, shuffled)."""
    info = check_det_dataset(str(data))
    cfg = get_cfg(overrides={"imgsz": imgsz, "batch": batch, "workers": workers, "task": "detect"})
    dataset = build_yolo_dataset(cfg, info[split], batch, info, mode="train", stride=stride)
    loader = build_dataloader(dataset, batch=batch, workers=workers, shuffle=True, device=device)
    while True:
        for items in loader:
            moved = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in items.items()}
            moved["img"] = moved["img"].float() / 255
            yield moved


def _teacher_hyperparameters(teacher: nn.Module, imgsz: int) -> Any:
    """The arguments the detection loss reads (``box``, ``cls``, ``dfl`` gains ...): Ultralytics'
    defaults with the teacher's own training values where it has them."""
    saved = getattr(teacher, "args", None)
    saved = vars(saved) if hasattr(saved, "__dict__") else dict(saved or {})
    own = {key: saved[key] for key in _HYPERPARAMETERS if key in saved}
    return get_cfg(overrides={**own, "imgsz": imgsz, "task": "detect"})


def tune_prompts(
    teacher: ModelSource,
    data: str | os.PathLike,
    output: str | os.PathLike = "prompts.safetensors",
    steps: int = 2000,
    imgsz: int = 640,
    batch: int = 16,
    lr: float = 0.01,
    weight_decay: float = 1e-3,
    preset: str = "recommended",
    dissimilarity_weight: float = 1.0,
    resynthesis: str = "centered",
    loss_options: Mapping[str, Any] | None = None,
    device: str | torch.device | None = None,
    workers: int = 0,
    seed: int = 0,
    log_every: int = 50,
) -> TunedPrompts:
    """Stage 1: tune FreeKD's prompts on a frozen Ultralytics YOLO teacher.

    Args:
        teacher: the trained teacher: a ``.pt`` checkpoint, an ``ultralytics.YOLO`` object or a
            ``DetectionModel`` (copied; never trained here).
        data: an Ultralytics data YAML (the ``train`` split is used).
        output: the prompt file to write (safetensors; the taps, preset and ``imgsz`` are
            recorded in it for :class:`~freekd.integrations.ultralytics.FreeKDTrainer`).
        steps: optimizer steps (the MasKD recipe: 2000).
        imgsz: training image size; the wavelet levels of each layer are chosen from its map
            size at this size (:func:`freekd.auto_levels`).
        batch: images per step.
        lr, weight_decay: Adam on the prompt tokens, cosine decay to 1e-6.
        preset: the FreeKD preset (``"recommended"``, the measured best; ``"paper"``;
            ``"official"``).
        dissimilarity_weight: ``lambda`` of ``L_task + lambda * L_dis``.
        resynthesis: ``"centered"`` (default: the re-synthesis is the identity at
            initialization) or ``"sum"`` (the paper's).
        loss_options: further :class:`freekd.FreeKDLoss` settings (e.g. ``{"num_prompts": 6}``).
        device: ``"cpu"``, ``"cuda:0"``, ... (default: CUDA when available).
        workers: data loader processes.
        seed: seeds the prompt initialization and the data order.
        log_every: log the loss every this many steps (0: never).

    Returns:
        :class:`TunedPrompts` (the file, taps, channels, levels, timing, diagnostics).

    Raises:
        ValueError: a bad ``steps`` / ``preset`` / ``resynthesis``, or a teacher that is not
            a detection model; FileNotFoundError: a missing teacher checkpoint.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    check_choice("preset", preset, tuple(PRESETS))
    check_choice("resynthesis", resynthesis, RESYNTHESES)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_detection_model(teacher, "teacher").to(device)
    model.args = _teacher_hyperparameters(model, imgsz)
    model.criterion = None  # rebuilt with these arguments on the first loss call
    taps = detect_taps(model)
    shapes = tap_shapes(model, imgsz)
    channels = [int(shape[1]) for shape in shapes]
    levels = auto_levels([(int(s[-2]), int(s[-1])) for s in shapes])
    torch.manual_seed(seed)
    loss = FreeKDLoss.preset(preset, channels, **{"levels": levels, **dict(loss_options or {})})
    loss.to(device)
    stride = max(int(model.stride.max()), 32)
    batches = yolo_batches(data, imgsz, batch, stride, device, workers)
    start = time.perf_counter()
    with PromptTuner(
        model, taps, loss, detection_task_loss, dissimilarity_weight, resynthesis
    ) as tuner:
        optimizer = torch.optim.Adam(tuner.trainable_parameters(), lr=lr, weight_decay=weight_decay)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=1e-6)
        tuner.train()
        last: dict[str, float] = {}
        for step in range(1, steps + 1):
            current = next(batches)
            optimizer.zero_grad(set_to_none=True)
            terms = tuner(current)
            if not torch.isfinite(terms["loss"]):
                raise FloatingPointError(
                    f"prompt tuning: the loss is {float(terms['loss'])} at step {step}: lower lr "
                    f"or check the teacher checkpoint and the data"
                )
            terms["loss"].backward()
            optimizer.step()
            schedule.step()
            last = {k: terms[k].detach().item() for k in ("loss", "task", "dissimilarity")}
            if log_every and (step % log_every == 0 or step == steps):
                logger.info(
                    "prompt tuning step %d/%d: loss %.4g (task %.4g, dissimilarity %.4g)",
                    step, steps, last["loss"], last["task"], last["dissimilarity"],
                )  # fmt: skip
        seconds = time.perf_counter() - start
        tuner.mark_tuned()
        diagnostics = tuner.diagnostics(current)
        logger.info("prompt diagnostics (last batch):\n%s", format_diagnostics(diagnostics))
        warning = damage_warning(diagnostics)
        if warning is not None:
            logger.warning(warning)
        extra = {"taps": taps, "preset": preset, "imgsz": imgsz}
        path = save_yolo_prompts(tuner, output, extra)
    if not all(math.isfinite(v) for v in last.values()):
        raise FloatingPointError(f"prompt tuning ended with non-finite terms {last}")
    return TunedPrompts(path, taps, channels, levels, steps, seconds, last, diagnostics)
