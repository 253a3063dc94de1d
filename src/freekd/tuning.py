"""Stage 1 of FreeKD: tune the frequency prompts on the frozen teacher.

At each tapped layer the teacher's feature ``F`` is replaced by
``idwt2(prompt.mask_bands(dwt2(F)), size=F.shape[-2:])``; the rest of the teacher runs on it and
its own task loss is computed. Only the prompts are trained, on
``L_prompt = L_task + lambda * L_dis`` (``L_dis`` the overlap between each group's ``T`` masks).
The teacher is frozen for the whole run: every parameter has ``requires_grad=False`` and its norm
and dropout layers stay in eval mode even when the tuner is put in train mode.

:meth:`PromptTuner.diagnostics` measures what the masks do to the teacher (its task loss on the
clean and on the re-synthesised features, the masks' saturation); :func:`teacher_damaged` and
:func:`damage_warning` say when tuning has made the teacher worse, :func:`format_diagnostics`
prints them as a table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._checks import check_choice
from .frozen import TaskLoss, freeze, loss_terms
from .losses.freekd import FreeKDLoss
from .prompts import RESYNTHESES, PromptMasks, Resynthesis
from .taps import FeatureTaps
from .wavelets import dwt2, idwt2

__all__ = [
    "DAMAGE_TOLERANCE",
    "SATURATION_MARGIN",
    "PromptTuner",
    "TaskLoss",
    "damage_warning",
    "format_diagnostics",
    "freeze",
    "loss_terms",
    "mask_statistics",
    "merge_diagnostics",
    "teacher_damaged",
]

DAMAGE_TOLERANCE = 1.1
"""Tuning damaged the teacher when its re-synthesised task loss exceeds this times the clean one."""

SATURATION_MARGIN = 1e-3
"""A mask value is saturated below this or above ``1 -`` this (its sigmoid passes ~no gradient)."""

Diagnostics = dict[str, Any]
"""``{"clean_task": float, "resynthesized_task": float, "task_ratio": float, "masks":
{"layer{i}": {"low" | "level{j}": {"saturated": float, "mean": float}}}}``."""


class PromptTuner(nn.Module):
    """The frozen teacher with prompt-masked re-synthesis at its taps; trains ``loss.prompts``.

    Args:
        teacher: the trained model (frozen here, in place).
        taps: the distilled layers (see :mod:`freekd.taps`), fine to coarse; the same taps as in
            stage 2, one prompt per tapped feature.
        loss: the :class:`~freekd.FreeKDLoss` whose prompts are tuned; its settings (``T``,
            levels, wavelet, granularity, dissimilarity) are the ones used here.
        task_loss: ``task_loss(teacher, batch)`` -> scalar or dict of scalars.
        dissimilarity_weight: ``lambda`` (paper: 1).
        resynthesis: how the masks multiply the bands (:meth:`FrequencyPrompt.mask_bands`):
            ``"sum"`` (DESIGN: ``band * sum_t M_t``) or ``"centered"`` (``band * 2 mean_t M_t``,
            1 where the logits are 0, so the re-synthesis starts near the identity and tuning
            starts from the teacher's own loss).

    ``forward(batch)`` returns ``{"loss": task + lambda * dissimilarity, "task": ...,
    "dissimilarity": ..., "task/<name>": ...}``. Train :meth:`trainable_parameters` (the prompt
    tokens; a learned relational gate of the loss belongs to stage 2). Save the result with
    ``loss.save_prompts(path)``. The hooks stay on the teacher until :meth:`remove_hooks` (or
    the end of a ``with`` block).

    Raises:
        ValueError: a bad ``resynthesis``; at run time, taps whose features do not match the
            loss's prompts (count or channels).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from freekd import FreeKDLoss
        >>> teacher = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 1, 1))
        >>> loss = FreeKDLoss.preset("paper", [8], levels=2)
        >>> images = torch.randn(2, 3, 16, 16)
        >>> with PromptTuner(teacher, ["0"], loss, lambda m, x: m(x).square().mean()) as tuner:
        ...     optimizer = torch.optim.Adam(tuner.trainable_parameters(), lr=0.01)
        ...     terms = tuner(images)
        ...     terms["loss"].backward()
        ...     optimizer.step()
        ...     tuner.mark_tuned()
        >>> sorted(terms), bool(loss.prompts[0].tuned)
        (['dissimilarity', 'loss', 'task'], True)
    """

    def __init__(
        self,
        teacher: nn.Module,
        taps: Sequence[str],
        loss: FreeKDLoss,
        task_loss: TaskLoss,
        dissimilarity_weight: float = 1.0,
        resynthesis: Resynthesis = "sum",
    ) -> None:
        super().__init__()
        check_choice("resynthesis", resynthesis, RESYNTHESES)
        self.resynthesis = resynthesis
        self.teacher = freeze(teacher)
        self.loss = loss
        self.loss.prompts.requires_grad_(True)
        self.task_loss = task_loss
        self.dissimilarity_weight = float(dissimilarity_weight)
        self.taps = FeatureTaps(teacher, taps, replace=self._resynthesize)
        self._masks: dict[int, Any] = {}

    def train(self, mode: bool = True) -> PromptTuner:
        super().train(mode)
        freeze(self.teacher)  # norm and dropout layers stay in eval mode
        return self

    def _resynthesize(self, index: int, feature: Tensor) -> Tensor:
        """Replace tapped feature ``index`` (``[N, C, H, W]``) by its prompt-masked re-synthesis."""
        if index >= len(self.loss.prompts):
            raise ValueError(
                f"the taps yield more than {len(self.loss.prompts)} features, the loss has one "
                f"prompt per feature: build FreeKDLoss with one channel count per tapped feature"
            )
        prompt = self.loss.prompts[index]
        if feature.dim() != 4 or feature.shape[1] != prompt.channels:
            raise ValueError(
                f"tapped feature {index} has shape {tuple(feature.shape)}, its prompt expects "
                f"[N, {prompt.channels}, H, W]: check the taps and the loss's channels"
            )
        with torch.autocast(feature.device.type, enabled=False):
            bands = dwt2(feature.float(), prompt.levels, self.loss.wavelet)
            masks = prompt.masks(bands)
            self._masks[index] = masks
            masked = prompt.mask_bands(bands, masks, self.resynthesis)
            return idwt2(masked, self.loss.wavelet, size=feature.shape[-2:]).to(feature.dtype)

    def forward(self, batch: Any) -> dict[str, Tensor]:
        task = self._resynthesized_task(batch)
        dissimilarity = sum(
            prompt.dissimilarity(self._masks[i], self.loss.dissimilarity)
            for i, prompt in enumerate(self.loss.prompts)
        )
        task_total = _task_total(task)
        terms = {
            "loss": task_total + self.dissimilarity_weight * dissimilarity,
            "task": task_total,
            "dissimilarity": dissimilarity,
        }
        terms.update((k, v) for k, v in task.items() if k != "task")
        return terms

    def _resynthesized_task(self, batch: Any) -> dict[str, Tensor]:
        """The teacher's task loss terms on ``batch`` with every tap re-synthesised (the masks
        of the pass are left in ``self._masks``)."""
        self._masks = {}
        task = loss_terms(self.task_loss(self.teacher, batch), "task")
        if len(self._masks) != len(self.loss.prompts):
            raise ValueError(
                f"the teacher's taps produced {len(self._masks)} features, the loss has prompts "
                f"for {len(self.loss.prompts)}: build FreeKDLoss with one channel count per feature"
            )
        return task

    def _clean_task(self, batch: Any) -> dict[str, Tensor]:
        """The teacher's task loss terms on ``batch`` with its own features (no re-synthesis)."""
        replace, self.taps.replace = self.taps.replace, None
        try:
            return loss_terms(self.task_loss(self.teacher, batch), "task")
        finally:
            self.taps.replace = replace

    @torch.no_grad()
    def diagnostics(self, batch: Any) -> Diagnostics:
        """What the prompts do to the teacher on ``batch``, under ``no_grad``.

        The teacher runs as in tuning (train mode, its norm and dropout layers in eval mode;
        the tuner's mode is restored afterwards), once with its own features and once
        re-synthesised. Returns ``{"clean_task": float, "resynthesized_task": float,
        "task_ratio": resynthesized / clean, "masks": {"layer{i}": {"low" | "level{j}":
        {"saturated": share of mask values < 1e-3 or > 1 - 1e-3, "mean": mean mask value}}}}``
        (levels finest first). Both passes draw the same torch random numbers (a task loss that
        samples, such as a detector's box sampler, compares like with like); the global torch
        random state is left as it was. See :func:`teacher_damaged` and
        :func:`format_diagnostics`.
        """
        was_training = self.training
        device = self.loss.prompts[0].tokens.device
        self.train()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                seed = int(torch.randint(2**31, (1,)))
                torch.manual_seed(seed)
                clean = float(_task_total(self._clean_task(batch)))
                torch.manual_seed(seed)
                resynthesized = float(_task_total(self._resynthesized_task(batch)))
            masks = {f"layer{i}": mask_statistics(self._masks[i]) for i in sorted(self._masks)}
        finally:
            self._masks = {}
            self.train(was_training)
        return {
            "clean_task": clean,
            "resynthesized_task": resynthesized,
            "task_ratio": _ratio(resynthesized, clean),
            "masks": masks,
        }

    def save_prompts(self, path: str | Path) -> Path:
        """Save the loss's prompts (:meth:`FreeKDLoss.save_prompts`), recording the
        re-synthesis they were tuned with."""
        return self.loss.save_prompts(path, resynthesis=self.resynthesis)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The prompt tokens, one tensor per tapped layer: all that stage 1 trains."""
        return [prompt.tokens for prompt in self.loss.prompts]

    def mark_tuned(self) -> None:
        """Record that the prompts are tuned (call at the end of stage 1)."""
        for prompt in self.loss.prompts:
            prompt.mark_tuned()
        self.loss.reset_tuned_check()

    def remove_hooks(self) -> None:
        """Detach the taps from the teacher (it computes its own features again; idempotent)."""
        self.taps.remove()

    def __enter__(self) -> PromptTuner:
        """``with PromptTuner(...) as tuner:``; the hooks are removed on leaving the block."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove_hooks()


