"""What a training job shows while it runs: a progress bar counted in steps on a terminal, or
a log line every ``log_every_steps`` steps elsewhere (log files, ``nohup``, CI).

- :func:`progress_callback`: which of the three below a run shows.
- :class:`StepProgressBar`: Lightning's ``TQDMProgressBar`` with one bar for the whole run
  (``distill 120/300``) instead of one per epoch: the jobs are counted in optimizer steps
  (``max_steps``) and run for as many epochs as that takes (``max_epochs=-1``).
- :class:`RichStepProgressBar`: the same bar drawn by Lightning's ``RichProgressBar``, shown
  instead of the tqdm one when ``rich`` is installed and stdout is a terminal.
- :class:`StepLog`: on the process of rank 0 only, through the ``freekd`` logger (INFO)::

      distill step 120/300 (40%): loss 0.8123 (task 0.7012, distill/freekd 0.1111),
      lr 7.94e-04, elapsed 1:02, ETA 1:33      (one line)

- :class:`ConsoleHandler`: the command line's handler of the ``freekd`` logger: information on
  stdout (with the results, one stream to redirect), warnings and errors on stderr.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Mapping
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_only
from lightning_utilities.core.imports import RequirementCache

__all__ = [
    "ConsoleHandler",
    "RichStepProgressBar",
    "StepLog",
    "StepProgressBar",
    "format_duration",
    "format_terms",
    "output_is_terminal",
    "progress_callback",
    "rich_available",
]

logger = logging.getLogger("freekd")

_MAX_TERMS = 6
"""Loss terms shown in a log line besides the objective (the first ones logged)."""


def format_duration(seconds: float) -> str:
    """``75.3`` -> ``"1:15"``, ``3725`` -> ``"1:02:05"`` (minutes:seconds, hours when needed)."""
    if not math.isfinite(seconds):
        return "?"
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_terms(metrics: Mapping[str, Any], prefix: str = "train/") -> str:
    """``"loss 0.8123 (task 0.7012, distill/freekd 0.1111)"`` from logged values
    ``{prefix + "loss": ..., prefix + "task": ..., ...}``: the objective, then its terms
    (per-layer terms ``.../layer<i>`` and zero counters left out); ``""`` when nothing is
    logged under ``prefix``."""
    values = {
        name[len(prefix) :]: float(value)
        for name, value in metrics.items()
        if name.startswith(prefix) and _is_scalar(value)
    }
    terms = [
        f"{name} {value:.4g}"
        for name, value in values.items()
        if name != "loss"
        and not name.rsplit("/", 1)[-1].startswith("layer")
        and not (name == "nonfinite_skipped" and value == 0)
    ]
    shown = terms[:_MAX_TERMS] + ([f"{len(terms) - _MAX_TERMS} more"] if len(terms) > 6 else [])
    if "loss" not in values:
        return ", ".join(shown)
    inner = f" ({', '.join(shown)})" if shown else ""
    return f"loss {values['loss']:.4g}{inner}"


def _is_scalar(value: Any) -> bool:
    if isinstance(value, int | float):
        return True
    numel = getattr(value, "numel", None)
    return callable(numel) and numel() == 1


def _job_name(module: LightningModule) -> str:
    return str(getattr(module, "job_name", type(module).__name__))


def _learning_rate(trainer: Trainer) -> float | None:
    optimizers = trainer.optimizers
    if not optimizers or not optimizers[0].param_groups:
        return None
    return float(optimizers[0].param_groups[0]["lr"])


class StepProgressBar(TQDMProgressBar):
    """One bar over the run's ``max_steps`` steps, named after the job (``distill``), with
    the objective and the learning rate; a resumed run starts the bar at its step."""

    def init_train_tqdm(self) -> Any:
        bar = super().init_train_tqdm()
        if self.trainer.max_steps > 0:
            bar.set_description(_job_name(self.trainer.lightning_module), refresh=False)
            bar.total = self.trainer.max_steps
        return bar

    def on_train_epoch_start(self, trainer: Trainer, *_: Any) -> None:
        if trainer.max_steps <= 0:  # an epoch-based run: Lightning's bar
            super().on_train_epoch_start(trainer, *_)
            return
        bar = self.train_progress_bar
        if not getattr(bar, "freekd_steps", False):  # the first epoch: the bar of the whole run
            bar.reset(total=trainer.max_steps)
            bar.initial = 0
            bar.n = trainer.global_step
            bar.set_description(_job_name(trainer.lightning_module))
            bar.freekd_steps = True
            bar.refresh()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if trainer.max_steps <= 0:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, idx)
            return
        step = trainer.global_step
        if self._should_update(step, trainer.max_steps) and not self.train_progress_bar.disable:
            self.train_progress_bar.n = step
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.max_steps <= 0:
            super().on_train_epoch_end(trainer, pl_module)

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        metrics = dict(super().get_metrics(trainer, pl_module))
        metrics.pop("v_num", None)
        rate = _learning_rate(trainer)
        if rate is not None:
            metrics["lr"] = f"{rate:.2e}"
        return metrics


class RichStepProgressBar(RichProgressBar):
    """Lightning's ``RichProgressBar`` as one bar over the run's ``max_steps`` steps, named
    after the job (``distill``), with the objective and the learning rate; a resumed run
    starts the bar at its step (needs ``rich``)."""

    def _add_step_task(self, trainer: Trainer) -> None:
        """The bar of the whole run, at the trainer's step."""
        self.train_progress_bar_id = self._add_task(
            trainer.max_steps, _job_name(trainer.lightning_module)
        )
        self._update(self.train_progress_bar_id, trainer.global_step)

    def _initialize_train_progress_bar_id(self) -> None:  # Lightning's, for mid-epoch resumes
        if self.trainer.max_steps <= 0:
            super()._initialize_train_progress_bar_id()
            return
        self._add_step_task(self.trainer)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.max_steps <= 0:  # an epoch-based run: Lightning's bar
            super().on_train_epoch_start(trainer, pl_module)
            return
        if self.is_enabled and self.progress is not None and self.train_progress_bar_id is None:
            self._add_step_task(trainer)  # the first epoch only: later ones continue the bar
        self.refresh()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if trainer.max_steps <= 0:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, idx)
            return
        if self.is_enabled and self.train_progress_bar_id is None:
            self._add_step_task(trainer)
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        metrics = dict(super().get_metrics(trainer, pl_module))
        metrics.pop("v_num", None)
        rate = _learning_rate(trainer)
        if rate is not None:
            metrics["lr"] = f"{rate:.2e}"
        return metrics


