"""Distillation losses: FreeKD and the baselines it is compared with (one calling convention:
``loss(student_feats, teacher_feats)`` on lists of ``[N, C, H, W]`` tensors)."""

from .baselines import (
    BASELINES,
    ChannelWiseDistillation,
    FeatureMSE,
    FrequencyL1,
    MaskedGenerativeDistillation,
)
from .freekd import PRESETS, FreeKDLoss

__all__ = [
    "BASELINES",
    "PRESETS",
    "ChannelWiseDistillation",
    "FeatureMSE",
    "FreeKDLoss",
    "FrequencyL1",
    "MaskedGenerativeDistillation",
]
