"""Shared by the tests: device and dtype fixtures, and the tiny models, task losses, batches and
distillers that several test modules build.

Helpers are plain functions and classes (import them: ``from tests.conftest import
TinySegmenter``); the fixtures wrap the ones a test takes as an argument.

- classification (``[N, 3, 32, 32]`` -> 4 logits): :class:`TinyNet`, :func:`task_loss`,
  :data:`EXAMPLE`, :func:`make_distiller` (teacher ``TinyNet(8)``, student ``TinyNet(4)``, the
  paper preset on ``layer1`` / ``layer2``);
- segmentation (``[N, 3, H, W]`` -> 3-class maps): :class:`TinySegmenter`,
  :func:`segmentation_loss`, :func:`fixed_batch`, :func:`trained_teacher`, :data:`TAPS`;
- loss inputs: :data:`SHAPES`, :func:`pyramid` (float64 features, fine to coarse),
  :func:`randomize_prompts`.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from freekd import FreeKDLoss
from freekd.distill import Distiller

DEVICES = ("cpu", *(("cuda",) if torch.cuda.is_available() else ()))
"""The devices the device fixture runs a test on: the CPU, and CUDA when present."""


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Each available device in turn (``cpu``; ``cuda`` when present)."""
    return torch.device(request.param)


@pytest.fixture(params=(torch.float32, torch.float64), ids=("float32", "float64"))
def dtype(request) -> torch.dtype:
    """float32 and float64 in turn."""
    return request.param


# ---------------------------------------------------------------------------- classification


class TinyNet(nn.Module):
    """``[N, 3, 32, 32]`` -> 4 logits; tapped stages ``layer1`` ``[N, w, 16, 16]`` and
    ``layer2`` ``[N, 2w, 8, 8]``; BatchNorm (buffers) and optional dropout (RNG in the step;
    ``dropout=None``: no dropout layer at all, as the DDP check script's model)."""

    def __init__(self, width: int, dropout: float | None = 0.0) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.layer1 = nn.Sequential(nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU())
        self.drop = nn.Identity() if dropout is None else nn.Dropout(dropout)
        self.head = nn.Linear(2 * width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.layer2(self.layer1(self.stem(x))).mean((2, 3))))


def task_loss(model: nn.Module, batch) -> torch.Tensor:
    """Cross entropy of ``model(images)`` against ``labels`` for a batch ``(images, labels)``."""
    images, labels = batch
    return F.cross_entropy(model(images), labels)


EXAMPLE = (torch.randn(2, 3, 32, 32), torch.zeros(2, dtype=torch.long))
"""An example batch for :class:`TinyNet` (sizes the Distiller's projections)."""


def make_distiller(
    seed: int = 0, dropout: float | None = 0.2, nonfinite: str = "raise"
) -> Distiller:
    """Teacher ``TinyNet(8)``, student ``TinyNet(4, dropout)`` (built after
    ``torch.manual_seed(seed)``), FreeKD's paper preset on ``layer1`` and ``layer2``."""
    torch.manual_seed(seed)
    teacher, student = TinyNet(8), TinyNet(4, dropout=dropout)
    return Distiller(
        teacher,
        student,
        ["layer1", "layer2"],
        ["layer1", "layer2"],
        {"freekd": FreeKDLoss.preset("paper", [8, 16])},
        task_loss,
        EXAMPLE,
        nonfinite=nonfinite,
    )


# ---------------------------------------------------------------------------- segmentation


class TinySegmenter(nn.Module):
    """Three conv stages (strides 1, 2, ``last_stride``) and a 1x1 classifier upsampled to the
    input; ``dropout`` before the last ReLU (``0``: none)."""

    def __init__(
        self,
        width: int = 8,
        classes: int = 3,
        last_stride: int = 2,
        in_channels: int = 3,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.stage2 = nn.Sequential(nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU())
        self.stage3 = nn.Sequential(
            nn.Conv2d(width, width, 3, stride=last_stride, padding=1),
            *([nn.Dropout(dropout)] if dropout else []),
            nn.ReLU(),
        )
        self.classifier = nn.Conv2d(width, classes, 1)

    def forward(self, x):
        features = self.stage3(self.stage2(self.stage1(x)))
        return F.interpolate(self.classifier(features), size=x.shape[-2:], mode="bilinear")


def segmentation_loss(model, batch):
    """Pixel cross entropy (label 255 ignored) for a batch ``(images, labels)``."""
    images, labels = batch
    return F.cross_entropy(model(images), labels, ignore_index=255)


def fixed_batch(seed=0, size=32):
    """Four ``[3, size, size]`` images and learnable pixel labels in ``0..2``."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(4, 3, size, size, generator=generator)
    labels = (images[:, 0] > 0).long() + (images[:, 1] > 0.5).long()  # learnable pixel labels
    return images, labels


def trained_teacher(width=16, steps=30, **options):
    """A :class:`TinySegmenter` (``options`` go to it) trained ``steps`` Adam steps on
    :func:`fixed_batch`, from ``torch.manual_seed(0)``."""
    torch.manual_seed(0)
    teacher = TinySegmenter(width, **options)
    batch = fixed_batch()
    optimizer = torch.optim.Adam(teacher.parameters(), lr=0.01)
    for _ in range(steps):
        optimizer.zero_grad()
        segmentation_loss(teacher, batch).backward()
        optimizer.step()
    return teacher


TAPS = ["stage2", "stage3"]
"""The distilled layers of :class:`TinySegmenter`."""


# ---------------------------------------------------------------------------- loss inputs

SHAPES = [(16, 24), (8, 12), (5, 7)]  # fine to coarse, odd sizes included


def pyramid(channels=6, batch=2, shapes=SHAPES, dtype=torch.float64, seed=0, grad=False, scale=1.0):
    """One ``[batch, channels, h, w]`` feature per shape (seeded), times ``scale``."""
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch, channels, h, w, generator=generator, dtype=dtype) * scale
        ).requires_grad_(grad)
        for h, w in shapes
    ]


def randomize_prompts(loss: FreeKDLoss, std: float = 0.5, seed: int = 1) -> None:
    """Seeded random prompt tokens (``std``), marked tuned."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for prompt in loss.prompts:
            prompt.tokens.copy_(torch.randn(prompt.tokens.shape, generator=generator) * std)
            prompt.mark_tuned()
