"""freekd.data: data sets, joint transforms and collate functions for detection and segmentation.

- :class:`DigitScenes` (``"digits"``): built-in scenes of real handwritten digits, generated
  deterministically (detection or segmentation); :func:`write_coco` and
  :func:`write_segmentation_folder` write any data set to disk in the formats below.
- :class:`CocoDetection` (``"coco"``): any COCO-format folder (COCO 2017 included).
- :class:`SegmentationFolder` (``"segmentation-folder"``): images + PNG label masks.
- :class:`Cityscapes` (``"cityscapes"``): the official layout, 19 train ids.

Conventions: detection items are ``(image FloatTensor [3, H, W] in [0, 1], target dict)`` as in
torchvision's detection API (labels ``1..num_classes``); segmentation items are
``(image FloatTensor [3, H, W], mask Int64Tensor [H, W])`` with ``ignore_index=255``. Every
data set has ``num_classes`` and ``class_names``. Needs Pillow, scikit-learn (``digits``) and
torchvision; pycocotools only for :meth:`CocoDetection.coco`.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch.utils.data import Dataset

from .._checks import check_choice
from .coco import CocoDetection
from .collate import detection_collate, segmentation_collate
from .digits import DigitScene, DigitScenes, digit_sample_indices, load_digit_samples
from .segmentation import (
    CITYSCAPES_CLASS_NAMES,
    CITYSCAPES_ID_TO_TRAIN_ID,
    Cityscapes,
    SegmentationFolder,
    cityscapes_label_lut,
)
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Compose,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    RandomResizedScale,
    Resize,
    TorchvisionTransform,
    default_detection_transforms,
    default_segmentation_transforms,
)
from .writers import CocoPaths, SegmentationPaths, write_coco, write_segmentation_folder

__all__ = [
    "CITYSCAPES_CLASS_NAMES",
    "CITYSCAPES_ID_TO_TRAIN_ID",
    "DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Cityscapes",
    "CocoDetection",
    "CocoPaths",
    "Compose",
    "DigitScene",
    "DigitScenes",
    "Normalize",
    "RandomCrop",
    "RandomHorizontalFlip",
    "RandomResizedScale",
    "Resize",
    "SegmentationFolder",
    "SegmentationPaths",
    "TorchvisionTransform",
    "build_dataset",
    "cityscapes_label_lut",
    "default_detection_transforms",
    "default_segmentation_transforms",
    "detection_collate",
    "digit_sample_indices",
    "load_digit_samples",
    "segmentation_collate",
    "write_coco",
    "write_segmentation_folder",
]

DATASETS: dict[str, type[Dataset]] = {
    "digits": DigitScenes,
    "coco": CocoDetection,
    "segmentation-folder": SegmentationFolder,
    "cityscapes": Cityscapes,
}
"""Names accepted by :func:`build_dataset`."""


def build_dataset(name: str, **kwargs: Any) -> Dataset:
    """Build a data set by name: ``"digits"`` (:class:`DigitScenes`), ``"coco"``
    (:class:`CocoDetection`), ``"segmentation-folder"`` (:class:`SegmentationFolder`),
    ``"cityscapes"`` (:class:`Cityscapes`); ``kwargs`` go to its constructor.

    Raises ``ValueError`` for an unknown name (listing the valid ones) and ``TypeError`` for
    arguments the data set does not take (listing those it does).
    """
    check_choice("dataset", name, sorted(DATASETS))
    cls = DATASETS[name]
    signature = inspect.signature(cls)
    try:
        signature.bind(**kwargs)
    except TypeError as error:
        accepted = [p for p in signature.parameters if p not in ("self",)]
        raise TypeError(
            f"dataset {name!r} ({cls.__name__}): {error}; it takes {accepted}"
        ) from None
    return cls(**kwargs)
