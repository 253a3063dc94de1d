"""``fit``: build a Lightning ``Trainer`` from a :class:`~freekd.train.config.TrainConfig` and run
one of the jobs, fresh or resumed.

Run folder (``config.run_dir``)::

    checkpoints/step=000500.ckpt, ..., last.ckpt   every checkpoint_every_steps, and at the end
    checkpoints/interrupted.ckpt                     after an exception (best effort)
    logs/version_0/metrics.csv                       per-step terms; version_1, ... after resumes
    prompts.safetensors / student.safetensors        what a completed run produced

A fresh run refuses a folder that is not empty (``force=True`` clears it); ``resume=...``
continues in the same folder from a checkpoint, exactly: weights, optimizer, schedule, loop
position (also in the middle of an epoch, with a :class:`~freekd.train.ResumableDataLoader`),
the data order and the RNG states.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from .callbacks import AtomicCheckpointIO, RNGState, StepCheckpoint
from .config import TrainConfig
from .data import ResumableDataLoader, ShardSampler

__all__ = ["FitResult", "build_trainer", "fit", "resolve_resume"]

logger = logging.getLogger("freekd")

_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")

_EXPECTED_WARNINGS = (
    # The frozen teacher's norm layers are in eval mode on purpose.
    r"Found \d+ module\(s\) in eval mode",
    # Every job defines validation_step; validation data is optional.
    r"You defined a `validation_step` but have no `val_dataloader`",
    # A resumed run writes into its own checkpoint folder.
    r"Checkpoint directory .* exists and is not empty",
)


@dataclass
class FitResult:
    """What :func:`fit` returns.

    ``metrics``: the last logged values (``train/...`` of the last step, ``val/...`` of the last
    validation) as floats; ``last_checkpoint``: ``run_dir/checkpoints/last.ckpt`` when written.
    """

    module: pl.LightningModule
    trainer: pl.Trainer
    run_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)
    last_checkpoint: Path | None = None
    global_step: int = 0


def _launching_process() -> bool:
    """Whether this is the process that starts the run (global rank 0 of a launcher such as
    torchrun or SLURM, or the only one): the one that checks and prepares the run folder."""
    return all(os.environ.get(name, "0") in ("", "0") for name in _RANK_VARIABLES)


def resolve_resume(resume: str | os.PathLike | None, run_dir: Path) -> Path | None:
    """The checkpoint file meant by ``resume``: a ``.ckpt`` file, a run folder (its
    ``checkpoints/last.ckpt``), ``"last"`` (``run_dir/checkpoints/last.ckpt``, which must exist)
    or ``"auto"`` (that file when it exists, else ``None``: a fresh start; for jobs that are
    requeued after a preemption)."""
    if resume is None:
        return None
    last = run_dir / "checkpoints" / "last.ckpt"
    if str(resume) == "auto":
        return last if last.is_file() else None
    path = last if str(resume) == "last" else Path(resume)
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise FileNotFoundError(
            f"cannot resume from {str(path)!r}: no such checkpoint file; pass a .ckpt file, a run "
            f"folder holding checkpoints/last.ckpt, 'last' or 'auto'"
        )
    return path


def _prepare_run_dir(run_dir: Path, resuming: bool, force: bool) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise NotADirectoryError(f"run_dir {str(run_dir)!r} is a file: choose a folder path")
    if not resuming and run_dir.is_dir() and any(run_dir.iterdir()):
        if not force:
            entries = sorted(p.name for p in run_dir.iterdir())
            raise FileExistsError(
                f"run folder {str(run_dir)!r} already holds a run ({', '.join(entries[:5])}"
                f"{', ...' if len(entries) > 5 else ''}): resume it with resume='last', "
                f"overwrite it with force=True, or choose another run_dir"
            )
        logger.warning("force=True: clearing the run folder %s", run_dir)
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def _make_logger(config: TrainConfig) -> Any:
    if config.logger is None:
        return False
    if config.logger == "csv":
        from lightning.pytorch.loggers import CSVLogger

        # A new version folder per (re)start: Lightning's CSV writer would replace the metrics
        # file of an existing one.
        return CSVLogger(config.run_dir, name="logs")
    try:
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(config.run_dir, name="logs", default_hp_metric=False)
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            f"TrainConfig.logger='tensorboard' needs the tensorboard package ({error}): "
            f"pip install tensorboard, or use logger='csv'"
        ) from None


def build_trainer(
    config: TrainConfig,
    distributed_sampler: bool = False,
    callbacks: Sequence[pl.Callback] = (),
) -> pl.Trainer:
    """The ``Trainer`` that :func:`fit` uses (exposed for ``trainer.validate`` and the like).

    ``distributed_sampler``: let Lightning put a ``DistributedSampler`` into plain loaders
    (not needed, and off, for :class:`~freekd.train.ResumableDataLoader`, which shards itself).
    """
    extra = dict(config.extra_trainer_args)
    has_logger = config.logger is not None
    all_callbacks: list[pl.Callback] = [
        RNGState(),
        StepCheckpoint(
            Path(config.run_dir) / "checkpoints",
            every_n_train_steps=config.checkpoint_every_steps,
            keep=config.keep_checkpoints,
        ),
    ]
    if has_logger:
        from lightning.pytorch.callbacks import LearningRateMonitor

        all_callbacks.append(LearningRateMonitor(logging_interval="step"))
    all_callbacks.extend(callbacks)
    all_callbacks.extend(_as_list(extra.pop("callbacks", None)))
    validation = (
        {"val_check_interval": config.val_every_steps, "check_val_every_n_epoch": None}
        if config.val_every_steps is not None
        else {"check_val_every_n_epoch": 1}
    )
    arguments: dict[str, Any] = dict(
        default_root_dir=str(config.run_dir),
        max_steps=config.max_steps,
        max_epochs=-1,
        gradient_clip_val=config.grad_clip_norm,
        gradient_clip_algorithm="norm" if config.grad_clip_norm is not None else None,
        precision=config.precision,
        accumulate_grad_batches=config.accumulate_grad_batches,
        accelerator=config.accelerator,
        devices=config.devices,
        num_nodes=config.num_nodes,
        strategy=config.strategy,
        deterministic=config.deterministic,
        logger=_make_logger(config),
        log_every_n_steps=config.log_every_steps,
        enable_progress_bar=config.progress_bar,
        enable_model_summary=config.model_summary,
        num_sanity_val_steps=config.sanity_val_steps,
        callbacks=all_callbacks,
        plugins=[AtomicCheckpointIO(), *_as_list(extra.pop("plugins", None))],
        use_distributed_sampler=distributed_sampler,
        **validation,
    )
    arguments.update(extra)
    return pl.Trainer(**arguments)


def _own_generator(loader: Any, seed: int) -> None:
    """Give a plain DataLoader its own generator, so that creating its iterator (each
    validation, each epoch) does not draw from the global torch RNG."""
    if isinstance(loader, DataLoader) and loader.generator is None:
        loader.generator = torch.Generator().manual_seed(seed)


def fit(
    module: pl.LightningModule,
    train_loader: DataLoader,
    val_loader: DataLoader | Sequence[DataLoader] | None = None,
    config: TrainConfig | None = None,
    resume: str | os.PathLike | None = None,
    force: bool = False,
    callbacks: Sequence[pl.Callback] = (),
) -> FitResult:
    """Train ``module`` (a :class:`~freekd.train.TeacherModule`, :class:`PromptTuningModule` or
    :class:`DistillModule`) on ``train_loader`` for ``config.max_steps`` steps.

    Args:
        module: the job.
        train_loader: preferably from :func:`~freekd.train.make_train_loader` (exact mid-epoch
            resume, sharded over processes); a plain ``DataLoader`` works too (Lightning then adds
            a ``DistributedSampler`` under DDP, and a mid-epoch resume is not exact).
        val_loader: validation data (see :func:`~freekd.train.make_val_loader`), or ``None``.
        config: trainer settings (default :class:`TrainConfig()`).
        resume: a checkpoint to continue from: a ``.ckpt`` path, a run folder, ``"last"``, or
            ``"auto"`` (``last.ckpt`` of ``run_dir`` if there is one, else a fresh start).
        force: clear a non-empty ``run_dir`` for a fresh run (otherwise ``FileExistsError``).
        callbacks: more Lightning callbacks.

    Raises ``KeyboardInterrupt`` after a Ctrl-C, once the checkpoint of the step in progress is
    written (``resume="last"`` continues from it).
    """
    config = config or TrainConfig()
    run_dir = Path(config.run_dir)
    checkpoint = resolve_resume(resume, run_dir)
    if _launching_process():
        _prepare_run_dir(run_dir, resuming=checkpoint is not None, force=force)
    pl.seed_everything(config.seed, workers=True, verbose=False)
    for index, loader in enumerate([train_loader, *_as_list(val_loader)]):
        _own_generator(loader, config.seed + index)
    resumable = isinstance(train_loader, ResumableDataLoader)
    sharded = [
        v for v in _as_list(val_loader) if isinstance(getattr(v, "sampler", None), ShardSampler)
    ]
    if sharded and not resumable:
        raise ValueError(
            "make_val_loader shards the validation data by itself, which works with a training "
            "loader from make_train_loader; with a plain training DataLoader (sharded by "
            "Lightning) pass a plain validation DataLoader too"
        )
    trainer = build_trainer(config, distributed_sampler=not resumable, callbacks=callbacks)
    deterministic = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    main_thread = threading.current_thread() is threading.main_thread()
    sigint_handler = signal.getsignal(signal.SIGINT) if main_thread else None
    try:
        with warnings.catch_warnings():
            for message in _EXPECTED_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            trainer.fit(
                module,
                train_dataloaders=train_loader,
                val_dataloaders=val_loader,
                ckpt_path=str(checkpoint) if checkpoint is not None else None,
                weights_only=True,
            )
    except SystemExit as error:
        # Lightning turns a KeyboardInterrupt it caught into sys.exit(1), after the callbacks'
        # on_exception (StepCheckpoint wrote interrupted.ckpt); give the caller the interrupt.
        # (Lightning's SIGTERMException is a SystemExit subclass: it passes through.)
        if type(error) is SystemExit and trainer.interrupted:
            raise KeyboardInterrupt(
                f"interrupted at step {trainer.global_step}; the last complete checkpoint is "
                f"{run_dir / 'checkpoints' / 'last.ckpt'}"
            ) from None
        raise
    finally:
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        # After an exception, Lightning leaves SIGINT ignored (after a Ctrl-C) or with the
        # handler it found at the start (StepCheckpoint's): put the caller's back.
        if main_thread and sigint_handler is not None:
            signal.signal(signal.SIGINT, sigint_handler)
    step_checkpoint = next(c for c in trainer.callbacks if isinstance(c, StepCheckpoint))
    last = Path(step_checkpoint.dirpath or run_dir) / "last.ckpt"
    if step_checkpoint.stopped_by == "SIGINT":
        raise KeyboardInterrupt(
            f"stopped by Ctrl-C at step {trainer.global_step}; the checkpoint is {last}: continue "
            f"with resume='last'"
        )
    metrics = {
        name: float(value)
        for name, value in trainer.logged_metrics.items()
        if isinstance(value, torch.Tensor) and value.numel() == 1
    }
    return FitResult(
        module=module,
        trainer=trainer,
        run_dir=run_dir,
        metrics=metrics,
        last_checkpoint=last if last.is_file() else None,
        global_step=trainer.global_step,
    )


def _as_list(loaders: Any) -> list[Any]:
    if loaders is None:
        return []
    return list(loaders) if isinstance(loaders, list | tuple) else [loaders]
