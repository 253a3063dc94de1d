"""The distillation losses FreeKD is compared with, and its prompt-free ablation.

Every loss here has the :class:`~freekd.losses.FreeKDLoss` calling convention: ``forward(
student_feats, teacher_feats)`` takes two lists of ``[N, C_i, H_i, W_i]`` tensors (one per
distilled layer, the student's already projected to the teacher's shape, as
:class:`freekd.distill.Distiller` passes them) and returns the sum over layers of a scalar,
computed in float32 (float64 stays float64), with autocast off. The teacher side never gets a
gradient. The weight of the whole term (``mu``) belongs to the distiller, not to the loss.

- :class:`FeatureMSE` — FitNet: ``mean((s - t)^2)``.
- :class:`ChannelWiseDistillation` — CWD (Shu et al., ICCV 2021): per channel, a softmax over the
  ``H*W`` positions at temperature ``tau``; ``tau^2 * KL(p_t || p_s)`` summed over positions,
  averaged over ``N*C``.
- :class:`MaskedGenerativeDistillation` — MGD (Yang et al., ECCV 2022): zero a random
  ``mask_ratio`` of the student's positions, regenerate the teacher feature with a small
  conv-ReLU-conv block (trained with the student), ``alpha * sum((G(s*m) - t)^2) / N``.
- :class:`FrequencyL1` — FreeKD without prompts: L1 between the wavelet bands of teacher and
  student over every position (optionally with FreeKD's relational channel weight), the "no
  masks" ablation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import (
    check_channel_list,
    check_choice,
    check_positive_float,
    check_positive_int,
)
from ..relation import RELATION_SOURCES, RelationalGate, RelationSource
from ..wavelets import dwt2, wavelet_filters
from .base import (
    BASELINES,
    LayerwiseLoss,
    Relational,
    channel_weight,
    masked_band_l1,
    register_loss,
    relational_setting,
)

__all__ = [
    "BASELINES",
    "ChannelWiseDistillation",
    "FeatureMSE",
    "FrequencyL1",
    "MaskedGenerativeDistillation",
]


@register_loss("mse")
class FeatureMSE(LayerwiseLoss):
    """FitNet: ``mean over [N, C, H, W] of (s - t)^2`` per layer, summed over layers. (Also the
    official RetinaNet recipe's extra spatial term, at weight 5.)

    Example:
        >>> import torch
        >>> FeatureMSE()([torch.zeros(1, 2, 4, 4)], [torch.full((1, 2, 4, 4), 3.0)])
        tensor(9.)
    """

    def layer_loss(self, index: int, student: list[Tensor], teacher: list[Tensor]) -> Tensor:
        return F.mse_loss(student[index], teacher[index])


@register_loss("cwd")
class ChannelWiseDistillation(LayerwiseLoss):
    """CWD: per channel, ``p = softmax(F / tau)`` over the ``H*W`` positions;
    ``tau^2 / (N*C) * sum over n, c, positions of p_t * (log p_t - log p_s)`` per layer.

    ``tau`` = 1 in the CWD paper's detection runs and 4 in its segmentation runs.

    Raises:
        ValueError: ``tau`` is not > 0.

    Example:
        >>> import torch
        >>> feature = torch.randn(2, 3, 8, 8)
        >>> ChannelWiseDistillation(tau=4.0)([feature], [feature]).abs().item() < 1e-6
        True
    """

    def __init__(self, tau: float = 4.0) -> None:
        super().__init__()
        if not tau > 0:
            raise ValueError(f"CWD temperature tau must be > 0, got {tau!r}")
        self.tau = float(tau)

    def layer_loss(self, index: int, student: list[Tensor], teacher: list[Tensor]) -> Tensor:
        n, c = teacher[index].shape[:2]
        log_p_t = F.log_softmax(teacher[index].flatten(2) / self.tau, dim=2)
        log_p_s = F.log_softmax(student[index].flatten(2) / self.tau, dim=2)
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum()
        return kl * self.tau**2 / (n * c)

    def extra_repr(self) -> str:
        return f"tau={self.tau}"


@register_loss("mgd")
class MaskedGenerativeDistillation(LayerwiseLoss):
    """MGD: ``alpha * sum((G(s * m) - t)^2) / N`` per layer.

    ``m: [N, 1, H, W]`` is 0 at a random ``mask_ratio`` of the positions (drawn from the global
    torch RNG each call, so checkpointed RNG states replay it) and 1 elsewhere; ``G`` is a
    conv3x3-ReLU-conv3x3 block on the teacher's channels, one per layer, trained with the student
    (its parameters belong in the student's optimizer; :meth:`Distiller.trainable_parameters`
    includes them). Defaults are MGD's: ``alpha`` 2e-5, ``mask_ratio`` 0.65 (detection; its
    segmentation runs used 0.75).

    Raises:
        ValueError: bad ``channels``, ``alpha`` (> 0) or ``mask_ratio`` (in ``[0, 1)``).

    Example:
        >>> import torch
        >>> loss = MaskedGenerativeDistillation(channels=[4])
        >>> loss([torch.randn(2, 4, 8, 8)], [torch.randn(2, 4, 8, 8)]).shape
        torch.Size([])
    """

    def __init__(
        self, channels: Sequence[int], alpha: float = 2e-5, mask_ratio: float = 0.65
    ) -> None:
        super().__init__()
        self.channels = check_channel_list("MaskedGenerativeDistillation", channels)
        if not 0 <= mask_ratio < 1:
            raise ValueError(f"MGD mask_ratio must be in [0, 1), got {mask_ratio!r}")
        if not alpha > 0:
            raise ValueError(f"MGD alpha must be > 0, got {alpha!r}")
        self.alpha, self.mask_ratio = float(alpha), float(mask_ratio)
        self.generators = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(c, c, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(c, c, 3, padding=1)
            )
            for c in self.channels
        )

    def layer_loss(self, index: int, student: list[Tensor], teacher: list[Tensor]) -> Tensor:
        feature = student[index]
        n, _, h, w = feature.shape
        keep = torch.rand(n, 1, h, w, device=feature.device) >= self.mask_ratio
        generated = self.generators[index](feature * keep.to(feature.dtype))
        return self.alpha * (generated - teacher[index]).pow(2).sum() / n

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, mask_ratio={self.mask_ratio}"


@register_loss("frequency")
class FrequencyL1(LayerwiseLoss):
    """FreeKD without prompts: per layer, ``sum over levels j of mean over [N, C, 3, h_j, w_j]
    of omega * |dwt2(F_t) - dwt2(F_s)|`` (plus the low band's mean over ``[N, C, h_J, w_J]``),
    over every position: FreeKD's reduction with every mask 1.

    ``include_low`` (default on) adds the low band; ``relational`` weights channels with
    FreeKD's position-aware term ``omega`` (needs ``channels``; ``True`` / ``"raw"``,
    ``"cosine"`` with ``relation_temperature``, ``relation_source``: as in
    :class:`~freekd.losses.FreeKDLoss`); off (``False`` / ``"off"``), ``omega`` = 1.

    Raises:
        ValueError: bad ``levels``, ``wavelet``, ``relational`` settings, or
            ``relational`` without ``channels``.

    Example:
        >>> import torch
        >>> loss = FrequencyL1(levels=2)
        >>> zeros, ones = [torch.zeros(1, 2, 8, 8)], [torch.ones(1, 2, 8, 8)]
        >>> loss(zeros, ones)  # Haar: only the low band of a constant map is non-zero (4 = 2^2)
        tensor(4.)
    """

    def __init__(
        self,
        channels: Sequence[int] | None = None,
        levels: int = 3,
        wavelet: str = "haar",
        include_low: bool = True,
        relational: bool | Relational = False,
        relation_temperature: float = 0.1,
        relation_source: RelationSource = "product",
    ) -> None:
        super().__init__()
        check_positive_int("levels", levels)
        wavelet_filters(wavelet)
        relational_kind = relational_setting(relational)
        temperature = check_positive_float("relation_temperature", relation_temperature)
        check_choice("relation_source", relation_source, RELATION_SOURCES)
        self.levels, self.wavelet = levels, wavelet
        self.include_low, self.relational = bool(include_low), relational_kind != "off"
        self.relational_kind = relational_kind
        self.gates = None
        if self.relational:
            if channels is None:
                raise ValueError("FrequencyL1(relational=True) needs channels=[C_1, ...]")
            self.channels = check_channel_list("FrequencyL1", channels)
            self.gates = nn.ModuleList(
                RelationalGate(
                    c, kind=relational_kind, temperature=temperature, source=relation_source
                )
                for c in self.channels
            )
        elif channels is not None:
            self.channels = check_channel_list("FrequencyL1", channels)

    def layer_loss(self, index: int, student: list[Tensor], teacher: list[Tensor]) -> Tensor:
        omega = channel_weight(self.gates, index, student, teacher)
        with torch.no_grad():
            teacher_low, teacher_highs = dwt2(teacher[index], self.levels, self.wavelet)
        student_low, student_highs = dwt2(student[index], self.levels, self.wavelet)
        everywhere = teacher_low.new_ones(())
        pairs = list(zip(teacher_highs, student_highs, strict=True))
        if self.include_low:
            pairs.append((teacher_low, student_low))
        terms = [masked_band_l1(t, s, everywhere, omega) for t, s in pairs]
        return torch.stack(terms).sum()

    def extra_repr(self) -> str:
        return (
            f"levels={self.levels}, wavelet={self.wavelet!r}, include_low={self.include_low}, "
            f"relational={self.relational_kind!r}"
        )
