"""Optimizers and per-step learning-rate schedules built from :mod:`freekd.train.config`.

The schedule is a ``torch.optim.lr_scheduler.LambdaLR`` stepped once per optimizer step: the
learning rate used by optimizer step ``t`` (0-based) of a parameter group with peak rate ``lr`` is
``lr * warmup(t) * main(t)``, with

- ``warmup(t) = ratio + (1 - ratio) * t / warmup_steps`` for ``t < warmup_steps``, else 1;
- ``main(t)``: 1 (``"constant"``); ``gamma ** (number of milestones <= t)`` (``"step"``);
  ``(m + (1 - m) * (1 - min(t, T) / T) ** power)`` (``"poly"``) or
  ``(m + (1 - m) * (1 + cos(pi * min(t, T) / T)) / 2)`` (``"cosine"``), where
  ``m = min_lr / lr`` and ``T = total_steps``.

These are MMCV's ``LinearWarmup`` + ``Step`` / ``Poly`` / ``CosineAnnealing`` updaters.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from .config import OptimConfig, ScheduleConfig

__all__ = ["build_optimizer", "build_scheduler", "lr_factor"]


def build_optimizer(
    params: Iterable[nn.Parameter] | Iterable[dict[str, Any]], config: OptimConfig
) -> torch.optim.Optimizer:
    """``torch.optim`` SGD / Adam / AdamW over ``params`` (tensors or param-group dicts)."""
    params = list(params)
    if not params:
        raise ValueError(
            "the optimizer got no parameters: nothing in the module requires a gradient (is "
            "everything frozen?)"
        )
    if config.name == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    optimizer = torch.optim.Adam if config.name == "adam" else torch.optim.AdamW
    return optimizer(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)


def lr_factor(step: int, config: ScheduleConfig, min_factor: float = 0.0) -> float:
    """The factor that multiplies the peak rate at optimizer step ``step`` (0-based).

    ``min_factor`` is ``min_lr / lr`` of the parameter group (for poly and cosine).
    """
    factor = 1.0
    if config.kind == "step":
        factor = config.gamma ** bisect.bisect_right(config.milestones, step)
    elif config.kind in ("poly", "cosine"):
        total = config.total_steps
        assert total is not None  # checked by ScheduleConfig
        progress = min(step, total) / total
        if config.kind == "poly":
            decay = (1.0 - progress) ** config.power
        else:
            decay = (1.0 + math.cos(math.pi * progress)) / 2.0
        factor = min_factor + (1.0 - min_factor) * decay
    if step < config.warmup_steps:
        ratio = config.warmup_ratio
        factor *= ratio + (1.0 - ratio) * step / config.warmup_steps
    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, config: ScheduleConfig) -> LambdaLR:
    """A ``LambdaLR`` following ``config``; call ``.step()`` after every optimizer step.

    Each parameter group gets its own factor (``min_lr`` is absolute, so ``min_lr / lr`` differs
    between groups of different peak rates).
    """
    lambdas: list[Callable[[int], float]] = []
    for index, group in enumerate(optimizer.param_groups):
        peak = group.get("initial_lr", group["lr"])
        if config.min_lr > peak:
            raise ValueError(
                f"ScheduleConfig.min_lr={config.min_lr} is above the learning rate {peak} of "
                f"parameter group {index}: lower min_lr"
            )
        lambdas.append(_make_lambda(config, config.min_lr / peak))
    return LambdaLR(optimizer, lambdas)


def _make_lambda(config: ScheduleConfig, min_factor: float) -> Callable[[int], float]:
    # A plain function (not a callable object), so that LambdaLR.state_dict() stores nothing
    # for it and checkpoints stay loadable with torch.load(weights_only=True).
    def factor(step: int) -> float:
        return lr_factor(step, config, min_factor)

    return factor
