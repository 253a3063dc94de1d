"""The jobs that ``freekd`` runs, each from a :class:`~freekd.pipeline.config.RunConfig`.

Run folder (``config.run_dir``)::

    teacher/            train-teacher: checkpoints/, logs/, config.yaml, teacher.safetensors
    prompts/            tune-prompts: ..., prompts.safetensors
    student_freekd/     distill: ..., student.safetensors (student only), metrics.json
    student_baseline/   distill --baseline (the student on its task loss alone): student.safetensors
    <student job>/exported/   export: <ckpt>.safetensors, <ckpt>_hf/ (--format hf), <ckpt>.onnx
    masks.png           visualize

Every job refuses a job folder that already holds a run unless ``force`` (which clears it) or
``resume`` (which continues it exactly from a checkpoint: ``"last"``, ``"auto"``, a ``.ckpt``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

from .._checks import check_choice, check_positive_float
from .._choices import EXPORT_FORMATS, ROLES, SPLITS
from ..checkpoints import export_student
from ..distill import Distiller, OutputLoss
from ..losses import FeatureMSE
from ..train import DistillModule, PromptTuningModule, TeacherModule, fit
from .builders import (
    build_baseline_loss,
    build_data,
    build_freekd_loss,
    build_spec,
    calibration_batches,
    example_batch,
    job_dir,
    load_model_weights,
    num_classes_of,
    resolve_device,
    tap_channels,
    train_loader,
    trainer_config,
    val_loader,
)
from .config import ModelSection, RunConfig, dump_config
from .onnx_export import DEFAULT_TOLERANCE

__all__ = [
    "HEAD_TAPS",
    "PRIMARY_METRIC",
    "JobResult",
    "distill",
    "evaluate_model",
    "export",
    "job_summary",
    "onnx_record",
    "prompts_file",
    "score_tables",
    "teacher_weights",
    "train_baseline",
    "train_teacher",
    "tune_prompts",
    "visualize",
    "write_json",
]

logger = logging.getLogger("freekd")

HEAD_TAPS = {
    "retinanet": "head.regression_head",
    "fcos": "head.regression_head:0",
}
"""Default box-regression head outputs for the official recipes' SmoothL1 term."""

PRIMARY_METRIC = {"segmentation": "mIoU", "detection": "AP"}


@dataclass
class JobResult:
    """What a job produced: its folder, output files, last logged values, wall time."""

    name: str
    directory: Path
    outputs: dict[str, Path] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    completed: bool = True
    step: int = 0
    """The last completed step."""
    total_steps: int = 0
    """The steps the job runs for."""


class _WriteConfig(pl.Callback):
    """Writes the run's configuration into the job folder once the folder is prepared."""

    def __init__(self, config: RunConfig, directory: Path) -> None:
        self.config, self.directory = config, directory

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            dump_config(self.config, self.directory / "config.yaml")


def _metadata(config: RunConfig, section: ModelSection, role: str, num_classes: int) -> dict:
    return {
        "task": config.task,
        "arch": section.arch,
        "backbone": section.backbone,
        "num_classes": num_classes,
        "args": section.args,
        "role": role,
    }


def _fit(
    config: RunConfig,
    module: pl.LightningModule,
    loader: Any,
    directory: Path,
    steps: int,
    resume: str | None,
    force: bool,
    val: Any = None,
) -> tuple[Any, bool]:
    result = fit(
        module,
        loader,
        val,
        trainer_config(config, directory, steps),
        resume=resume,
        force=force,
        callbacks=[_WriteConfig(config, directory)],
    )
    return result, result.global_step >= steps


@dataclass(frozen=True)
class _TrainJob:
    """One training job: the Lightning ``module`` fitted on ``train_set`` for ``steps`` steps in
    ``directory``, then ``model``'s state dict exported to ``weights_path`` with ``metadata``.
    ``start``: ``time.perf_counter()`` when the job began (for its duration)."""

    role: str
    module: pl.LightningModule
    train_set: Any
    directory: Path
    steps: int
    model: nn.Module
    weights_path: Path
    metadata: dict[str, Any]
    start: float


def _train_and_export(
    config: RunConfig, job: _TrainJob, resume: str | None, force: bool
) -> JobResult:
    """Fit ``job.module`` (with periodic validation when asked) and, when the run reached its
    last step, export ``job.model``'s state dict with its metadata to ``job.weights_path``."""
    result, done = _fit(
        config,
        job.module,
        train_loader(config, job.train_set),
        job.directory,
        job.steps,
        resume,
        force,
        _segmentation_val(config),
    )
    metadata = {**job.metadata, "step": result.global_step}  # export reuses it at that step
    outputs = {"weights": export_student(job.model, job.weights_path, metadata)} if done else {}
    elapsed = time.perf_counter() - job.start
    return JobResult(
        job.role,
        job.directory,
        outputs,
        result.metrics,
        elapsed,
        done,
        result.global_step,
        job.steps,
    )


