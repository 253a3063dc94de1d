"""Position-aware relational channel weight (the paper's term; absent from the official code).

For a feature ``F: [N, C, h, w]`` and the next (coarser) feature ``F_next`` resized to ``F``'s grid
(``psi(F)``; ``F`` itself when there is no next layer or its channels differ):

    A = softmax(psi(F) F^T / sqrt(h w), dim=-1): [N, C, C]
    omega = C * (mean over rows of A): [N, C]      (mean 1 over channels: each row sums to 1)

:class:`RelationalGate` combines the teacher's and the projected student's weights,
``omega = normalize(omega_t * omega_s)`` to mean 1 over channels, under ``no_grad`` (computed in
log space: the softmax saturates on real maps and single weights underflow). The optional
learned gate (``gate="mlp"``) multiplies that by ``2 * sigmoid(MLP(omega))``, whose last layer
starts at zero so that training starts from the parameter-free weight; its output is normalized the
same way and it is trained with the student.

Options (``docs/deviations.md``): ``kind="cosine"`` replaces the logits by the cosine similarity of
the flattened channel maps over a temperature, ``A = softmax(cos(psi(F)_c, F_c') / tau)``, whose
sharpness does not grow with the map size (the raw logits grow like ``sqrt(h w)``, so the raw
softmax is nearly one-hot on large maps); ``source="teacher"`` uses the teacher's weight alone.
:func:`effective_channels` measures how many channels a weight spreads over.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_choice, check_positive_float, check_positive_int
from ._deprecation import renamed

__all__ = [
    "GATES",
    "RELATION_KINDS",
    "RELATION_SOURCES",
    "Gate",
    "RelationKind",
    "RelationSource",
    "RelationalGate",
    "effective_channels",
    "normalize_log_weight",
    "relational_log_weight",
    "relational_weight",
]

Gate = Literal["parameter-free", "mlp"]
RelationKind = Literal["raw", "cosine"]
RelationSource = Literal["product", "teacher"]
GATES: tuple[str, ...] = get_args(Gate)
RELATION_KINDS: tuple[str, ...] = get_args(RelationKind)
RELATION_SOURCES: tuple[str, ...] = get_args(RelationSource)

_NORM_EPS = 1e-12  # guard of a channel map's norm (kind="cosine")


def relational_weight(
    feature: Tensor,
    next_feature: Tensor | None = None,
    kind: RelationKind = "raw",
    temperature: float = 0.1,
) -> Tensor:
    """Parameter-free channel weight ``C * mean over rows of A``: ``[N, C]``, mean 1 over channels.

    Args:
        feature: ``F: [N, C, h, w]``.
        next_feature: ``F_next: [N, C', h', w']``, resized (bilinear) to ``F``'s grid when given
            with ``C' == C``; otherwise ``F`` relates to itself.
        kind: ``"raw"`` (paper): ``A = softmax(psi(F) F^T / sqrt(h w))``; ``"cosine"``:
            ``A = softmax(cos(psi(F)_c, F_c') / temperature)``.
        temperature: ``tau`` of ``kind="cosine"`` (unused by ``"raw"``).
    """
    return relational_log_weight(feature, next_feature, kind, temperature).exp()


def relational_log_weight(
    feature: Tensor,
    next_feature: Tensor | None = None,
    kind: RelationKind = "raw",
    temperature: float = 0.1,
) -> Tensor:
    """``log`` of :func:`relational_weight`, computed in log space: ``[N, C]``.

    The raw logits grow like ``sqrt(h w)``, so the softmax saturates on real feature maps and a
    channel's weight can underflow to exactly 0; its logarithm stays finite.
    """
    check_choice("relational kind", kind, RELATION_KINDS)
    if kind == "cosine":
        logits = _cosine_logits(feature, next_feature) / check_positive_float(
            "relation_temperature", temperature
        )
        return _log_column_mass(logits).to(feature.dtype)
    height, width = feature.shape[-2:]
    if next_feature is None or next_feature.shape[1] != feature.shape[1]:
        context, pixels = feature, feature
    elif next_feature.shape[-2:] != feature.shape[-2:]:
        # psi(F) F^T = (U F_next) F^T = F_next (U^T F)^T for the bilinear upsampling U: pulling F
        # back to the coarse grid costs one pass over F and makes the product 4x cheaper for a
        # pyramid, with no full-size upsampled map.
        context, pixels = next_feature, _upsample_adjoint(feature, next_feature.shape[-2:])
    else:
        context, pixels = next_feature, feature
    logits = _relation_logits(context, pixels) / math.sqrt(height * width)
    return _log_column_mass(logits).to(feature.dtype)


def _log_column_mass(logits: Tensor) -> Tensor:
    """``log(C * mean over rows of softmax(logits, dim=-1))``: ``[N, C, C]`` -> ``[N, C]``."""
    log_relation = torch.log_softmax(logits, dim=-1)
    return torch.logsumexp(log_relation, dim=1)


def _psi(feature: Tensor, next_feature: Tensor | None) -> Tensor:
    """``psi(F)``: the next feature resized (bilinear, ``align_corners=False``) to ``F``'s grid,
    or ``F`` itself when there is none or its channels differ. ``[N, C, h, w]``."""
    if next_feature is None or next_feature.shape[1] != feature.shape[1]:
        return feature
    if next_feature.shape[-2:] == feature.shape[-2:]:
        return next_feature
    return F.interpolate(
        next_feature, size=feature.shape[-2:], mode="bilinear", align_corners=False
    )


def _unit_channels(feature: Tensor) -> Tensor:
    """``[N, C, h, w]`` -> ``[N, C, h w]``: each channel's flattened map divided by its L2 norm
    (clamped at 1e-12; an all-zero channel stays zero). The map is first divided by a power of
    two near its largest value (exact), so the norm neither overflows nor underflows."""
    flat = feature.flatten(2)
    largest = flat.detach().abs().amax(dim=-1, keepdim=True)
    _, exponent = torch.frexp(largest)
    exponent = torch.where(torch.isfinite(largest), exponent, torch.zeros_like(exponent))
    flat = flat / torch.ldexp(torch.ones_like(largest), exponent)
    return flat / torch.linalg.vector_norm(flat, dim=-1, keepdim=True).clamp_min(_NORM_EPS)


def _cosine_logits(feature: Tensor, next_feature: Tensor | None) -> Tensor:
    """``cos(psi(F)_c, F_c')``: ``[N, C, C]`` in float64, rows ``c`` of ``psi(F)``, columns
    ``c'`` of ``F``, between the flattened ``h w`` maps."""
    context = _unit_channels(_psi(feature, next_feature))
    pixels = _unit_channels(feature)
    return (context @ pixels.transpose(1, 2)).double()


def effective_channels(omega: Tensor) -> Tensor:
    """Participation ratio ``(sum_c omega_c)^2 / sum_c omega_c^2`` of channel weights
    ``omega: [N, C]`` -> ``[N]``: ``C`` for uniform weights, 1 when one channel holds all the
    weight. A diagnostic of how many channels a relational weight distills."""
    wide = omega.double()
    return (wide.sum(dim=1).square() / wide.square().sum(dim=1)).to(omega.dtype)


def _power_of_two_scale(feature: Tensor) -> Tensor:
    """``[N, 1, 1]``: per sample, the power of two just above the largest ``|feature|`` (1 for an
    all-zero or non-finite sample). Dividing by it is exact in floating point."""
    largest = feature.detach().abs().flatten(1).amax(dim=1)
    _, exponent = torch.frexp(largest)  # largest = mantissa * 2**exponent, mantissa in [0.5, 1)
    exponent = torch.where(torch.isfinite(largest), exponent, torch.zeros_like(exponent))
    return torch.ldexp(torch.ones_like(largest), exponent).view(-1, 1, 1)


def _relation_logits(context: Tensor, pixels: Tensor) -> Tensor:
    """``context F^T``: ``[N, C, hw] x [N, hw, C]`` -> ``[N, C, C]`` in float64.

    The product is taken on the features divided by a power of two (exact), so that it cannot
    overflow in float32 for huge magnitudes (1e30 squared) nor underflow for tiny ones; the scale
    is put back on the small ``[N, C, C]`` result in float64.
    """
    context_scale, pixel_scale = _power_of_two_scale(context), _power_of_two_scale(pixels)
    scaled = (context.flatten(2) / context_scale) @ (pixels.flatten(2) / pixel_scale).transpose(
        1, 2
    )
    return scaled.double() * (context_scale.double() * pixel_scale.double())


def _upsample_adjoint(feature: Tensor, coarse_size: torch.Size) -> Tensor:
    """``U^T F`` for the bilinear upsampling ``U`` from ``coarse_size`` to ``F``'s grid (the
    gradient of ``F.interpolate`` with respect to its input).

    ``[N, C, H, W]`` -> ``[N, C, h, w]``.
    """
    return torch.ops.aten.upsample_bilinear2d_backward(
        feature,
        output_size=list(feature.shape[-2:]),
        input_size=[*feature.shape[:2], *coarse_size],
        align_corners=False,
    )


def normalize_log_weight(log_weight: Tensor) -> Tensor:
    """Channel weight ``[N, C]`` with mean 1 over channels from unnormalized log weights:
    ``C * softmax(log_weight)`` (never all zero, unlike normalizing underflowed products)."""
    return log_weight.shape[1] * torch.softmax(log_weight, dim=1)


class RelationalGate(nn.Module):
    """Channel weights ``omega: [N, C]`` (mean 1 over channels) for one distilled layer.

    ``gate="parameter-free"`` (default) has no parameters; ``gate="mlp"`` adds a small learned
    MLP (``C -> C // reduction -> C``), trained with the student and not part of it.
    ``kind`` and ``temperature``: see :func:`relational_weight`. ``source="product"`` (default)
    combines the teacher's and the student's weights, ``normalize(omega_t * omega_s)``;
    ``"teacher"`` uses the teacher's alone. Every kind and source works with either gate.

    Raises:
        ValueError: a bad ``channels``, ``reduction``, ``gate``, ``kind``, ``temperature`` or
            ``source`` (named, with the valid values).

    Example:
        >>> import torch
        >>> gate = RelationalGate(8)
        >>> omega = gate(torch.randn(2, 8, 16, 16), torch.randn(2, 8, 16, 16))
        >>> omega.shape, torch.allclose(omega.mean(dim=1), torch.ones(2))
        (torch.Size([2, 8]), True)
    """

    def __init__(
        self,
        channels: int,
        gate: Gate = "parameter-free",
        reduction: int = 4,
        kind: RelationKind = "raw",
        temperature: float = 0.1,
        source: RelationSource = "product",
    ) -> None:
        super().__init__()
        check_positive_int("channels", channels)
        check_positive_int("reduction", reduction)
        check_choice("gate", gate, GATES)
        check_choice("relational kind", kind, RELATION_KINDS)
        check_choice("relation_source", source, RELATION_SOURCES)
        self.channels, self.gate = channels, gate
        self.kind, self.temperature, self.source = (
            kind,
            check_positive_float("relation_temperature", temperature),
            source,
        )
        self.mlp: nn.Sequential | None = None
        if gate == "mlp":
            hidden = max(1, channels // reduction)
            self.mlp = nn.Sequential(
                nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels)
            )
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)

    def forward(
        self,
        teacher: Tensor,
        student: Tensor,
        teacher_next: Tensor | None = None,
        student_next: Tensor | None = None,
    ) -> Tensor:
        """``teacher``, ``student: [N, C, h, w]`` (student already projected), and the next
        (coarser) layer of each or ``None`` -> ``omega: [N, C]``, mean 1 over channels.
        Gradients reach only the MLP's parameters, never the features."""
        with torch.no_grad():
            log_omega = relational_log_weight(teacher, teacher_next, self.kind, self.temperature)
            if self.source == "product":
                log_omega = log_omega + relational_log_weight(
                    student, student_next, self.kind, self.temperature
                )
            omega = normalize_log_weight(log_omega)
        if self.mlp is None:
            return omega
        # omega * 2 sigmoid(z), renormalized; the factor 2 cancels.
        return normalize_log_weight(log_omega + F.logsigmoid(self.mlp(omega)))

    def extra_repr(self) -> str:
        text = f"channels={self.channels}, gate={self.gate!r}"
        if (self.kind, self.source) != ("raw", "product"):
            text += f", kind={self.kind!r}, temperature={self.temperature}, source={self.source!r}"
        return text


__getattr__ = renamed(__name__, {"normalise_log_weight": "normalize_log_weight"}, globals())