_RICH = RequirementCache("rich>=10.2.2")


def rich_available() -> bool:
    """Whether ``rich`` (the version Lightning's ``RichProgressBar`` needs) is installed."""
    return bool(_RICH)


def output_is_terminal() -> bool:
    """Whether ``sys.stdout`` is a terminal (where rich draws)."""
    isatty = getattr(sys.stdout, "isatty", None)
    return bool(callable(isatty) and isatty())


def progress_callback(show_bar: bool, every: int) -> Callback:
    """What a run shows: with ``show_bar``, a bar counted in steps (:class:`RichStepProgressBar`
    when ``rich`` is installed and stdout is a terminal, else :class:`StepProgressBar`);
    without, a :class:`StepLog` line every ``every`` steps."""
    if not show_bar:
        return StepLog(every)
    if rich_available() and output_is_terminal():
        return RichStepProgressBar()
    return StepProgressBar()


class StepLog(Callback):
    """A line when the run starts, then one every ``every`` optimizer steps and at the last
    one (step/total, objective and terms, learning rate, elapsed time, time left); rank 0
    only, through the ``freekd`` logger at INFO. The time left is extrapolated from the steps
    of this process's run (a resumed run counts from its first step)."""

    def __init__(self, every: int) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"StepLog: every must be an integer >= 1, got {every!r}")
        self.every = every
        self._start_time = 0.0
        self._start_step = 0
        self._rate: float | None = None

    @rank_zero_only
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start_time = time.perf_counter()
        self._start_step = trainer.global_step
        total = trainer.max_steps
        if self._start_step > 0:
            logger.info(
                "%s: resuming at step %d of %d", _job_name(pl_module), self._start_step, total
            )
        else:
            logger.info("%s: %d steps, a line every %d", _job_name(pl_module), total, self.every)

    @rank_zero_only
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, idx: int
    ) -> None:
        self._rate = _learning_rate(trainer)  # the rate this step uses (before it steps)

    @rank_zero_only
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        step, total = trainer.global_step, trainer.max_steps
        if step % self.every and step != total:
            return
        logger.info("%s", self.line(trainer, pl_module))

    def line(self, trainer: Trainer, pl_module: LightningModule) -> str:
        """The log line of the current step."""
        step, total = trainer.global_step, trainer.max_steps
        elapsed = time.perf_counter() - self._start_time
        done = step - self._start_step
        parts = [format_terms(trainer.callback_metrics)]
        rate = self._rate if self._rate is not None else _learning_rate(trainer)
        if rate is not None:
            parts.append(f"lr {rate:.2e}")
        parts.append(f"elapsed {format_duration(elapsed)}")
        if total > 0:
            left = (total - step) * elapsed / done if done > 0 else math.inf
            parts.append(f"ETA {format_duration(left)}")
        counted = f"{step}/{total} ({100 * step / total:.0f}%)" if total > 0 else f"{step}"
        return f"{_job_name(pl_module)} step {counted}: " + ", ".join(p for p in parts if p)


class ConsoleHandler(logging.Handler):
    """``freekd: <message>`` on ``sys.stdout`` below WARNING, on ``sys.stderr`` from WARNING up;
    the streams are looked up at each message (so a replaced ``sys.stdout`` is followed)."""

    def __init__(self, prefix: str = "freekd: ") -> None:
        super().__init__()
        self.setFormatter(logging.Formatter(f"{prefix}%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001  (logging must never raise)
            self.handleError(record)
