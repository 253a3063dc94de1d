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

Options beyond the paper and the official code (defaults reproduce them; every one is listed in
``docs/deviations.md``): ``mask_logits`` (the prompts' logit scale), ``relational="cosine"`` with
``relation_temperature`` and ``relation_source``, ``levels`` per layer (see
:func:`freekd.wavelets.auto_levels`), ``band_weighting="coefficient"``, and FreeKD+'s
``decoupled`` low-band L2 and ``student_masks``. The presets ``"paper"`` and ``"official"`` use
none of them.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from .._checks import (
    check_channel_list,
    check_choice,
    check_nonnegative_int,
    check_positive_float,
    check_positive_int,
)
from ..prompts import (
    DISSIMILARITIES,
    GRANULARITIES,
    MASK_LOGITS,
    Dissimilarity,
    FrequencyPrompt,
    Granularity,
    MaskLogits,
)
from ..relation import GATES, RELATION_SOURCES, Gate, RelationalGate, RelationSource
from ..wavelets import WaveletBands, dwt2, wavelet_filters
from .base import (
    RELATIONAL_SETTINGS,
    LayerwiseLoss,
    Relational,
    channel_weight,
    masked_band_l1,
    masked_band_sum,
    register_loss,
    relational_setting,
)

__all__ = [
    "BAND_WEIGHTINGS",
    "PRESETS",
    "RELATIONAL_SETTINGS",
    "BandWeighting",
    "FreeKDLoss",
]

BandWeighting = Literal["band", "coefficient"]
BAND_WEIGHTINGS: tuple[str, ...] = get_args(BandWeighting)

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
    # Chosen on the quality benchmark v2 (docs/results.md): beat MSE and CWD on 3 paired seeds.
    "recommended": dict(
        num_prompts=2,
        granularity="band",
        dissimilarity="jaccard",
        mask_logits="normalized",
        relational="cosine",
        relation_temperature=0.1,
        relation_source="product",
        include_low=False,
        band_weighting="band",
    ),
}

_OFFICIAL_KEY = re.compile(r"(?:^|\.)mask_modules\.(\d+)\.mask_token$")


def _band_l2(teacher: Tensor, student: Tensor, omega: Tensor | None) -> Tensor:
    """``mean over [N, C, h, w] of omega * (teacher - student)^2`` (scalar): FreeKD+'s low-band
    term. ``teacher, student: [N, C, h, w]``, ``omega: [N, C]`` or ``None`` (1)."""
    per_channel = (teacher - student).square().flatten(2).sum(dim=2)
    if omega is not None:
        per_channel = per_channel * omega
    return per_channel.sum() / teacher.numel()


def _layer_levels(levels: object, count: int) -> list[int]:
    """``levels`` (one int for every layer, or one per layer) as a list of ``count`` ints."""
    if isinstance(levels, int) and not isinstance(levels, bool):
        check_positive_int("levels", levels)
        return [levels] * count
    if isinstance(levels, str) or not isinstance(levels, Sequence):
        raise ValueError(
            f"levels must be an integer >= 1 or a list of one per layer, got {levels!r} (for "
            f"levels from the map sizes, pass freekd.wavelets.auto_levels(sizes))"
        )
    if len(levels) != count:
        raise ValueError(
            f"levels lists {len(levels)} values, the loss distills {count} layers: give one "
            f"per layer, or a single integer for all"
        )
    for index, value in enumerate(levels):
        check_positive_int(f"levels[{index}]", value)
    return [int(value) for value in levels]


