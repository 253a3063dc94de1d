"""Write a data set to disk: a COCO-format detection folder or an "images + masks" folder.

Used to turn the built-in ``digits`` scenes into files that the real loaders
(:class:`~freekd.data.coco.CocoDetection`, :class:`~freekd.data.segmentation.SegmentationFolder`)
read, and to export any data set with the same item conventions.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import Dataset

from .._io import atomic_write
from ._image import save_image, save_mask

__all__ = ["CocoPaths", "SegmentationPaths", "write_coco", "write_segmentation_folder"]


class CocoPaths(NamedTuple):
    image_dir: Path
    annotation_file: Path


class SegmentationPaths(NamedTuple):
    image_dir: Path
    mask_dir: Path


def _indices(dataset: Dataset, indices: Iterable[int] | None) -> list[int]:
    return list(range(len(dataset))) if indices is None else [int(i) for i in indices]  # type: ignore[arg-type]


def write_coco(
    dataset: Dataset,
    folder: str | os.PathLike,
    image_format: str = "png",
    indices: Iterable[int] | None = None,
    overwrite: bool = False,
) -> CocoPaths:
    """Write a detection data set as ``folder/images/NNNNNN.png`` plus
    ``folder/annotations.json`` (COCO instances format).

    Args:
        dataset: items ``(image FloatTensor [3, H, W] in [0, 1], target dict)`` with ``boxes``
            (xyxy pixels) and ``labels`` (``1..K``), optionally ``image_id``, ``area``,
            ``iscrowd``; and ``class_names`` (``K`` names). Category ids are the labels, or
            ``dataset.label_to_category_id`` when it has one. Items are written as the data set
            returns them (with its transforms; leave out ``Normalize``).
        folder: output folder (created).
        image_format: ``"png"`` (lossless) or ``"jpg"``.
        indices: the items to write (default all).
        overwrite: replace an existing ``annotations.json`` (otherwise ``FileExistsError``).

    Returns ``CocoPaths(image_dir, annotation_file)``. Annotations get ``bbox = [x, y, w, h]``,
    ``area`` (the target's ``area`` when given, else ``w * h``), ``iscrowd`` and ids from 1.
    """
    if image_format not in ("png", "jpg"):
        raise ValueError(f"write_coco: image_format must be 'png' or 'jpg', got {image_format!r}")
    folder = Path(folder)
    image_dir, annotation_file = folder / "images", folder / "annotations.json"
    if annotation_file.exists() and not overwrite:
        raise FileExistsError(
            f"write_coco: {annotation_file} exists; pass overwrite=True or another folder"
        )
    class_names = getattr(dataset, "class_names", None)
    if class_names is None:
        raise ValueError("write_coco: the dataset needs class_names (one name per label 1..K)")
    label_to_category = getattr(dataset, "label_to_category_id", None) or {
        label: label for label in range(1, len(class_names) + 1)
    }
    image_dir.mkdir(parents=True, exist_ok=True)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    seen_ids: set[int] = set()
    for index in _indices(dataset, indices):
        image, target = dataset[index]
        if not isinstance(target, dict) or "boxes" not in target or "labels" not in target:
            raise TypeError(
                f"write_coco: item {index} is not a detection pair (image, dict with boxes and "
                "labels); build the dataset for detection (e.g. DigitScenes(task='detection'))"
            )
        image_id = int(target.get("image_id", index))
        if image_id in seen_ids:
            raise ValueError(f"write_coco: image_id {image_id} occurs twice (item {index})")
        seen_ids.add(image_id)
        file_name = f"{index:06d}.{image_format}"
        save_image(image, image_dir / file_name)
        height, width = int(image.shape[-2]), int(image.shape[-1])
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        boxes = target["boxes"].reshape(-1, 4).double()
        labels = target["labels"].reshape(-1)
        count = len(boxes)
        areas = target.get("area", (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
        crowd = target.get("iscrowd", torch.zeros(count, dtype=torch.int64))
        for k in range(count):
            x0, y0, x1, y1 = (float(v) for v in boxes[k])
            label = int(labels[k])
            if label not in label_to_category:
                raise ValueError(
                    f"write_coco: item {index} has label {label}, outside 1..{len(class_names)}"
                )
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(label_to_category[label]),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": float(areas[k]),
                    "iscrowd": int(crowd[k]),
                }
            )
    categories = [
        {"id": int(label_to_category[label]), "name": str(name), "supercategory": "object"}
        for label, name in enumerate(class_names, start=1)
    ]
    document = {
        "info": {"description": f"written by freekd.data.write_coco from {type(dataset).__name__}"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    text = json.dumps(document)
    atomic_write(annotation_file, lambda path: Path(path).write_text(text, encoding="utf-8"))
    return CocoPaths(image_dir, annotation_file)


def write_segmentation_folder(
    dataset: Dataset,
    folder: str | os.PathLike,
    indices: Iterable[int] | None = None,
) -> SegmentationPaths:
    """Write a segmentation data set as ``folder/images/NNNNNN.png`` (RGB) and
    ``folder/masks/NNNNNN.png`` (mode ``L``, pixel value = class id, 255 = ignore), the layout
    :class:`~freekd.data.segmentation.SegmentationFolder` reads.

    ``dataset`` items are ``(image FloatTensor [3, H, W] in [0, 1], mask Int64Tensor [H, W])``
    with values in ``0..255``. Returns ``SegmentationPaths(image_dir, mask_dir)``.
    """
    folder = Path(folder)
    image_dir, mask_dir = folder / "images", folder / "masks"
    image_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    for index in _indices(dataset, indices):
        image, mask = dataset[index]
        if not isinstance(mask, torch.Tensor) or mask.ndim != 2:
            raise TypeError(
                f"write_segmentation_folder: item {index} is not a segmentation pair "
                "(image, mask [H, W]); build the dataset for segmentation "
                "(e.g. DigitScenes(task='segmentation'))"
            )
        save_image(image, image_dir / f"{index:06d}.png")
        save_mask(mask, mask_dir / f"{index:06d}.png")
    return SegmentationPaths(image_dir, mask_dir)
