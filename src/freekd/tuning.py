"""Stage 1 of FreeKD: tune the frequency prompts on the frozen teacher.

At each tapped layer the teacher's feature ``F`` is replaced by
``idwt2(prompt.mask_bands(dwt2(F)), size=F.shape[-2:])``; the rest of the teacher runs on it and
its own task loss is computed. Only the prompts are trained, on
``L_prompt = L_task + lambda * L_dis`` (``L_dis`` the overlap between each group's ``T`` masks).
The teacher is frozen for the whole run: every parameter has ``requires_grad=False`` and its norm
and dropout layers stay in eval mode even when the tuner is put in train mode.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .losses.freekd import FreeKDLoss
from .taps import FeatureTaps
from .wavelets import dwt2, idwt2

__all__ = ["PromptTuner", "TaskLoss", "freeze", "loss_terms"]

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

    ``forward(batch)`` returns ``{"loss": task + lambda * dissimilarity, "task": ...,
    "dissimilarity": ..., "task/<name>": ...}``. Train :meth:`trainable_parameters` (the prompt
    tokens; a learned relational gate of the loss belongs to stage 2). Save the result with
    ``loss.save_prompts(path)``.
    """

    def __init__(
        self,
        teacher: nn.Module,
        taps: Sequence[str],
        loss: FreeKDLoss,
        task_loss: TaskLoss,
        dissimilarity_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.teacher = freeze(teacher)
        self.loss = loss
        self.loss.prompts.requires_grad_(True)
        self.task_loss = task_loss
        self.dissimilarity_weight = float(dissimilarity_weight)
        self.taps = FeatureTaps(teacher, taps, replace=self._resynthesise)
        self._masks: dict[int, Any] = {}

    def train(self, mode: bool = True) -> PromptTuner:
        super().train(mode)
        freeze(self.teacher)  # norm and dropout layers stay in eval mode
        return self

    def _resynthesise(self, index: int, feature: Tensor) -> Tensor:
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
            bands = dwt2(feature.float(), self.loss.levels, self.loss.wavelet)
            masks = prompt.masks(bands)
            self._masks[index] = masks
            masked = prompt.mask_bands(bands, masks)
            return idwt2(masked, self.loss.wavelet, size=feature.shape[-2:]).to(feature.dtype)

    def forward(self, batch: Any) -> dict[str, Tensor]:
        self._masks = {}
        task = loss_terms(self.task_loss(self.teacher, batch), "task")
        if len(self._masks) != len(self.loss.prompts):
            raise ValueError(
                f"the teacher's taps produced {len(self._masks)} features, the loss has prompts "
                f"for {len(self.loss.prompts)}: build FreeKDLoss with one channel count per feature"
            )
        dissimilarity = sum(
            prompt.dissimilarity(self._masks[i], self.loss.dissimilarity)
            for i, prompt in enumerate(self.loss.prompts)
        )
        task_total = task["task"] if "task" in task else sum(task.values())
        terms = {
            "loss": task_total + self.dissimilarity_weight * dissimilarity,
            "task": task_total,
            "dissimilarity": dissimilarity,
        }
        terms.update((k, v) for k, v in task.items() if k != "task")
        return terms

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The prompt tokens, one tensor per tapped layer: all that stage 1 trains."""
        return [prompt.tokens for prompt in self.loss.prompts]

    def mark_tuned(self) -> None:
        """Record that the prompts are tuned (call at the end of stage 1)."""
        for prompt in self.loss.prompts:
            prompt.mark_tuned()
        self.loss.reset_tuned_check()
