"""The run configuration shared by every ``freekd`` subcommand: schema, YAML loading, overrides.

One YAML file describes a whole FreeKD project (see ``docs/cli.md`` and ``configs/``)::

    task: segmentation            # or detection
    run_dir: runs/my_run          # jobs write into run_dir/{teacher,prompts,student_freekd,...}
    data:    {name: digits, args: {...}, batch_size: 8, crop_size: 64, ...}
    teacher: {arch: pspnet, backbone: resnet50, checkpoint: null, args: {}, train: {...}}
    student: {arch: pspnet, backbone: resnet18, args: {}, train: {steps, optimizer, schedule}}
    prompts: {steps: 2000, optimizer: {...}, schedule: {...}, dissimilarity_weight: 1.0}
    distill: {method: freekd, preset: recommended, mu: auto, projection: auto, mse_weight: 0, ...}
    train:   {precision: 32-true, grad_clip_norm: null, devices: auto, ...}  # trainer settings

:func:`load_config` reads a file, applies ``--set key.sub=value`` overrides (values parsed as
YAML scalars) and checks everything against the dataclasses below; every error names the key
and where the value came from (the file, or the ``--set`` option).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .._choices import Task
from ..distill import NonFinitePolicy, Projector
from ..losses import FreeKDLoss, loss_names
from ..prompts import Resynthesis
from ..train.config import Logger, OptimConfig, ScheduleConfig
from .schema import ConfigError, choice_problem, from_dict, to_dict

__all__ = [
    "DataSection",
    "DistillSection",
    "JobSection",
    "ModelSection",
    "PromptsSection",
    "RunConfig",
    "TrainerSection",
    "apply_overrides",
    "config_from_dict",
    "dump_config",
    "load_config",
    "parse_override",
    "read_yaml",
]


@dataclass
class DataSection:
    """Data sets and loaders.

    ``name`` and ``args`` go to :func:`freekd.data.build_dataset` (``train_args`` / ``val_args``
    are merged over ``args`` for each split; ``split`` and, for ``digits``, ``task`` are filled in
    when the data set takes them). Transforms: segmentation trains on random crops of
    ``crop_size`` after scale jitter ``scale_range`` and flips with ``hflip_prob``, and evaluates
    on whole images (``resize``: shorter side or ``[h, w]``), normalized with ImageNet mean/std
    when ``normalize``; detection resizes to ``resize`` (capped at ``max_size``) and flips
    (the detector then resizes to its own ``min_size`` / ``max_size``).
    """

    name: str = "digits"
    args: dict[str, Any] = field(default_factory=dict)
    train_args: dict[str, Any] = field(default_factory=dict)
    val_args: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 2
    val_batch_size: int | None = None
    num_workers: int = 0
    crop_size: int | list[int] | None = None
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    hflip_prob: float = 0.5
    resize: int | list[int] | None = None
    max_size: int | None = None
    normalize: bool = True
    val_limit: int | None = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "val_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(name, f"must be >= 1, got {value}")
        if self.num_workers < 0:
            raise ConfigError("num_workers", f"must be >= 0, got {self.num_workers}")
        if len(self.scale_range) != 2 or not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ConfigError(
                "scale_range", f"use [low, high] with 0 < low <= high, got {self.scale_range}"
            )
        if not 0 <= self.hflip_prob <= 1:
            raise ConfigError("hflip_prob", f"must lie in [0, 1], got {self.hflip_prob}")
        if self.val_limit is not None and self.val_limit < 1:
            raise ConfigError("val_limit", f"must be >= 1 (or null for all), got {self.val_limit}")


@dataclass
class JobSection:
    """One training job: ``steps`` optimizer steps with ``optimizer`` and ``schedule``
    (:class:`~freekd.train.OptimConfig` and :class:`~freekd.train.ScheduleConfig` fields; the
    schedule's ``total_steps`` defaults to ``steps``)."""

    steps: int = 1000
    optimizer: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    @classmethod
    def _prepare(cls, raw: dict[str, Any]) -> dict[str, Any]:
        """Fill the schedule's ``total_steps`` with the job's ``steps`` where it is not set:
        always for the default schedule (whose own ``total_steps`` only matches the default
        ``steps``), else where the file or ``--set`` left it out or null."""
        steps = raw.get("steps", _field_default(cls, "steps"))
        schedule = raw.get("schedule")
        if schedule is None:
            schedule = {**to_dict(_field_default(cls, "schedule")), "total_steps": None}
        if isinstance(schedule, Mapping) and schedule.get("total_steps") is None:
            raw["schedule"] = {**schedule, "total_steps": steps}
        return raw

    def plain(self) -> dict[str, Any]:
        """The section as plain data, with ``total_steps: null`` where the schedule follows
        ``steps`` (so that a written ``config.yaml`` run again with another ``--set ...steps``
        keeps following it)."""
        data = to_dict(self)
        if data["schedule"].get("total_steps") == self.steps:
            data["schedule"]["total_steps"] = None
        return data

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError("steps", f"must be >= 1, got {self.steps}")


def _field_default(cls: type, name: str) -> Any:
    spec = cls.__dataclass_fields__[name]
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    return spec.default


@dataclass
class ModelSection:
    """A model of the registry (:func:`freekd.models.build_model`): ``arch``, ``backbone``,
    builder ``args`` (``weights_backbone``, ``output_stride``, ``min_size``, ...), and
    ``checkpoint``: weights of the whole model (teacher: the trained teacher; ``null`` means
    the one ``freekd train-teacher`` wrote to ``run_dir/teacher``). ``train``: the job that
    trains it (the teacher's for ``train-teacher``; the student's for ``distill``)."""

    arch: str
    backbone: str
    checkpoint: str | None = None
    args: dict[str, Any] = field(default_factory=dict)
    train: JobSection = field(default_factory=JobSection)


def _prompt_optimizer() -> OptimConfig:
    return OptimConfig(name="adam", lr=0.01, weight_decay=1e-3)


def _prompt_schedule() -> ScheduleConfig:
    return ScheduleConfig(kind="cosine", total_steps=2000, min_lr=1e-6)


@dataclass
class PromptsSection(JobSection):
    """Stage 1: prompt tuning (defaults: the MasKD recipe, 2000 steps, Adam 0.01, weight decay
    1e-3, cosine to 1e-6). ``dissimilarity_weight`` is lambda; ``resynthesis``: ``centered``
    (default: starts near the identity and keeps the teacher's re-synthesised features intact,
    :class:`freekd.tuning.PromptTuner`; docs/results.md) or ``sum`` (the paper's formula);
    ``batch_size`` overrides ``data.batch_size``; ``file``: the tuned prompts used by
    ``distill`` and ``visualize`` (``null``: ``run_dir/prompts/prompts.safetensors``)."""

    steps: int = 2000
    optimizer: OptimConfig = field(default_factory=_prompt_optimizer)
    schedule: ScheduleConfig = field(default_factory=_prompt_schedule)
    dissimilarity_weight: float = 1.0
    resynthesis: Resynthesis = "centered"
    batch_size: int | None = None
    file: str | None = None


@dataclass
class DistillSection:
    """Stage 2: the FreeKD loss (or a baseline loss) and the other distillation terms.

    ``method``: ``freekd`` (default) or another registered loss
    (:func:`freekd.losses.loss_names`; :func:`freekd.losses.register_loss` adds one), such as
    the baselines FreeKD is compared with: ``mse`` (FitNet), ``cwd``, ``mgd``, ``frequency``
    (FreeKD without prompts); ``method_args`` are the baseline's keyword arguments (``tau``;
    ``alpha``, ``mask_ratio``; ``levels``, ``wavelet``, ``include_low``, ``relational``). A
    baseline needs no prompts and writes ``run_dir/student_<method>``; ``mu`` weights it as it
    weights FreeKD. ``preset``: ``recommended`` (default: the measured best, docs/results.md),
    ``paper``, ``official`` or another of :meth:`freekd.FreeKDLoss.presets`
    (:meth:`freekd.FreeKDLoss.preset`), ``loss``: its
    overrides (``num_prompts``, ``levels``, ``wavelet``, ``granularity``, ``dissimilarity``,
    ``relational``, ``include_low``, ``gate``, ``loss_weight``, ``mask_logits``,
    ``relation_temperature``, ``relation_source``, ``band_weighting``, ``decoupled``,
    ``student_masks``, ``student_mask_warmup``). ``mu`` weights the FreeKD term (or the
    baseline's): a number, or ``auto`` (default), the weight at which the term pulls the student's
    distilled features as hard as its task loss does at initialization
    (:meth:`freekd.Distiller.calibrate` on ``calibration_batches`` batches; the value is logged
    and kept in ``calibration.json``), times ``mu_factor`` (1: the measured best; sweep
    1/3, 1, 3 to tune).
    ``teacher_taps`` / ``student_taps``: the distilled layers (default: the models'),
    ``projection``: ``auto`` | ``always`` | ``none``. The official recipes' extra terms:
    ``mse_weight`` (spatial MSE on the projected features) and ``head_weight`` (SmoothL1
    between the box-regression head outputs, at ``teacher_head`` / ``student_head``; default
    ``head.regression_head`` for RetinaNet). ``nonfinite``: on NaN/Inf in a distilled feature
    or a loss term, ``raise`` (naming the tap), ``skip`` the step on every process (counted as
    ``train/nonfinite_skipped``) or ``off`` (no check).
    """

    method: str = "freekd"
    method_args: dict[str, Any] = field(default_factory=dict)
    preset: str = "recommended"
    loss: dict[str, Any] = field(default_factory=dict)
    mu: float | Literal["auto"] = "auto"
    mu_factor: float = 1.0
    calibration_batches: int = 4
    projection: Projector = "auto"
    teacher_taps: list[str] | None = None
    student_taps: list[str] | None = None
    mse_weight: float = 0.0
    head_weight: float = 0.0
    teacher_head: str | None = None
    student_head: str | None = None
    nonfinite: NonFinitePolicy = "raise"

    def __post_init__(self) -> None:
        for name, choices in (("method", loss_names()), ("preset", FreeKDLoss.presets())):
            if getattr(self, name) not in choices:
                raise ConfigError(name, choice_problem(getattr(self, name), choices))
        for name in ("mu", "mse_weight", "head_weight"):
            value = getattr(self, name)
            if value != "auto" and value < 0:
                raise ConfigError(name, f"must be >= 0, got {value}")
        if self.mu_factor <= 0:
            raise ConfigError("mu_factor", f"must be > 0, got {self.mu_factor}")
        if self.mu != "auto" and self.mu_factor != 1.0:
            raise ConfigError(
                "mu_factor",
                f"scales the calibrated weight of mu: auto; with mu: {self.mu} give the weight "
                f"in mu and leave mu_factor at 1",
            )
        if self.calibration_batches < 1:
            raise ConfigError(
                "calibration_batches", f"must be >= 1, got {self.calibration_batches}"
            )
        if self.method == "mse" and self.mse_weight > 0:
            raise ConfigError(
                "mse_weight",
                "adds an MSE term to FreeKD; with method: mse the MSE term is the method: "
                "set its weight with mu and mse_weight: 0",
            )


@dataclass
class TrainerSection:
    """Trainer settings shared by the jobs (the fields of :class:`freekd.train.TrainConfig`
    except ``max_steps``, ``run_dir`` and ``seed``, which come from the job and the run).
    ``progress_bar: null`` shows it when the output is a terminal; ``logger_args`` go to the
    constructor of ``logger`` (:func:`freekd.train.loggers.make_logger`)."""

    precision: str = "32-true"
    grad_clip_norm: float | None = None
    accumulate_grad_batches: int = 1
    devices: int | str | list[int] = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    val_every_steps: int | None = None
    checkpoint_every_steps: int = 1000
    keep_checkpoints: int = 2
    deterministic: bool | Literal["warn"] = "warn"
    logger: Logger | None = "csv"
    logger_args: dict[str, Any] = field(default_factory=dict)
    log_every_steps: int = 50
    progress_bar: bool | None = None
    model_summary: bool = False
    sanity_val_steps: int = 0
    extra_trainer_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.logger_args and self.logger is None:
            raise ConfigError(
                "logger_args",
                "set while train.logger is null, so no logger would take them: choose a "
                "logger (csv, tensorboard, wandb, mlflow) or remove logger_args",
            )


@dataclass
class RunConfig:
    """A whole FreeKD run (see the module docstring)."""

    task: Task
    teacher: ModelSection
    student: ModelSection
    data: DataSection = field(default_factory=DataSection)
    prompts: PromptsSection = field(default_factory=PromptsSection)
    distill: DistillSection = field(default_factory=DistillSection)
    train: TrainerSection = field(default_factory=TrainerSection)
    run_dir: str = "runs/freekd"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda", "gpu"] = "auto"
    description: str = ""

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ConfigError("seed", f"must be >= 0, got {self.seed}")
        if self.task == "segmentation" and self.data.crop_size is None:
            raise ConfigError(
                "data.crop_size",
                "missing: segmentation trains on random crops of one size; set e.g. "
                "crop_size: [512, 1024]",
            )

    def to_dict(self) -> dict[str, Any]:
        """The configuration as plain data (what ``config.yaml`` of a run holds); a schedule
        that follows its job's ``steps`` is written with ``total_steps: null``."""
        data = to_dict(self)
        data["teacher"]["train"] = self.teacher.train.plain()
        data["student"]["train"] = self.student.train.plain()
        data["prompts"] = self.prompts.plain()
        return data


# ---------------------------------------------------------------------------- loading


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping in a YAML file; ``FileNotFoundError`` / ``ConfigError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"config file {str(path)!r} {what}: check the path")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ConfigError(
            "",
            f"not a text file (byte {error.start} is not UTF-8): pass the YAML configuration "
            f"(e.g. configs/digits_demo_segmentation.yaml)",
            str(path),
        ) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(
            "", f"not valid YAML{where}: {problem}; fix the file there", str(path)
        ) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            "", f"expected a mapping of settings, got {type(data).__name__}", str(path)
        )
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b.c=value"`` -> ``(["a", "b", "c"], value)``; the value is read as a YAML scalar
    or flow collection (``0.1``, ``null``, ``[1, 2]``, ``{k: v}``, ``text``)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(
            "", f"--set {text!r}: use --set key.sub=value (e.g. --set student.train.steps=100)"
        )
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key.split("."), parsed


