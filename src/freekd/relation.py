"""Position-aware relational channel weight (the paper's term; absent from the official code).

For a feature ``F: [N, C, h, w]`` and the next (coarser) feature ``F_next`` resized to ``F``'s grid
(``psi(F)``; ``F`` itself when there is no next layer or its channels differ):

    A = softmax(psi(F) F^T / sqrt(h w), dim=-1): [N, C, C]
    omega = C * (mean over rows of A): [N, C]      (mean 1 over channels: each row sums to 1)

:class:`RelationalGate` combines the teacher's and the projected student's weights,
``omega = normalise(omega_t * omega_s)`` to mean 1 over channels, under ``no_grad`` (computed in
log space: the softmax saturates on real maps and single weights underflow). The optional
learned gate (``gate="mlp"``) multiplies that by ``2 * sigmoid(MLP(omega))``, whose last layer
starts at zero so that training starts from the parameter-free weight; its output is normalised the
same way and it is trained with the student.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_choice, check_positive_int

__all__ = [
    "GATES",
    "RelationalGate",
    "normalise_log_weight",
    "relational_log_weight",
    "relational_weight",
]

Gate = Literal["parameter-free", "mlp"]
GATES: tuple[str, ...] = ("parameter-free", "mlp")


def relational_weight(feature: Tensor, next_feature: Tensor | None = None) -> Tensor:
    """Parameter-free channel weight ``C * mean over rows of A``: ``[N, C]``, mean 1 over channels.

    Args:
        feature: ``F: [N, C, h, w]``.
        next_feature: ``F_next: [N, C', h', w']``, resized (bilinear) to ``F``'s grid when given
            with ``C' == C``; otherwise ``F`` relates to itself.
    """
    return relational_log_weight(feature, next_feature).exp()


def relational_log_weight(feature: Tensor, next_feature: Tensor | None = None) -> Tensor:
    """``log`` of :func:`relational_weight`, computed in log space: ``[N, C]``.

    The logits grow like ``sqrt(h w)``, so the softmax saturates on real feature maps and a
    channel's weight can underflow to exactly 0; its logarithm stays finite.
    """
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
    log_relation = torch.log_softmax(logits, dim=-1)
    return torch.logsumexp(log_relation, dim=1).to(feature.dtype)  # log(C * mean over rows)


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


def normalise_log_weight(log_weight: Tensor) -> Tensor:
    """Channel weight ``[N, C]`` with mean 1 over channels from unnormalised log weights:
    ``C * softmax(log_weight)`` (never all zero, unlike normalising underflowed products)."""
    return log_weight.shape[1] * torch.softmax(log_weight, dim=1)


class RelationalGate(nn.Module):
    """Channel weights ``omega: [N, C]`` (mean 1 over channels) for one distilled layer.

    ``gate="parameter-free"`` (default) has no parameters; ``gate="mlp"`` adds a small learned
    MLP (``C -> C // reduction -> C``), trained with the student and not part of it.
    """

    def __init__(self, channels: int, gate: Gate = "parameter-free", reduction: int = 4) -> None:
        super().__init__()
        check_positive_int("channels", channels)
        check_positive_int("reduction", reduction)
        check_choice("gate", gate, GATES)
        self.channels, self.gate = channels, gate
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
            log_omega = relational_log_weight(teacher, teacher_next) + relational_log_weight(
                student, student_next
            )
            omega = normalise_log_weight(log_omega)
        if self.mlp is None:
            return omega
        # omega * 2 sigmoid(z), renormalised; the factor 2 cancels.
        return normalise_log_weight(log_omega + F.logsigmoid(self.mlp(omega)))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, gate={self.gate!r}"
