"""Distillation losses: FreeKD and (later) the baselines it is compared with."""

from .freekd import PRESETS, FreeKDLoss

__all__ = ["PRESETS", "FreeKDLoss"]