def _segmentation_val(config: RunConfig) -> Any:
    """A validation loader for periodic validation (the task loss on the val set), when
    ``train.val_every_steps`` asks for it; detectors give no loss in eval mode."""
    if config.train.val_every_steps is None:
        return None
    if config.task == "detection":
        raise ValueError(
            "train.val_every_steps: periodic validation is done for segmentation only "
            "(torchvision detectors give no loss in eval mode); run freekd evaluate on a "
            "checkpoint instead, and set val_every_steps: null"
        )
    return val_loader(config, build_data(config, "val"))


_COMMANDS = {
    "teacher": "train-teacher",
    "prompts": "tune-prompts",
    "student": "distill",
    "baseline": "distill --baseline",
}
_FILE_ROLES = {
    "teacher.safetensors": "the trained teacher (tune-prompts and distill load it)",
    "prompts.safetensors": "the tuned prompts (distill and visualize load them)",
    "student.safetensors": "the student alone (evaluate, export; loads with strict=True)",
    "calibration.json": "the distillation weight that mu: auto chose",
    "metrics.json": "the scores of the last evaluate",
    "config.yaml": "the settings of the run",
}


def job_summary(result: JobResult) -> str:
    """What a finished (or stopped) job did, for people: its steps and time, the last logged
    objective and terms (and the validation loss when there is one), and the files in its
    folder with what each one is for. Lines, no trailing newline."""
    from ..train.progress import format_duration, format_terms

    command = _COMMANDS.get(result.name, result.name)
    when = format_duration(result.seconds)
    if result.completed:
        head = f"{command} finished: {result.step} steps in {when}"
    else:
        head = (
            f"{command} stopped at step {result.step} of {result.total_steps} after {when}; "
            f"continue with --resume"
        )
    lines = [head]
    terms = format_terms(result.metrics)
    if terms:
        lines.append(f"  last step: {terms}")
    validation = format_terms(result.metrics, "val/")
    if validation:
        lines.append(f"  validation: {validation}")
    lines.append(f"files in {result.directory}:")
    rows = _job_files(result.directory)
    width = max(len(name) for name, _ in rows) if rows else 0
    lines += [f"  {name:{width}s}  {role}" for name, role in rows]
    return "\n".join(lines)


def _job_files(directory: Path) -> list[tuple[str, str]]:
    """``(path relative to directory, what it is)`` of the files a job leaves in its folder."""
    rows = [(name, role) for name, role in _FILE_ROLES.items() if (directory / name).is_file()]
    last = directory / "checkpoints" / "last.ckpt"
    if last.is_file():
        target = f" -> {os.readlink(last)}" if last.is_symlink() else ""
        steps = len(list(last.parent.glob("step=*.ckpt")))
        rows.append(
            (
                f"checkpoints/last.ckpt{target}",
                f"resume with --resume ({steps} step file{'s' if steps != 1 else ''} kept)",
            )
        )
    logs = sorted(
        directory.glob("logs/version_*/metrics.csv"),
        key=lambda path: int(path.parent.name.split("_")[-1]),
    )
    if logs:
        rows.append((str(logs[-1].relative_to(directory)), "the logged terms of every step"))
    return rows + _logger_rows(directory)


def _logger_rows(directory: Path) -> list[tuple[str, str]]:
    """``(folder/, what it is)`` of what the TensorBoard, wandb and MLflow loggers wrote in a
    job's ``logs/`` (the newest run of each)."""
    logs, rows = directory / "logs", []
    events = sorted(logs.glob("version_*/events.out.tfevents.*"), key=os.path.getmtime)
    if events:
        folder = events[-1].parent.relative_to(directory)
        rows.append((f"{folder}/", f"TensorBoard events (tensorboard --logdir {logs})"))
    runs = [path for path in logs.glob("wandb/*run-*") if path.is_dir() and not path.is_symlink()]
    runs.sort(key=os.path.getmtime)
    if runs:
        offline = runs[-1].name.startswith("offline-")
        role = f"the wandb run (offline: wandb sync {runs[-1]})" if offline else "the wandb run"
        rows.append((f"{runs[-1].relative_to(directory)}/", role))
    if (logs / "mlruns").is_dir():
        uri = (logs / "mlruns").resolve().as_uri()
        rows.append(("logs/mlruns/", f"the MLflow runs (tracking URI {uri})"))
    return rows


# ---------------------------------------------------------------------------- inputs


