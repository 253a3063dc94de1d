"""The base every layer-wise distillation loss subclasses, the registry that names them, and the
helpers they share.

A *layer-wise* loss takes the distilled features of all layers as two lists, ``student_feats``
and ``teacher_feats``, each holding one ``[N, C_i, H_i, W_i]`` tensor per layer (ordered fine to
coarse, the student's already projected to the teacher's shape), and returns one scalar: the sum
over layers of :meth:`LayerwiseLoss.layer_loss`, times ``loss_weight``. :class:`LayerwiseLoss`
does the rest once for every loss: it checks the lists (one clear message naming the loss, the
layer and the fix), upcasts half-precision features to float32 (float64 stays float64), turns
autocast off, detaches the teacher and keeps the weighted per-layer terms in ``last_terms``.

A new loss subclasses :class:`LayerwiseLoss`, implements ``layer_loss`` and, to be found by
name (the pipeline's ``distill.method``), registers itself::

    @register_loss("l2-sum")
    class FeatureL2Sum(LayerwiseLoss):
        def layer_loss(self, index, student, teacher):
            return (student[index] - teacher[index]).square().sum()
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, TypeVar, get_args

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_feature_lists

__all__ = [
    "BASELINES",
    "RELATIONAL_SETTINGS",
    "LayerwiseLoss",
    "Relational",
    "baseline_losses",
    "build_loss",
    "channel_weight",
    "compute_dtype",
    "loss_class",
    "loss_names",
    "masked_band_l1",
    "masked_band_sum",
    "register_loss",
    "relational_setting",
]

Relational = Literal["off", "raw", "cosine"]
"""The relational channel weight of a loss: off, the paper's (``"raw"``) or ``"cosine"``."""
RELATIONAL_SETTINGS: tuple[str, ...] = get_args(Relational)


