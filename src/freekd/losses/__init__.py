"""Distillation losses: FreeKD and the baselines it is compared with (one calling convention:
``loss(student_feats, teacher_feats)`` on lists of ``[N, C, H, W]`` tensors).

Every loss subclasses :class:`LayerwiseLoss` and is registered by name (:func:`register_loss`);
:func:`build_loss` builds one by that name, as the pipeline's ``distill.method`` does.
"""

from .base import (
    BASELINES,
    LayerwiseLoss,
    build_loss,
    loss_class,
    loss_names,
    register_loss,
)
from .freekd import PRESETS, FreeKDLoss

# isort: split
# (registered after FreeKDLoss, so that "freekd" leads loss_names())
from .baselines import (
    ChannelWiseDistillation,
    FeatureMSE,
    FrequencyL1,
    MaskedGenerativeDistillation,
)

__all__ = [
    "BASELINES",
    "PRESETS",
    "ChannelWiseDistillation",
    "FeatureMSE",
    "FreeKDLoss",
    "FrequencyL1",
    "LayerwiseLoss",
    "MaskedGenerativeDistillation",
    "build_loss",
    "loss_class",
    "loss_names",
    "register_loss",
]