def teacher_weights(config: RunConfig) -> Path:
    """The teacher's weights: ``teacher.checkpoint``, else what ``train-teacher`` wrote."""
    if config.teacher.checkpoint:
        path = Path(config.teacher.checkpoint)
        if not path.is_file():
            raise FileNotFoundError(
                f"teacher.checkpoint {str(path)!r} does not exist: fix the path, or set it to "
                f"null and run freekd train-teacher"
            )
        return path
    path = job_dir(config, "teacher") / "teacher.safetensors"
    if not path.is_file():
        raise FileNotFoundError(
            f"no teacher weights: teacher.checkpoint is not set and {str(path)!r} does not "
            f"exist; set teacher.checkpoint or run freekd train-teacher first"
        )
    return path


def prompts_file(config: RunConfig) -> Path:
    """The tuned prompts: ``prompts.file``, else what ``tune-prompts`` wrote."""
    path = Path(config.prompts.file or job_dir(config, "prompts") / "prompts.safetensors")
    if not path.is_file():
        raise FileNotFoundError(
            f"no tuned prompts at {str(path)!r}: run freekd tune-prompts first, or set prompts.file"
        )
    return path


def _teacher(config: RunConfig, num_classes: int, checkpoint: str | os.PathLike | None = None):
    spec = build_spec(config, config.teacher, num_classes)
    path = Path(checkpoint) if checkpoint is not None else teacher_weights(config)
    report = load_model_weights(spec.model, path, "teacher")
    logger.info(
        "teacher %s/%s: %s from %s", config.teacher.arch, config.teacher.backbone, report, path
    )
    return spec


def _taps(config: RunConfig, spec: Any, role: str) -> list[str]:
    taps = config.distill.teacher_taps if role == "teacher" else config.distill.student_taps
    return list(taps) if taps else list(spec.taps)


def _channels(config: RunConfig, spec: Any, batch: Any) -> list[int]:
    taps = _taps(config, spec, "teacher")
    if taps == list(spec.taps):
        return list(spec.tap_channels)
    return tap_channels(spec.model, taps, batch[0])


# ---------------------------------------------------------------------------- jobs


def _train_model(
    config: RunConfig,
    role: str,
    section: ModelSection,
    output: str,
    resume: str | None,
    force: bool,
) -> JobResult:
    start = time.perf_counter()
    directory = job_dir(config, role)
    train_set = build_data(config, "train")
    num_classes = num_classes_of(train_set)
    torch.manual_seed(config.seed)  # the weights are built before fit() seeds the run
    spec = build_spec(config, section, num_classes)
    job = section.train
    module = TeacherModule(spec.model, spec.task_loss, job.optimizer, job.schedule)
    if role == "baseline":  # checkpoints say which job wrote them (checked on resume)
        module.job_name = "distill --baseline"
    return _train_and_export(
        config,
        _TrainJob(
            role=role,
            module=module,
            train_set=train_set,
            directory=directory,
            steps=job.steps,
            model=spec.model,
            weights_path=directory / output,
            metadata=_metadata(config, section, role, num_classes),
            start=start,
        ),
        resume,
        force,
    )


def train_teacher(config: RunConfig, resume: str | None = None, force: bool = False) -> JobResult:
    """Train the teacher on its task loss (``teacher.train``) -> ``teacher/teacher.safetensors``.

    Refuses when ``teacher.checkpoint`` is set (the teacher is given)."""
    if config.teacher.checkpoint:
        raise ValueError(
            f"teacher.checkpoint is set ({config.teacher.checkpoint!r}): that teacher is used as "
            f"it is; to train one into {job_dir(config, 'teacher')}, unset it "
            f"(--set teacher.checkpoint=null)"
        )
    return _train_model(config, "teacher", config.teacher, "teacher.safetensors", resume, force)


def train_baseline(config: RunConfig, resume: str | None = None, force: bool = False) -> JobResult:
    """Train the student on its task loss alone, with the student's job settings (the
    baseline FreeKD is compared with) -> ``student_baseline/student.safetensors``."""
    return _train_model(config, "baseline", config.student, "student.safetensors", resume, force)


def tune_prompts(config: RunConfig, resume: str | None = None, force: bool = False) -> JobResult:
    """Stage 1: tune the prompts on the frozen teacher -> ``prompts/prompts.safetensors``."""
    start = time.perf_counter()
    directory = job_dir(config, "prompts")
    train_set = build_data(config, "train")
    spec = _teacher(config, num_classes_of(train_set))
    batch = example_batch(config, train_set)
    torch.manual_seed(config.seed)
    loss = build_freekd_loss(config, _channels(config, spec, batch))
    from ..tuning import PromptTuner

    tuner = PromptTuner(
        spec.model,
        _taps(config, spec, "teacher"),
        loss,
        spec.task_loss,
        dissimilarity_weight=config.prompts.dissimilarity_weight,
        resynthesis=config.prompts.resynthesis,
    )
    job = config.prompts
    module = PromptTuningModule(
        tuner, job.optimizer, job.schedule, prompts_path=directory / "prompts.safetensors"
    )
    module.frozen_source = str(teacher_weights(config))  # named if a resume finds it changed
    loader = train_loader(config, train_set, job.batch_size)
    result, done = _fit(config, module, loader, directory, job.steps, resume, force)
    outputs = {"prompts": directory / "prompts.safetensors"} if done else {}
    metrics = dict(result.metrics)
    if done and result.trainer.is_global_zero:
        batch_size = job.batch_size or config.data.batch_size
        metrics.update(_report_tuning(config, tuner, train_set, batch_size))
    seconds = time.perf_counter() - start
    return JobResult(
        "prompts", directory, outputs, metrics, seconds, done, result.global_step, job.steps
    )


