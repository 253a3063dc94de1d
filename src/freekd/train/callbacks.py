"""Callbacks and checkpoint I/O that Lightning does not provide as needed here.

- :class:`AtomicCheckpointIO`: every checkpoint file is written to a temporary file in the same
  folder and renamed over the target, so a crash while writing leaves the previous file intact.
- :class:`RNGState`: stores the RNG states of every process in the checkpoint and restores them
  when training resumes, right before the first batch; validation runs on a forked RNG stream, so
  whether (and when) validation runs does not change the training randomness.
- :class:`StepCheckpoint`: ``ModelCheckpoint`` every ``k`` steps plus ``last.ckpt`` (a link to
  the newest step file, not a copy); Ctrl-C (or a
  SIGTERM) stops the run at the end of the current step, after writing a checkpoint there, so
  that resuming from it is exact; any other exception writes ``interrupted.ckpt`` (best effort:
  the state may be in the middle of a step, ``last.ckpt`` is the last consistent one).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

from .._io import atomic_write
from .rng import capture_rng_state, restore_rng_state

__all__ = ["AtomicCheckpointIO", "RNGState", "StepCheckpoint"]

logger = logging.getLogger("freekd")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file next to the target, then ``os.replace`` onto it."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__}.save_checkpoint takes no storage_options, got "
                f"{storage_options!r}"
            )
        if "://" in str(path):  # remote storage: Lightning's fsspec writer
            super().save_checkpoint(checkpoint, path)
            return
        atomic_write(path, lambda temporary: torch.save(checkpoint, temporary))


def _distributed() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


class RNGState(Callback):
    """RNG states in the checkpoint, per process; restored at ``on_train_start`` of a resumed run.

    ``local_only`` (set while writing an emergency checkpoint) stores this process's state only,
    without the collective that gathers the others'.
    """

    local_only = False

    def __init__(self) -> None:
        self._to_restore: dict[str, Any] | None = None
        self._before_validation: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return "freekd.RNGState"

    def state_dict(self) -> dict[str, Any]:
        state = capture_rng_state()
        if _distributed() and not RNGState.local_only:
            states: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, state)
            return {"states": states}
        return {"states": [state]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._to_restore = state_dict

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._to_restore is None:
            return
        states = self._to_restore["states"]
        self._to_restore = None
        rank = trainer.global_rank
        if len(states) != trainer.world_size and rank == 0:
            logger.warning(
                "the checkpoint holds RNG states of %d processes, this run has %d: random "
                "augmentation will not continue exactly",
                len(states),
                trainer.world_size,
            )
        if rank < len(states) and states[rank] is not None:
            restore_rng_state(states[rank])

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._before_validation = capture_rng_state()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._before_validation is not None:
            restore_rng_state(self._before_validation)
            self._before_validation = None


_STEP_FILE = re.compile(r"^step=(\d+)\.ckpt$")


class StepCheckpoint(ModelCheckpoint):
    """Checkpoints ``dirpath/step=NNNNNN.ckpt`` every ``every_n_train_steps`` steps and at the
    last step; ``dirpath/last.ckpt`` is a relative symbolic link to the newest of them (a hard
    link where the file system has no symbolic links, a copy where it has neither), replaced
    atomically (a copy on remote storage); keeps the ``keep`` most recent step files (-1: all).

    A first Ctrl-C (SIGINT) asks the run to stop: at the end of the current step every process
    writes the checkpoint (``last.ckpt`` and the step file) and training stops; ``stopped_by``
    then says ``"SIGINT"``. A second Ctrl-C interrupts at once. A SIGTERM seen by Lightning is
    handled the same way before Lightning ends the run.
    """

    def __init__(self, dirpath: str | Path, every_n_train_steps: int, keep: int = -1) -> None:
        super().__init__(
            dirpath=dirpath,
            filename="{step:06d}",
            every_n_train_steps=every_n_train_steps,
            save_top_k=-1,
            # remote storage (s3://...) has no links: a copy there
            save_last="link" if "://" not in str(dirpath) else True,
            enable_version_counter=False,
        )
        self.keep = keep
        self.stop_requested = False
        self.stopped_by: str | None = None
        self.interrupted_path: Path | None = None
        self._previous_handler: Any = None
        self._installed = False

    # ------------------------------------------------------------------ Ctrl-C

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.stop_requested, self.stopped_by = False, None
        if stage == "fit" and trainer.is_global_zero:
            self._remove_stale_temporary_files()
        if stage == "fit" and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)
            self._installed = True

    def _remove_stale_temporary_files(self) -> None:
        """Delete the temporary files of checkpoint writes that a killed run (SIGKILL, power
        loss) left half done; the checkpoints themselves are intact (atomic rename)."""
        if self.dirpath is None or not Path(self.dirpath).is_dir():
            return
        for path in Path(self.dirpath).glob(".*.ckpt.*.tmp"):  # also a half-made link
            logger.info("removing %s, left by an interrupted checkpoint write", path.name)
            path.unlink(missing_ok=True)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._restore_handler()
        super().teardown(trainer, pl_module, stage)

    def _restore_handler(self) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous_handler or signal.default_int_handler)
            self._installed = False

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.stop_requested:  # second Ctrl-C: stop now
            self._restore_handler()
            raise KeyboardInterrupt
        self.stop_requested = True
        logger.warning(
            "Ctrl-C: stopping after this step and writing a checkpoint (Ctrl-C again to abort)"
        )

    # ------------------------------------------------------------------ saving

    @staticmethod
    def _link_checkpoint(trainer: Trainer, filepath: str, linkpath: str) -> None:
        """Point ``linkpath`` (``last.ckpt``) at ``filepath``: a new link under a temporary name
        renamed over the old one, so that a kill at any moment leaves a loadable ``last.ckpt``."""
        newest, link = Path(filepath), Path(linkpath)
        if trainer.is_global_zero and newest.resolve() != link.absolute().resolve(strict=False):
            temporary = link.with_name(f".{link.name}.{os.getpid()}.link.tmp")
            temporary.unlink(missing_ok=True)
            try:
                os.symlink(os.path.relpath(newest, link.parent), temporary)
            except OSError:  # no symbolic links (Windows without the privilege): a hard link
                try:
                    os.link(newest, temporary)
                except OSError:  # nor hard links: a copy
                    shutil.copyfile(newest, temporary)
            os.replace(temporary, link)
        trainer.strategy.barrier()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, idx)
        stop = self.stop_requested or trainer.received_sigterm
        if trainer.world_size > 1:  # every process must agree, they all take part in the save
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        final = 0 < trainer.max_steps <= trainer.global_step
        if (stop or final) and not self._should_skip_saving_checkpoint(trainer):
            # The state at the end of the step: resuming from it (with more max_steps after a
            # completed run) is exact.
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        if stop:
            self.stopped_by = "SIGTERM" if trainer.received_sigterm else "SIGINT"
            trainer.should_stop = True
        self._prune(trainer)

    def _prune(self, trainer: Trainer) -> None:
        if self.keep < 1 or not trainer.is_global_zero or self.dirpath is None:
            return
        files = sorted(
            (int(m.group(1)), path)
            for path in Path(self.dirpath).glob("step=*.ckpt")
            if (m := _STEP_FILE.match(path.name))
        )
        for _, path in files[: -self.keep]:
            self._remove_checkpoint(trainer, str(path))
            self.best_k_models.pop(str(path), None)

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        self._restore_handler()
        if (
            trainer.state.fn != TrainerFn.FITTING
            or trainer.sanity_checking
            or trainer.global_step == 0
            or self._last_global_step_saved == trainer.global_step
            or self.dirpath is None
        ):
            return
        path = Path(self.dirpath) / "interrupted.ckpt"
        RNGState.local_only = True  # no collective: the other processes may be gone
        try:
            checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
            if trainer.is_global_zero:
                trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, path)
                self.interrupted_path = path
                logger.warning(
                    "%s at step %d: wrote %s (it may hold a half-done step; %s is the last "
                    "consistent checkpoint)",
                    type(exception).__name__,
                    trainer.global_step,
                    path,
                    Path(self.dirpath) / "last.ckpt",
                )
        except Exception as error:  # never hide the original exception
            logger.warning("could not write %s after %r: %s", path, exception, error)
        finally:
            RNGState.local_only = False
