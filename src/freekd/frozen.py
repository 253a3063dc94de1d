"""What both FreeKD stages share about models: a frozen teacher, and the task-loss convention.

:func:`freeze` freezes a model in place (no gradients, norm and dropout layers in eval mode);
a :data:`TaskLoss` runs a model on a batch and returns its loss, and :func:`loss_terms` names
that loss's terms; :func:`eval_mode` runs a model in eval mode for a while and
:func:`model_device` says where it lives. Stage 1 (:mod:`freekd.tuning`), stage 2
(:mod:`freekd.distill`), the taps and the model builders (:mod:`freekd.models`) use them without
depending on each other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["TaskLoss", "eval_mode", "freeze", "loss_terms", "model_device"]

TaskLoss = Callable[[nn.Module, Any], Tensor | Mapping[str, Tensor]]
"""``task_loss(model, batch)``: runs ``model`` on ``batch`` and returns its loss, a scalar or a
dict of named scalars (as torchvision detectors return in train mode)."""

_FROZEN_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    nn.modules.dropout._DropoutNd,
)


def freeze(model: nn.Module) -> nn.Module:
    """Set ``requires_grad=False`` on every parameter, drop stale gradients, and put norm and
    dropout layers in eval mode.

    The model's own ``training`` flags stay as they are elsewhere, so models that return their
    losses only in train mode (torchvision detectors) still do.
    """
    model.requires_grad_(False)
    for parameter in model.parameters():
        parameter.grad = None  # a frozen model holds no gradients (e.g. left from its training)
    for module in model.modules():
        if isinstance(module, _FROZEN_LAYER_TYPES):
            module.eval()
    return model


def loss_terms(output: Tensor | Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """A task loss (scalar or dict of scalars) as ``{"{prefix}/{name}": scalar}``."""
    if isinstance(output, Tensor):
        if output.dim() != 0:
            raise ValueError(
                f"the task loss must be a scalar or a dict of scalars, got a tensor of shape "
                f"{tuple(output.shape)}: reduce it (e.g. .mean())"
            )
        return {prefix: output}
    if isinstance(output, Mapping) and output:
        return {f"{prefix}/{name}": value for name, value in output.items()}
    raise TypeError(
        f"the task loss must return a scalar tensor or a non-empty dict of them, got "
        f"{type(output).__name__}"
    )


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule of ``model`` in eval mode, then restore each one's own flag.

    Restoring per module (not ``model.train(previous)``) keeps frozen norm layers of a model
    that is otherwise in train mode (a teacher) in eval mode.
    """
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter or buffer (CPU for a model with neither)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")