@register_loss("freekd")
class FreeKDLoss(LayerwiseLoss):
    """FreeKD loss over several distilled layers (ordered fine to coarse).

    The prompts (``self.prompts[i]``, one :class:`~freekd.prompts.FrequencyPrompt` per layer) are
    frozen here: tune them in stage 1, or load them with :meth:`load_official_state_dict`. The
    teacher side never gets a gradient. With ``gate="mlp"`` the gates' parameters are trainable and
    belong with the student's optimizer.

    Args:
        channels: channel count ``C_i`` of each distilled layer.
        num_prompts: ``T``, prompt tokens per group.
        levels: ``J``, wavelet levels: one integer for every layer, or one per layer (e.g. from
            :func:`freekd.wavelets.auto_levels`, which picks them from the map sizes).
        wavelet: an orthogonal wavelet name (``"haar"``, ``"db2"``, ...).
        granularity: ``"band"`` (paper) or ``"level"`` (official code).
        dissimilarity: ``"jaccard"`` (paper) or ``"dice"`` (official); used by prompt tuning.
        relational: the position-aware relational channel weight: ``True`` / ``"raw"`` (the
            paper's ``softmax(psi(F) F^T / sqrt(hw))``), ``False`` / ``"off"``, or ``"cosine"``
            (``softmax(cos(psi(F)_c, F_c') / relation_temperature)``, whose sharpness does not
            grow with the map size). See :mod:`freekd.relation`.
        include_low: also distill the low band (the official code drops it).
        loss_weight: multiplies the total (for parity with official configs).
        gate: ``"parameter-free"`` or ``"mlp"`` relational gate.
        mask_logits: the prompts' logit scale, ``"raw"`` (paper, official), ``"scaled"``
            (``/ sqrt(C)``) or ``"normalized"`` (unit pixel vectors); see
            :class:`~freekd.prompts.FrequencyPrompt`.
        relation_temperature: ``tau`` of ``relational="cosine"``.
        relation_source: ``"product"`` (default): ``normalize(omega_t * omega_s)``;
            ``"teacher"``: the teacher's weight alone.
        band_weighting: ``"band"`` (default): the sum over the distilled bands of each band's
            mean of ``omega * Mbar * |D|`` (every band weighs the same); ``"coefficient"``: the
            sum over the distilled bands of ``omega * Mbar * |D|`` divided by the number of
            distilled coefficients of the layer (``N * C * sum of band sizes``, 3 orientations
            per level), so every coefficient weighs the same and coarse levels weigh less.
        decoupled: FreeKD+'s frequency-decoupled loss: the low band is always distilled, with
            ``mean over [N, C, h_J, w_J] of omega * D_low^2`` (unmasked L2), the detail bands
            keep the masked L1. The L2 term is its own mean under either ``band_weighting``.
        student_masks: FreeKD+'s student-refined masks: the mask mean used in the loss is
            ``Mbar_t * Mbar_s``, ``Mbar_s`` the mean over ``T`` of the masks the same prompts
            give on the projected student's bands (under ``no_grad``).
        student_mask_warmup: with ``student_masks``, the first ``student_mask_warmup`` calls in
            training mode use the teacher's masks alone. The calls made in training mode are
            counted in the buffer ``student_mask_calls`` (saved in the state dict, so a resumed
            run continues the count; eval-mode calls are not counted and refine once the count
            has reached the warm-up).

    After each call, ``last_terms`` maps ``"layer{i}"`` to that layer's (weighted, detached) term.
    Checks, upcasting and the sum over layers come from :class:`~freekd.losses.LayerwiseLoss`.

    Raises:
        ValueError: a bad setting (named, with the valid values and the fix); at call time,
            features that do not fit (see :meth:`LayerwiseLoss.forward`).

    Example:
        >>> import torch
        >>> loss = FreeKDLoss(channels=[8, 8], num_prompts=2, levels=2)
        >>> student = [torch.randn(2, 8, 16, 16), torch.randn(2, 8, 8, 8)]
        >>> teacher = [torch.randn(2, 8, 16, 16), torch.randn(2, 8, 8, 8)]
        >>> total = loss(student, teacher)  # a scalar; logs once that the prompts are untuned
        >>> sorted(loss.last_terms)
        ['layer0', 'layer1']
    """

    def __init__(
        self,
        channels: Sequence[int],
        num_prompts: int = 2,
        levels: int | Sequence[int] = 3,
        wavelet: str = "haar",
        granularity: Granularity = "band",
        dissimilarity: Dissimilarity = "jaccard",
        relational: bool | Relational = True,
        include_low: bool = False,
        loss_weight: float = 1.0,
        gate: Gate = "parameter-free",
        *,
        mask_logits: MaskLogits = "raw",
        relation_temperature: float = 0.1,
        relation_source: RelationSource = "product",
        band_weighting: BandWeighting = "band",
        decoupled: bool = False,
        student_masks: bool = False,
        student_mask_warmup: int = 0,
    ) -> None:
        super().__init__()
        channels = check_channel_list("FreeKDLoss", channels)
        check_positive_int("num_prompts (T)", num_prompts)
        layer_levels = _layer_levels(levels, len(channels))
        wavelet_filters(wavelet)
        check_choice("granularity", granularity, GRANULARITIES)
        check_choice("dissimilarity", dissimilarity, DISSIMILARITIES)
        check_choice("gate", gate, GATES)
        check_choice("mask_logits", mask_logits, MASK_LOGITS)
        relational_kind = relational_setting(relational)
        temperature = check_positive_float("relation_temperature", relation_temperature)
        check_choice("relation_source", relation_source, RELATION_SOURCES)
        check_choice("band_weighting", band_weighting, BAND_WEIGHTINGS)
        check_nonnegative_int("student_mask_warmup", student_mask_warmup)
        if (
            isinstance(loss_weight, bool)
            or not isinstance(loss_weight, int | float)
            or not math.isfinite(loss_weight)
        ):
            raise ValueError(f"loss_weight must be a finite number, got {loss_weight!r}")
        self.channels = [int(c) for c in channels]
        self.layer_levels = layer_levels
        self.levels: int | list[int] = (
            layer_levels[0] if len(set(layer_levels)) == 1 else list(layer_levels)
        )
        self.num_prompts, self.wavelet = num_prompts, wavelet
        self.granularity, self.dissimilarity = granularity, dissimilarity
        self.relational_kind = relational_kind
        self.relational, self.include_low = relational_kind != "off", bool(include_low)
        self.loss_weight, self.gate = float(loss_weight), gate
        self.mask_logits = mask_logits
        self.relation_temperature, self.relation_source = temperature, relation_source
        self.band_weighting, self.decoupled = band_weighting, bool(decoupled)
        self.student_masks, self.student_mask_warmup = bool(student_masks), student_mask_warmup
        self.prompts = nn.ModuleList(
            FrequencyPrompt(c, num_prompts, lv, granularity, mask_logits)
            for c, lv in zip(self.channels, layer_levels, strict=True)
        )
        self.prompts.requires_grad_(False)
        self.gates = (
            nn.ModuleList(
                RelationalGate(
                    c,
                    gate,
                    kind=relational_kind,
                    temperature=temperature,
                    source=relation_source,
                )
                for c in self.channels
            )
            if self.relational
            else None
        )
        if self.student_masks:
            self.register_buffer("student_mask_calls", torch.zeros((), dtype=torch.long))
        self._untuned_checked = False

    # ------------------------------------------------------------------ construction helpers

    @classmethod
    def presets(cls) -> tuple[str, ...]:
        """The names :meth:`preset` accepts (the keys of :data:`PRESETS`)."""
        return tuple(PRESETS)

    @classmethod
    def preset(cls, name: str, channels: Sequence[int], **overrides) -> FreeKDLoss:
        """A registered configuration (:data:`PRESETS`); keyword arguments override a setting.

        - ``"paper"``: T=2, Jaccard, band granularity, relational on (the paper's formulas).
        - ``"official"``: T=6, Dice, level granularity, relational off, no low band (the
          official release's loss).
        - ``"recommended"``: the configuration chosen on the quality benchmark (docs/results.md,
          quality benchmark v2: beat MSE and CWD on every paired seed there): T=2, band
          granularity, Jaccard, ``mask_logits="normalized"``, ``relational="cosine"`` (tau 0.1,
          source ``"product"``), no low band, ``band_weighting="band"``.

        Returns:
            The loss, with untuned prompts (tune them, load them, or copy them).

        Raises:
            ValueError: an unknown preset (the valid ones are named) or a bad override.

        Example:
            >>> FreeKDLoss.preset("official", [256] * 5).num_prompts
            6
        """
        check_choice("preset", name, cls.presets())
        return cls(channels, **{**PRESETS[name], **overrides})

    @classmethod
    def from_official(cls, state_dict: Mapping[str, Tensor], **overrides) -> FreeKDLoss:
        """The official configuration built from an official prompt checkpoint, inferring ``T``
        and the channels from its ``mask_modules.{i}.mask_token: [4, T, C]`` tensors.

        Returns:
            A ``preset("official")`` loss holding the checkpoint's prompts (marked tuned).

        Raises:
            ValueError, TypeError: no official prompt tensors in ``state_dict``, or malformed
                ones (named).

        Example:
            >>> import torch
            >>> sd = {"distiller.mask_modules.0.mask_token": torch.randn(4, 6, 16)}
            >>> loss = FreeKDLoss.from_official(sd)
            >>> loss.channels, loss.num_prompts
            ([16], 6)
        """
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
        naming both. Needs ``granularity="level"`` and ``levels=3`` on every layer.
        """
        if self.granularity != "level" or any(levels != 3 for levels in self.layer_levels):
            raise ValueError(
                f"official prompts are one group per level over 3 levels; this loss has "
                f"granularity={self.granularity!r}, levels={self.levels}: build it with "
                f"FreeKDLoss.preset('official', channels) or FreeKDLoss.from_official(sd)"
            )
        tokens = _official_tokens(state_dict)
        if len(tokens) != len(self.prompts):
            raise ValueError(
                f"official checkpoint has prompts for {len(tokens)} layers, this loss distills "
                f"{len(self.prompts)}: distill the same layers or use FreeKDLoss.from_official"
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

    def save_prompts(self, path, resynthesis: str | None = None) -> Path:
        """Save the prompts as safetensors with their configuration (see ``freekd.prompt_io``);
        ``resynthesis``: the stage-1 re-synthesis they were tuned with, recorded when given."""
        from ..prompt_io import save_prompts

        return save_prompts(self, path, resynthesis=resynthesis)

    def load_prompts(self, path) -> None:
        """Load prompts saved by :meth:`save_prompts`, refusing another configuration."""
        from ..prompt_io import load_prompts

        load_prompts(self, path)

    def copy_prompts_from(self, other: FreeKDLoss) -> None:
        """Copy ``other``'s prompts (tokens and tuned flags) into this loss, in memory.

        For a second loss over the same layers, e.g. a variant that differs in stage-2 settings
        only (``relational``, ``band_weighting``, ...), sharing one stage-1 run.

        Raises:
            ValueError: the two were built for other channels, ``T``, granularity, levels,
                wavelet or mask logits (each difference is named).

        Example:
            >>> tuned = FreeKDLoss.preset("paper", [8, 8])
            >>> variant = FreeKDLoss.preset("paper", [8, 8], relational=False)
            >>> variant.copy_prompts_from(tuned)
            >>> bool((variant.prompts[0].tokens == tuned.prompts[0].tokens).all())
            True
        """
        from ..prompt_io import copy_prompts

        copy_prompts(other, self)

    def reset_tuned_check(self) -> None:
        """Check again, at the next call, that the prompts are tuned (after loading new ones)."""
        self._untuned_checked = False

    # ------------------------------------------------------------------ the loss

    def layer_options(self) -> dict[str, bool]:
        """Once per call, before the layers: warn about untuned prompts (once) and decide
        whether this call refines the masks with the student's (``student_masks``)."""
        self._warn_if_untuned()
        return {"refine_masks": self._refine_masks_now()}

    def _refine_masks_now(self) -> bool:
        """Whether this call uses student-refined masks; counts the call in training mode."""
        if not self.student_masks:
            return False
        refine = int(self.student_mask_calls) >= self.student_mask_warmup
        if self.training:
            self.student_mask_calls += 1
        return refine

    def layer_loss(
        self,
        index: int,
        student: Sequence[Tensor],
        teacher: Sequence[Tensor],
        refine_masks: bool = False,
    ) -> Tensor:
        """Unweighted term of layer ``index``; ``student`` and ``teacher`` list the (upcast)
        features of all layers, since the relational term reads the next layer.
        ``refine_masks``: multiply the teacher's mask mean by the student's (``student_masks``)."""
        teacher_feat, student_feat = teacher[index], student[index]
        levels, prompt = self.layer_levels[index], self.prompts[index]
        masked_low = self.include_low and not self.decoupled
        with torch.no_grad():
            teacher_bands = dwt2(teacher_feat, levels, self.wavelet)
            low_masks, high_masks = prompt.masks(teacher_bands, masked_low)
        omega = channel_weight(self.gates, index, student, teacher)
        # Teacher bands serve both the masks and the difference: dwt2 is linear, so
        # dwt2(F_t) - dwt2(F_s) == dwt2(F_t - F_s), and no full-size difference map is made.
        student_bands = dwt2(student_feat, levels, self.wavelet)
        student_low, student_highs = student_bands
        teacher_low, teacher_highs = teacher_bands
        high_means = [masks.mean(dim=1, keepdim=True) for masks in high_masks]
        low_mean = None if low_masks is None else low_masks.mean(dim=1)
        if refine_masks:
            high_means, low_mean = self._refined_means(prompt, student_bands, high_means, low_mean)
        triples = list(zip(teacher_highs, student_highs, high_means, strict=True))
        if low_mean is not None:
            triples.append((teacher_low, student_low, low_mean))
        if self.band_weighting == "band":
            terms = [masked_band_l1(t, s, mean, omega) for t, s, mean in triples]
        else:
            sums = [masked_band_sum(t, s, mean, omega) for t, s, mean in triples]
            terms = [torch.stack(sums).sum() / sum(t.numel() for t, _, _ in triples)]
        if self.decoupled:
            terms.append(_band_l2(teacher_low, student_low, omega))
        return torch.stack(terms).sum()

    def _refined_means(
        self,
        prompt: FrequencyPrompt,
        student_bands: WaveletBands,
        high_means: list[Tensor],
        low_mean: Tensor | None,
    ) -> tuple[list[Tensor], Tensor | None]:
        """FreeKD+'s student-refined mask means ``Mbar_t * Mbar_s``, ``Mbar_s`` from the same
        prompts on the (projected) student's bands, under ``no_grad``. Shapes as given:
        ``high_means[j - 1]: [N, 1, k, h_j, w_j]``, ``low_mean: [N, 1, h_J, w_J]`` or ``None``."""
        with torch.no_grad():
            low, highs = student_bands
            student_low_masks, student_high_masks = prompt.masks(
                (low.detach(), [h.detach() for h in highs]), low_mean is not None
            )
            refined_highs = [
                mean * masks.mean(dim=1, keepdim=True)
                for mean, masks in zip(high_means, student_high_masks, strict=True)
            ]
            refined_low = None
            if low_mean is not None and student_low_masks is not None:
                refined_low = low_mean * student_low_masks.mean(dim=1)
        return refined_highs, refined_low

    # ------------------------------------------------------------------ checks

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
        text = (
            f"channels={self.channels}, num_prompts={self.num_prompts}, levels={self.levels}, "
            f"wavelet={self.wavelet!r}, granularity={self.granularity!r}, "
            f"dissimilarity={self.dissimilarity!r}, relational={self.relational_kind!r}, "
            f"include_low={self.include_low}, loss_weight={self.loss_weight}, "
            f"mask_logits={self.mask_logits!r}, band_weighting={self.band_weighting!r}"
        )
        if self.relational:
            text += f", relation_source={self.relation_source!r}"
        if self.relational_kind == "cosine":
            text += f", relation_temperature={self.relation_temperature}"
        if self.decoupled:
            text += ", decoupled=True"
        if self.student_masks:
            text += f", student_masks=True, student_mask_warmup={self.student_mask_warmup}"
        return text


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
