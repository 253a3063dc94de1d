"""Frequency prompts: learnable tokens that mark the pixels of interest in each wavelet band.

For one distilled layer with ``C`` channels, a :class:`FrequencyPrompt` holds ``T`` tokens for
each *group* of bands, ``tokens: [G, T, C]``, in this order: the low band, then the detail bands
of levels ``1..J`` finest first. With ``granularity="level"`` (the official code) a level is one
group whose mask is computed from the sum of its three orientations and shared by them
(``k = 1``); with ``granularity="band"`` (the paper's wording) each orientation is its own group
(``k = 3``). So ``G = 1 + J * k``; the official checkpoint's ``[4, T, C]`` is ``"level"``
granularity with ``J = 3``.

A group's masks for teacher band pixels ``R: [N, C, h * w]`` are
``sigmoid(P_g @ R): [N, T, h, w]`` (``mask_logits="raw"``, the paper and the official code). Two
options rescale the logits, which otherwise grow with ``C`` and the band magnitudes (see
``docs/deviations.md``): ``"scaled"`` divides them by ``sqrt(C)``; ``"normalized"`` divides each
pixel vector ``R[:, p]`` by its L2 norm over the channels first, so a logit is the token's
component along the pixel's direction, bounded by ``|P_g|``.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from ._checks import check_choice, check_positive_int
from .wavelets import WaveletBands

__all__ = [
    "DISSIMILARITIES",
    "GRANULARITIES",
    "MASK_LOGITS",
    "RESYNTHESES",
    "Dissimilarity",
    "FrequencyPrompt",
    "Granularity",
    "MaskLogits",
    "PromptMasks",
    "Resynthesis",
    "mask_overlap",
]

Granularity = Literal["level", "band"]
Dissimilarity = Literal["jaccard", "dice"]
MaskLogits = Literal["raw", "scaled", "normalized"]
Resynthesis = Literal["sum", "centered"]
GRANULARITIES: tuple[str, ...] = get_args(Granularity)
DISSIMILARITIES: tuple[str, ...] = get_args(Dissimilarity)
MASK_LOGITS: tuple[str, ...] = get_args(MaskLogits)
RESYNTHESES: tuple[str, ...] = get_args(Resynthesis)

PromptMasks = tuple[Tensor | None, list[Tensor]]
"""``(low_masks: [N, T, 1, h_J, w_J] or None, high_masks[j - 1]: [N, T, k, h_j, w_j])``."""

_EPS = 1e-12  # the official code's guard in the Dice denominator
_NORM_EPS = 1e-12  # guard of a pixel vector's norm (mask_logits="normalized")


def _unit_pixels(band: Tensor) -> Tensor:
    """Each pixel vector of ``band: [N, C, ...]`` (over the channels, dim 1) divided by its L2
    norm, clamped at ``1e-12`` (an all-zero pixel stays zero). Same shape as ``band``.

    Equivalently the band RMS-normalized over the channels and divided by ``sqrt(C)``.
    """
    return band / torch.linalg.vector_norm(band, dim=1, keepdim=True).clamp_min(_NORM_EPS)


def mask_overlap(masks: Tensor, kind: Dissimilarity = "jaccard") -> Tensor:
    """Mean overlap between the ``T`` masks of each row, over ordered pairs ``i != j``.

    ``masks: [B, T, P]`` (values in ``[0, 1]``) -> ``[B]``. ``kind="jaccard"``: soft Jaccard
    ``sum(min(m_i, m_j)) / sum(max(m_i, m_j))`` (the paper); ``kind="dice"``:
    ``2 <m_i, m_j> / (|m_i|^2 + |m_j|^2)`` (the official code). ``T = 1`` gives zeros.
    """
    check_choice("dissimilarity", kind, DISSIMILARITIES)
    rows, tokens = masks.shape[:2]
    if tokens < 2:
        return masks.new_zeros(rows)
    if kind == "jaccard":
        # min(a, b) = (a + b - |a - b|) / 2 and max(a, b) = (a + b + |a - b|) / 2, so the sums
        # need only the pairwise L1 distances, without a [B, T, T, P] tensor.
        l1 = torch.cdist(masks, masks, p=1)
        mass = masks.sum(-1)
        pair_mass = mass.unsqueeze(-1) + mass.unsqueeze(-2)
        overlap = (pair_mass - l1) / (pair_mass + l1).clamp_min(_EPS)
    else:
        gram = masks @ masks.transpose(-1, -2)
        sq_norm = gram.diagonal(dim1=-2, dim2=-1) + _EPS
        overlap = 2 * gram / (sq_norm.unsqueeze(-1) + sq_norm.unsqueeze(-2))
    off_diagonal = ~torch.eye(tokens, dtype=torch.bool, device=masks.device)
    return (overlap * off_diagonal).sum((-2, -1)) / (tokens * (tokens - 1))


class FrequencyPrompt(nn.Module):
    """Prompt tokens of one distilled layer, ``tokens: [1 + levels * k, T, C]``.

    Trained in stage 1 (prompt tuning, teacher frozen) and frozen in stage 2. The persistent buffer
    ``tuned`` records whether the tokens were tuned or loaded from a tuned checkpoint.

    Args:
        channels: ``C``, channels of the distilled feature.
        num_prompts: ``T``, tokens per group.
        levels: ``J``, wavelet levels.
        granularity: ``"level"`` (one group per level, official) or ``"band"`` (one per band).
        mask_logits: how a mask's logits are formed from a token ``P: [C]`` and a pixel vector
            ``r: [C]`` of the band: ``"raw"`` ``<P, r>`` (paper, official); ``"scaled"``
            ``<P, r> / sqrt(C)``; ``"normalized"`` ``<P, r / max(|r|, 1e-12)>`` (equivalently
            ``r`` RMS-normalized over the channels, the product divided by ``sqrt(C)``), which
            does not depend on the band's magnitude. Used alike in stage 1 and stage 2.

    Raises:
        ValueError: a bad ``channels``, ``num_prompts``, ``levels``, ``granularity`` or
            ``mask_logits`` (named, with the valid values).

    Example:
        >>> import torch
        >>> from freekd.wavelets import dwt2
        >>> prompt = FrequencyPrompt(channels=8, num_prompts=2, levels=2, granularity="level")
        >>> prompt.tokens.shape  # [1 + levels * k, T, C], k = 1 for "level"
        torch.Size([3, 2, 8])
        >>> low_masks, high_masks = prompt.masks(dwt2(torch.randn(1, 8, 16, 16), levels=2))
        >>> low_masks.shape, [tuple(m.shape) for m in high_masks]
        (torch.Size([1, 2, 1, 4, 4]), [(1, 2, 1, 8, 8), (1, 2, 1, 4, 4)])
    """

    def __init__(
        self,
        channels: int,
        num_prompts: int = 2,
        levels: int = 3,
        granularity: Granularity = "band",
        mask_logits: MaskLogits = "raw",
    ) -> None:
        super().__init__()
        check_positive_int("channels", channels)
        check_positive_int("num_prompts (T)", num_prompts)
        check_positive_int("levels", levels)
        check_choice("granularity", granularity, GRANULARITIES)
        check_choice("mask_logits", mask_logits, MASK_LOGITS)
        self.channels, self.num_prompts, self.levels = channels, num_prompts, levels
        self.granularity, self.mask_logits = granularity, mask_logits
        self.groups_per_level = 1 if granularity == "level" else 3
        groups = 1 + levels * self.groups_per_level
        self.tokens = nn.Parameter(torch.randn(groups, num_prompts, channels) * 0.01)
        self.register_buffer("tuned", torch.zeros((), dtype=torch.bool))

    def mark_tuned(self, tuned: bool = True) -> None:
        """Record that the tokens are tuned (or not)."""
        self.tuned.fill_(tuned)

    def level_tokens(self, level: int) -> Tensor:
        """Tokens of level ``level`` (1-based, finest first): ``[k, T, C]``."""
        start = 1 + (level - 1) * self.groups_per_level
        return self.tokens[start : start + self.groups_per_level]

    def _check_bands(self, bands: WaveletBands) -> None:
        low, highs = bands
        if len(highs) != self.levels:
            raise ValueError(
                f"FrequencyPrompt was made for {self.levels} wavelet levels, got bands of "
                f"{len(highs)}: transform with levels={self.levels}"
            )
        if low.shape[1] != self.channels:
            raise ValueError(
                f"FrequencyPrompt was made for {self.channels} channels, got bands of "
                f"{low.shape[1]}: build it with channels={low.shape[1]} or project the feature"
            )

    def masks(self, bands: WaveletBands, include_low: bool = True) -> PromptMasks:
        """Masks of the pixels of interest of each band, from the (teacher's) bands.

        ``bands = (low: [N, C, h_J, w_J], highs[j - 1]: [N, C, 3, h_j, w_j])`` ->
        ``(low_masks: [N, T, 1, h_J, w_J], high_masks[j - 1]: [N, T, k, h_j, w_j])``, values in
        ``(0, 1)``; ``low_masks`` is ``None`` when ``include_low`` is false (nothing computed).
        """
        self._check_bands(bands)
        low, highs = bands
        tokens = self.tokens.to(low.dtype)
        low_masks = None
        if include_low:
            logits = torch.einsum("tc,nchw->nthw", tokens[0], self._logit_input(low))
            low_masks = self._scale_logits(logits).sigmoid().unsqueeze(2)
        high_masks = []
        for level, detail in enumerate(highs, start=1):
            if self.granularity == "level":
                detail = detail.sum(dim=2, keepdim=True)  # [N, C, 1, h, w]
            logits = torch.einsum(
                "ktc,nckhw->ntkhw",
                self.level_tokens(level).to(low.dtype),
                self._logit_input(detail),
            )
            high_masks.append(self._scale_logits(logits).sigmoid())
        return low_masks, high_masks

    def _logit_input(self, band: Tensor) -> Tensor:
        """The band pixels the tokens are multiplied with: ``band: [N, C, ...]`` itself, or with
        unit pixel vectors for ``mask_logits="normalized"``."""
        return _unit_pixels(band) if self.mask_logits == "normalized" else band

    def _scale_logits(self, logits: Tensor) -> Tensor:
        """``logits`` divided by ``sqrt(C)`` for ``mask_logits="scaled"``, else unchanged."""
        return logits / math.sqrt(self.channels) if self.mask_logits == "scaled" else logits

    def mask_bands(
        self,
        bands: WaveletBands,
        masks: PromptMasks | None = None,
        resynthesis: Resynthesis = "sum",
    ) -> WaveletBands:
        """Bands multiplied by their ``T`` masks (stage-1 re-synthesis input).

        ``resynthesis="sum"`` (DESIGN, default): ``band * sum_t M_t``; ``"centered"``:
        ``band * 2 * mean_t M_t``, which is 1 where the logits are 0, so near-zero tokens (as
        initialized) leave the bands, and the re-synthesised feature, nearly unchanged. Same
        structure and shapes as ``bands``; the masks are computed from ``bands`` unless given.
        """
        check_choice("resynthesis", resynthesis, RESYNTHESES)
        low, highs = bands
        low_masks, high_masks = self.masks(bands) if masks is None else masks
        if low_masks is None:
            raise ValueError(
                "mask_bands needs masks of the low band: compute them with include_low"
            )
        if resynthesis == "centered":
            masked_low = low * (2 * low_masks.mean(dim=1))
            masked_highs = [
                detail * (2 * mask.mean(dim=1, keepdim=True))
                for detail, mask in zip(highs, high_masks, strict=True)
            ]
            return masked_low, masked_highs
        masked_low = low * low_masks.sum(dim=1)  # [N, C, h, w] * [N, 1, h, w]
        masked_highs = [
            detail * mask.sum(dim=1, keepdim=True)  # [N, C, 3, h, w] * [N, 1, k, h, w]
            for detail, mask in zip(highs, high_masks, strict=True)
        ]
        return masked_low, masked_highs

    def dissimilarity(self, masks: PromptMasks, kind: Dissimilarity = "jaccard") -> Tensor:
        """Overlap between the ``T`` masks of each group: mean over ordered pairs ``i != j`` and
        over images, summed over groups (low band, and each level or band). Scalar; 0 for T = 1."""
        low_masks, high_masks = masks
        group_masks = high_masks if low_masks is None else [low_masks, *high_masks]
        total = group_masks[0].new_zeros(())
        for mask in group_masks:  # [N, T, k, h, w]: k groups
            batch, tokens, groups = mask.shape[:3]
            rows = mask.transpose(1, 2).reshape(batch * groups, tokens, -1)
            total = total + mask_overlap(rows, kind).view(batch, groups).mean(0).sum()
        return total

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, num_prompts={self.num_prompts}, levels={self.levels}, "
            f"granularity={self.granularity!r}, mask_logits={self.mask_logits!r}"
        )
