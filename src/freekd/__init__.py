"""freekd: knowledge distillation of dense-prediction models in the wavelet domain (FreeKD).

The core (this package's top level) needs only PyTorch.
"""

from .losses import FreeKDLoss
from .prompts import FrequencyPrompt
from .relation import RelationalGate
from .wavelets import DWT2d, IDWT2d, auto_levels, dwt2, idwt2

__version__ = "0.1.0"

__all__ = [
    "DWT2d",
    "FreeKDLoss",
    "FrequencyPrompt",
    "IDWT2d",
    "RelationalGate",
    "__version__",
    "auto_levels",
    "dwt2",
    "idwt2",
]
