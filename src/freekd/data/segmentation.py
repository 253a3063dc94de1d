"""Semantic segmentation data sets: a generic "images + PNG label masks" folder and Cityscapes.

Items are ``(image, mask)`` with ``image: FloatTensor [3, H, W]`` in ``[0, 1]`` (add
``Normalize`` to the transforms, as ``default_segmentation_transforms`` does, for ImageNet
normalization) and ``mask: Int64Tensor [H, W]`` holding class ids ``0..C-1`` and
``ignore_index`` (255) for pixels that are not scored.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .._checks import preview
from ._image import load_image, load_mask

__all__ = [
    "CITYSCAPES_CLASS_NAMES",
    "CITYSCAPES_ID_TO_TRAIN_ID",
    "Cityscapes",
    "SegmentationFolder",
    "cityscapes_label_lut",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

Transforms = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _check_mask(
    mask: torch.Tensor,
    image: torch.Tensor,
    num_classes: int,
    ignore_index: int,
    image_path: Path,
    mask_path: Path,
) -> None:
    """Raise ``ValueError`` when the mask's size differs from the image's or when it holds
    values other than ``0..num_classes-1`` and ``ignore_index``."""
    if tuple(mask.shape) != tuple(image.shape[-2:]):
        raise ValueError(
            f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} pixels but image {image_path} "
            f"is {image.shape[2]}x{image.shape[1]}; they must have the same size"
        )
    values = torch.unique(mask)
    invalid = values[((values < 0) | (values >= num_classes)) & (values != ignore_index)]
    if invalid.numel():
        raise ValueError(
            f"mask {mask_path} has values {invalid.tolist()[:10]} outside the class ids "
            f"0..{num_classes - 1} and ignore_index {ignore_index}; set num_classes to cover them, "
            f"or map them to {ignore_index} (pixel values must be class ids, not colors)"
        )


class SegmentationFolder(Dataset):
    """Images with PNG label masks of the same name: ``root/images/NAME.(png|jpg|jpeg)`` and
    ``root/masks/NAME.png`` (mask pixel values = class ids; mode ``L`` or palette ``P``).

    Args:
        root: the data set folder.
        images, masks: sub-folder names (or absolute paths) of the images and the masks.
        num_classes: number of classes ``C`` (mask values ``0..C-1``; others must be
            ``ignore_index``).
        class_names: ``C`` names (default ``"class_0"``, ...).
        transforms: optional joint transform ``(image, mask) -> (image, mask)``.
        ignore_index: mask value of unlabelled pixels.
        names: use only these names (file names without suffix): a list, or a text file with
            one name per line (e.g. Pascal VOC's ``ImageSets/Segmentation/train.txt``). Without
            it every image must have a mask and every mask an image.

    Errors (``FileNotFoundError`` / ``ValueError``, naming the files): missing folders, no
    images, unpaired images or masks, two images with one name, and on access: unreadable
    files, a mask whose size differs from its image, mask values outside the classes.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        images: str = "images",
        masks: str = "masks",
        *,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        transforms: Transforms | None = None,
        ignore_index: int = 255,
        names: Sequence[str] | str | os.PathLike | None = None,
    ) -> None:
        self.root = Path(root)
        self.image_dir, self.mask_dir = self.root / images, self.root / masks
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"SegmentationFolder: num_classes must be >= 1, got {num_classes!r}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(
                f"SegmentationFolder: ignore_index {ignore_index} is one of the class ids "
                f"0..{num_classes - 1}; use a value outside them (255)"
            )
        self.num_classes, self.ignore_index = num_classes, int(ignore_index)
        if class_names is None:
            self.class_names: tuple[str, ...] = tuple(f"class_{i}" for i in range(num_classes))
        else:
            self.class_names = tuple(class_names)
            if len(self.class_names) != num_classes:
                raise ValueError(
                    f"SegmentationFolder: {len(self.class_names)} class_names for "
                    f"num_classes={num_classes}"
                )
        self.transforms = transforms
        for folder, what in (
            (self.root, "data set"),
            (self.image_dir, "image"),
            (self.mask_dir, "mask"),
        ):
            if not folder.is_dir():
                raise FileNotFoundError(
                    f"SegmentationFolder: {what} folder not found: {folder}; expected "
                    f"{self.root}/{images}/NAME.png|jpg and {self.root}/{masks}/NAME.png"
                )
        image_files = self._image_files()
        mask_files = {
            path.stem: path
            for path in self.mask_dir.iterdir()
            if path.is_file() and path.suffix.lower() == ".png"
        }
        if names is None:
            if not image_files:
                raise ValueError(
                    f"SegmentationFolder: no images ({'/'.join(IMAGE_SUFFIXES)}) in "
                    f"{self.image_dir}: the data set is empty; put the images there or fix root"
                )
            no_mask = sorted(set(image_files) - set(mask_files))
            no_image = sorted(set(mask_files) - set(image_files))
            if no_mask or no_image:
                problems = []
                if no_mask:
                    problems.append(
                        f"{len(no_mask)} image(s) without a mask {self.mask_dir}/NAME.png: "
                        + preview([image_files[name].name for name in no_mask])
                    )
                if no_image:
                    problems.append(
                        f"{len(no_image)} mask(s) without an image in {self.image_dir}: "
                        + preview([mask_files[name].name for name in no_image])
                    )
                raise ValueError(
                    "SegmentationFolder: unpaired files: "
                    + "; ".join(problems)
                    + "; add the missing files, or pass names= to select the pairs to use"
                )
            selected = sorted(image_files)
        else:
            selected = self._read_names(names)
            missing = [
                name for name in selected if name not in image_files or name not in mask_files
            ]
            if missing:
                raise ValueError(
                    f"SegmentationFolder: {len(missing)} listed name(s) lack an image in "
                    f"{self.image_dir} or a mask in {self.mask_dir}: {preview(missing)}"
                )
        self.names: list[str] = selected
        self._pairs = [(image_files[name], mask_files[name]) for name in selected]

    def _image_files(self) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for path in sorted(self.image_dir.iterdir()):
            if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if path.stem in found:
                raise ValueError(
                    f"SegmentationFolder: two images share the name {path.stem!r}: "
                    f"{found[path.stem].name} and {path.name} in {self.image_dir}; keep one"
                )
            found[path.stem] = path
        return found

    @staticmethod
    def _read_names(names: Sequence[str] | str | os.PathLike) -> list[str]:
        if isinstance(names, (str, os.PathLike)):
            path = Path(names)
            if not path.is_file():
                raise FileNotFoundError(f"SegmentationFolder: names file not found: {path}")
            listed = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        else:
            listed = [str(name) for name in names]
        if not listed:
            raise ValueError("SegmentationFolder: names is empty")
        return listed

    def __len__(self) -> int:
        return len(self._pairs)

    def paths(self, index: int) -> tuple[Path, Path]:
        """``(image file, mask file)`` of item ``index``."""
        return self._pairs[index]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, mask_path = self._pairs[index]
        image, mask = load_image(image_path), load_mask(mask_path)
        _check_mask(mask, image, self.num_classes, self.ignore_index, image_path, mask_path)
        if self.transforms is not None:
            return self.transforms(image, mask)
        return image, mask

    def __repr__(self) -> str:
        return (
            f"SegmentationFolder({len(self)} pairs, {self.num_classes} classes, "
            f"root={str(self.root)!r})"
        )


