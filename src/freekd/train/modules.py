"""The three training jobs as LightningModules: teacher, prompt tuning (stage 1), distillation
(stage 2).

Each takes an :class:`~freekd.train.config.OptimConfig` and a
:class:`~freekd.train.config.ScheduleConfig`; the schedule is stepped once per optimizer step.
Every loss term is logged under ``train/<name>`` at each step (``train/loss`` is the objective,
also shown on the progress bar); validation values under ``val/<name>``, averaged over the
validation set and over processes.

Under DDP the whole module is wrapped, but the frozen parts (the teacher, and in stage 2 the
prompts) are listed in ``_ddp_params_and_buffers_to_ignore``: DDP neither broadcasts nor
all-reduces them, they hold no gradients, and ``find_unused_parameters`` is not needed for them.

Checkpoints of prompt tuning and distillation leave the frozen teacher out (its weights come
from where the caller loaded them, e.g. its file): they record its :func:`state_sha256`
instead, and resuming with another teacher is refused with one clear error
(:meth:`_Job.check_frozen_state`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from ..checkpoints import export_student, state_sha256
from ..distill import Distiller, NonFiniteError, nonfinite_message
from ..frozen import TaskLoss, loss_terms
from ..losses.freekd import FreeKDLoss
from ..tuning import PromptTuner
from .config import OptimConfig, ScheduleConfig
from .schedules import build_optimizer, build_scheduler

__all__ = ["DistillModule", "PromptTuningModule", "TeacherModule", "ValStep"]

logger = logging.getLogger("freekd")

ValStep = Callable[[nn.Module, Any], Tensor | Mapping[str, Tensor]]
"""``val_step(model, batch)`` -> a scalar or a dict of named scalars (e.g. a loss, an accuracy),
called under ``no_grad`` with the model in eval mode; logged as ``val/<name>``."""


def _batch_size(batch: Any) -> int:
    """Items in a batch: the leading size of its first tensor (1 when it holds none)."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, list | tuple):
        if batch and not isinstance(batch[0], Tensor | Mapping | list | tuple):
            return len(batch)
        for item in batch:
            if isinstance(item, Tensor | Mapping | list | tuple):
                return _batch_size(item)
    return 1


def _total(terms: Mapping[str, Tensor]) -> Tensor:
    """The objective of a task loss dict: ``terms["task"]`` if present, else the sum."""
    return terms["task"] if "task" in terms else torch.stack(list(terms.values())).sum()


