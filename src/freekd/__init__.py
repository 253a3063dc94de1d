"""freekd: knowledge distillation of dense-prediction models in the wavelet domain (FreeKD).

The core (this package's top level) needs only PyTorch (and safetensors for files): the
transform (:func:`dwt2`), the prompts and relational weight, the losses (FreeKD and the
baselines, one :class:`LayerwiseLoss` base and a registry), the hooks that tap a model's
features (:class:`FeatureTaps`), the two stages (:class:`PromptTuner`, :class:`Distiller`) and
the weight files (:func:`load_weights`, :func:`export_student`). The batteries-included pipeline
(``freekd.pipeline``, ``freekd.models``, ``freekd.data``, ``freekd.train``, the ``freekd``
command) builds on it with Lightning, torchvision, smp and timm.

Example:
    >>> import torch
    >>> import freekd
    >>> loss = freekd.FreeKDLoss.preset("paper", channels=[8])
    >>> student, teacher = [torch.randn(2, 8, 16, 16)], [torch.randn(2, 8, 16, 16)]
    >>> loss(student, teacher).shape
    torch.Size([])
"""

from ._version import __version__
from .calibration import calibrate_weight
from .checkpoints import export_student, load_weights
from .distill import Distiller, NonFiniteError, OutputLoss
from .losses import (
    ChannelWiseDistillation,
    FeatureMSE,
    FreeKDLoss,
    FrequencyL1,
    LayerwiseLoss,
    MaskedGenerativeDistillation,
    build_loss,
    loss_names,
    register_loss,
)
from .prompts import FrequencyPrompt
from .relation import RelationalGate
from .taps import FeatureTaps, TapError, probe_features
from .tuning import PromptTuner
from .wavelets import DWT2d, IDWT2d, auto_levels, dwt2, idwt2

__all__ = [
    "ChannelWiseDistillation",
    "DWT2d",
    "Distiller",
    "FeatureMSE",
    "FeatureTaps",
    "FreeKDLoss",
    "FrequencyL1",
    "FrequencyPrompt",
    "IDWT2d",
    "LayerwiseLoss",
    "MaskedGenerativeDistillation",
    "NonFiniteError",
    "OutputLoss",
    "PromptTuner",
    "RelationalGate",
    "TapError",
    "__version__",
    "auto_levels",
    "build_loss",
    "calibrate_weight",
    "dwt2",
    "export_student",
    "idwt2",
    "load_weights",
    "loss_names",
    "probe_features",
    "register_loss",
]