_DIAGNOSTIC_BATCHES = 2
_DAMAGE_FIX = (
    "lower prompts.optimizer.lr or prompts.dissimilarity_weight, or use prompts.resynthesis: "
    "centered / distill.loss.mask_logits: normalized"
)


def _report_tuning(config: RunConfig, tuner: Any, train_set: Any, batch_size: int) -> dict:
    """Measure what the tuned prompts do to the teacher on the first training items (up to
    ``_DIAGNOSTIC_BATCHES`` batches), log it as a table, warn when tuning damaged the teacher;
    returns the task losses as ``diagnostics/...`` metrics."""
    from lightning.pytorch.utilities import move_data_to_device
    from torch.utils.data import Subset

    from ..tuning import damage_warning, format_diagnostics, merge_diagnostics

    tuner.to(resolve_device(config.device))
    device = tuner.loss.prompts[0].tokens.device
    results = []
    for start in range(0, min(len(train_set), _DIAGNOSTIC_BATCHES * batch_size), batch_size):
        items = Subset(train_set, range(start, min(start + batch_size, len(train_set))))
        batch = move_data_to_device(example_batch(config, items, batch_size), device)
        results.append(tuner.diagnostics(batch))
    report = merge_diagnostics(results)
    logger.info("prompt diagnostics (first training items):\n%s", format_diagnostics(report))
    warning = damage_warning(report, fix=_DAMAGE_FIX)
    if warning is not None:
        logger.warning(warning)
    return {f"diagnostics/{key}": report[key] for key in ("clean_task", "resynthesized_task")}


def _output_losses(config: RunConfig) -> dict[str, OutputLoss]:
    settings = config.distill
    if settings.head_weight == 0:
        return {}
    teacher_head = settings.teacher_head or HEAD_TAPS.get(config.teacher.arch)
    student_head = settings.student_head or HEAD_TAPS.get(config.student.arch)
    if teacher_head is None or student_head is None:
        raise ValueError(
            f"distill.head_weight > 0 compares box-regression head outputs, which have no "
            f"default for {config.teacher.arch} / {config.student.arch} (Faster R-CNN's box "
            f"head runs on proposals that differ between the models): set "
            f"distill.teacher_head and distill.student_head, or head_weight: 0"
        )
    loss = nn.SmoothL1Loss()
    return {"head": OutputLoss(teacher_head, student_head, loss, settings.head_weight)}


def distill(config: RunConfig, resume: str | None = None, force: bool = False) -> JobResult:
    """Stage 2: distill the student from the teacher with the tuned prompts (``mu`` * FreeKD,
    plus the official recipe's MSE and head terms when their weights are > 0) ->
    ``student_freekd/student.safetensors``; with a baseline ``distill.method``, ``mu`` * that
    loss (no prompts) -> ``student_<method>/student.safetensors``."""
    start = time.perf_counter()
    directory = job_dir(config, "student")
    train_set = build_data(config, "train")
    num_classes = num_classes_of(train_set)
    teacher = _teacher(config, num_classes)
    batch = example_batch(config, train_set)
    settings = config.distill
    channels = _channels(config, teacher, batch)
    if settings.method == "freekd":
        loss = build_freekd_loss(config, channels)
        loss.load_prompts(prompts_file(config))
    else:
        loss = build_baseline_loss(config, channels)
    feature_losses: dict[str, nn.Module] = {settings.method: loss}
    weights = {settings.method: 1.0 if settings.mu == "auto" else settings.mu}
    if settings.mse_weight > 0:
        feature_losses["mse"] = FeatureMSE()
        weights["mse"] = settings.mse_weight
    torch.manual_seed(config.seed)  # the student as in the baseline run
    student = build_spec(config, config.student, num_classes)
    distiller = Distiller(
        teacher.model,
        student.model,
        _taps(config, teacher, "teacher"),
        _taps(config, student, "student"),
        feature_losses,
        student.task_loss,
        example_batch=batch,
        loss_weights=weights,
        projection=settings.projection,
        output_losses=_output_losses(config),
        nonfinite=settings.nonfinite,
    )
    calibration = None
    if settings.mu == "auto":
        calibration = calibrated_mu(config, distiller, train_set)
        distiller.loss_weights[settings.method] = calibration["mu"]
    job = config.student.train
    module = DistillModule(
        distiller, job.optimizer, job.schedule, student_path=directory / "student.safetensors"
    )
    module.frozen_source = str(teacher_weights(config))  # named if a resume finds it changed
    # DistillModule exported already; export again with the architecture in the metadata.
    result = _train_and_export(
        config,
        _TrainJob(
            role="student",
            module=module,
            train_set=train_set,
            directory=directory,
            steps=job.steps,
            model=student.model,
            weights_path=directory / "student.safetensors",
            metadata=_metadata(config, config.student, "student", num_classes),
            start=start,
        ),
        resume,
        force,
    )
    if calibration is not None:
        result.metrics["distill/mu"] = calibration["mu"]
        if rank_zero_only.rank == 0:
            write_json(calibration, directory / "calibration.json")
    return result