class _Job(pl.LightningModule):
    """What the three jobs share: optimizer and schedule, logging, validation, DDP exclusions.

    ``job_name`` (the command that runs the job: ``"train-teacher"``, ``"tune-prompts"``,
    ``"distill"``; set it to tell apart two jobs of one class, e.g. ``"distill --baseline"``)
    is written into every checkpoint under ``checkpoint["freekd"]`` with the optimizer and
    schedule settings; :func:`freekd.train.fit` checks them before resuming.
    """

    job_name = "job"
    frozen_name = "teacher"
    """What the frozen part left out of checkpoints is called in messages."""

    def __init__(
        self, optim: OptimConfig, schedule: ScheduleConfig, val_step: ValStep | None
    ) -> None:
        super().__init__()
        if not isinstance(optim, OptimConfig) or not isinstance(schedule, ScheduleConfig):
            raise TypeError(
                "optim and schedule must be freekd.train.OptimConfig and ScheduleConfig, got "
                f"{type(optim).__name__} and {type(schedule).__name__}"
            )
        self.optim_config, self.schedule_config, self.val_step = optim, schedule, val_step
        self.frozen_source: str | None = None
        """Where the frozen teacher was loaded from (a file), named in the resume error."""
        self._frozen_sha256: str | None = None

    def trainable_parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    # ------------------------------------------------------------------ frozen teacher

    def frozen_module(self) -> tuple[str, nn.Module] | None:
        """``(attribute path, module)`` of the frozen part that checkpoints leave out (the
        teacher of stages 1 and 2), ``None`` when everything is stored (teacher training)."""
        return None

    def frozen_state_keys(self) -> list[str]:
        """The entries of ``state_dict()`` that checkpoints leave out."""
        frozen = self.frozen_module()
        if frozen is None:
            return []
        prefix = f"{frozen[0]}."
        return [key for key in self.state_dict() if key.startswith(prefix)]

    def frozen_sha256(self) -> str | None:
        """:func:`~freekd.checkpoints.state_sha256` of the frozen teacher (computed once: it
        does not change during a run)."""
        frozen = self.frozen_module()
        if frozen is None:
            return None
        if self._frozen_sha256 is None:
            self._frozen_sha256 = state_sha256(frozen[1])
        return self._frozen_sha256

    def check_frozen_state(self, checkpoint: Mapping[str, Any], path: str | Path) -> None:
        """Refuse to resume from ``checkpoint`` (read from ``path``) with another teacher than
        the one it was trained with (its recorded fingerprint); ``ValueError`` naming both."""
        recorded = checkpoint.get("freekd")
        saved = recorded.get("frozen_sha256") if isinstance(recorded, Mapping) else None
        current = self.frozen_sha256()
        if saved is None or current is None or saved == current:
            return
        source = recorded.get("frozen_source")
        was = f" (loaded from {source})" if source else ""
        now = f", loaded from {self.frozen_source}" if self.frozen_source else ""
        raise ValueError(
            f"cannot resume from {str(path)!r}: the {self.frozen_name} differs from the one the "
            f"run was trained with (weights sha256 {saved[:12]}...{was}; now {current[:12]}..."
            f"{now}); checkpoints leave the frozen {self.frozen_name} out, so resume with the "
            f"same {self.frozen_name} file, or start afresh with force=True"
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["freekd"] = {
            "job": self.job_name,
            "optimizer": dataclasses.asdict(self.optim_config),
            "schedule": dataclasses.asdict(self.schedule_config),
        }
        frozen = self.frozen_state_keys()
        if frozen:
            state = checkpoint["state_dict"]
            for key in frozen:
                state.pop(key, None)
            checkpoint["freekd"]["frozen"] = self.frozen_module()[0]  # type: ignore[index]
            checkpoint["freekd"]["frozen_sha256"] = self.frozen_sha256()
            checkpoint["freekd"]["frozen_source"] = self.frozen_source

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check the teacher against the checkpoint's record and put its current weights into
        the state dict Lightning loads (strictly)."""
        path = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
        self.check_frozen_state(checkpoint, path or "the checkpoint")
        state = checkpoint["state_dict"]
        own = self.state_dict()
        for key in self.frozen_state_keys():
            state.setdefault(key, own[key])

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = build_optimizer(self.trainable_parameters(), self.optim_config)
        scheduler = build_scheduler(optimizer, self.schedule_config)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    def _ignore_in_ddp(
        self, frozen: Iterable[nn.Module], buffers_of: Iterable[nn.Module] = ()
    ) -> None:
        """Exclude the parameters and buffers of ``frozen``, the buffers of ``buffers_of``, and
        every parameter that needs no gradient from DDP's broadcasts and gradient reduction."""
        frozen_ids = {id(t) for m in frozen for t in (*m.parameters(), *m.buffers())}
        frozen_ids |= {id(b) for m in buffers_of for b in m.buffers()}
        names = [
            n for n, p in self.named_parameters() if id(p) in frozen_ids or not p.requires_grad
        ]
        names += [n for n, b in self.named_buffers() if id(b) in frozen_ids]
        self._ddp_params_and_buffers_to_ignore = names

    def _log_train(self, terms: Mapping[str, Tensor], total: Tensor) -> None:
        values = {f"train/{name}": value.detach().float() for name, value in terms.items()}
        values["train/loss"] = total.detach().float()
        self.log_dict(values, on_step=True, on_epoch=False)
        self.log("loss", total.detach().float(), prog_bar=True, logger=False)

    def _log_val(self, output: Tensor | Mapping[str, Tensor], batch: Any) -> None:
        terms = loss_terms(output, "loss") if isinstance(output, Tensor) else dict(output)
        values = {f"val/{name}": torch.as_tensor(v).detach().float() for name, v in terms.items()}
        self.log_dict(
            values, on_step=False, on_epoch=True, sync_dist=True, batch_size=_batch_size(batch)
        )

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._finished():  # the last step: callbacks' on_train_end see equal buffers
            self._broadcast_buffers()

    def on_train_end(self) -> None:
        self._broadcast_buffers()

    def _broadcast_buffers(self) -> None:
        """Give every process the buffers of process 0 (e.g. the student's BatchNorm running
        statistics, which DDP only broadcasts at the start of each forward pass, so that after
        the last step each process still holds its own)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        if torch.distributed.get_world_size() < 2:
            return
        ignored = set(getattr(self, "_ddp_params_and_buffers_to_ignore", ()))
        for name, buffer in self.named_buffers():
            if name not in ignored:
                torch.distributed.broadcast(buffer, src=0)

    def _finished(self) -> bool:
        """Whether the run reached its ``max_steps`` (and was not stopped early)."""
        trainer = self.trainer
        return trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps

    def _run_file(self, name: str) -> Path:
        return Path(self.trainer.default_root_dir) / name


class TeacherModule(_Job):
    """Train a model on its own task loss (a teacher for users without one, or the demo's).

    Args:
        model: the model; all its parameters with ``requires_grad`` are trained.
        task_loss: ``task_loss(model, batch)`` -> scalar or dict of scalars (summed).
        optim, schedule: optimizer and learning-rate schedule.
        val_step: ``val_step(model, batch)`` for validation; default: the task loss (in eval
            mode; pass ``val_step`` for models that return no loss in eval mode, e.g.
            torchvision detectors).
    """

    job_name = "train-teacher"

    def __init__(
        self,
        model: nn.Module,
        task_loss: TaskLoss,
        optim: OptimConfig,
        schedule: ScheduleConfig,
        val_step: ValStep | None = None,
    ) -> None:
        super().__init__(optim, schedule, val_step)
        self.model, self.task_loss = model, task_loss

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        terms = loss_terms(self.task_loss(self.model, batch), "task")
        total = _total(terms)
        self._log_train(terms, total)
        return total

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        step = self.val_step or self.task_loss
        self._log_val(step(self.model, batch), batch)


class PromptTuningModule(_Job):
    """Stage 1: tune the frequency prompts of ``tuner.loss`` on the frozen teacher.

    Args:
        tuner: a :class:`~freekd.tuning.PromptTuner` (its teacher is frozen, norms in eval).
        optim, schedule: for the prompts (paper: :func:`~freekd.train.prompt_tuning_recipe`).
        prompts_path: where the tuned prompts are written at the end of a completed run
            (default ``<run_dir>/prompts.safetensors``); load them with
            ``FreeKDLoss.load_prompts``.
        val_step: ``val_step(tuner, batch)``; default: the tuner's loss terms.

    The optimizer gets the prompt tokens only. At the end of a run that reached ``max_steps``
    the prompts are marked tuned and saved (by process 0).
    """

    job_name = "tune-prompts"

    def __init__(
        self,
        tuner: PromptTuner,
        optim: OptimConfig,
        schedule: ScheduleConfig,
        prompts_path: str | Path | None = None,
        val_step: ValStep | None = None,
    ) -> None:
        super().__init__(optim, schedule, val_step)
        if not isinstance(tuner, PromptTuner):
            raise TypeError(f"tuner must be a freekd.tuning.PromptTuner, got {type(tuner)}")
        self.tuner = tuner
        self.prompts_path = None if prompts_path is None else Path(prompts_path)
        prompts = tuner.loss.prompts
        others = [m for name, m in tuner.named_children() if name != "loss"]
        loss_parts = [m for name, m in tuner.loss.named_children() if name != "prompts"]
        self._ignore_in_ddp([*others, *loss_parts], buffers_of=[prompts])
        for name, param in prompts.named_parameters():
            if not param.requires_grad:
                raise ValueError(f"prompt parameter {name} does not require a gradient")

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.tuner.trainable_parameters()

    def frozen_module(self) -> tuple[str, nn.Module]:
        return "tuner.teacher", self.tuner.teacher

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        terms = self.tuner(batch)
        total = terms.pop("loss")
        self._log_train(terms, total)
        return total

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if self.val_step is not None:
            self._log_val(self.val_step(self.tuner, batch), batch)
        else:
            self._log_val(self.tuner(batch), batch)

    def save_prompts(self, path: str | Path) -> Path:
        """Write the prompts (and their configuration, the re-synthesis included) as
        safetensors."""
        self.tuner.save_prompts(path)
        return Path(path)

    def on_train_end(self) -> None:
        super().on_train_end()
        if not self._finished():
            return
        self.tuner.mark_tuned()
        path = self.prompts_path or self._run_file("prompts.safetensors")
        if self.trainer.is_global_zero:
            self.save_prompts(path)
            logger.debug("tuned prompts written to %s", path)
        self.prompts_path = path


class DistillModule(_Job):
    """Stage 2: train the student of a :class:`~freekd.distill.Distiller`.

    Args:
        distiller: teacher (frozen), student, taps, projections and losses.
        optim, schedule: for ``distiller.trainable_parameters()`` (student, projections, learned
            loss parts such as FreeKD's MLP gate; never the teacher or the prompts).
        student_path: where the student-only weights are exported at the end of a completed
            run (default ``<run_dir>/student.safetensors``, see
            :func:`freekd.checkpoints.export_student`).
        val_step: ``val_step(student, batch)``; default: the distiller's loss terms.

    Logged: every term of ``distiller(batch)`` (``train/task...``, ``train/distill/<name>``,
    ``train/output/<name>``), their sum ``train/loss``, and for each FreeKD loss its per-layer
    terms ``train/distill/<name>/layer<i>`` (times the loss's weight in the distiller, so they
    add up to ``train/distill/<name>``).

    Non-finite values (``distiller.nonfinite``): the processes agree (one all-reduce of a flag)
    on whether any of them saw NaN/Inf in a tapped feature or loss term. ``"raise"``: every
    process raises :class:`~freekd.distill.NonFiniteError` at the same step. ``"skip"``: every
    process skips the optimizer step: the gradients are dropped before clipping and the
    optimizer, the student's buffers (BatchNorm statistics) are put back as before the batch,
    so no weight, momentum or Adam moment changes and no per-parameter step counter advances;
    the step still counts (``global_step`` and the learning-rate schedule move on, so a run
    still ends at ``max_steps``). ``train/nonfinite_skipped`` logs the running count, which the
    checkpoint keeps.
    """

    job_name = "distill"

    def __init__(
        self,
        distiller: Distiller,
        optim: OptimConfig,
        schedule: ScheduleConfig,
        student_path: str | Path | None = None,
        val_step: ValStep | None = None,
    ) -> None:
        super().__init__(optim, schedule, val_step)
        if not isinstance(distiller, Distiller):
            raise TypeError(f"distiller must be a freekd.distill.Distiller, got {type(distiller)}")
        self.distiller = distiller
        self.student_path = None if student_path is None else Path(student_path)
        prompts = [
            loss.prompts
            for loss in distiller.feature_losses.values()
            if isinstance(loss, FreeKDLoss)
        ]
        self._ignore_in_ddp([distiller.teacher, *prompts])
        self.nonfinite_skipped = 0
        self._skip_optimizer_step = False
        self._buffers_before_skip: dict[str, Tensor] = {}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.distiller.trainable_parameters()

    def frozen_module(self) -> tuple[str, nn.Module]:
        return "distiller.teacher", self.distiller.teacher

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        policy = self.distiller.nonfinite
        saved = {}
        if policy == "skip" and not self._skip_optimizer_step:
            saved = {name: b.detach().clone() for name, b in self._trained_buffers().items()}
        terms = self.distiller(batch, raise_nonfinite=False)
        total = torch.stack(list(terms.values())).sum()
        if policy != "off" and self._any_process_nonfinite():
            if policy == "raise":
                raise NonFiniteError(self._nonfinite_report(), self.distiller.last_nonfinite)
            if not self._skip_optimizer_step:  # the buffers of before the first bad batch
                self._skip_optimizer_step, self._buffers_before_skip = True, saved
            logger.warning("skipping step %d: %s", self.global_step, self._nonfinite_report())
        logged = dict(terms)
        for name, loss in self.distiller.feature_losses.items():
            weight = self.distiller.loss_weights[name]
            for layer, value in getattr(loss, "last_terms", {}).items():
                logged[f"distill/{name}/{layer}"] = weight * value
        self._log_train(logged, total)
        return total

    # ------------------------------------------------------------------ non-finite steps

    def _trained_buffers(self) -> dict[str, Tensor]:
        """Buffers that a forward pass may change: all but the frozen teacher's and prompts'."""
        ignored = set(getattr(self, "_ddp_params_and_buffers_to_ignore", ()))
        return {name: b for name, b in self.named_buffers() if name not in ignored}

    def _any_process_nonfinite(self) -> bool:
        """Whether this or any other process saw NaN/Inf at this step (a collective: every
        process calls it at every step)."""
        local = bool(self.distiller.last_nonfinite)
        if self.trainer.world_size > 1:
            return self.trainer.strategy.reduce_boolean_decision(local, all=False)
        return local

    def _nonfinite_report(self) -> str:
        sources = self.distiller.last_nonfinite
        where = f" at step {self.global_step}"
        if not sources:
            return f"another process saw NaN or Inf{where} (its message names the tensor)"
        message = nonfinite_message(sources).replace("; ", f"{where}; ", 1)
        return message if self.distiller.nonfinite == "raise" else message.split("; or pass")[0]

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop the gradients of a step that a process found non-finite (before clipping and
        the optimizer, which leaves parameters without a gradient untouched)."""
        if self.distiller.nonfinite != "skip":
            return
        if self._skip_optimizer_step:
            for group in optimizer.param_groups:
                for parameter in group["params"]:
                    parameter.grad = None
            # After the backward pass (BatchNorm saved its running statistics for it).
            buffers = self._trained_buffers()
            with torch.no_grad():
                for name, value in self._buffers_before_skip.items():
                    buffers[name].copy_(value)
            self.nonfinite_skipped += 1
            self._skip_optimizer_step, self._buffers_before_skip = False, {}
        self.log("train/nonfinite_skipped", float(self.nonfinite_skipped), on_step=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["freekd_nonfinite_skipped"] = self.nonfinite_skipped

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.nonfinite_skipped = int(checkpoint.get("freekd_nonfinite_skipped", 0))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if self.val_step is not None:
            self._log_val(self.val_step(self.distiller.student, batch), batch)
        else:
            self._log_val(self.distiller(batch), batch)

    def export_student(self, path: str | Path) -> Path:
        """Write the student's plain ``state_dict`` as safetensors."""
        return export_student(self.distiller.student, path)

    def on_train_end(self) -> None:
        super().on_train_end()
        if not self._finished():
            return
        path = self.student_path or self._run_file("student.safetensors")
        if self.trainer.is_global_zero:
            self.export_student(path)
            logger.debug("student weights written to %s", path)
        self.student_path = path