# ---------------------------------------------------------------------------- diagnostics


def _task_total(task: Mapping[str, Tensor]) -> Tensor:
    """The total of :func:`loss_terms` output: its ``"task"`` entry or the sum of its terms."""
    return task["task"] if "task" in task else sum(task.values())


def _ratio(value: float, reference: float) -> float:
    """``value / reference``; 1 when both are 0, ``inf`` for a positive value over 0."""
    if reference != 0:
        return value / reference
    return 1.0 if value == 0 else math.copysign(math.inf, value)


def mask_statistics(
    masks: PromptMasks, margin: float = SATURATION_MARGIN
) -> dict[str, dict[str, float]]:
    """Per band group of one layer's masks, ``(low_masks: [N, T, 1, h_J, w_J] or None,
    high_masks[j - 1]: [N, T, k, h_j, w_j])``: ``{"low" | "level{j}": {"saturated": share of
    values < margin or > 1 - margin, "mean": mean value}}``."""
    low, highs = masks
    named = [("low", low)] if low is not None else []
    named += [(f"level{j}", mask) for j, mask in enumerate(highs, start=1)]
    return {
        name: {
            "saturated": float(((mask < margin) | (mask > 1 - margin)).double().mean()),
            "mean": float(mask.double().mean()),
        }
        for name, mask in named
    }