def calibrated_mu(config: RunConfig, distiller: Distiller, train_set: Any) -> dict[str, Any]:
    """``distill.mu: auto``: ``mu_factor * mu0`` of the distillation term, ``mu0`` from
    :meth:`freekd.Distiller.calibrate` on the student at initialization. A resumed run
    rebuilds the same initial student (same seed) before loading its checkpoint, so it gets the
    same weight. Returns the record written to the job's ``calibration.json``."""
    settings = config.distill
    mu0 = distiller.calibrate(calibration_batches(config, train_set))[settings.method]
    logger.info(
        "distill.mu: auto -> %.4g (mu0 %.4g x mu_factor %g: the %s term pulls the student's "
        "features as hard as its task loss at initialization)",
        settings.mu_factor * mu0,
        mu0,
        settings.mu_factor,
        settings.method,
    )
    return {
        "method": settings.method,
        "mu0": mu0,
        "mu_factor": settings.mu_factor,
        "mu": settings.mu_factor * mu0,
        "batches": settings.calibration_batches,
    }


# ---------------------------------------------------------------------------- evaluation


def default_weights(config: RunConfig, role: str) -> Path:
    """The weights a role's job produced (``teacher``: see :func:`teacher_weights`)."""
    if role == "teacher":
        return teacher_weights(config)
    path = job_dir(config, role) / "student.safetensors"
    if not path.is_file():
        job = "distill" if role == "student" else "distill --baseline"
        raise FileNotFoundError(
            f"no {role} weights at {str(path)!r}: run freekd {job} first, or pass --checkpoint"
        )
    return path


def _finite(value: Any) -> Any:
    """NaN / inf as ``None`` (valid JSON), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def write_json(data: Any, path: str | os.PathLike) -> Path:
    """``data`` as indented JSON (NaN as null), written atomically."""
    from .._io import atomic_write

    text = json.dumps(_finite(data), indent=2) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _robustness(
    config: RunConfig,
    model: nn.Module,
    loader: Any,
    names: list[str],
    severities: Sequence[int],
    seed: int | None,
    **kwargs: Any,
) -> dict[str, Any]:
    """:func:`~freekd.evaluation.evaluate_robustness` on the validation loader, with the
    normalization the pipeline's transforms applied (segmentation with ``data.normalize``)."""
    from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from ..evaluation import evaluate_robustness

    normalized = config.task == "segmentation" and config.data.normalize
    return evaluate_robustness(
        config.task,
        model,
        loader,
        corruptions=names,
        severities=severities,
        seed=config.seed if seed is None else seed,
        normalization=(IMAGENET_MEAN, IMAGENET_STD) if normalized else None,
        **kwargs,
    )


