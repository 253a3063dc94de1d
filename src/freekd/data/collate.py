"""Collate functions for ``DataLoader(collate_fn=...)``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["detection_collate", "segmentation_collate"]


def detection_collate(
    batch: Sequence[tuple[torch.Tensor, dict[str, Any]]],
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """``[(image [3, H_i, W_i], target_i), ...] -> ([images], [targets])``: lists, since
    detection images may differ in size (torchvision detectors take lists)."""
    images = [item[0] for item in batch]
    targets = [item[1] for item in batch]
    return images, targets


def segmentation_collate(
    batch: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[(image [3, H, W], mask [H, W]), ...] -> (images [N, 3, H, W], masks [N, H, W])``.

    All items must share one size: crop or resize them in the dataset's transforms
    (``RandomCrop`` for training); otherwise ``ValueError`` lists the sizes found.
    """
    if len(batch) == 0:
        raise ValueError("segmentation_collate: the batch is empty")
    sizes = sorted({tuple(item[0].shape) for item in batch})
    mask_sizes = sorted({tuple(item[1].shape) for item in batch})
    if len(sizes) > 1 or len(mask_sizes) > 1:
        raise ValueError(
            f"segmentation_collate: images of different sizes in one batch (images {sizes}, "
            f"masks {mask_sizes}); add RandomCrop/Resize to the transforms, or use batch_size=1"
        )
    images = torch.stack([item[0] for item in batch])
    masks = torch.stack([item[1] for item in batch])
    if masks.shape[-2:] != images.shape[-2:]:
        raise ValueError(
            f"segmentation_collate: masks {tuple(masks.shape[-2:])} and images "
            f"{tuple(images.shape[-2:])} differ in size"
        )
    return images, masks
