"""COCO-format object detection: an image folder plus a COCO "instances" JSON file.

Works with any such data set (COCO 2017 itself, or one written by
:func:`freekd.data.digits.write_coco`, Roboflow/CVAT exports, ...). The JSON is parsed directly
so that every malformed entry is reported with the file, the key, the image or annotation id and
the fix; pycocotools is not needed to load the data (evaluation reads ``annotation_file`` with
it, see :meth:`CocoDetection.coco`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .._checks import preview
from ._image import load_image

__all__ = ["CocoDetection"]

logger = logging.getLogger("freekd")

_REQUIRED_KEYS = ("images", "annotations", "categories")


def _as_int(value: Any) -> int | None:
    """``value`` as an int when it is one (an integral float counts), else ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


class CocoDetection(Dataset):
    """Detection data set from a COCO-format instances JSON and a folder of images.

    Args:
        image_dir: folder holding the files named by ``images[*].file_name`` (relative paths
            with sub-folders are allowed).
        annotation_file: the instances JSON (``images``, ``annotations``, ``categories``).
        transforms: optional joint transform ``(image, target) -> (image, target)``
            (see :mod:`freekd.data.transforms`).
        category_ids: COCO category ids to use, in label order (labels ``1..K``); annotations
            of other categories are left out. ``None``: all categories, sorted by id (COCO
            2017's 80 ids in 1..90 become labels 1..80).
        skip_crowd: leave ``iscrowd=1`` annotations out of the targets (the usual training
            choice; COCO evaluation reads them from ``annotation_file`` itself).
        skip_empty: leave out images without any (kept) annotation (the usual training
            choice; keep them for evaluation).
        check_files: check at construction that every image file exists (otherwise a missing
            file raises when its item is read).
        min_box_size: boxes (after clipping to the image) whose width or height is at most
            this many pixels are dropped; their number is ``num_degenerate``.

    Items: ``(image, target)`` with ``image: FloatTensor [3, H, W]`` in ``[0, 1]`` and
    ``target = dict(boxes=FloatTensor [K, 4] xyxy pixels, labels=Int64Tensor [K] in 1..K,
    image_id=int (the COCO id), area=FloatTensor [K], iscrowd=Int64Tensor [K])``.

    Attributes: ``num_classes`` (K, background excluded), ``class_names`` (K names),
    ``label_to_category_id`` / ``category_id_to_label`` (for writing COCO results),
    ``image_ids`` (COCO ids in item order: sorted), ``annotation_file``, ``image_dir``,
    ``num_degenerate``, ``num_crowd_skipped``, ``num_empty_skipped``.

    Errors: ``FileNotFoundError`` for a missing JSON, image folder or image file;
    ``ValueError`` for invalid JSON, missing keys, malformed entries, duplicate ids, annotations
    referring to unknown image or category ids, an unreadable image, an image whose size
    differs from its JSON entry, and an empty data set. Messages name the file, the entry and
    the fix.
    """

    def __init__(
        self,
        image_dir: str | os.PathLike,
        annotation_file: str | os.PathLike,
        transforms: Callable[[torch.Tensor, dict[str, Any]], tuple[torch.Tensor, Any]]
        | None = None,
        category_ids: Sequence[int] | None = None,
        skip_crowd: bool = True,
        skip_empty: bool = False,
        check_files: bool = False,
        min_box_size: float = 1.0,
    ) -> None:
        self.image_dir = Path(image_dir)
        self.annotation_file = Path(annotation_file)
        self.transforms = transforms
        self.skip_crowd, self.skip_empty = bool(skip_crowd), bool(skip_empty)
        self.min_box_size = float(min_box_size)
        if not self.annotation_file.is_file():
            raise FileNotFoundError(
                f"COCO annotation file not found: {self.annotation_file}; pass the path of the "
                "instances JSON (e.g. annotations/instances_val2017.json)"
            )
        if not self.image_dir.is_dir():
            raise FileNotFoundError(
                f"COCO image folder not found: {self.image_dir}; pass the folder that holds the "
                f"images named in {self.annotation_file.name}"
            )
        data = self._read_json()
        categories = self._parse_categories(data["categories"])
        self._set_labels(categories, category_ids)
        images = self._parse_images(data["images"])
        per_image = self._parse_annotations(data["annotations"], images, categories)

        self.num_empty_skipped = 0
        ids = sorted(images)
        if self.skip_empty:
            kept = [image_id for image_id in ids if per_image[image_id]]
            self.num_empty_skipped = len(ids) - len(kept)
            ids = kept
        if not ids:
            reason = (
                "none of its images has an annotation of the selected categories (skip_empty=True)"
                if images
                else "its 'images' list is empty"
            )
            raise ValueError(
                f"{self.annotation_file}: the data set is empty: {reason}; check the file "
                "(and category_ids / skip_empty)"
            )
        self.image_ids: list[int] = ids
        self._images = images
        self._targets = {image_id: self._pack(per_image[image_id]) for image_id in ids}
        if self.num_degenerate:
            logger.warning(
                "%s: dropped %d degenerate boxes (width or height <= %g px after clipping to "
                "the image)",
                self.annotation_file,
                self.num_degenerate,
                self.min_box_size,
            )
        if check_files:
            self.check_files()

    # ------------------------------------------------------------------------------ parsing

    def _fail(self, message: str) -> ValueError:
        return ValueError(f"{self.annotation_file}: {message}")

    def _read_json(self) -> dict[str, Any]:
        try:
            with open(self.annotation_file, encoding="utf-8") as handle:
                data = json.load(handle)
        except json.JSONDecodeError as error:
            raise self._fail(
                f"not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}); "
                "the file is truncated or not a COCO instances file: re-export or re-download it"
            ) from error
        except UnicodeDecodeError as error:
            raise self._fail(f"not a UTF-8 text file ({error}); pass the instances JSON") from error
        if not isinstance(data, dict):
            raise self._fail(
                f"the top level is a JSON {type(data).__name__}, not an object; a COCO "
                "instances file is an object with the lists " + ", ".join(map(repr, _REQUIRED_KEYS))
            )
        missing = [key for key in _REQUIRED_KEYS if key not in data]
        if missing:
            raise self._fail(
                f"missing top-level key(s) {missing}; a COCO instances file needs the lists "
                + ", ".join(map(repr, _REQUIRED_KEYS))
                + " (an image-info file without annotations cannot be used for training)"
            )
        for key in _REQUIRED_KEYS:
            if not isinstance(data[key], list):
                raise self._fail(
                    f"top-level key {key!r} must be a list, got {type(data[key]).__name__}"
                )
        return data

    def _parse_categories(self, entries: list[Any]) -> dict[int, str]:
        categories: dict[int, str] = {}
        for position, entry in enumerate(entries):
            if not isinstance(entry, dict) or "id" not in entry or "name" not in entry:
                raise self._fail(
                    f"categories[{position}] must be an object with 'id' and 'name', got "
                    f"{entry!r:.80}"
                )
            category_id = _as_int(entry["id"])
            if category_id is None:
                raise self._fail(f"categories[{position}] has a non-integer id {entry['id']!r}")
            if category_id in categories:
                raise self._fail(
                    f"category id {category_id} is listed twice (categories[{position}]); "
                    "category ids must be unique"
                )
            categories[category_id] = str(entry["name"])
        if not categories:
            raise self._fail("the 'categories' list is empty; list the object classes there")
        return categories

    def _set_labels(self, categories: dict[int, str], category_ids: Sequence[int] | None) -> None:
        if category_ids is None:
            used = sorted(categories)
        else:
            used = [int(category_id) for category_id in category_ids]
            unknown = [category_id for category_id in used if category_id not in categories]
            if unknown:
                raise ValueError(
                    f"category_ids {unknown} are not in the 'categories' of "
                    f"{self.annotation_file} (ids there: {preview(sorted(categories))})"
                )
            if len(set(used)) != len(used):
                raise ValueError(f"category_ids has repeated ids: {used}")
            if not used:
                raise ValueError("category_ids is empty; pass None to use all categories")
        self.category_id_to_label: dict[int, int] = {
            category_id: label for label, category_id in enumerate(used, start=1)
        }
        self.label_to_category_id: dict[int, int] = {
            label: category_id for category_id, label in self.category_id_to_label.items()
        }
        self.class_names: tuple[str, ...] = tuple(categories[category_id] for category_id in used)
        self.num_classes = len(used)

    def _parse_images(self, entries: list[Any]) -> dict[int, dict[str, Any]]:
        images: dict[int, dict[str, Any]] = {}
        for position, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise self._fail(f"images[{position}] must be an object, got {entry!r:.80}")
            for key in ("id", "file_name"):
                if key not in entry:
                    raise self._fail(
                        f"images[{position}] has no {key!r} (every image entry needs 'id' and "
                        "'file_name')"
                    )
            image_id = _as_int(entry["id"])
            if image_id is None:
                raise self._fail(
                    f"images[{position}] has a non-integer id {entry['id']!r}; COCO image ids "
                    "are integers"
                )
            if image_id in images:
                raise self._fail(
                    f"image id {image_id} is listed twice (images[{position}], file "
                    f"{entry['file_name']!r}); image ids must be unique"
                )
            info = {"id": image_id, "file_name": str(entry["file_name"])}
            for key in ("width", "height"):
                if key in entry:
                    value = _as_int(entry[key])
                    if value is None or value < 1:
                        raise self._fail(
                            f"image id {image_id} ({entry['file_name']!r}) has an invalid "
                            f"{key} {entry[key]!r}"
                        )
                    info[key] = value
            images[image_id] = info
        return images

    def _parse_annotations(
        self,
        entries: list[Any],
        images: dict[int, dict[str, Any]],
        categories: dict[int, str],
    ) -> dict[int, list[tuple[float, float, float, float, int, float, int]]]:
        per_image: dict[int, list[tuple[float, float, float, float, int, float, int]]] = {
            image_id: [] for image_id in images
        }
        unknown_images: list[str] = []
        unknown_categories: list[str] = []
        self.num_degenerate = self.num_crowd_skipped = 0
        for position, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise self._fail(f"annotations[{position}] must be an object, got {entry!r:.80}")
            name = f"annotations[{position}]" + (f" (id {entry['id']})" if "id" in entry else "")
            for key in ("image_id", "category_id", "bbox"):
                if key not in entry:
                    raise self._fail(
                        f"{name} has no {key!r}; every annotation needs 'image_id', "
                        "'category_id' and 'bbox' ([x, y, width, height])"
                    )
            image_id, category_id = _as_int(entry["image_id"]), _as_int(entry["category_id"])
            if image_id is None or image_id not in images:
                unknown_images.append(f"{name} -> image_id {entry['image_id']!r}")
                continue
            if category_id is None or category_id not in categories:
                unknown_categories.append(f"{name} -> category_id {entry['category_id']!r}")
                continue
            box = entry["bbox"]
            if (
                not isinstance(box, list)
                or len(box) != 4
                or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                    for v in box
                )
            ):
                raise self._fail(
                    f"{name} (image id {image_id}) has an invalid bbox {box!r:.80}; it must be "
                    "[x, y, width, height] with 4 finite numbers"
                )
            if category_id not in self.category_id_to_label:
                continue
            crowd = int(bool(entry.get("iscrowd", 0)))
            if crowd and self.skip_crowd:
                self.num_crowd_skipped += 1
                continue
            x, y, width, height = (float(v) for v in box)
            x0, y0, x1, y1 = x, y, x + width, y + height
            info = images[image_id]
            x0, y0 = max(x0, 0.0), max(y0, 0.0)
            if "width" in info:
                x1 = min(x1, float(info["width"]))
            if "height" in info:
                y1 = min(y1, float(info["height"]))
            if x1 - x0 <= self.min_box_size or y1 - y0 <= self.min_box_size:
                self.num_degenerate += 1
                continue
            area = entry.get("area", width * height)
            area = float(area) if isinstance(area, (int, float)) else width * height
            label = self.category_id_to_label[category_id]
            per_image[image_id].append((x0, y0, x1, y1, label, area, crowd))
        if unknown_images:
            raise self._fail(
                f"{len(unknown_images)} annotation(s) refer to image ids that are not in "
                f"'images': {preview(unknown_images)}; add the image entries or remove those "
                "annotations"
            )
        if unknown_categories:
            raise self._fail(
                f"{len(unknown_categories)} annotation(s) refer to category ids that are not in "
                f"'categories' (ids there: {preview(sorted(categories))}): "
                f"{preview(unknown_categories)}; add the categories or fix the category_id"
            )
        return per_image

    @staticmethod
    def _pack(rows: list[tuple[float, float, float, float, int, float, int]]) -> dict[str, Any]:
        table = np.asarray(rows, dtype=np.float64).reshape(-1, 7)
        return {
            "boxes": table[:, :4].astype(np.float32),
            "labels": table[:, 4].astype(np.int64),
            "area": table[:, 5].astype(np.float32),
            "iscrowd": table[:, 6].astype(np.int64),
        }

    # ------------------------------------------------------------------------------ access

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_info(self, index: int) -> dict[str, Any]:
        """The JSON entry of item ``index``: ``id``, ``file_name`` (and ``width``, ``height``
        when the file gives them)."""
        return dict(self._images[self.image_ids[index]])

    def image_path(self, index: int) -> Path:
        return self.image_dir / self._images[self.image_ids[index]]["file_name"]

    def check_files(self) -> None:
        """Raise ``FileNotFoundError`` listing the image files that are missing."""
        missing = [
            f"{info['file_name']} (image id {image_id})"
            for image_id in self.image_ids
            if not (self.image_dir / (info := self._images[image_id])["file_name"]).is_file()
        ]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {len(self)} images listed in {self.annotation_file} are "
                f"missing from {self.image_dir}: {preview(missing)}; check image_dir or remove "
                "their entries"
            )

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        image_id = self.image_ids[index]
        info = self._images[image_id]
        path = self.image_dir / info["file_name"]
        if not path.is_file():
            raise FileNotFoundError(
                f"image {info['file_name']!r} (image id {image_id}) listed in "
                f"{self.annotation_file} not found at {path}; check image_dir or remove the entry"
            )
        image = load_image(path)
        height, width = image.shape[-2:]
        expected = (info.get("height", height), info.get("width", width))
        if expected != (height, width):
            raise ValueError(
                f"image {path} (image id {image_id}) is {width}x{height} pixels but "
                f"{self.annotation_file.name} says {expected[1]}x{expected[0]}; the boxes would "
                "be misplaced: fix the width/height in the JSON or use the original image"
            )
        packed = self._targets[image_id]
        target = {
            "boxes": torch.from_numpy(packed["boxes"].copy()),
            "labels": torch.from_numpy(packed["labels"].copy()),
            "image_id": image_id,
            "area": torch.from_numpy(packed["area"].copy()),
            "iscrowd": torch.from_numpy(packed["iscrowd"].copy()),
        }
        if "width" not in info or "height" not in info:
            target["boxes"][:, 0::2].clamp_(0, width)
            target["boxes"][:, 1::2].clamp_(0, height)
        if self.transforms is not None:
            return self.transforms(image, target)
        return image, target

    def coco(self) -> Any:
        """``pycocotools.coco.COCO`` of ``annotation_file`` (for COCO evaluation; imports
        pycocotools, which must be installed)."""
        if getattr(self, "_coco", None) is None:
            from pycocotools.coco import COCO

            self._coco = COCO(str(self.annotation_file))
        return self._coco

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_coco", None)  # not sent to DataLoader workers
        return state

    def __repr__(self) -> str:
        return (
            f"CocoDetection({len(self)} images, {self.num_classes} classes, "
            f"annotation_file={str(self.annotation_file)!r})"
        )