def evaluate_model(
    config: RunConfig,
    role: str = "student",
    checkpoint: str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
    corruptions: str | Sequence[str] | None = None,
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    corruption_seed: int | None = None,
    coco_backend: str = "auto",
) -> dict[str, Any]:
    """Score a teacher, FreeKD student or baseline student on the validation set.

    ``role``: ``teacher`` | ``student`` | ``baseline`` (which architecture, and where its
    weights are by default); ``checkpoint``: a ``.safetensors`` / ``.pt`` file or a job's
    Lightning ``.ckpt``. Returns and writes (``output``, default ``<job folder>/metrics.json``)
    ``{task, role, arch, backbone, checkpoint, parameters, metric, value, scores}``.

    ``corruptions``: also score the model on corrupted copies of the validation set
    (``"all"``, a comma-separated string or a list of names of
    :mod:`freekd.evaluation.corruptions`) at ``severities``, with random corruptions seeded by
    ``corruption_seed`` (default ``config.seed``); the result then holds ``robustness``:
    ``{metric, clean, mPC, rPC, per_corruption: {name: {"1": m, ..., "mean": m}}, ...}``
    (:func:`freekd.evaluation.evaluate_robustness`). Images are corrupted in ``[0, 1]``, before
    the ImageNet normalization of ``data.normalize``.

    ``coco_backend`` (detection): ``"auto"`` | ``"faster_coco_eval"`` | ``"pycocotools"``
    (:func:`freekd.evaluation.detection.resolve_coco_backend`); the result names the one used
    (``coco_backend``). A segmentation run refuses any other value than ``"auto"``.
    """
    from ..evaluation import evaluate
    from ..evaluation.corruptions import resolve_corruptions
    from ..models import count_parameters

    names = resolve_corruptions(corruptions)  # unknown names fail before any work
    backend = _coco_backend(config, coco_backend)  # as must a missing backend

    check_choice("model", role, ROLES)
    val_set = build_data(config, "val")
    num_classes = num_classes_of(val_set)
    section = config.teacher if role == "teacher" else config.student
    path = Path(checkpoint) if checkpoint is not None else default_weights(config, role)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist: check the path")
    spec = build_spec(config, section, num_classes)
    load_model_weights(spec.model, path, role)
    device = resolve_device(config.device)
    loader = val_loader(config, val_set)
    kwargs: dict[str, Any] = {"device": device}
    if config.task == "segmentation":
        kwargs["num_classes"] = num_classes
        class_names = getattr(getattr(val_set, "dataset", val_set), "class_names", None)
        if class_names is not None and len(class_names) == num_classes:  # scores by name
            kwargs["class_names"] = list(class_names)
    else:
        base = getattr(val_set, "dataset", val_set)
        mapping = getattr(base, "label_to_category_id", None)
        if mapping is not None:
            kwargs["label_to_category_id"] = mapping
        annotation = getattr(base, "annotation_file", None)
        if annotation is not None and val_set is base:
            kwargs["annotation_file"] = annotation
        kwargs["backend"] = backend
    start = time.perf_counter()
    robustness = None
    if names:
        robustness = _robustness(
            config, spec.model, loader, names, severities, corruption_seed, **kwargs
        )
        scores = robustness.pop("clean_scores")
    else:
        scores = evaluate(config.task, spec.model, loader, **kwargs)
    metric = PRIMARY_METRIC[config.task]
    result = {
        "task": config.task,
        "role": role,
        "arch": section.arch,
        "backbone": section.backbone,
        "checkpoint": str(path),
        "parameters": count_parameters(spec.model),
        "metric": metric,
        "value": scores[metric],
        "images": len(val_set),  # type: ignore[arg-type]
        "seconds": round(time.perf_counter() - start, 2),
        "scores": scores,
    }
    if backend is not None:
        result["coco_backend"] = backend
    if robustness is not None:
        result["robustness"] = robustness
    target = Path(output) if output is not None else job_dir(config, role) / "metrics.json"
    write_json(result, target)
    result["output"] = str(target)
    return result


def _coco_backend(config: RunConfig, backend: str) -> str | None:
    """The COCO backend a detection run's evaluation uses (``None`` for segmentation, which
    refuses a backend asked for by name: it would be ignored)."""
    from ..evaluation.detection import COCO_BACKENDS, resolve_coco_backend

    check_choice("coco_backend", backend, COCO_BACKENDS)
    if config.task == "detection":
        return resolve_coco_backend(backend)
    if backend != "auto":
        raise ValueError(
            f"coco_backend={backend!r} is for detection, and this run's task is "
            f"{config.task}: leave it out (mIoU needs no COCO backend)"
        )
    return None


def score_tables(result: dict[str, Any]) -> list[str]:
    """The tables of an :func:`evaluate_model` result for people, each with its header: the
    per-class scores (segmentation) and the robustness table (``--corruptions``)."""
    from ..evaluation.robustness import format_robustness_table
    from ..evaluation.segmentation import format_class_table

    tables = []
    scores = result.get("scores", {})
    if isinstance(scores.get("per_class_IoU"), dict):
        tables.append(format_class_table(scores))
    if result.get("robustness") is not None:
        tables.append(format_robustness_table(result["robustness"]))
    return tables


# ---------------------------------------------------------------------------- export, masks


