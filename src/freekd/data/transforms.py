"""Joint transforms for ``(image, target)`` detection pairs and ``(image, mask)`` segmentation
pairs.

Every transform is called as ``transform(image, target) -> (image, target)`` with
``image: FloatTensor [3, H, W]`` and ``target`` either a detection dict (``boxes: [K, 4]`` xyxy
pixels, ``labels``, ``area``, ...) or a segmentation ``mask: Int64Tensor [H, W]``; both kinds go
through the same classes. The geometry is done by ``torchvision.transforms.v2.functional`` on
``tv_tensors`` (boxes follow the image, masks are resized with nearest neighbors), and the
results are plain tensors again. Random choices come from torch's global RNG, so restoring
``torch.get_rng_state()`` (as a resumed training run does) reproduces them.

:class:`TorchvisionTransform` wraps any ``torchvision.transforms.v2`` transform (color jitter,
affine, ...) into the same calling convention.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Compose",
    "Normalize",
    "RandomCrop",
    "RandomHorizontalFlip",
    "RandomResizedScale",
    "Resize",
    "TorchvisionTransform",
    "default_detection_transforms",
    "default_segmentation_transforms",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Target = Any  # a detection dict or a segmentation mask tensor
Pair = tuple[torch.Tensor, Target]


def _image_size(image: torch.Tensor) -> tuple[int, int]:
    if image.ndim != 3:
        raise ValueError(f"transforms expect an image [3, H, W], got shape {tuple(image.shape)}")
    return int(image.shape[-2]), int(image.shape[-1])


def _check_target(target: Target) -> None:
    if isinstance(target, dict):
        if "boxes" not in target:
            raise ValueError("a detection target must have 'boxes' ([K, 4] xyxy)")
    elif not isinstance(target, torch.Tensor) or target.ndim != 2:
        raise TypeError(
            "transforms expect a detection target dict or a segmentation mask [H, W], got "
            f"{type(target).__name__}"
            + (f" of shape {tuple(target.shape)}" if isinstance(target, torch.Tensor) else "")
        )


def _geometric(
    image: torch.Tensor,
    target: Target,
    apply: Callable[[torch.Tensor], torch.Tensor],
) -> Pair:
    """Apply the same v2 functional op ``apply`` to the image, the boxes or the mask."""
    height, width = _image_size(image)
    _check_target(target)
    new_image = apply(tv_tensors.Image(image)).as_subclass(torch.Tensor)
    if isinstance(target, dict):
        boxes = tv_tensors.BoundingBoxes(
            target["boxes"].reshape(-1, 4), format="XYXY", canvas_size=(height, width)
        )
        new_boxes = apply(boxes).as_subclass(torch.Tensor)
        target = dict(target, boxes=new_boxes)
        if "area" in target and new_image.shape[-2:] != image.shape[-2:]:
            # Areas in pixels follow a change of scale (the only size change done here).
            scale = (new_image.shape[-2] * new_image.shape[-1]) / (height * width)
            target["area"] = target["area"] * scale
        return new_image, target
    if tuple(target.shape) != (height, width):
        raise ValueError(
            f"mask shape {tuple(target.shape)} differs from image size {(height, width)}"
        )
    new_mask = apply(tv_tensors.Mask(target)).as_subclass(torch.Tensor)
    return new_image, new_mask


def _resizer(
    size: list[int], max_size: int | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    def apply(tensor: torch.Tensor) -> torch.Tensor:
        return TF.resize(tensor, size, max_size=max_size, antialias=True)

    return apply


class Compose:
    """Apply ``transforms`` in order to an ``(image, target)`` pair."""

    def __init__(self, transforms: Sequence[Callable[[torch.Tensor, Target], Pair]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: torch.Tensor, target: Target) -> Pair:
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target

    def __repr__(self) -> str:
        inner = ", ".join(repr(transform) for transform in self.transforms)
        return f"Compose([{inner}])"


class Resize:
    """Resize the image and its boxes (scaled) or mask (nearest neighbor).

    Args:
        size: an int resizes the *shorter* side to ``size`` keeping the aspect ratio (the
            longer side capped at ``max_size`` when given: torchvision's 800/1333 detection
            rule is ``Resize(800, max_size=1333)``); ``(height, width)`` resizes to exactly
            that size.
        max_size: only with an int ``size``.
    """

    def __init__(self, size: int | Sequence[int], max_size: int | None = None) -> None:
        if isinstance(size, int):
            self.size = [int(size)]
        else:
            self.size = [int(v) for v in size]
            if len(self.size) != 2:
                raise ValueError(f"Resize: size must be an int or (height, width), got {size!r}")
            if max_size is not None:
                raise ValueError("Resize: max_size is only allowed with an int size")
        if min(self.size) < 1:
            raise ValueError(f"Resize: size must be positive, got {size!r}")
        self.max_size = max_size

    def __call__(self, image: torch.Tensor, target: Target) -> Pair:
        return _geometric(image, target, _resizer(self.size, self.max_size))

    def __repr__(self) -> str:
        size = self.size[0] if len(self.size) == 1 else tuple(self.size)
        return f"Resize({size!r}, max_size={self.max_size})"


class RandomResizedScale:
    """Scale jitter: resize by a factor drawn uniformly from ``scale_range`` (the image and
    its boxes or mask; segmentation recipes use ``(0.5, 2.0)`` followed by a crop).

    Args:
        scale_range: ``(lo, hi)`` factors applied to the current size, or to ``base_size``.
        base_size: ``(height, width)`` that the factor multiplies (keeping the aspect ratio of
            the image: the image is fitted inside ``factor * base_size``, as MMSegmentation's
            ``RandomResize(scale=..., ratio_range=..., keep_ratio=True)``); ``None``: the
            image's own size.
    """

    def __init__(
        self,
        scale_range: tuple[float, float] = (0.5, 2.0),
        base_size: tuple[int, int] | None = None,
    ) -> None:
        lo, hi = (float(v) for v in scale_range)
        if not 0 < lo <= hi:
            raise ValueError(f"RandomResizedScale: need 0 < lo <= hi, got {scale_range!r}")
        self.scale_range = (lo, hi)
        self.base_size = None if base_size is None else (int(base_size[0]), int(base_size[1]))

    def __call__(self, image: torch.Tensor, target: Target) -> Pair:
        height, width = _image_size(image)
        lo, hi = self.scale_range
        factor = lo + (hi - lo) * float(torch.rand(()))
        if self.base_size is None:
            fit = factor
        else:
            fit = min(factor * self.base_size[0] / height, factor * self.base_size[1] / width)
        size = [max(1, round(height * fit)), max(1, round(width * fit))]
        return _geometric(image, target, _resizer(size))

    def __repr__(self) -> str:
        return f"RandomResizedScale({self.scale_range}, base_size={self.base_size})"


class RandomHorizontalFlip:
    """Mirror the image and its boxes (``x -> W - x``) or mask with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0 <= p <= 1:
            raise ValueError(f"RandomHorizontalFlip: p must lie in [0, 1], got {p}")
        self.p = float(p)

    def __call__(self, image: torch.Tensor, target: Target) -> Pair:
        if float(torch.rand(())) >= self.p:
            return image, target
        return _geometric(image, target, TF.horizontal_flip)

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class RandomCrop:
    """Random ``(height, width)`` crop of a segmentation pair; a smaller image is first padded
    at the bottom and right (image with ``fill``, mask with ``ignore_index``).

    Segmentation only: a detection target raises ``TypeError`` (cropping boxes needs a rule for
    cut objects; use :class:`TorchvisionTransform` with ``v2.RandomIoUCrop`` and
    ``v2.SanitizeBoundingBoxes`` for that).
    """

    def __init__(
        self, size: int | Sequence[int], ignore_index: int = 255, fill: float = 0.0
    ) -> None:
        pair = (int(size), int(size)) if isinstance(size, int) else tuple(int(v) for v in size)
        if len(pair) != 2 or min(pair) < 1:
            raise ValueError(f"RandomCrop: size must be a positive int or (h, w), got {size!r}")
        self.size: tuple[int, int] = (pair[0], pair[1])
        self.ignore_index, self.fill = int(ignore_index), float(fill)

    def __call__(self, image: torch.Tensor, target: Target) -> Pair:
        if isinstance(target, dict):
            raise TypeError(
                "RandomCrop crops segmentation pairs (image, mask) only; for detection use "
                "Resize/RandomResizedScale, or TorchvisionTransform(v2.RandomIoUCrop())"
            )
        _check_target(target)
        height, width = _image_size(image)
        if tuple(target.shape) != (height, width):
            raise ValueError(
                f"mask shape {tuple(target.shape)} differs from image size {(height, width)}"
            )
        crop_h, crop_w = self.size
        pad_h, pad_w = max(0, crop_h - height), max(0, crop_w - width)
        if pad_h or pad_w:
            padding = (0, pad_w, 0, pad_h)  # left, right, top, bottom
            image = torch.nn.functional.pad(image, padding, value=self.fill)
            target = torch.nn.functional.pad(target, padding, value=self.ignore_index)
            height, width = height + pad_h, width + pad_w
        top = int(torch.randint(0, height - crop_h + 1, ()))
        left = int(torch.randint(0, width - crop_w + 1, ()))
        return (
            image[:, top : top + crop_h, left : left + crop_w],
            target[top : top + crop_h, left : left + crop_w],
        )

    def __repr__(self) -> str:
        return f"RandomCrop({self.size}, ignore_index={self.ignore_index}, fill={self.fill})"


