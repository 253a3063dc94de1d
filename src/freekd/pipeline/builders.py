"""From a :class:`~freekd.pipeline.config.RunConfig` to data sets, loaders, models, losses and
trainer settings."""

from __future__ import annotations

import inspect
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..checkpoints import LoadReport
from ..losses import FreeKDLoss, loss_class
from ..taps import probe_features
from ..train import TrainConfig, make_train_loader, make_val_loader
from .config import ModelSection, RunConfig

__all__ = [
    "ROLE_DIRS",
    "build_data",
    "build_baseline_loss",
    "build_freekd_loss",
    "build_spec",
    "check_devices",
    "example_batch",
    "job_dir",
    "load_model_weights",
    "num_classes_of",
    "resolve_device",
    "tap_channels",
    "trainer_config",
    "train_loader",
    "val_loader",
]

logger = logging.getLogger("freekd")

ROLE_DIRS = {
    "teacher": "teacher",
    "prompts": "prompts",
    "student": "student_freekd",
    "baseline": "student_baseline",
}
"""Sub-folder of ``run_dir`` that each job writes."""

# Key prefixes of the models inside the Lightning checkpoints of the jobs, by role.
_CHECKPOINT_PREFIXES = {
    "teacher": ("model.", "tuner.teacher.", "distiller.teacher."),
    "student": ("distiller.student.", "model."),
    "baseline": ("model.", "distiller.student."),
}


def job_dir(config: RunConfig, role: str) -> Path:
    """``run_dir/<teacher | prompts | student_freekd | student_baseline>``; a student distilled
    with a baseline loss (``distill.method``) writes ``student_<method>``."""
    if role == "student" and config.distill.method != "freekd":
        return Path(config.run_dir) / f"student_{config.distill.method}"
    return Path(config.run_dir) / ROLE_DIRS[role]


def resolve_device(device: str) -> str:
    """``"cuda"`` or ``"cpu"`` for the configured ``device`` (``auto``: a GPU when present)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device in ("cuda", "gpu"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"device: {device!r} was asked for, but torch sees no CUDA GPU: use "
                f"--device cpu (or auto)"
            )
        return "cuda"
    return "cpu"


def check_devices(config: RunConfig) -> None:
    """Refuse ``train.devices`` that this machine cannot run as asked (before any data is read
    or any process started): several processes where ``device: auto`` finds no GPU (a GPU
    recipe on a CPU machine), more GPUs than there are; see
    :func:`freekd.train.runner.check_devices`. ``device: cpu`` asks for CPU processes on
    purpose."""
    from ..train import runner

    device = resolve_device(config.device)
    runner.check_devices(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=config.train.devices,
        num_nodes=config.train.num_nodes,
        cpu_requested=config.device == "cpu",
        words=runner.DeviceWords(
            devices="train.devices",
            one_process="--set train.devices=1",
            gpus="--set train.devices={count}",
            cpu_on_purpose="--device cpu",
        ),
    )


def trainer_config(config: RunConfig, directory: Path, steps: int) -> TrainConfig:
    """The :class:`~freekd.train.TrainConfig` of one job of the run (its devices checked by
    :func:`check_devices`)."""
    check_devices(config)
    settings = asdict(config.train)
    if settings["progress_bar"] is None:
        settings["progress_bar"] = sys.stdout.isatty()  # where the bar and the log lines go
    device = resolve_device(config.device)
    return TrainConfig(
        max_steps=steps,
        run_dir=directory,
        seed=config.seed,
        accelerator="gpu" if device == "cuda" else "cpu",
        **settings,
    )


# ---------------------------------------------------------------------------- data


def _split_args(config: RunConfig, split: str) -> dict[str, Any]:
    from ..data import DATASETS

    data = config.data
    args = {**data.args, **(data.train_args if split == "train" else data.val_args)}
    dataset_class = DATASETS.get(data.name)
    if dataset_class is not None:
        parameters = inspect.signature(dataset_class).parameters
        if "split" in parameters:
            args.setdefault("split", split)
        if "task" in parameters:
            args.setdefault("task", config.task)
    return args


def _transforms(config: RunConfig, train: bool) -> Any:
    from ..data import default_detection_transforms, default_segmentation_transforms

    data = config.data
    if config.task == "detection":
        return default_detection_transforms(
            train, size=data.resize, max_size=data.max_size, hflip_prob=data.hflip_prob
        )
    return default_segmentation_transforms(
        train,
        crop_size=data.crop_size,
        scale_range=tuple(data.scale_range),
        hflip_prob=data.hflip_prob,
        normalize=data.normalize,
        size=data.resize,
    )


def build_data(config: RunConfig, split: str) -> Dataset:
    """The ``"train"`` or ``"val"`` data set with the task's transforms (``val_limit`` applied
    to ``"val"``)."""
    from ..data import build_dataset

    args = _split_args(config, split)
    if "transforms" in args:
        raise ValueError(
            "data.args: 'transforms' is set by freekd from data.crop_size / resize / "
            "hflip_prob / normalize; remove it"
        )
    dataset = build_dataset(
        config.data.name, transforms=_transforms(config, split == "train"), **args
    )
    check_files = getattr(dataset, "check_files", None)
    if callable(check_files):  # a missing image fails now, not after hours of training
        check_files()
    limit = config.data.val_limit
    if split == "val" and limit is not None and limit < len(dataset):  # type: ignore[arg-type]
        subset = Subset(dataset, range(limit))
        subset.num_classes = dataset.num_classes  # type: ignore[attr-defined]
        return subset
    return dataset


def num_classes_of(dataset: Dataset) -> int:
    """The data set's ``num_classes`` (of the underlying one for a ``Subset``)."""
    while isinstance(dataset, Subset) and not hasattr(dataset, "num_classes"):
        dataset = dataset.dataset
    count = getattr(dataset, "num_classes", None)
    if not isinstance(count, int):
        raise ValueError(f"data set {type(dataset).__name__} does not say its num_classes")
    return count


