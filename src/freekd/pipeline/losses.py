"""Extra distillation terms of the official recipes that are not part of FreeKD itself."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FeatureMSE"]


class FeatureMSE(nn.Module):
    """Spatial MSE between projected student features and teacher features (FitNet-style).

    ``forward(student_feats, teacher_feats)``: lists of ``[N, C_i, H_i, W_i]`` (the student's
    already projected to the teacher's shapes, as :class:`freekd.distill.Distiller` passes
    them) -> the sum over layers of ``mean((s - t)^2)``, computed in float32. The teacher side
    gets no gradient. The weight (the official RetinaNet recipe's 5) is the distiller's
    ``loss_weights`` entry, not a parameter here.
    """

    def forward(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> Tensor:
        if len(student_feats) != len(teacher_feats) or not teacher_feats:
            raise ValueError(
                f"FeatureMSE needs one student feature per teacher feature, got "
                f"{len(student_feats)} and {len(teacher_feats)}"
            )
        terms = []
        for index, (s, t) in enumerate(zip(student_feats, teacher_feats, strict=True)):
            if s.shape != t.shape:
                raise ValueError(
                    f"FeatureMSE layer {index}: student {tuple(s.shape)} and teacher "
                    f"{tuple(t.shape)} differ: project the student first"
                )
            terms.append(F.mse_loss(s.float(), t.detach().float()))
        return torch.stack(terms).sum()