def export(
    config: RunConfig,
    checkpoint: str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
    role: str = "student",
    format: str = "safetensors",
    tolerance: float = DEFAULT_TOLERANCE,
) -> Path:
    """Export the student alone (no teacher, prompts or projections) of a distillation (or
    baseline) run's Lightning checkpoint (default ``student_freekd/checkpoints/last.ckpt``).
    Returns the file or folder written.

    ``format``:

    - ``"safetensors"`` (default): its state dict, checked by loading it with ``strict=True``
      into a freshly built student. Default output:
      ``<job folder>/exported/<checkpoint name>.safetensors``; without ``output``, when the job
      already wrote ``<job folder>/student.safetensors`` at the checkpoint's step (a completed
      run), that file is checked and returned instead of written again.
    - ``"hf"``: a Hugging Face style folder (:mod:`freekd.pipeline.hub`: ``config.json``,
      ``model.safetensors``, the model card ``README.md`` with the scores of the job's
      ``metrics.json`` when there is one, ``run_config.yaml``), checked by reloading it with
      :func:`~freekd.pipeline.hub.from_pretrained`. Default:
      ``<job folder>/exported/<checkpoint name>_hf/``.
    - ``"onnx"``: an ONNX file checked with onnxruntime against PyTorch on the first validation
      image (:func:`~freekd.pipeline.onnx_export.export_onnx`; written only when the max abs
      difference is at most ``tolerance``), and beside it ``<file>.json``, the check's record
      (:func:`onnx_record`). Default: ``<job folder>/exported/<checkpoint name>.onnx``. Needs
      the ``onnx`` extra.
    """
    check_choice("export format", format, EXPORT_FORMATS)
    if format == "onnx":
        from .onnx_export import require_onnx

        require_onnx()  # before any data is read
        check_positive_float("tolerance", tolerance)
    if role not in ("student", "baseline"):
        raise ValueError(f"export writes students: role must be student or baseline, got {role!r}")
    directory = job_dir(config, role)
    path = Path(checkpoint) if checkpoint is not None else directory / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {str(path)!r} does not exist: run freekd distill first or pass "
            f"--checkpoint"
        )
    val_set = build_data(config, "val")
    num_classes = num_classes_of(val_set)
    if format == "safetensors":
        return _export_safetensors(config, path, output, role, num_classes)
    spec = build_spec(config, config.student, num_classes)
    load_model_weights(spec.model, path, role)
    spec.model.eval()
    suffix = "_hf" if format == "hf" else ".onnx"
    target = Path(output) if output is not None else directory / "exported" / f"{path.stem}{suffix}"
    job = _ExportJob(config, role, path, target, spec.model, num_classes, val_set)
    return _export_hf(job) if format == "hf" else _export_onnx(job, tolerance)


def _export_safetensors(
    config: RunConfig, path: Path, output: str | os.PathLike | None, role: str, num_classes: int
) -> Path:
    """``export(format="safetensors")``: the state dict of ``path``'s student, checked."""
    import safetensors.torch

    directory = job_dir(config, role)
    written = _written_student(directory, path) if output is None else None
    if written is not None:
        fresh = build_spec(config, config.student, num_classes).model
        fresh.load_state_dict(safetensors.torch.load_file(str(written)), strict=True)
        return written
    spec = build_spec(config, config.student, num_classes)
    load_model_weights(spec.model, path, role)
    target = (
        Path(output) if output is not None else directory / "exported" / f"{path.stem}.safetensors"
    )
    export_student(spec.model, target, _metadata(config, config.student, role, num_classes))
    fresh = build_spec(config, config.student, num_classes).model
    fresh.load_state_dict(safetensors.torch.load_file(str(target)), strict=True)
    return target


@dataclass(frozen=True)
class _ExportJob:
    """One ``hf`` or ``onnx`` export: the student of ``checkpoint`` (loaded, eval mode) of the
    run ``config`` (``role``: student or baseline), to ``target``; ``val_set`` gives the
    sample input (its first image) and the class names."""

    config: RunConfig
    role: str
    checkpoint: Path
    target: Path
    model: nn.Module
    num_classes: int
    val_set: Any

    def sample(self) -> torch.Tensor:
        """The first validation image as the model takes it: ``[1, 3, H, W]`` (segmentation,
        transformed as for evaluation) or ``[3, H, W]`` in ``[0, 1]`` (detection)."""
        image = self.val_set[0][0]
        return image[None] if self.config.task == "segmentation" else image

    def source(self) -> dict[str, Any]:
        """Where the weights come from: the checkpoint, its step, the run folder."""
        return {
            "checkpoint": str(self.checkpoint),
            "step": _checkpoint_step(self.checkpoint),
            "run_dir": str(self.config.run_dir),
        }


def _checkpoint_step(path: Path) -> int | None:
    """The training step a checkpoint was saved at (``global_step`` of a ``.ckpt``, ``step``
    in a job's ``.safetensors`` metadata), ``None`` when it does not say."""
    from ..checkpoints import read_torch_file

    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                step = json.loads((handle.metadata() or {}).get("step", "null"))
        else:
            step = read_torch_file(path).get("global_step")
    except Exception:  # only a label of the export: the weights loaded already
        return None
    return step if isinstance(step, int) else None


def _job_json(config: RunConfig, role: str, name: str) -> dict[str, Any] | None:
    """The job folder's ``metrics.json`` / ``calibration.json``, ``None`` when absent; an
    unreadable one is said in a warning and left out."""
    path = job_dir(config, role) / name
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        logger.warning("%s is unreadable (%s): the model card leaves it out", path, error)
        return None
    return data if isinstance(data, dict) else None