def _collate(config: RunConfig) -> Any:
    from ..data import detection_collate, segmentation_collate

    return detection_collate if config.task == "detection" else segmentation_collate


def train_loader(config: RunConfig, dataset: Dataset, batch_size: int | None = None) -> Any:
    """A resumable, shuffled training loader (incomplete last batches dropped)."""
    size = batch_size or config.data.batch_size
    if len(dataset) < size:  # type: ignore[arg-type]
        raise ValueError(
            f"the training set has {len(dataset)} items, fewer than one batch of {size}: "  # type: ignore[arg-type]
            f"lower data.batch_size or add data"
        )
    return make_train_loader(
        dataset,
        batch_size=size,
        seed=config.seed,
        drop_last=True,
        num_workers=config.data.num_workers,
        collate_fn=_collate(config),
        persistent_workers=config.data.num_workers > 0,
    )


def val_loader(config: RunConfig, dataset: Dataset) -> DataLoader:
    """The evaluation loader (in order, every item once)."""
    return make_val_loader(
        dataset,
        batch_size=config.data.val_batch_size or config.data.batch_size,
        num_workers=config.data.num_workers,
        collate_fn=_collate(config),
    )


def example_batch(config: RunConfig, dataset: Dataset, size: int = 2) -> Any:
    """The first ``size`` items of ``dataset`` as one batch (for dry runs)."""
    count = min(size, len(dataset))  # type: ignore[arg-type]
    return _collate(config)([dataset[i] for i in range(count)])


def calibration_batches(config: RunConfig, dataset: Dataset) -> list[Any]:
    """``distill.calibration_batches`` batches of ``data.batch_size`` items, the first items of
    ``dataset`` in order, drawn without touching the random streams of the run (for
    ``distill.mu: auto``)."""
    size = min(config.data.batch_size, len(dataset))  # type: ignore[arg-type]
    count = min(config.distill.calibration_batches, len(dataset) // size)  # type: ignore[arg-type]
    collate = _collate(config)
    with torch.random.fork_rng(devices=[]):
        return [collate([dataset[i * size + j] for j in range(size)]) for i in range(count)]


# ---------------------------------------------------------------------------- models


def build_spec(config: RunConfig, section: ModelSection, num_classes: int) -> Any:
    """The :class:`~freekd.models.ModelSpec` of ``section`` (randomly initialized or with its
    builder ``args``' pretrained backbone)."""
    from ..models import build_model

    for name in ("weights", "weights_prefix"):
        if name in section.args:
            raise ValueError(
                f"{section.arch} args: {name!r} is not used by the CLI; set the model's "
                f"'checkpoint' instead"
            )
    from ..models._common import WeightsUnavailableError

    try:
        return build_model(config.task, section.arch, section.backbone, num_classes, **section.args)
    except WeightsUnavailableError as error:
        role = "teacher" if section is config.teacher else "student"
        raise error.named(f"{role}.args.{error.setting}") from None


def load_model_weights(model: nn.Module, path: str | os.PathLike, role: str) -> LoadReport:
    """Load a safetensors / torch file or a Lightning checkpoint of one of the jobs into
    ``model``; for a ``.ckpt`` the model is picked by its key prefix (``model.`` of a
    teacher or baseline run, ``distiller.student.`` of a distillation run, ...). A file that
    does not fit (missing or extra entries, other shapes) raises naming what it holds."""
    from ..models._common import load_checkpoint

    return load_checkpoint(model, Path(path), prefixes=_CHECKPOINT_PREFIXES[role])


def tap_channels(model: nn.Module, taps: list[str], inputs: Any) -> list[int]:
    """Channels of each feature the ``taps`` capture, by a dry run on ``inputs``
    (:func:`freekd.taps.probe_features`)."""
    channels = []
    for index, shape in enumerate(probe_features(model, taps, inputs)):
        if len(shape) != 4:
            raise ValueError(
                f"tap {index} of {taps} gives a feature of shape {tuple(shape)}; "
                f"FreeKD distills [N, C, H, W] maps"
            )
        channels.append(int(shape[1]))
    return channels


def build_freekd_loss(config: RunConfig, channels: list[int]) -> FreeKDLoss:
    """``FreeKDLoss.preset(distill.preset, channels, **distill.loss)``."""
    try:
        return FreeKDLoss.preset(config.distill.preset, channels, **config.distill.loss)
    except TypeError as error:
        valid = [n for n in inspect.signature(FreeKDLoss).parameters if n != "channels"]
        raise ValueError(f"distill.loss: {error}; valid keys: {', '.join(valid)}") from None


def build_baseline_loss(config: RunConfig, channels: list[int]) -> nn.Module:
    """The registered loss of ``distill.method`` (not ``freekd``) with ``distill.method_args``
    (and ``channels``, when its constructor takes them and the arguments do not give them)."""
    method = config.distill.method
    cls = loss_class(method)
    args = dict(config.distill.method_args)
    parameters = inspect.signature(cls).parameters
    if "channels" in parameters and "channels" not in args:
        args["channels"] = channels
    try:
        return cls(**args)
    except TypeError as error:
        valid = [n for n in parameters if n != "channels"]
        raise ValueError(
            f"distill.method_args for method {method!r}: {error}; valid keys: "
            f"{', '.join(valid) or 'none'}"
        ) from None
