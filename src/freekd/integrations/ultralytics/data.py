"""Write detection data sets in the YOLO format that Ultralytics trains on.

:func:`write_yolo_dataset` writes any data set with freekd's detection item convention
(``(image FloatTensor [3, H, W] in [0, 1], {"boxes": [K, 4] xyxy pixels, "labels": [K] in
1..C})`` and ``class_names``) as ``images/<split>/NNNNNN.png`` and ``labels/<split>/NNNNNN.txt``
(one ``class cx cy w h`` line per box, class ``label - 1``, coordinates normalized to ``[0, 1]``).
:func:`write_yolo_digits` writes the built-in digit scenes (:class:`freekd.data.DigitScenes`,
generated offline) with a ``data.yaml`` that ``YOLO(...).train(data=...)`` reads.

Needs the pipeline extra (``freekd[pipeline]``: Pillow, scikit-learn for the digits), not
Ultralytics itself.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..._io import atomic_write

__all__ = ["write_yolo_dataset", "write_yolo_digits", "yolo_label_lines"]


def yolo_label_lines(boxes: torch.Tensor, labels: torch.Tensor, size: tuple[int, int]) -> list[str]:
    """YOLO label lines for one image.

    Args:
        boxes: ``[K, 4]`` ``x0, y0, x1, y1`` in pixels.
        labels: ``[K]`` class labels ``1..C`` (freekd's detection convention; YOLO classes are
            ``label - 1``).
        size: ``(height, width)`` of the image in pixels.

    Returns:
        ``K`` lines ``"class cx cy w h"``, coordinates normalized to ``[0, 1]``.

    Example:
        >>> yolo_label_lines(torch.tensor([[0.0, 0.0, 32.0, 16.0]]), torch.tensor([3]), (64, 64))
        ['2 0.250000 0.125000 0.500000 0.250000']
    """
    height, width = size
    lines = []
    boxes, labels = boxes.reshape(-1, 4), labels.reshape(-1)
    if len(boxes) != len(labels):
        raise ValueError(f"{len(boxes)} boxes but {len(labels)} labels: give one label per box")
    for (x0, y0, x1, y1), label in zip(boxes.tolist(), labels.tolist(), strict=True):
        if int(label) < 1:
            raise ValueError(
                f"label {int(label)} is not a class: freekd detection labels start at 1 (label 0 "
                f"is the implicit background)"
            )
        x0, x1 = max(0.0, x0), min(float(width), x1)
        y0, y1 = max(0.0, y0), min(float(height), y1)
        if x1 <= x0 or y1 <= y0:
            continue  # a box outside the image, or empty: nothing to learn from
        lines.append(
            f"{int(label) - 1} {(x0 + x1) / 2 / width:.6f} {(y0 + y1) / 2 / height:.6f} "
            f"{(x1 - x0) / width:.6f} {(y1 - y0) / height:.6f}"
        )
    return lines


def write_yolo_dataset(
    dataset: Dataset,
    folder: str | os.PathLike,
    split: str,
    indices: Iterable[int] | None = None,
) -> Path:
    """Write a detection data set's items as ``folder/images/<split>/*.png`` and
    ``folder/labels/<split>/*.txt`` (the YOLO layout); returns the image folder.

    ``dataset`` items are ``(image FloatTensor [3, H, W] in [0, 1], target)`` with
    ``target["boxes"]: [K, 4]`` xyxy pixels and ``target["labels"]: [K]`` in ``1..C``; an image
    without boxes gets an empty label file (a background image for Ultralytics).
    """
    from ...data._image import save_image

    folder = Path(folder)
    image_dir, label_dir = folder / "images" / split, folder / "labels" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    chosen = range(len(dataset)) if indices is None else indices  # type: ignore[arg-type]
    for index in chosen:
        image, target = dataset[int(index)]
        if not isinstance(target, dict) or "boxes" not in target or "labels" not in target:
            raise TypeError(
                f"write_yolo_dataset: item {index} is not a detection pair (image, dict with "
                f"boxes and labels); build the data set for detection"
            )
        size = (int(image.shape[-2]), int(image.shape[-1]))
        lines = yolo_label_lines(target["boxes"], target["labels"], size)
        save_image(image, image_dir / f"{int(index):06d}.png")
        text = "".join(line + "\n" for line in lines)
        label_file = label_dir / f"{int(index):06d}.txt"
        atomic_write(label_file, lambda path, text=text: Path(path).write_text(text))
    return image_dir


def write_data_yaml(folder: str | os.PathLike, class_names: Sequence[str]) -> Path:
    """``folder/data.yaml`` naming ``images/train``, ``images/val`` and the classes."""
    folder = Path(folder).resolve()
    names = "".join(f"  {index}: {name!r}\n" for index, name in enumerate(class_names))
    text = f"path: {str(folder)!r}\ntrain: images/train\nval: images/val\nnames:\n{names}"
    return atomic_write(folder / "data.yaml", lambda path: Path(path).write_text(text))


def write_yolo_digits(
    folder: str | os.PathLike,
    size: int = 128,
    train_length: int = 64,
    val_length: int = 16,
    seed: int = 0,
    **scene_options: object,
) -> Path:
    """Write the built-in digit scenes (``freekd.data.DigitScenes``, task ``"detection"``, 10
    classes ``"0"``..``"9"``) as a YOLO data set under ``folder``; returns ``folder/data.yaml``.

    Args:
        folder: output folder (created); ``images/{train,val}``, ``labels/{train,val}`` and
            ``data.yaml`` are written into it.
        size: side of the square images in pixels.
        train_length, val_length: number of scenes per split (the splits draw from disjoint
            digit samples).
        seed: scene ``i`` of a split depends only on ``(seed, split, i)``.
        scene_options: further :class:`~freekd.data.DigitScenes` settings (``noise``,
            ``clutter``, ``max_digits``, ...).
    """
    from ...data.digits import DigitScenes

    for split, length in (("train", train_length), ("val", val_length)):
        scenes = DigitScenes(
            split, "detection", size=size, length=length, seed=seed, **scene_options
        )
        write_yolo_dataset(scenes, folder, split)
    return write_data_yaml(folder, DigitScenes("train", "detection", size=size).class_names)