class Normalize:
    """``image -> (image - mean) / std`` per channel (ImageNet statistics by default); the
    target is unchanged. Apply it last, to images in ``[0, 1]``."""

    def __init__(
        self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
    ) -> None:
        self.mean, self.std = [float(v) for v in mean], [float(v) for v in std]
        if min(self.std) <= 0:
            raise ValueError(f"Normalize: std must be positive, got {std!r}")

    def __call__(self, image: torch.Tensor, target: Target) -> Pair:
        return TF.normalize(image, self.mean, self.std), target

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


class TorchvisionTransform:
    """Use a ``torchvision.transforms.v2`` transform on a pair: the image becomes a
    ``tv_tensors.Image``, boxes ``tv_tensors.BoundingBoxes`` (XYXY), a mask ``tv_tensors.Mask``;
    the results are plain tensors again. Other entries of a detection target (``labels``,
    ``area``, ``iscrowd``) are passed along, so v2 transforms that drop boxes (e.g.
    ``SanitizeBoundingBoxes(labels_getter=...)``) can drop them too."""

    def __init__(self, transform: Callable[..., Any]) -> None:
        self.transform = transform

    def __call__(self, image: torch.Tensor, target: Target) -> Pair:
        height, width = _image_size(image)
        _check_target(target)
        wrapped_image = tv_tensors.Image(image)
        if isinstance(target, dict):
            wrapped: Any = dict(
                target,
                boxes=tv_tensors.BoundingBoxes(
                    target["boxes"].reshape(-1, 4), format="XYXY", canvas_size=(height, width)
                ),
            )
        else:
            wrapped = tv_tensors.Mask(target)
        new_image, new_target = self.transform(wrapped_image, wrapped)
        if isinstance(new_target, dict):
            new_target = {
                key: value.as_subclass(torch.Tensor) if isinstance(value, torch.Tensor) else value
                for key, value in new_target.items()
            }
        else:
            new_target = new_target.as_subclass(torch.Tensor)
        return new_image.as_subclass(torch.Tensor), new_target

    def __repr__(self) -> str:
        return f"TorchvisionTransform({self.transform!r})"