def merge_diagnostics(results: Sequence[Diagnostics]) -> Diagnostics:
    """The mean of several :meth:`PromptTuner.diagnostics` results (one per batch, equal
    weights); the ratio is recomputed from the mean losses."""
    if not results:
        raise ValueError("merge_diagnostics needs at least one diagnostics result")
    count = len(results)
    clean = sum(r["clean_task"] for r in results) / count
    resynthesized = sum(r["resynthesized_task"] for r in results) / count
    masks = {
        layer: {
            band: {
                stat: sum(r["masks"][layer][band][stat] for r in results) / count for stat in values
            }
            for band, values in bands.items()
        }
        for layer, bands in results[0]["masks"].items()
    }
    return {
        "clean_task": clean,
        "resynthesized_task": resynthesized,
        "task_ratio": _ratio(resynthesized, clean),
        "masks": masks,
    }


def teacher_damaged(diagnostics: Diagnostics, tolerance: float = DAMAGE_TOLERANCE) -> bool:
    """Whether the prompts made the teacher worse: its task loss on the re-synthesised features
    is more than ``tolerance`` times its loss on its own features."""
    return diagnostics["resynthesized_task"] > tolerance * diagnostics["clean_task"]


def damage_warning(
    diagnostics: Diagnostics,
    tolerance: float = DAMAGE_TOLERANCE,
    fix: str = (
        "lower the prompts' learning rate or the dissimilarity weight, or use "
        "resynthesis='centered' / mask_logits='normalized'"
    ),
) -> str | None:
    """The warning to show when :func:`teacher_damaged` (``None`` otherwise): "prompt tuning
    raised the teacher's task loss from X to Y (+Z%): <fix>"."""
    if not teacher_damaged(diagnostics, tolerance):
        return None
    clean, resynthesized = diagnostics["clean_task"], diagnostics["resynthesized_task"]
    increase = 100 * (_ratio(resynthesized, clean) - 1)
    return (
        f"prompt tuning raised the teacher's task loss from {clean:.4g} to "
        f"{resynthesized:.4g} (+{increase:.0f}%): {fix}"
    )


def format_diagnostics(diagnostics: Diagnostics) -> str:
    """:meth:`PromptTuner.diagnostics` as a short text table: the task losses, then one row per
    layer and band group with the saturated share and the mean of its mask values."""
    lines = [
        f"teacher task loss: clean {diagnostics['clean_task']:.4g}, re-synthesized "
        f"{diagnostics['resynthesized_task']:.4g} (x{diagnostics['task_ratio']:.3f})",
        f"{'layer':<8} {'band':<7} {'saturated':>9} {'mean':>6}",
    ]
    for layer, bands in diagnostics["masks"].items():
        for band, values in bands.items():
            lines.append(
                f"{layer:<8} {band:<7} {100 * values['saturated']:>8.1f}% {values['mean']:>6.3f}"
            )
    return "\n".join(lines)
