"""``fit``: build a Lightning ``Trainer`` from a :class:`~freekd.train.config.TrainConfig` and run
one of the jobs, fresh or resumed.

Run folder (``config.run_dir``)::

    checkpoints/step=000500.ckpt, ..., last.ckpt   every checkpoint_every_steps, and at the end
    checkpoints/interrupted.ckpt                     after an exception (best effort)
    (last.ckpt is a link to the newest step file; the frozen teacher is never stored)
    logs/version_0/metrics.csv                       per-step terms; version_1, ... after resumes
    (logs/wandb/..., logs/mlruns/...: with logger="wandb" / "mlflow", see freekd.train.loggers)
    prompts.safetensors / student.safetensors        what a completed run produced

A fresh run refuses a folder that is not empty (``force=True`` clears it); ``resume=...``
continues in the same folder from a checkpoint, exactly: weights, optimizer, schedule, loop
position (also in the middle of an epoch, with a :class:`~freekd.train.ResumableDataLoader`),
the data order and the RNG states. Before anything starts, :func:`fit` refuses what would run
something else than asked: device settings this machine cannot honour (:func:`check_devices`)
and a checkpoint that is unreadable, of another job, of another model, or saved with another
optimizer or schedule (:func:`check_resume_checkpoint`). A SIGTERM stops at the end of the step
with a checkpoint and raises :class:`StoppedBySignal` (exit status 143 when not caught).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader

from ..checkpoints import checkpoint_job, read_torch_file
from .callbacks import AtomicCheckpointIO, RNGState, StepCheckpoint
from .config import TrainConfig
from .data import ResumableDataLoader, ShardSampler
from .loggers import finish_logger, make_logger
from .progress import progress_callback

__all__ = [
    "DeviceWords",
    "FitResult",
    "StoppedBySignal",
    "build_trainer",
    "check_devices",
    "check_resume_checkpoint",
    "fit",
    "is_rank_zero",
    "resolve_resume",
]

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


class StoppedBySignal(SIGTERMException):
    """:func:`fit` stopped on a SIGTERM at the end of a step, after writing its checkpoint.

    A ``SystemExit`` (as Lightning's ``SIGTERMException``, which it subclasses) whose ``code``
    is 143 (128 + SIGTERM): uncaught, the process exits with that status, so that a shell's
    ``a && b`` does not go on to ``b``. ``step``: the last completed step; ``checkpoint``: the
    file to resume from (``None`` when none was written); ``str()`` says both.
    """

    def __init__(self, step: int, checkpoint: Path | None) -> None:
        super().__init__(128 + signal.SIGTERM)
        self.step, self.checkpoint = step, checkpoint
        where = f"checkpoint {checkpoint}" if checkpoint is not None else "no checkpoint yet"
        self.message = f"stopped by SIGTERM at step {step}; resume with resume='last' ({where})"

    def __str__(self) -> str:
        return self.message


def is_rank_zero() -> bool:
    """Whether this is the process that starts the run (global rank 0 of a launcher such as
    torchrun or SLURM, or the only one): the one that checks and prepares the run folder and
    prints summaries."""
    return all(os.environ.get(name, "0") in ("", "0") for name in _RANK_VARIABLES)


_PARENT_WATCH = {"started": False}


def _exit_with_launcher() -> None:
    """In a process of rank > 0: exit as soon as the process that started it is gone (rank 0
    under Lightning's launcher, torchrun's agent, ...), instead of waiting in a collective for
    a peer that will never answer."""
    if _PARENT_WATCH["started"]:
        return
    _PARENT_WATCH["started"] = True
    parent = os.getppid()
    rank = next((os.environ[n] for n in _RANK_VARIABLES if os.environ.get(n, "0") != "0"), "?")

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        sys.stderr.write(
            f"freekd: rank {rank}: the process that started this one (pid {parent}) is gone; "
            f"exiting\n"
        )
        sys.stderr.flush()
        os._exit(1)

    threading.Thread(target=watch, name="freekd-parent-watch", daemon=True).start()


# ---------------------------------------------------------------------------- devices


@dataclass(frozen=True)
class DeviceWords:
    """How :func:`check_devices` names the settings in its messages: the Python API's
    (default) or a caller's (the command line's config keys and options)."""

    devices: str = "TrainConfig.devices"
    one_process: str = "devices=1"
    gpus: str = "devices={count}"
    cpu_on_purpose: str = "accelerator='cpu'"


def _process_count(devices: Any) -> int | None:
    """Processes per node that ``devices`` asks for, ``None`` where Lightning decides
    (``"auto"``, ``-1``)."""
    if isinstance(devices, bool):
        return None
    if isinstance(devices, int):
        return devices if devices > 0 else None
    if isinstance(devices, list | tuple):
        return len(devices)
    if isinstance(devices, str):
        text = devices.strip()
        if text.isdigit():
            return int(text)
        if "," in text:
            return len([part for part in text.split(",") if part.strip()])
    return None


def check_devices(
    accelerator: str,
    devices: Any,
    num_nodes: int = 1,
    cpu_requested: bool | None = None,
    words: DeviceWords = DeviceWords(),
) -> None:
    """Refuse device settings that would silently run something else than asked.

    - More processes than GPUs where GPUs are asked for (``accelerator`` ``"gpu"``/``"cuda"``,
      or ``"auto"`` on a machine with GPUs).
    - Several processes on a machine without GPU unless CPU processes were asked for on purpose
      (``cpu_requested``; default: ``accelerator == "cpu"``): a GPU recipe (``devices=8``) would
      otherwise start 8 CPU processes, each with the whole model. Asked for on purpose, more
      processes than CPU cores only log a warning.

    ``words`` name the settings and fixes in the caller's terms. Raises ``ValueError``.
    """
    count = _process_count(devices)
    if count is None or count <= 1 and num_nodes <= 1:
        return
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    setting = f"{words.devices}={devices}"
    wants_gpus = accelerator in ("gpu", "cuda") or (accelerator == "auto" and gpus > 0)
    if wants_gpus:
        if gpus == 0:
            raise ValueError(
                f"{setting} asks for GPUs but torch sees none: use {words.one_process} "
                f"(one CPU process), or {words.cpu_on_purpose} to start {count} CPU processes "
                f"on purpose"
            )
        if count > gpus:
            raise ValueError(
                f"{setting} but this machine has {gpus} GPU{'s' if gpus > 1 else ''}: use "
                f"{words.gpus.format(count=gpus)}, or run on a machine with {count}"
            )
        return
    if accelerator not in ("cpu", "auto"):
        return  # another accelerator (TPU, MPS, ...): Lightning checks it
    if cpu_requested is None:
        cpu_requested = accelerator == "cpu"
    if not cpu_requested:
        raise ValueError(
            f"{setting} but this machine has no GPU: use {words.one_process} (one CPU "
            f"process), or {words.cpu_on_purpose} to start {count} CPU processes on purpose"
        )
    cores = os.cpu_count() or 1
    if count > cores:
        logger.warning(
            "%s starts %d CPU processes on %d CPU cores (asked for on purpose): each one holds "
            "the whole model, and they share the cores",
            setting,
            count,
            cores,
        )


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


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively (a checkpoint may hold either)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


_SCHEDULE_FIELDS = {
    "constant": (),
    "step": ("milestones", "gamma"),
    "poly": ("total_steps", "power", "min_lr"),
    "cosine": ("total_steps", "min_lr"),
}
_OPTIMIZER_FIELDS = {"sgd": ("momentum",), "adam": ("betas",), "adamw": ("betas",)}


def _differences(saved: Mapping[str, Any], current: Mapping[str, Any], prefix: str) -> list[str]:
    """The settings of an optimizer (``prefix="optimizer"``) or schedule that differ between
    a checkpoint and this run, among those that change the learning rate or the update (a
    constant schedule's ``total_steps`` does not: such a run may be resumed for more steps)."""
    if prefix == "schedule":
        keys = (
            "kind",
            "warmup_steps",
            "warmup_ratio",
            *_SCHEDULE_FIELDS.get(saved.get("kind"), ()),
        )
    else:
        keys = ("name", "lr", "weight_decay", *_OPTIMIZER_FIELDS.get(saved.get("name"), ()))
    return [
        f"{prefix}.{key} {saved[key]!r} -> {current.get(key)!r}"
        for key in keys
        if key in saved and key in current and _plain(saved[key]) != _plain(current[key])
    ]


def check_resume_checkpoint(path: str | os.PathLike, module: pl.LightningModule) -> None:
    """Refuse to resume ``module`` from ``path`` when the result would not be the run it
    continues, before anything is loaded: an unreadable (truncated, damaged, foreign) file,
    a checkpoint of another job (its ``freekd.job``, or its keys), of another model (other
    entries or shapes), trained with another frozen teacher (the fingerprint it records), or
    saved with another optimizer or learning-rate schedule (the rate would jump at the resumed
    step). Raises ``ValueError`` naming the file and the fix."""
    path = Path(path)
    checkpoint = read_torch_file(
        path,
        "checkpoint",
        fix="resume from another checkpoint of the run (checkpoints/step=*.ckpt), or start "
        "afresh with force=True",
    )
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("state_dict"), Mapping):
        raise ValueError(
            f"cannot resume from {str(path)!r}: it is not a Lightning checkpoint of a training "
            f"run (no 'state_dict'; model weights?): resume from a run's checkpoints/last.ckpt"
        )
    expected_job, job = getattr(module, "job_name", None), checkpoint_job(checkpoint)
    if expected_job is not None and job is not None and job != expected_job:
        raise ValueError(
            f"cannot resume from {str(path)!r}: this is a {job} checkpoint, not a {expected_job} "
            f"one: resume from a checkpoint of the {expected_job} run, or start it without "
            f"resuming"
        )
    # The frozen teacher is not stored (older checkpoints hold it: it is ignored then).
    frozen = set(module.frozen_state_keys()) if hasattr(module, "frozen_state_keys") else set()
    saved = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}
    state = {k: v for k, v in module.state_dict().items() if k not in frozen}
    differ = sorted(set(saved) ^ set(state))
    differ += [
        f"{k} {tuple(saved[k].shape)} -> {tuple(v.shape)}"
        for k, v in state.items()
        if k in saved and hasattr(saved[k], "shape") and tuple(saved[k].shape) != tuple(v.shape)
    ]
    if differ:
        shown = ", ".join(differ[:3]) + (f" and {len(differ) - 3} more" if len(differ) > 3 else "")
        raise ValueError(
            f"cannot resume from {str(path)!r}: it holds another model than this run builds "
            f"({len(differ)} entries differ: {shown}): resume with the settings the run was "
            f"started with (its config.yaml), or start afresh with force=True"
        )
    if hasattr(module, "check_frozen_state"):
        module.check_frozen_state(checkpoint, path)
    recorded = checkpoint.get("freekd")
    optim = getattr(module, "optim_config", None)
    schedule = getattr(module, "schedule_config", None)
    if not isinstance(recorded, Mapping) or optim is None or schedule is None:
        return
    changes = _differences(recorded.get("optimizer", {}), dataclasses.asdict(optim), "optimizer")
    changes += _differences(recorded.get("schedule", {}), dataclasses.asdict(schedule), "schedule")
    if changes:
        raise ValueError(
            f"cannot resume from {str(path)!r}: the run was started with another optimizer or "
            f"schedule ({'; '.join(changes)}), and the learning rate would jump at the resumed "
            f"step: resume with the settings it was started with (its config.yaml), or start "
            f"afresh with force=True"
        )


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
    if not any(isinstance(c, ProgressBar) for c in all_callbacks):
        # A bar counted in steps (rich on a terminal); otherwise a line every log_every_steps.
        all_callbacks.append(progress_callback(config.progress_bar, config.log_every_steps))
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
        logger=make_logger(config),
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

    Raises ``KeyboardInterrupt`` after a Ctrl-C and :class:`StoppedBySignal` after a SIGTERM,
    once the checkpoint of the step in progress is written (``resume="last"`` continues from
    it); ``ValueError`` before anything starts for devices this machine cannot honour and for
    a checkpoint that cannot be resumed as this run (:func:`check_resume_checkpoint`).
    """
    config = config or TrainConfig()
    check_devices(config.accelerator, config.devices, config.num_nodes)
    run_dir = Path(config.run_dir)
    checkpoint = resolve_resume(resume, run_dir)
    if checkpoint is not None and "://" not in str(checkpoint):
        check_resume_checkpoint(checkpoint, module)
    if not is_rank_zero():
        _exit_with_launcher()
    elif checkpoint is None and resume is not None:  # "auto" in a folder without checkpoint
        logger.warning("no checkpoint in %s yet: starting this job fresh", run_dir / "checkpoints")
    if is_rank_zero():
        _prepare_run_dir(run_dir, resuming=resume is not None, force=force)
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
    completed = False
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
        completed = True
    except SystemExit as error:
        # Lightning turns a KeyboardInterrupt it caught into sys.exit(1), after the callbacks'
        # on_exception (StepCheckpoint wrote interrupted.ckpt); give the caller the interrupt.
        if type(error) is SystemExit and trainer.interrupted:
            raise KeyboardInterrupt(
                f"interrupted at step {trainer.global_step}; the last complete checkpoint is "
                f"{run_dir / 'checkpoints' / 'last.ckpt'}"
            ) from None
        # Lightning's SIGTERMException is a SystemExit with status 0: say where it stopped and
        # exit with 143, as a process killed by SIGTERM does.
        if isinstance(error, SIGTERMException) and not isinstance(error, StoppedBySignal):
            last = run_dir / "checkpoints" / "last.ckpt"
            raise StoppedBySignal(trainer.global_step, last if last.is_file() else None) from None
        raise
    finally:
        finish_logger(trainer.logger, failed=not completed)
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
    if step_checkpoint.stopped_by == "SIGTERM" and trainer.global_step < config.max_steps:
        raise StoppedBySignal(trainer.global_step, last if last.is_file() else None)
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