def _export_hf(job: _ExportJob) -> Path:
    """``export(format="hf")``: the folder of :func:`freekd.pipeline.hub.save_pretrained`,
    reloaded with ``from_pretrained`` as a check."""
    from ..models import count_parameters
    from .hub import from_pretrained, model_card, pretrained_config, save_pretrained

    base = getattr(job.val_set, "dataset", job.val_set)
    names = getattr(base, "class_names", None)
    sample = job.sample()
    info = pretrained_config(
        job.config,
        job.role,
        job.num_classes,
        (int(sample.shape[-2]), int(sample.shape[-1])),
        list(names) if names is not None else None,
        job.source(),
    )
    calibration = _job_json(job.config, job.role, "calibration.json") or {}
    card = model_card(
        info,
        job.config,
        _job_json(job.config, job.role, "metrics.json"),
        calibration.get("mu"),
        count_parameters(job.model),
    )
    save_pretrained(job.model, job.target, info, card, job.config)
    from_pretrained(job.target)  # the check: it rebuilds offline and loads strictly
    return job.target


def onnx_record(path: str | os.PathLike) -> Path:
    """The check record written beside an exported ONNX file: ``<file>.json``."""
    path = Path(path)
    return path.with_name(f"{path.name}.json")


def _export_onnx(job: _ExportJob, tolerance: float) -> Path:
    """``export(format="onnx")``: :func:`freekd.pipeline.onnx_export.export_onnx` on the first
    validation image, and its record (the check, the model, the input it takes)."""
    from .._version import __version__
    from .onnx_export import export_onnx

    sample = job.sample()
    result = export_onnx(job.model, job.config.task, sample, job.target, tolerance)
    section = job.config.student
    record = {
        **result.to_dict(),
        "task": job.config.task,
        "arch": section.arch,
        "backbone": section.backbone,
        "num_classes": job.num_classes,
        "role": job.role,
        "sample_shape": list(sample.shape),
        "source": job.source(),
        "freekd_version": __version__,
        "torch_version": torch.__version__,
    }
    write_json(record, onnx_record(job.target))
    logger.debug(  # the command line prints it with the file; Python reads the record
        "ONNX check (%s exporter): onnxruntime vs PyTorch max abs difference %.3g on %s",
        result.exporter,
        result.max_abs_diff,
        result.compared,
    )
    return job.target


def _written_student(directory: Path, checkpoint: Path) -> Path | None:
    """``directory/student.safetensors`` when the job wrote it at the step of ``checkpoint`` (a
    checkpoint of the same job folder), else ``None``."""
    from safetensors import safe_open

    from ..checkpoints import read_torch_file

    student = directory / "student.safetensors"
    own = (directory / "checkpoints").resolve()
    if not student.is_file() or checkpoint.resolve().parent != own:
        return None
    try:
        with safe_open(str(student), framework="pt") as handle:
            step = json.loads((handle.metadata() or {}).get("step", "null"))
        saved = read_torch_file(checkpoint).get("global_step")
    except Exception:  # an unreadable file: export writes a new one from the checkpoint
        return None
    return student if step is not None and step == saved else None


def visualize(
    config: RunConfig,
    checkpoint: str | os.PathLike | None = None,
    prompts: str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
    index: int = 0,
    split: str = "val",
) -> Path:
    """The learned frequency masks of the teacher's prompts over image ``index`` of ``split``
    (PNG; default ``run_dir/masks.png``), labelled (:func:`freekd.viz.prompt_mask_figure`).
    Rows: distilled layers; columns: the image, the teacher's finest band, the mask of the low
    band and of each level (mean over the prompts), each prompt's mask of the finest level, and
    the finest level's mask over the image; a color bar for the mask values."""
    from ..viz import render_prompt_masks

    check_choice("split", split, SPLITS)
    dataset = build_data(config, split)
    if not 0 <= index < len(dataset):  # type: ignore[arg-type]
        raise ValueError(f"--index {index} is outside the {split} set (0..{len(dataset) - 1})")  # type: ignore[arg-type]
    spec = _teacher(config, num_classes_of(dataset), checkpoint)
    image = dataset[index][0]
    batch = example_batch(config, dataset, 1)
    loss = build_freekd_loss(config, _channels(config, spec, batch))
    loss.load_prompts(Path(prompts) if prompts is not None else prompts_file(config))
    target = Path(output) if output is not None else Path(config.run_dir) / "masks.png"
    inputs = [image] if config.task == "detection" else image[None]
    title = (
        f"FreeKD prompt masks of the teacher {config.teacher.arch}/{config.teacher.backbone} on "
        f"{split} image {index} (T = {loss.prompts[0].tokens.shape[-2]} tokens per band)"
    )
    return render_prompt_masks(
        spec.model, _taps(config, spec, "teacher"), loss, image, target, inputs, title
    )
