"""Loss-weight calibration: the distillation weight whose pull equals the task loss's.

A distillation loss's weight ``mu`` means nothing across losses (an MSE over ``C*H*W`` values, a
KL over positions, a masked L1 over wavelet bands all have their own scale), so comparing losses
at the same ``mu`` compares their units, not their worth. :func:`calibrate_weight` returns the
weight ``mu0`` at which, on the student's distilled features ``F`` (the tapped features, before any
projection),

    || d(mu0 * L_distill) / dF || == || d L_task / dF ||,

averaged over the batches given. Sweeping ``mu`` around ``mu0`` (e.g. ``mu0 / 3, mu0, 3 * mu0``)
then gives every loss the same tuning budget. Calibrate at initialization (the student untrained,
the teacher and prompts final), where both gradients are large.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

__all__ = ["calibrate_weight", "gradient_norm", "weight_from_norms"]


def gradient_norm(loss: Tensor, features: Sequence[Tensor]) -> float:
    """``|| d loss / d features ||``: the L2 norm over all features together (features the loss
    does not depend on count as zero). ``loss`` is a scalar in the graph of ``features``, which
    require grad; the graph is kept (``retain_graph``) for further calls."""
    if loss.dim() != 0:
        raise ValueError(f"loss must be a scalar, got shape {tuple(loss.shape)}: reduce it")
    if not loss.requires_grad:
        raise ValueError(
            "the loss does not depend on anything that requires grad: pass a loss computed from "
            "the student's features in this step, not a detached value"
        )
    grads = torch.autograd.grad(loss, list(features), retain_graph=True, allow_unused=True)
    squares = [g.detach().double().pow(2).sum() for g in grads if g is not None]
    if not squares:
        raise ValueError(
            "the loss does not depend on the features given: pass the student's tapped features "
            "that the loss was computed from"
        )
    return math.sqrt(float(torch.stack(squares).sum()))


def calibrate_weight(
    task_losses: Tensor | Iterable[Tensor],
    distill_losses: Tensor | Iterable[Tensor],
    features: Sequence[Tensor] | Iterable[Sequence[Tensor]],
) -> float:
    """The weight ``mu0`` with ``||grad_F(mu0 * L_distill)|| = ||grad_F(L_task)||``.

    Args:
        task_losses: the student's task loss (scalar), or one per batch.
        distill_losses: the unweighted distillation loss (scalar), or one per batch, computed
            from the same forward passes.
        features: the student's distilled features ``[N, C_i, H_i, W_i]`` of that pass (a list,
            before projection; they must be in both graphs), or one such list per batch.

    Returns:
        ``mean ||grad task|| / mean ||grad distill||`` over the batches (a positive float).

    Raises:
        ValueError: when the distillation loss has no gradient on the features (e.g. the
            student already equals the teacher), or the inputs do not line up.

    Example:
        >>> import torch
        >>> feature = torch.ones(1, 2, 2, 2, requires_grad=True)
        >>> task = (3 * feature).sum()                 # gradient 3 everywhere
        >>> distill = (feature - 0).pow(2).sum() / 2   # gradient 1 everywhere
        >>> round(calibrate_weight(task, distill, [feature]), 6)
        3.0
    """
    if isinstance(task_losses, Tensor):
        task_losses, distill_losses, features = [task_losses], [distill_losses], [features]
    task_losses, distill_losses, features = list(task_losses), list(distill_losses), list(features)
    if not len(task_losses) == len(distill_losses) == len(features) > 0:
        raise ValueError(
            f"give one task loss, one distillation loss and one feature list per batch; got "
            f"{len(task_losses)}, {len(distill_losses)} and {len(features)}"
        )
    task_norm = sum(gradient_norm(t, f) for t, f in zip(task_losses, features, strict=True))
    distill_norm = sum(gradient_norm(d, f) for d, f in zip(distill_losses, features, strict=True))
    return weight_from_norms(task_norm, distill_norm)


def weight_from_norms(task_norm: float, distill_norm: float) -> float:
    """``task_norm / distill_norm`` (gradient norms summed over the same batches), refusing a
    distillation loss without gradient."""
    if not distill_norm > 0 or not math.isfinite(distill_norm):
        raise ValueError(
            f"the distillation loss has gradient norm {distill_norm} on the student's features: "
            f"calibrate at initialization, when the student differs from the teacher"
        )
    return task_norm / distill_norm