# ---------------------------------------------------------------------------------------------
# Cityscapes

CITYSCAPES_ID_TO_TRAIN_ID: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
"""The official label id -> train id table (cityscapesScripts ``labels.py``); all other ids
(void classes, license plate, ...) map to 255."""

CITYSCAPES_CLASS_NAMES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)  # fmt: skip


def cityscapes_label_lut(ignore_index: int = 255) -> torch.Tensor:
    """Int64Tensor ``[256]``: ``lut[label_id]`` is the train id (``ignore_index`` for the rest)."""
    lut = torch.full((256,), ignore_index, dtype=torch.int64)
    for label_id, train_id in CITYSCAPES_ID_TO_TRAIN_ID.items():
        lut[label_id] = train_id
    return lut


class Cityscapes(Dataset):
    """Cityscapes fine annotations in the official layout, 19 train classes.

    ``root/leftImg8bit/{split}/{city}/{name}_leftImg8bit.png`` is paired with
    ``root/gtFine/{split}/{city}/{name}_gtFine_labelTrainIds.png`` when that file exists
    (made by cityscapesScripts' ``createTrainIdLabelImgs``), otherwise with
    ``{name}_gtFine_labelIds.png``, whose ids are mapped to train ids with
    :data:`CITYSCAPES_ID_TO_TRAIN_ID` (every other id -> 255).

    Args:
        root: the folder holding ``leftImg8bit/`` and ``gtFine/``.
        split: ``"train"``, ``"val"`` or ``"test"`` (any sub-folder name of ``leftImg8bit``).
        transforms: optional joint transform ``(image, mask) -> (image, mask)``.

    Items: ``(image FloatTensor [3, 1024, 2048] in [0, 1], mask Int64Tensor [1024, 2048])``
    with train ids 0..18 and 255 (before transforms).
    """

    num_classes = 19
    class_names = CITYSCAPES_CLASS_NAMES
    ignore_index = 255

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        transforms: Transforms | None = None,
    ) -> None:
        self.root, self.split, self.transforms = Path(root), split, transforms
        image_root = self.root / "leftImg8bit"
        label_root = self.root / "gtFine"
        for folder in (self.root, image_root, label_root):
            if not folder.is_dir():
                raise FileNotFoundError(
                    f"Cityscapes: folder not found: {folder}; root must hold leftImg8bit/ and "
                    "gtFine/ as unpacked from leftImg8bit_trainvaltest.zip and "
                    "gtFine_trainvaltest.zip"
                )
        split_dir = image_root / split
        if not split_dir.is_dir():
            available = sorted(p.name for p in image_root.iterdir() if p.is_dir())
            raise FileNotFoundError(
                f"Cityscapes: split folder not found: {split_dir}; splits present: {available}"
            )
        images = sorted(split_dir.glob("*/*_leftImg8bit.png"))
        if not images:
            raise ValueError(
                f"Cityscapes: no *_leftImg8bit.png images in {split_dir}/<city>/; check root"
            )
        pairs: list[tuple[Path, Path, bool]] = []
        missing: list[str] = []
        for image in images:
            city = image.parent.name
            name = image.name[: -len("_leftImg8bit.png")]
            train_ids = label_root / split / city / f"{name}_gtFine_labelTrainIds.png"
            label_ids = label_root / split / city / f"{name}_gtFine_labelIds.png"
            if train_ids.is_file():
                pairs.append((image, train_ids, True))
            elif label_ids.is_file():
                pairs.append((image, label_ids, False))
            else:
                missing.append(str(label_ids.relative_to(self.root)))
        if missing:
            raise FileNotFoundError(
                f"Cityscapes: {len(missing)} image(s) of split {split!r} have no label file "
                f"(*_gtFine_labelIds.png or *_gtFine_labelTrainIds.png): {preview(missing)}; "
                "unpack gtFine_trainvaltest.zip into root"
            )
        self._pairs = pairs
        self._lut = cityscapes_label_lut(self.ignore_index)

    def __len__(self) -> int:
        return len(self._pairs)

    def paths(self, index: int) -> tuple[Path, Path]:
        """``(image file, label file)`` of item ``index``."""
        image, label, _ = self._pairs[index]
        return image, label

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, label_path, is_train_ids = self._pairs[index]
        image, labels = load_image(image_path), load_mask(label_path)
        if is_train_ids:
            mask = labels
        else:
            if int(labels.min()) < 0 or int(labels.max()) > 255:
                raise ValueError(f"Cityscapes: label ids in {label_path} lie outside 0..255")
            mask = self._lut[labels]
        _check_mask(mask, image, self.num_classes, self.ignore_index, image_path, label_path)
        if self.transforms is not None:
            return self.transforms(image, mask)
        return image, mask

    def __repr__(self) -> str:
        return f"Cityscapes({len(self)} images, split={self.split!r}, root={str(self.root)!r})"