def default_detection_transforms(
    train: bool,
    size: int | Sequence[int] | None = None,
    max_size: int | None = None,
    hflip_prob: float = 0.5,
) -> Compose:
    """Detection pipeline: ``Resize(size, max_size)`` (when ``size`` is given), then, for
    training, ``RandomHorizontalFlip(hflip_prob)``.

    Images stay in ``[0, 1]``: torchvision detectors normalize (and resize again, to their own
    ``min_size``/``max_size``) inside the model. Use ``hflip_prob=0`` for data whose classes
    change under mirroring (the ``digits`` scenes, text).
    """
    transforms: list[Callable[[torch.Tensor, Target], Pair]] = []
    if size is not None:
        transforms.append(Resize(size, max_size=max_size))
    if train and hflip_prob > 0:
        transforms.append(RandomHorizontalFlip(hflip_prob))
    return Compose(transforms)


def default_segmentation_transforms(
    train: bool,
    crop_size: int | Sequence[int] | None = None,
    scale_range: tuple[float, float] = (0.5, 2.0),
    base_size: tuple[int, int] | None = None,
    hflip_prob: float = 0.5,
    normalize: bool = True,
    ignore_index: int = 255,
    size: int | Sequence[int] | None = None,
) -> Compose:
    """Segmentation pipeline of the usual recipes (MMSegmentation's Cityscapes one):

    - training: ``RandomResizedScale(scale_range, base_size)``, ``RandomCrop(crop_size)``
      (padding the mask with ``ignore_index``; required for batching), ``RandomHorizontalFlip``;
    - evaluation: ``Resize(size)`` when ``size`` is given (whole images otherwise);
    - then ``Normalize()`` (ImageNet mean/std) when ``normalize`` is true; with
      ``normalize=False`` images stay in ``[0, 1]``.
    """
    transforms: list[Callable[[torch.Tensor, Target], Pair]] = []
    if train:
        if crop_size is None:
            raise ValueError(
                "default_segmentation_transforms(train=True) needs crop_size so that the "
                "images of a batch share one size"
            )
        transforms.append(RandomResizedScale(scale_range, base_size=base_size))
        transforms.append(RandomCrop(crop_size, ignore_index=ignore_index))
        if hflip_prob > 0:
            transforms.append(RandomHorizontalFlip(hflip_prob))
    elif size is not None:
        transforms.append(Resize(size))
    if normalize:
        transforms.append(Normalize())
    return Compose(transforms)