def apply_overrides(
    data: dict[str, Any], overrides: Sequence[str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """``data`` with the ``--set`` overrides applied, and ``{dotted key: option text}``."""
    data = copy.deepcopy(data)
    sources: dict[str, str] = {}
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                prefix = ".".join(parts[: depth + 1])
                raise ConfigError(
                    prefix,
                    f"is {child!r}, not a mapping: cannot set {'.'.join(parts)}",
                    f"--set {text}",
                )
            node = child
        node[parts[-1]] = value
        sources[".".join(parts)] = f"--set {text}"
    return data, sources


def _source_of(key: str, sources: Mapping[str, str], default: str) -> str:
    """The ``--set`` option a key (or one of its parents / children) came from, else
    ``default``."""
    for dotted, option in sources.items():
        if key == dotted or key.startswith(dotted + ".") or key.startswith(dotted + "["):
            return option
        if dotted.startswith(key + ".") and key:
            return f"{default} (with {option})"
    return default


def config_from_dict(
    data: Mapping[str, Any], source: str = "<config>", sources: Mapping[str, str] | None = None
) -> RunConfig:
    """Check ``data`` against :class:`RunConfig`; errors name the key and ``source``."""
    try:
        return from_dict(RunConfig, dict(data))
    except ConfigError as error:
        raise error.with_source(_source_of(error.key, sources or {}, source)) from None


def load_config(
    path: str | os.PathLike | None,
    overrides: Sequence[str] = (),
    base: Mapping[str, Any] | None = None,
) -> RunConfig:
    """Read the YAML file ``path`` (merged over ``base`` when given), apply the ``--set``
    overrides and validate. ``path=None`` uses ``base`` alone."""
    data: dict[str, Any] = copy.deepcopy(dict(base or {}))
    source = "<built-in config>"
    if path is not None:
        data = _merge(data, read_yaml(path))
        source = str(path)
    data, sources = apply_overrides(data, overrides)
    return config_from_dict(data, source, sources)


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def dump_config(config: RunConfig, path: str | os.PathLike) -> Path:
    """Write the (resolved) configuration as YAML, atomically."""
    from .._io import atomic_write

    text = yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=None)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
