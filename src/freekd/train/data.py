"""Data loaders whose position can be saved and restored: exact resume from mid-epoch.

:class:`ResumableSampler` draws a permutation of the dataset from ``(seed, epoch)`` only and
shards it over the processes of a distributed run (rank ``r`` of ``W`` takes positions
``r, r + W, ...``, padding the permutation to a multiple of ``W`` like ``DistributedSampler``).
:class:`ResumableDataLoader` counts the batches it has handed out in the current epoch and
exposes ``state_dict()`` / ``load_state_dict()``; Lightning stores that state in its checkpoints
(for any loader with those methods) and loads it on resume, and the next epoch pass then starts
right after the last batch that was trained on. The count is kept by the loader, not by the
sampler, so batches that worker processes had prefetched but not yet delivered are not skipped.

Exactness: the data order and the position are exact for any ``num_workers``. Random
augmentation drawn from the global RNGs in ``__getitem__`` is reproduced exactly with
``num_workers=0`` (the trainer restores the RNG states); with worker processes, draw it from a
generator seeded by ``(seed, epoch, index)`` to make it exact as well.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = [
    "ResumableDataLoader",
    "ResumableSampler",
    "ShardSampler",
    "make_train_loader",
    "make_val_loader",
]

logger = logging.getLogger("freekd")


def _rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (``(0, 1)`` outside a process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % (2**63)


class ResumableSampler(Sampler[int]):
    """Indices of a dataset of ``size`` items, a new order each epoch, sharded over processes.

    Args:
        size: number of items (or a sized dataset).
        seed: the order of epoch ``e`` depends on ``(seed, e)`` only.
        shuffle: ``False`` keeps ``0, 1, 2, ...`` (still sharded).

    Rank and world size are read from ``torch.distributed`` when iteration starts, so the
    sampler can be built before the process group exists. ``set_epoch(e)`` selects the epoch
    (Lightning calls it); ``start_at(i)`` makes the next pass start at position ``i`` of this
    process's share.
    """

    def __init__(self, size: int | Sized, seed: int = 0, shuffle: bool = True) -> None:
        self.size = size if isinstance(size, int) else len(size)
        if self.size < 1:
            raise ValueError("ResumableSampler: the dataset is empty")
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.epoch = 0
        self._start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def start_at(self, position: int) -> None:
        """Skip the first ``position`` indices of this process's share in the next pass."""
        self._start = int(position)

    def order(self, epoch: int | None = None) -> list[int]:
        """This process's indices for ``epoch`` (default: the current one), none skipped."""
        epoch = self.epoch if epoch is None else epoch
        if self.shuffle:
            generator = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
            indices = torch.randperm(self.size, generator=generator).tolist()
        else:
            indices = list(range(self.size))
        rank, world = _rank_and_world()
        total = math.ceil(self.size / world) * world
        indices = (indices * math.ceil(total / self.size))[:total]
        return indices[rank::world]

    def __iter__(self) -> Iterator[int]:
        start, self._start = self._start, 0
        yield from self.order()[start:]

    def __len__(self) -> int:
        return math.ceil(self.size / _rank_and_world()[1])


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + W, rank + 2W, ...`` in order, without padding (for evaluation:
    every item is seen exactly once over all processes)."""

    def __init__(self, size: int | Sized) -> None:
        self.size = size if isinstance(size, int) else len(size)

    def __iter__(self) -> Iterator[int]:
        rank, world = _rank_and_world()
        return iter(range(rank, self.size, world))

    def __len__(self) -> int:
        rank, world = _rank_and_world()
        return len(range(rank, self.size, world))


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler` that can save and restore its position.

    Args:
        dataset: a map-style dataset.
        batch_size: items per batch (per process).
        seed: seed of the data order (and of the worker seeds, per epoch).
        shuffle: a new random order each epoch.
        drop_last: drop the last incomplete batch of each epoch.
        **kwargs: other ``DataLoader`` arguments (``num_workers``, ``collate_fn``,
            ``pin_memory``, ...); not ``sampler``, ``batch_sampler`` or ``generator``.

    ``state_dict()`` -> ``{"epoch", "batches", "batch_size", "world_size", "seed"}``: the epoch
    in progress and the batches already handed out in it.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        **kwargs: Any,
    ) -> None:
        taken = sorted({"sampler", "batch_sampler", "generator", "shuffle"} & set(kwargs))
        if taken:
            raise ValueError(
                f"ResumableDataLoader makes its own sampler and generator; remove {taken}"
            )
        sampler = ResumableSampler(len(dataset), seed=seed, shuffle=shuffle)  # type: ignore[arg-type]
        super().__init__(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last,
            # Its own generator: creating an iterator then draws the worker base seed from it,
            # not from the global torch RNG, which stays untouched.
            generator=torch.Generator(),
            **kwargs,
        )
        self.seed = int(seed)
        self._epoch = 0
        self._batches = 0
        self._resume: tuple[int, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        # A generator: nothing runs until the first batch is requested, after Lightning has
        # called set_epoch for the epoch about to start.
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        epoch, skip = sampler.epoch, 0
        if self._resume is not None:
            resume_epoch, resume_batches = self._resume
            self._resume = None
            if resume_epoch == epoch:
                skip = resume_batches
        self._epoch, self._batches = epoch, skip
        if skip >= len(self):
            return
        sampler.start_at(skip * self.batch_size)  # type: ignore[operator]
        self.generator.manual_seed(_epoch_seed(self.seed, epoch) ^ 0x5EED)
        for batch in super().__iter__():
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self._epoch,
            "batches": self._batches,
            "batch_size": int(self.batch_size),  # type: ignore[arg-type]
            "world_size": _rank_and_world()[1],
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, batches = int(state["epoch"]), int(state["batches"])
        world = _rank_and_world()[1]
        saved = (state.get("seed", self.seed), state.get("batch_size"), state.get("world_size"))
        if saved != (self.seed, self.batch_size, world):
            # Another order or another batch partition: continue at the same share of the epoch.
            samples = (
                batches
                * int(state.get("batch_size", self.batch_size))
                * int(state.get("world_size", world))
            )
            batches = samples // (int(self.batch_size) * world)  # type: ignore[operator]
            logger.warning(
                "resuming with seed/batch size/processes %s instead of %s: the data order will "
                "not continue exactly; skipping %d batches of epoch %d",
                (self.seed, self.batch_size, world),
                saved,
                batches,
                epoch,
            )
        self.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        self._epoch, self._batches = epoch, batches
        self._resume = (epoch, batches)


def make_train_loader(
    dataset: Dataset,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    drop_last: bool = False,
    num_workers: int = 0,
    **kwargs: Any,
) -> ResumableDataLoader:
    """A training loader for :func:`freekd.train.fit`: a new order each epoch from ``seed``,
    sharded over processes, resumable from mid-epoch (see :class:`ResumableDataLoader`)."""
    return ResumableDataLoader(
        dataset,
        batch_size=batch_size,
        seed=seed,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=num_workers,
        **kwargs,
    )


def make_val_loader(
    dataset: Dataset, batch_size: int, num_workers: int = 0, **kwargs: Any
) -> DataLoader:
    """An evaluation loader: each process takes every ``W``-th item (no padding, no shuffling).

    With several processes, logged validation values are the mean of the per-process means.
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(len(dataset)),  # type: ignore[arg-type]
        num_workers=num_workers,
        generator=torch.Generator(),
        **kwargs,
    )