class LayerwiseLoss(nn.Module):
    """A distillation loss summed over layers: ``loss(student_feats, teacher_feats)`` -> scalar.

    Subclasses implement :meth:`layer_loss` (and may set ``channels``, the channel count of each
    layer, to have the inputs checked against it, and ``loss_weight``, which multiplies the
    total). :meth:`layer_options` runs once per call before the layers (e.g. to count calls)
    and returns keyword arguments for every :meth:`layer_loss` call.

    After each call, ``last_terms`` maps ``"layer{i}"`` to that layer's term (times
    ``loss_weight``, detached), for logging.

    Example:
        >>> import torch
        >>> class SumL1(LayerwiseLoss):
        ...     def layer_loss(self, index, student, teacher):
        ...         return (student[index] - teacher[index]).abs().sum()
        >>> student = [torch.zeros(1, 2, 4, 4, dtype=torch.bfloat16), torch.zeros(1, 2, 2, 2)]
        >>> teacher = [torch.ones(1, 2, 4, 4, dtype=torch.bfloat16), torch.ones(1, 2, 2, 2)]
        >>> loss = SumL1()
        >>> loss(student, teacher)  # computed in float32
        tensor(40.)
        >>> loss.last_terms
        {'layer0': tensor(32.), 'layer1': tensor(8.)}
    """

    channels: list[int] | None = None
    loss_weight: float = 1.0

    def __init__(self) -> None:
        super().__init__()
        self.last_terms: dict[str, Tensor] = {}

    def forward(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> Tensor:
        """The weighted sum over layers of :meth:`layer_loss`.

        Args:
            student_feats: one ``[N, C_i, H_i, W_i]`` tensor per layer, fine to coarse, already
                projected to the teacher's shape.
            teacher_feats: the teacher's features, same shapes (detached here).

        Returns:
            A scalar, computed in float32 (float64 for float64 input), also under autocast.

        Raises:
            TypeError, ValueError: the lists do not hold one floating-point ``[N, C, H, W]``
                tensor per layer each, of equal shapes, on one device (and ``channels[i]``
                channels at layer ``i`` when ``channels`` is set); the message names the loss,
                the layer and the fix.
        """
        check_feature_lists(type(self).__name__, student_feats, teacher_feats, self.channels)
        options = self.layer_options()
        dtype = compute_dtype(student_feats, teacher_feats)
        with torch.autocast(device_type=teacher_feats[0].device.type, enabled=False):
            teacher = [t.detach().to(dtype) for t in teacher_feats]
            student = [s.to(dtype) for s in student_feats]
            terms = [self.layer_loss(i, student, teacher, **options) for i in range(len(teacher))]
        weight = self.loss_weight
        self.last_terms = {f"layer{i}": term.detach() * weight for i, term in enumerate(terms)}
        return torch.stack(terms).sum() * weight

    def layer_options(self) -> dict[str, Any]:
        """Keyword arguments for this call's :meth:`layer_loss` calls (none by default)."""
        return {}

    def layer_loss(self, index: int, student: list[Tensor], teacher: list[Tensor]) -> Tensor:
        """The unweighted scalar term of layer ``index``; ``student`` and ``teacher`` list the
        upcast features of all layers (a relational term reads the next layer)."""
        raise NotImplementedError(f"{type(self).__name__} must implement layer_loss")


# ---------------------------------------------------------------------------- registry

_LOSSES: dict[str, type[LayerwiseLoss]] = {}
LossClass = TypeVar("LossClass", bound=type[LayerwiseLoss])


def register_loss(name: str) -> Callable[[LossClass], LossClass]:
    """Class decorator: make a :class:`LayerwiseLoss` subclass findable as ``name`` (by
    :func:`build_loss` and the pipeline's ``distill.method``).

    Returns:
        The decorator, which returns the class unchanged.

    Raises:
        ValueError: ``name`` is empty or already names another class.
        TypeError: the decorated class is not a :class:`LayerwiseLoss` subclass.

    Example:
        >>> @register_loss("doctest-l1")
        ... class MeanL1(LayerwiseLoss):
        ...     def layer_loss(self, index, student, teacher):
        ...         return (student[index] - teacher[index]).abs().mean()
        >>> "doctest-l1" in loss_names()
        True
        >>> _ = _LOSSES.pop("doctest-l1")  # (tidy up the registry)
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a loss is registered under a non-empty name, got {name!r}")

    def decorator(cls: LossClass) -> LossClass:
        if not (isinstance(cls, type) and issubclass(cls, LayerwiseLoss)):
            raise TypeError(f"register_loss({name!r}) takes a LayerwiseLoss subclass, got {cls!r}")
        known = _LOSSES.get(name)
        same = known is not None and _qualified(known) == _qualified(cls)  # e.g. a reload
        if known is not None and not same:
            raise ValueError(
                f"loss name {name!r} is taken by {known.__qualname__}: register "
                f"{cls.__qualname__} under another name"
            )
        _LOSSES[name] = cls
        return cls

    return decorator


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def loss_names() -> tuple[str, ...]:
    """The registered loss names, in registration order (``"freekd"`` first)."""
    return tuple(_LOSSES)


def loss_class(name: str) -> type[LayerwiseLoss]:
    """The loss class registered as ``name``.

    Raises:
        ValueError: no loss has that name; the message lists the registered ones.
    """
    check_choice("loss", name, loss_names())
    return _LOSSES[name]


def build_loss(name: str, **kwargs: Any) -> LayerwiseLoss:
    """``loss_class(name)(**kwargs)``: the registered loss ``name`` built with ``kwargs``.

    Example:
        >>> from freekd.losses import build_loss
        >>> build_loss("cwd", tau=2.0)
        ChannelWiseDistillation(tau=2.0)
    """
    return loss_class(name)(**kwargs)


def baseline_losses() -> dict[str, type[LayerwiseLoss]]:
    """The registered losses other than ``"freekd"`` (the ones it is compared with)."""
    return {name: cls for name, cls in _LOSSES.items() if name != "freekd"}


class _Baselines(Mapping[str, type[LayerwiseLoss]]):
    """A live, read-only view of :func:`baseline_losses` (a loss registered later is in it)."""

    def __getitem__(self, name: str) -> type[LayerwiseLoss]:
        return baseline_losses()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(baseline_losses())

    def __len__(self) -> int:
        return len(baseline_losses())

    def __repr__(self) -> str:
        return repr(baseline_losses())


BASELINES: Mapping[str, type[LayerwiseLoss]] = _Baselines()
"""The baselines by the names the pipeline's ``distill.method`` uses (every registered loss but
``"freekd"``): ``mse``, ``cwd``, ``mgd``, ``frequency``."""


# ---------------------------------------------------------------------------- shared helpers


def compute_dtype(*feature_lists: Sequence[Tensor]) -> torch.dtype:
    """float64 when any feature is float64, else float32: half-precision features are upcast
    (the masks' logits and the sums need the range), mixed dtypes meet in one."""
    dtypes = {f.dtype for feats in feature_lists for f in feats}
    return torch.float64 if torch.float64 in dtypes else torch.float32


def relational_setting(relational: object) -> str:
    """``relational`` as one of :data:`RELATIONAL_SETTINGS` (``True`` is ``"raw"``, ``False``
    ``"off"``).

    Raises:
        ValueError: naming the setting and the valid values.
    """
    if isinstance(relational, bool):
        return "raw" if relational else "off"
    check_choice("relational (or True / False)", relational, RELATIONAL_SETTINGS)
    return str(relational)


def channel_weight(
    gates: Sequence[nn.Module] | None,
    index: int,
    student: Sequence[Tensor],
    teacher: Sequence[Tensor],
) -> Tensor | None:
    """``omega: [N, C]`` of layer ``index`` from its relational gate (``None`` without gates).

    ``student``, ``teacher``: the features of all layers; the gate reads layer ``index`` and the
    next one (when there is one), the student's detached.
    """
    if gates is None:
        return None
    has_next = index + 1 < len(teacher)
    return gates[index](
        teacher[index],
        student[index].detach(),
        teacher[index + 1] if has_next else None,
        student[index + 1].detach() if has_next else None,
    )


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


def masked_band_sum(
    teacher: Tensor, student: Tensor, mask_mean: Tensor, omega: Tensor | None
) -> Tensor:
    """``sum over [N, C, *band] of omega * mask_mean * |teacher - student|`` (scalar).

    ``teacher, student: [N, C, *band]``; ``mask_mean`` broadcasts to them (``[N, 1, *band]``, or
    a scalar 1 for no mask); ``omega: [N, C]`` or ``None`` (1). Gradient for ``student`` only.
    """
    per_channel = _MaskedBandL1.apply(teacher, student, mask_mean)
    if omega is not None:
        per_channel = per_channel * omega
    return per_channel.sum()


def masked_band_l1(
    teacher: Tensor, student: Tensor, mask_mean: Tensor, omega: Tensor | None
) -> Tensor:
    """``mean over [N, C, *band] of omega * mask_mean * |teacher - student|`` (scalar); the
    arguments as in :func:`masked_band_sum`."""
    return masked_band_sum(teacher, student, mask_mean, omega) / teacher.numel()
