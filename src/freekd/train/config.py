"""Configuration of the training jobs: optimizer, learning-rate schedule, trainer settings.

Plain dataclasses, checked on construction: a bad value raises a ``ValueError`` that names the
field, the value and the fix. The recipes of the paper and of the official release are provided
as functions (:func:`prompt_tuning_recipe`, :func:`detection_2x_recipe`,
:func:`segmentation_poly_recipe`); schedules are counted in optimizer steps, so a recipe given
in epochs needs the caller's ``steps_per_epoch``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from .._checks import check_choice

__all__ = [
    "DETECTION_GRAD_CLIP",
    "LOGGERS",
    "OPTIMIZERS",
    "PRECISIONS",
    "SCHEDULES",
    "Logger",
    "OptimConfig",
    "OptimizerName",
    "Precision",
    "ScheduleKind",
    "ScheduleConfig",
    "TrainConfig",
    "detection_2x_recipe",
    "prompt_tuning_recipe",
    "segmentation_poly_recipe",
]

OptimizerName = Literal["sgd", "adam", "adamw"]
ScheduleKind = Literal["constant", "step", "poly", "cosine"]
Precision = Literal["32-true", "bf16-mixed", "16-mixed"]
Logger = Literal["csv", "tensorboard", "wandb", "mlflow"]
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)
SCHEDULES: tuple[str, ...] = get_args(ScheduleKind)
PRECISIONS: tuple[str, ...] = get_args(Precision)
LOGGERS: tuple[str, ...] = get_args(Logger)

DETECTION_GRAD_CLIP = 35.0
"""Gradient-norm clipping of the official detection recipes (MMDetection ``grad_clip``)."""


def _fail(name: str, value: Any, fix: str) -> None:
    raise ValueError(f"{name}={value!r} is not valid: {fix}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_number(name: str, value: Any, minimum: float = 0.0, strict: bool = False) -> None:
    if not _is_number(value) or value < minimum or (strict and value == minimum):
        bound = f"> {minimum}" if strict else f">= {minimum}"
        _fail(name, value, f"use a finite number {bound}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        _fail(name, value, f"use an integer >= {minimum}")


@dataclass
class OptimConfig:
    """Optimizer: ``name`` ``"sgd"`` | ``"adam"`` | ``"adamw"``.

    ``lr`` is the peak learning rate (reached after warm-up); ``momentum`` is used by SGD (with
    Nesterov off), ``betas`` by Adam/AdamW; ``weight_decay`` by all (AdamW: decoupled).
    """

    name: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self) -> None:
        check_choice("OptimConfig.name", self.name, OPTIMIZERS)
        _check_number("OptimConfig.lr", self.lr, strict=True)
        _check_number("OptimConfig.momentum", self.momentum)
        if self.momentum >= 1:
            _fail("OptimConfig.momentum", self.momentum, "use a value in [0, 1)")
        _check_number("OptimConfig.weight_decay", self.weight_decay)
        betas = tuple(self.betas) if isinstance(self.betas, list | tuple) else ()
        if len(betas) != 2 or not all(_is_number(b) and 0 <= b < 1 for b in betas):
            _fail("OptimConfig.betas", self.betas, "use two numbers in [0, 1), e.g. (0.9, 0.999)")
        self.betas = (float(betas[0]), float(betas[1]))


@dataclass
class ScheduleConfig:
    """Learning rate per optimizer step: linear warm-up, then ``kind``.

    Args:
        kind: ``"constant"``; ``"step"`` (times ``gamma`` at each of ``milestones``);
            ``"poly"`` (``min_lr + (lr - min_lr) * (1 - t / total_steps) ** power``);
            ``"cosine"`` (``min_lr + (lr - min_lr) * (1 + cos(pi * t / total_steps)) / 2``).
        total_steps: length of the poly / cosine decay (required for those); the rate stays at
            ``min_lr`` after it.
        warmup_steps: steps of linear warm-up (0: none); the factor goes from ``warmup_ratio`` at
            step 0 to 1 at ``warmup_steps`` and multiplies the main schedule (MMCV's "linear").
        warmup_ratio: the warm-up's starting factor (MMDetection: 0.001).
        milestones: steps at which ``"step"`` multiplies the rate by ``gamma`` (increasing).
        gamma: the step factor.
        power: the poly exponent (0.9 in the segmentation recipes).
        min_lr: the floor of poly / cosine, in absolute learning-rate units.
    """

    kind: str = "constant"
    total_steps: int | None = None
    warmup_steps: int = 0
    warmup_ratio: float = 0.001
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    power: float = 0.9
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        check_choice("ScheduleConfig.kind", self.kind, SCHEDULES)
        if self.kind in ("poly", "cosine") and self.total_steps is None:
            _fail(
                "ScheduleConfig.total_steps",
                None,
                f"the {self.kind!r} schedule decays over total_steps: set it (e.g. to the "
                f"run's max_steps)",
            )
        if self.total_steps is not None:
            _check_int("ScheduleConfig.total_steps", self.total_steps, 1)
        _check_int("ScheduleConfig.warmup_steps", self.warmup_steps, 0)
        _check_number("ScheduleConfig.warmup_ratio", self.warmup_ratio)
        if self.warmup_ratio > 1:
            _fail("ScheduleConfig.warmup_ratio", self.warmup_ratio, "use a factor in [0, 1]")
        milestones = tuple(self.milestones)
        for step in milestones:
            _check_int("ScheduleConfig.milestones[...]", step, 1)
        if list(milestones) != sorted(set(milestones)):
            _fail("ScheduleConfig.milestones", self.milestones, "list increasing step numbers")
        if self.kind == "step" and not milestones:
            _fail("ScheduleConfig.milestones", self.milestones, "'step' needs at least one step")
        self.milestones = milestones
        _check_number("ScheduleConfig.gamma", self.gamma, strict=True)
        _check_number("ScheduleConfig.power", self.power, strict=True)
        _check_number("ScheduleConfig.min_lr", self.min_lr)


@dataclass
class TrainConfig:
    """Trainer settings shared by the three jobs (see :func:`freekd.train.fit`).

    Args:
        max_steps: optimizer steps of the run.
        run_dir: the run folder: checkpoints in ``run_dir/checkpoints``, logs in
            ``run_dir/logs``. A fresh run refuses a non-empty folder unless ``force``.
        val_every_steps: validate every this many steps (``None``: at the end of each epoch,
            when a validation loader is given).
        checkpoint_every_steps: write ``checkpoints/step=NNNNNN.ckpt`` and ``last.ckpt`` every
            this many steps (and ``last.ckpt`` at the end).
        keep_checkpoints: how many step checkpoints to keep (-1: all).
        grad_clip_norm: clip the gradients' global L2 norm to this (``None``: no clipping).
        precision: ``"32-true"``, ``"bf16-mixed"`` or ``"16-mixed"`` (the FreeKD loss and the
            wavelet transforms always run in float32 inside).
        accumulate_grad_batches: batches per optimizer step.
        accelerator, devices, num_nodes, strategy: as in ``lightning.Trainer`` (``"ddp"`` for
            several GPUs / nodes; ``"ddp_find_unused_parameters_true"`` when the student has
            parameters that get no gradient).
        seed: seeds Python, NumPy and torch at the start (``lightning.seed_everything``).
        deterministic: ``torch.use_deterministic_algorithms`` for the run: ``True``, ``False``,
            or ``"warn"`` (default: warn about non-deterministic ops instead of failing).
        logger: ``"csv"`` (default), ``"tensorboard"``, ``"wandb"`` or ``"mlflow"`` (each of
            the last three needs its package, the extra of the same name:
            ``pip install 'freekd[wandb]'``); ``None``: no logger. Every logger writes under
            ``run_dir/logs`` unless ``logger_args`` (or the logger's own environment variable)
            says otherwise (see :func:`freekd.train.loggers.make_logger`).
        logger_args: keyword arguments of the Lightning logger's constructor, over freekd's
            defaults (e.g. ``{"project": "detectors", "offline": True}`` for wandb,
            ``{"tracking_uri": "http://mlflow:5000"}`` for mlflow); names the logger does not
            take are refused before the run starts.
        log_every_steps: logging interval of the training terms (the logger's rows, and
            the log lines printed without a progress bar).
        progress_bar: show a progress bar counted in steps (``False``: a log line every
            ``log_every_steps`` steps through the ``freekd`` logger instead, for log files).
        model_summary: print the model summary at the start.
        sanity_val_steps: validation batches run before training (Lightning's sanity check).
    """

    max_steps: int = 1000
    run_dir: str | Path = "runs/freekd"
    val_every_steps: int | None = None
    checkpoint_every_steps: int = 500
    keep_checkpoints: int = -1
    grad_clip_norm: float | None = None
    precision: str = "32-true"
    accumulate_grad_batches: int = 1
    accelerator: str = "auto"
    devices: int | str | list[int] = "auto"
    num_nodes: int = 1
    strategy: Any = "auto"
    seed: int = 0
    deterministic: bool | str = "warn"
    logger: str | None = "csv"
    logger_args: dict[str, Any] = field(default_factory=dict)
    log_every_steps: int = 50
    progress_bar: bool = True
    model_summary: bool = True
    sanity_val_steps: int = 2
    extra_trainer_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_int("TrainConfig.max_steps", self.max_steps, 1)
        if not isinstance(self.run_dir, str | Path) or not str(self.run_dir):
            _fail("TrainConfig.run_dir", self.run_dir, "give a folder path for the run")
        self.run_dir = Path(self.run_dir)
        if self.val_every_steps is not None:
            _check_int("TrainConfig.val_every_steps", self.val_every_steps, 1)
        _check_int("TrainConfig.checkpoint_every_steps", self.checkpoint_every_steps, 1)
        if self.keep_checkpoints != -1:
            _check_int("TrainConfig.keep_checkpoints (or -1 for all)", self.keep_checkpoints, 1)
        if self.grad_clip_norm is not None:
            _check_number("TrainConfig.grad_clip_norm", self.grad_clip_norm, strict=True)
        check_choice("TrainConfig.precision", self.precision, PRECISIONS)
        _check_int("TrainConfig.accumulate_grad_batches", self.accumulate_grad_batches, 1)
        _check_int("TrainConfig.num_nodes", self.num_nodes, 1)
        _check_int("TrainConfig.seed", self.seed, 0)
        if self.deterministic not in (True, False, "warn"):
            _fail("TrainConfig.deterministic", self.deterministic, "use True, False or 'warn'")
        if self.logger is not None:
            check_choice("TrainConfig.logger", self.logger, LOGGERS)
        self._check_logger_args()
        _check_int("TrainConfig.log_every_steps", self.log_every_steps, 1)
        _check_int("TrainConfig.sanity_val_steps", self.sanity_val_steps, 0)
        count = isinstance(self.devices, int) and not isinstance(self.devices, bool)
        if count and self.devices < 1 and self.devices != -1:
            _fail("TrainConfig.devices", self.devices, "use a count >= 1, -1 (all) or 'auto'")
        if not isinstance(self.extra_trainer_args, dict):
            _fail("TrainConfig.extra_trainer_args", self.extra_trainer_args, "use a dict")

    def _check_logger_args(self) -> None:
        """``logger_args``: a mapping with string keys, and only with a logger to take it."""
        args = self.logger_args
        if not isinstance(args, dict) or not all(isinstance(key, str) for key in args):
            _fail(
                "TrainConfig.logger_args",
                args,
                "use a mapping of the logger's keyword arguments, e.g. {'project': 'freekd'}",
            )
        if args and self.logger is None:
            _fail(
                "TrainConfig.logger_args",
                args,
                "TrainConfig.logger is None, so no logger would take them: choose a logger "
                "or leave logger_args empty",
            )


def prompt_tuning_recipe(total_steps: int = 2000) -> tuple[OptimConfig, ScheduleConfig]:
    """Prompt tuning (the authors' MasKD recipe): Adam lr 0.01, weight decay 1e-3, cosine decay
    to 1e-6 over 2000 steps, no warm-up."""
    return (
        OptimConfig(name="adam", lr=0.01, weight_decay=1e-3),
        ScheduleConfig(kind="cosine", total_steps=total_steps, min_lr=1e-6),
    )


def detection_2x_recipe(
    steps_per_epoch: int, epochs: int = 24, milestones_epochs: tuple[int, ...] = (16, 22)
) -> tuple[OptimConfig, ScheduleConfig]:
    """MMDetection's "2x" schedule in steps: SGD lr 0.02 (batch 16), momentum 0.9, weight decay
    1e-4; linear warm-up over 1000 steps from 0.001; lr x0.1 at epochs 16 and 22 of 24.

    Returns the optimizer and schedule; clip gradients at :data:`DETECTION_GRAD_CLIP` and train
    ``epochs * steps_per_epoch`` steps. Scale ``lr`` linearly for another total batch size.
    """
    _check_int("steps_per_epoch", steps_per_epoch, 1)
    return (
        OptimConfig(name="sgd", lr=0.02, momentum=0.9, weight_decay=1e-4),
        ScheduleConfig(
            kind="step",
            total_steps=epochs * steps_per_epoch,
            warmup_steps=1000,
            warmup_ratio=0.001,
            milestones=tuple(e * steps_per_epoch for e in milestones_epochs),
            gamma=0.1,
        ),
    )


def segmentation_poly_recipe(total_steps: int = 40000) -> tuple[OptimConfig, ScheduleConfig]:
    """The Cityscapes distillation protocol (CWD / MGD baselines): SGD lr 0.01, momentum 0.9,
    weight decay 5e-4, poly decay with power 0.9 to 1e-4 (40k steps for DeepLabV3-R18)."""
    return (
        OptimConfig(name="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4),
        ScheduleConfig(kind="poly", total_steps=total_steps, power=0.9, min_lr=1e-4),
    )
