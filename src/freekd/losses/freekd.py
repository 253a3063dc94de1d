"""The FreeKD distillation loss: prompt-masked, channel-weighted L1 between wavelet bands.

At one layer, with teacher feature ``F_t`` and (projected) student feature ``F_s``, both
``[N, C, H, W]``, ``D = dwt2(F_t - F_s)``, computed as ``dwt2(F_t) - dwt2(F_s)`` (the transform is
linear; the teacher's bands are needed for the masks anyway, so the student's is the one
differentiable transform and no full-size difference map is made). The masks
``M_j: [N, T, k, h_j, w_j]`` come from the teacher's bands under ``no_grad`` and ``Mbar_j`` is
their mean over the ``T`` tokens:

    L = sum_j mean over [N, C, 3, h_j, w_j] of (omega * Mbar_j * |D_j|)
        (+ the same mean over [N, C, h_J, w_J] for the low band when ``include_low``)

``omega: [N, C]`` is the relational channel weight (1 when ``relational=False``). Because the masks
are positive, this equals the official "mean over T masked copies" without materialising them.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from .._checks import (
    check_channel_list,
    check_choice,
    check_feature_lists,
    check_positive_int,
)
from ..prompts import DISSIMILARITIES, GRANULARITIES, FrequencyPrompt
from ..relation import GATES, RelationalGate
from ..wavelets import dwt2, wavelet_filters

__all__ = ["PRESETS", "FreeKDLoss"]

logger = logging.getLogger("freekd")

PRESETS: dict[str, dict[str, object]] = {
    # The paper: T = 2 prompts, Jaccard dissimilarity, one prompt group per band, relational on.
    "paper": dict(
        num_prompts=2,
        granularity="band",
        dissimilarity="jaccard",
        relational=True,
        include_low=False,
    ),
    # The official release's loss: T = 6, Dice, one group per level, no relational term or low band.
    "official": dict(
        num_prompts=6,
        granularity="level",
        dissimilarity="dice",
        relational=False,
        include_low=False,
    ),
}

_OFFICIAL_KEY = re.compile(r"(?:^|\.)mask_modules\.(\d+)\.mask_token$")


class _MaskedBandL1(torch.autograd.Function):
    """Per-channel masked L1 between a teacher band and a student band.

    ``teacher, student: [N, C, *band]``, ``mask_mean: [N, 1, *band]`` (broadcast over channels
    and, for ``k = 1``, orientations) -> ``[N, C]``: ``sum over band of mask_mean * |t - s|``.
    Gradient for the student only (the teacher and the masks are constants). Written by hand so
    that forward and backward each allocate one band-sized temporary instead of three.
    """

    @staticmethod
    def forward(ctx, teacher: Tensor, student: Tensor, mask_mean: Tensor) -> Tensor:
        diff = teacher - student
        per_channel = (diff.abs() * mask_mean).flatten(2).sum(dim=2)
        ctx.save_for_backward(diff, mask_mean)
        return per_channel

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor | None, None]:
        if not ctx.needs_input_grad[1]:
            return None, None, None
        diff, mask_mean = ctx.saved_tensors
        scale = grad.neg().view(*grad.shape, *([1] * (diff.dim() - 2)))
        return None, diff.sign().mul_(mask_mean).mul_(scale), None


def _compute_dtype(*feature_lists: Sequence[Tensor]) -> torch.dtype:
    """float64 when any feature is float64, else float32: half-precision features are upcast
    (the masks' logits and the sums need the range), mixed dtypes meet in one."""
    dtypes = {f.dtype for feats in feature_lists for f in feats}
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _masked_band_l1(teacher: Tensor, student: Tensor, mask_mean: Tensor, omega: Tensor | None):
    """``mean over [N, C, *band] of omega * mask_mean * |teacher - student|`` (scalar)."""
    per_channel = _MaskedBandL1.apply(teacher, student, mask_mean)
    if omega is not None:
        per_channel = per_channel * omega
    return per_channel.sum() / teacher.numel()


class FreeKDLoss(nn.Module):
    """FreeKD loss over several distilled layers (ordered fine to coarse).

    The prompts (``self.prompts[i]``, one :class:`~freekd.prompts.FrequencyPrompt` per layer) are
    frozen here: tune them in stage 1, or load them with :meth:`load_official_state_dict`. The
    teacher side never gets a gradient. With ``gate="mlp"`` the gates' parameters are trainable and
    belong with the student's optimizer.

    Args:
        channels: channel count ``C_i`` of each distilled layer.
        num_prompts: ``T``, prompt tokens per group.
        levels: ``J``, wavelet levels.
        wavelet: an orthogonal wavelet name (``"haar"``, ``"db2"``, ...).
        granularity: ``"band"`` (paper) or ``"level"`` (official code).
        dissimilarity: ``"jaccard"`` (paper) or ``"dice"`` (official); used by prompt tuning.
        relational: weight channels by the position-aware relational term.
        include_low: also distil the low band (the official code drops it).
        loss_weight: multiplies the total (for parity with official configs).
        gate: ``"parameter-free"`` or ``"mlp"`` relational gate.

    After each call, ``last_terms`` maps ``"layer{i}"`` to that layer's (weighted, detached) term.
    """

    def __init__(
        self,
        channels: Sequence[int],
        num_prompts: int = 2,
        levels: int = 3,
        wavelet: str = "haar",
        granularity: Literal["level", "band"] = "band",
        dissimilarity: Literal["jaccard", "dice"] = "jaccard",
        relational: bool = True,
        include_low: bool = False,
        loss_weight: float = 1.0,
        gate: Literal["parameter-free", "mlp"] = "parameter-free",
    ) -> None:
        super().__init__()
        channels = check_channel_list("FreeKDLoss", channels)
        check_positive_int("num_prompts (T)", num_prompts)
        check_positive_int("levels", levels)
        wavelet_filters(wavelet)
        check_choice("granularity", granularity, GRANULARITIES)
        check_choice("dissimilarity", dissimilarity, DISSIMILARITIES)
        check_choice("gate", gate, GATES)
        if (
            isinstance(loss_weight, bool)
            or not isinstance(loss_weight, int | float)
            or not math.isfinite(loss_weight)
        ):
            raise ValueError(f"loss_weight must be a finite number, got {loss_weight!r}")
        self.channels = [int(c) for c in channels]
        self.num_prompts, self.levels, self.wavelet = num_prompts, levels, wavelet
        self.granularity, self.dissimilarity = granularity, dissimilarity
        self.relational, self.include_low = bool(relational), bool(include_low)
        self.loss_weight, self.gate = float(loss_weight), gate
        self.prompts = nn.ModuleList(
            FrequencyPrompt(c, num_prompts, levels, granularity) for c in self.channels
        )
        self.prompts.requires_grad_(False)
        self.gates = (
            nn.ModuleList(RelationalGate(c, gate) for c in self.channels) if relational else None
        )
        self.last_terms: dict[str, Tensor] = {}
        self._untuned_checked = False

    # ------------------------------------------------------------------ construction helpers

    @classmethod
    def preset(cls, name: Literal["paper", "official"], channels: Sequence[int], **overrides):
        """``"paper"``: T=2, Jaccard, band granularity, relational on. ``"official"``: T=6, Dice,
        level granularity, relational off, no low band. Keyword arguments override a setting."""
        check_choice("preset", name, tuple(PRESETS))
        return cls(channels, **{**PRESETS[name], **overrides})

    @classmethod
    def from_official(cls, state_dict: Mapping[str, Tensor], **overrides) -> FreeKDLoss:
        """The official configuration built from an official prompt checkpoint, inferring ``T``
        and the channels from its ``mask_modules.{i}.mask_token: [4, T, C]`` tensors."""
        tokens = _official_tokens(state_dict)
        channels = [t.shape[2] for t in tokens]
        settings = {"num_prompts": tokens[0].shape[1], **overrides}
        loss = cls.preset("official", channels, **settings)
        loss.load_official_state_dict(state_dict)
        return loss

    def load_official_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load prompts tuned with the official code.

        Reads the keys ending in ``mask_modules.{i}.mask_token``, each ``[4, T, C]``: the low band,
        then levels 1-3 finest first. An optional ``state_dict`` wrapper and any key prefix are
        accepted, other keys ignored. Refuses a different layer count, ``T`` or channel count,
        naming both. Needs ``granularity="level"`` and ``levels=3``.
        """
        if self.granularity != "level" or self.levels != 3:
            raise ValueError(
                f"official prompts are one group per level over 3 levels; this loss has "
                f"granularity={self.granularity!r}, levels={self.levels}: build it with "
                f"FreeKDLoss.preset('official', channels) or FreeKDLoss.from_official(sd)"
            )
        tokens = _official_tokens(state_dict)
        if len(tokens) != len(self.prompts):
            raise ValueError(
                f"official checkpoint has prompts for {len(tokens)} layers, this loss distils "
                f"{len(self.prompts)}: distil the same layers or use FreeKDLoss.from_official"
            )
        for index, (token, prompt) in enumerate(zip(tokens, self.prompts, strict=True)):
            groups, count, channels = token.shape
            if groups != 4:
                raise ValueError(
                    f"mask_modules.{index}.mask_token has {groups} groups, expected 4 "
                    f"(low band + 3 levels)"
                )
            if count != prompt.num_prompts:
                raise ValueError(
                    f"layer {index}: checkpoint has T={count} prompts, this loss "
                    f"T={prompt.num_prompts}: build it with num_prompts={count}"
                )
            if channels != prompt.channels:
                raise ValueError(
                    f"layer {index}: checkpoint prompts have {channels} channels, this loss "
                    f"{prompt.channels}: build it with channels matching the checkpoint"
                )
        with torch.no_grad():
            for token, prompt in zip(tokens, self.prompts, strict=True):
                prompt.tokens.copy_(token.to(prompt.tokens))
                prompt.mark_tuned()
        self.reset_tuned_check()

    def save_prompts(self, path) -> Path:
        """Save the prompts as safetensors with their configuration (see ``freekd.prompt_io``)."""
        from ..prompt_io import save_prompts

        return save_prompts(self, path)

    def load_prompts(self, path) -> None:
        """Load prompts saved by :meth:`save_prompts`, refusing another configuration."""
        from ..prompt_io import load_prompts

        load_prompts(self, path)

    def reset_tuned_check(self) -> None:
        """Check again, at the next call, that the prompts are tuned (after loading new ones)."""
        self._untuned_checked = False

    # ------------------------------------------------------------------ the loss

    def forward(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> Tensor:
        """``student_feats``, ``teacher_feats``: lists of ``[N, C_i, H_i, W_i]``, fine to coarse,
        the student's already projected to the teacher's shape. Returns the weighted scalar sum
        over layers, computed in float32 (float64 for float64 input), also under autocast."""
        self._check_features(student_feats, teacher_feats)
        self._warn_if_untuned()
        device_type = teacher_feats[0].device.type
        dtype = _compute_dtype(student_feats, teacher_feats)
        with torch.autocast(device_type=device_type, enabled=False):
            teacher = [t.detach().to(dtype) for t in teacher_feats]
            student = [s.to(dtype) for s in student_feats]
            terms = [self.layer_loss(i, student, teacher) for i in range(len(teacher))]
        total = torch.stack(terms).sum() * self.loss_weight
        self.last_terms = {f"layer{i}": t.detach() * self.loss_weight for i, t in enumerate(terms)}
        return total

    def layer_loss(
        self, index: int, student: Sequence[Tensor], teacher: Sequence[Tensor]
    ) -> Tensor:
        """Unweighted term of layer ``index``; ``student`` and ``teacher`` list the (upcast)
        features of all layers, since the relational term reads the next layer."""
        teacher_feat, student_feat = teacher[index], student[index]
        with torch.no_grad():
            teacher_bands = dwt2(teacher_feat, self.levels, self.wavelet)
            low_masks, high_masks = self.prompts[index].masks(teacher_bands, self.include_low)
        omega = None
        if self.gates is not None:
            has_next = index + 1 < len(teacher)
            omega = self.gates[index](
                teacher_feat,
                student_feat.detach(),
                teacher[index + 1] if has_next else None,
                student[index + 1].detach() if has_next else None,
            )
        # Teacher bands serve both the masks and the difference: dwt2 is linear, so
        # dwt2(F_t) - dwt2(F_s) == dwt2(F_t - F_s), and no full-size difference map is made.
        student_low, student_highs = dwt2(student_feat, self.levels, self.wavelet)
        teacher_low, teacher_highs = teacher_bands
        terms = [
            _masked_band_l1(t, s, masks.mean(dim=1, keepdim=True), omega)
            for t, s, masks in zip(teacher_highs, student_highs, high_masks, strict=True)
        ]
        if low_masks is not None:
            terms.append(_masked_band_l1(teacher_low, student_low, low_masks.mean(dim=1), omega))
        return torch.stack(terms).sum()

    # ------------------------------------------------------------------ checks

    def _check_features(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]):
        check_feature_lists("FreeKDLoss", student_feats, teacher_feats, self.channels)

    def _warn_if_untuned(self) -> None:
        if self._untuned_checked:
            return
        self._untuned_checked = True
        untuned = [i for i, p in enumerate(self.prompts) if not bool(p.tuned)]
        if untuned:
            logger.warning(
                "FreeKDLoss: the prompts of layers %s were never tuned; their masks are random. "
                "Tune them first (stage 1) or load tuned prompts.",
                untuned,
            )

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, num_prompts={self.num_prompts}, levels={self.levels}, "
            f"wavelet={self.wavelet!r}, granularity={self.granularity!r}, "
            f"dissimilarity={self.dissimilarity!r}, relational={self.relational}, "
            f"include_low={self.include_low}, loss_weight={self.loss_weight}"
        )


def _official_tokens(state_dict: Mapping[str, Tensor]) -> list[Tensor]:
    """The ``[4, T, C]`` prompt tokens of an official checkpoint, ordered by layer index."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"expected a state dict (a mapping of names to tensors), got {type(state_dict)}"
        )
    inner = state_dict.get("state_dict")
    if isinstance(inner, Mapping):
        state_dict = inner
    found: dict[int, tuple[str, Tensor]] = {}
    for key, value in state_dict.items():
        match = _OFFICIAL_KEY.search(str(key))
        if match is None:
            continue
        index = int(match.group(1))
        if index in found:
            raise ValueError(
                f"two prompt tensors for layer {index}: {found[index][0]!r} and {key!r}; pass the "
                f"state dict of one model"
            )
        if not isinstance(value, Tensor) or value.dim() != 3:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{key!r} must be a [4, T, C] tensor, got {shape}")
        found[index] = (key, value)
    if not found:
        raise ValueError(
            "no official prompts found: expected keys ending in 'mask_modules.{i}.mask_token'"
        )
    if sorted(found) != list(range(len(found))):
        raise ValueError(f"official prompt layers must be numbered 0..n-1, found {sorted(found)}")
    return [found[i][1].detach() for i in range(len(found))]
