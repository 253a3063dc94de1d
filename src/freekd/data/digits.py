"""Built-in data set ``digits``: scenes of real handwritten digits on textured backgrounds.

Each scene is generated on the fly from scikit-learn's bundled handwritten digits
(``sklearn.datasets.load_digits()``: 1797 grey 8x8 images of the digits 0-9, no download):
1-6 digits, each upsampled smoothly (bicubic) to a random size and aspect, colored to contrast
with the background under it, placed at a random position; later digits occlude earlier ones.
The background is a random base color with low-frequency color variation, stripes and soft
blobs (``clutter`` scales them), and Gaussian pixel noise (``noise``) is added on top.

Ground truth comes from the rendering itself. A digit's pixels are those where its upsampled
intensity reaches ``INK_THRESHOLD`` and that no later digit covers; its box is the tight
pixel box of those visible pixels (``[x0, y0, x1, y1]`` with ``x1 = last column + 1``), so boxes
and masks agree exactly. Digits that would stay mostly hidden (less than ``min_visible`` of their
pixels visible) are not drawn at all, so nothing in the picture lacks a label.

Determinism: scene ``i`` depends only on ``(seed, split, i)`` (a numpy ``Generator`` seeded
from those three numbers) and the parameters, never on the order of access, the process or the
global RNGs. The train and val splits draw from disjoint sets of the 1797 digit samples (a fixed
per-class split, 20 % to val): :func:`digit_sample_indices`.

:func:`write_coco` / :func:`write_segmentation_folder` (from :mod:`freekd.data.writers`) write
the scenes as a COCO-format folder or an "images + masks" folder for the real loaders.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .._checks import check_choice
from .._choices import SPLITS, TASKS
from .writers import write_coco, write_segmentation_folder

__all__ = [
    "DIGIT_CLASS_NAMES",
    "DigitScene",
    "DigitScenes",
    "digit_sample_indices",
    "load_digit_samples",
    "write_coco",
    "write_segmentation_folder",
]

DIGIT_CLASS_NAMES: tuple[str, ...] = tuple(str(digit) for digit in range(10))
VAL_FRACTION = 0.2
INK_THRESHOLD = 0.45  # upsampled intensity (in [0, 1]) from which a pixel belongs to the digit
_EDGE = 0.15  # half-width of the soft alpha ramp around INK_THRESHOLD (anti-aliased strokes)
_SPLIT_SEED = 1797  # fixed: the train/val split of the digit samples never changes
_MIN_VISIBLE_PIXELS = 4
_PLACEMENT_TRIES = 20


@functools.lru_cache(maxsize=1)
def load_digit_samples() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's handwritten digits: ``(images float32 [1797, 8, 8] in [0, 1],
    digits int64 [1797] in 0..9)`` (read-only arrays, loaded once per process)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (np.asarray(bunch.images, dtype=np.float32) / 16.0).clip(0.0, 1.0)
    digits = np.asarray(bunch.target, dtype=np.int64)
    images.setflags(write=False)
    digits.setflags(write=False)
    return images, digits


@functools.lru_cache(maxsize=2)
def digit_sample_indices(split: str) -> np.ndarray:
    """Sorted indices into :func:`load_digit_samples` that scenes of ``split`` draw from.

    A fixed stratified split: for each digit class, a fixed random 20 % of its samples go to
    ``"val"``, the rest to ``"train"``; the two sets are disjoint and cover all 1797 samples.
    """
    check_choice("DigitScenes split", split, SPLITS)
    _, digits = load_digit_samples()
    rng = np.random.default_rng(_SPLIT_SEED)
    chosen = []
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(digits == digit))
        n_val = int(round(VAL_FRACTION * len(members)))
        chosen.append(members[:n_val] if split == "val" else members[n_val:])
    indices = np.sort(np.concatenate(chosen)).astype(np.int64)
    indices.setflags(write=False)
    return indices


@dataclass(frozen=True)
class DigitScene:
    """One generated scene with its ground truth (numpy arrays; ``K`` visible digits).

    Attributes:
        image: float32 ``[H, W, 3]`` in ``[0, 1]``.
        instances: int64 ``[H, W]``: ``k`` where digit ``k`` is visible, ``-1`` elsewhere.
        digits: int64 ``[K]``: the digit (0-9) of each instance, in drawing order.
        boxes: float32 ``[K, 4]``: ``x0, y0, x1, y1`` in pixels, tight around the visible pixels.
        areas: int64 ``[K]``: number of visible pixels of each digit.
        sample_ids: int64 ``[K]``: index of each digit in :func:`load_digit_samples`.
    """

    image: np.ndarray
    instances: np.ndarray
    digits: np.ndarray
    boxes: np.ndarray
    areas: np.ndarray
    sample_ids: np.ndarray

    def class_mask(self) -> np.ndarray:
        """int64 ``[H, W]``: 0 for background, ``digit + 1`` for the pixels of a digit."""
        mask = np.zeros(self.instances.shape, dtype=np.int64)
        visible = self.instances >= 0
        mask[visible] = self.digits[self.instances[visible]] + 1
        return mask


class DigitScenes(Dataset):
    """Scenes of handwritten digits for detection or segmentation, generated on the fly.

    Args:
        split: ``"train"`` or ``"val"`` (disjoint digit samples, see :func:`digit_sample_indices`).
        task: ``"detection"``: items are ``(image, target)`` with ``image: FloatTensor [3, H, W]``
            in ``[0, 1]`` and ``target = dict(boxes=FloatTensor [K, 4] xyxy pixels,
            labels=Int64Tensor [K] in 1..10 (digit d -> label d + 1), image_id=int,
            area=FloatTensor [K] (visible pixels), iscrowd=Int64Tensor [K])``.
            ``"segmentation"``: items are ``(image, mask)`` with ``mask: Int64Tensor [H, W]``,
            0 = background, ``d + 1`` = digit ``d`` (11 classes).
        size: side of the square images in pixels (64-512 tested; 32-1024 accepted).
        length: number of scenes.
        seed: scene ``i`` depends only on ``(seed, split, i)`` and the parameters below.
        min_digits, max_digits: number of digits drawn per scene, uniform in this range (a
            digit that finds no free place, or that would be mostly hidden, is left out; every
            scene keeps at least one).
        digit_scale: ``(lo, hi)``: digit height as a fraction of ``size``, uniform in the range.
        noise: standard deviation of the Gaussian pixel noise (image values in ``[0, 1]``).
        clutter: strength of the background texture (stripes, blobs, color variation);
            0 gives a smooth background.
        contrast: ``(lo, hi)``: luminance difference between a digit and the background
            under it, uniform in the range (lower is harder).
        aspect_jitter: digit width = height * ``(1 + u)``, ``u`` uniform in ``[-j, j]``.
        max_overlap: a new digit's box may cover at most this fraction of the smaller of it
            and any earlier box.
        min_visible: digits with a smaller visible fraction of their pixels are not drawn.
        transforms: optional joint transform ``(image, target_or_mask) -> same`` (see
            :mod:`freekd.data.transforms`); images stay in ``[0, 1]`` unless it normalizes.
        cache: keep every rendered scene (image and target, before ``transforms``) in memory,
            so that later epochs skip the rendering (``16 * size^2`` bytes a segmentation scene,
            per process: each DataLoader worker keeps its own).

    ``num_classes`` is 10 for detection (labels 1..10; background 0 is implicit, as in
    torchvision detectors) and 11 for segmentation (class 0 = background); ``class_names``
    has the same length. :meth:`scene` gives the raw scene with instance ids.
    """

    ignore_index = 255

    def __init__(
        self,
        split: str = "train",
        task: str = "detection",
        size: int = 128,
        length: int = 1000,
        seed: int = 0,
        min_digits: int = 1,
        max_digits: int = 6,
        digit_scale: tuple[float, float] = (0.15, 0.35),
        noise: float = 0.03,
        clutter: float = 1.0,
        contrast: tuple[float, float] = (0.3, 0.7),
        aspect_jitter: float = 0.15,
        max_overlap: float = 0.2,
        min_visible: float = 0.4,
        transforms: Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any]] | None = None,
        cache: bool = False,
    ) -> None:
        check_choice("DigitScenes split", split, SPLITS)
        check_choice("DigitScenes task", task, TASKS)
        if not isinstance(size, int) or not 32 <= size <= 1024:
            raise ValueError(f"DigitScenes: size must be an int in 32..1024, got {size!r}")
        if not isinstance(length, int) or length < 1:
            raise ValueError(f"DigitScenes: length must be a positive int, got {length!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"DigitScenes: seed must be a non-negative int, got {seed!r}")
        if not 1 <= min_digits <= max_digits:
            raise ValueError(
                "DigitScenes: need 1 <= min_digits <= max_digits, "
                f"got min_digits={min_digits}, max_digits={max_digits}"
            )
        lo, hi = (float(v) for v in digit_scale)
        if not 0 < lo <= hi <= 1:
            raise ValueError(
                f"DigitScenes: digit_scale must satisfy 0 < lo <= hi <= 1, got {digit_scale}"
            )
        if hi * 10 / 8 > 1:
            raise ValueError(
                f"DigitScenes: digit_scale upper bound {hi} is too large: a digit with its "
                "margin must fit in the image (use at most 0.8)"
            )
        if lo * size < 6:
            raise ValueError(
                f"DigitScenes: digits of {lo * size:.1f} px are too small to be drawn; raise "
                f"digit_scale[0] to at least {6 / size:.3f} for size {size}"
            )
        c_lo, c_hi = (float(v) for v in contrast)
        if not 0 <= c_lo <= c_hi <= 1:
            raise ValueError(
                f"DigitScenes: contrast must satisfy 0 <= lo <= hi <= 1, got {contrast}"
            )
        for name, value, upper in (
            ("noise", noise, math.inf),
            ("clutter", clutter, math.inf),
            ("aspect_jitter", aspect_jitter, 0.5),
            ("max_overlap", max_overlap, 1.0),
            ("min_visible", min_visible, 1.0),
        ):
            if not 0 <= float(value) <= upper:
                raise ValueError(f"DigitScenes: {name} must lie in [0, {upper}], got {value!r}")
        self.split, self.task, self.size, self.length, self.seed = split, task, size, length, seed
        self.min_digits, self.max_digits = int(min_digits), int(max_digits)
        self.digit_scale = (lo, hi)
        self.noise, self.clutter = float(noise), float(clutter)
        self.contrast = (c_lo, c_hi)
        self.aspect_jitter = float(aspect_jitter)
        self.max_overlap, self.min_visible = float(max_overlap), float(min_visible)
        self.transforms = transforms
        self._cache: dict[int, tuple[torch.Tensor, Any]] | None = {} if cache else None
        if task == "detection":
            self.num_classes = 10
            self.class_names: tuple[str, ...] = DIGIT_CLASS_NAMES
        else:
            self.num_classes = 11
            self.class_names = ("background", *DIGIT_CLASS_NAMES)

    @property
    def sample_indices(self) -> np.ndarray:
        """Indices into :func:`load_digit_samples` that this split draws digits from."""
        return digit_sample_indices(self.split)

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        return (
            f"DigitScenes(split={self.split!r}, task={self.task!r}, size={self.size}, "
            f"length={self.length}, seed={self.seed})"
        )

    def _index(self, index: int) -> int:
        index = int(index)
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(f"DigitScenes index {index} out of range for length {self.length}")
        return index

    def rng(self, index: int) -> np.random.Generator:
        """The generator of scene ``index``: seeded from ``(seed, split, index)`` only."""
        return np.random.default_rng([self.seed, SPLITS.index(self.split), self._index(index)])

    def scene(self, index: int) -> DigitScene:
        """Generate scene ``index`` (ground truth included; no transforms applied)."""
        return _render(self, self.rng(index))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        index = self._index(index)
        if self._cache is None:
            image, target = self._render(index)
        else:
            if index not in self._cache:
                self._cache[index] = self._render(index)
            image, target = self._cache[index]
            image = image.clone()  # a transform may write into its input
            if isinstance(target, dict):
                target = {k: v.clone() if torch.is_tensor(v) else v for k, v in target.items()}
            else:
                target = target.clone()
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def _render(self, index: int) -> tuple[torch.Tensor, Any]:
        """Scene ``index`` as ``(image, target)`` tensors, before ``transforms``."""
        scene = self.scene(index)
        image = torch.from_numpy(np.ascontiguousarray(scene.image.transpose(2, 0, 1)))
        if self.task == "detection":
            count = len(scene.digits)
            target: Any = {
                "boxes": torch.from_numpy(scene.boxes).reshape(count, 4),
                "labels": torch.from_numpy(scene.digits + 1),
                "image_id": index,
                "area": torch.from_numpy(scene.areas.astype(np.float32)),
                "iscrowd": torch.zeros(count, dtype=torch.int64),
            }
        else:
            target = torch.from_numpy(scene.class_mask())
        return image, target


# ---------------------------------------------------------------------------------------------
# rendering


def _background(rng: np.random.Generator, size: int, clutter: float) -> np.ndarray:
    """float32 ``[size, size, 3]``: base color + low-frequency color variation + stripes +
    soft blobs (the texture amplitudes scale with ``clutter``)."""
    base = rng.uniform(0.15, 0.85, size=3).astype(np.float32)
    grid = int(rng.integers(2, 6))
    coarse = rng.normal(0.0, 0.06 + 0.06 * clutter, size=(grid, grid, 3)).astype(np.float32)
    resample = _cubic_matrix(grid, size, align_corners=True)  # [size, grid]
    image = base + np.einsum("yi,ijc,xj->yxc", resample, coarse, resample, optimize=True)
    axis = np.arange(size, dtype=np.float32)
    if clutter > 0 and rng.random() < min(1.0, 0.6 * clutter):
        period = rng.uniform(0.06, 0.3) * size
        angle = rng.uniform(0, np.pi)
        phase = rng.uniform(0, 2 * np.pi)
        direction = rng.normal(size=3).astype(np.float32)
        direction /= np.linalg.norm(direction) + 1e-6
        amplitude = rng.uniform(0.03, 0.1) * clutter
        # sin(u + v) = sin(u) cos(v) + cos(u) sin(v): two outer products instead of size**2 sines.
        along_x = 2 * np.pi * axis * np.cos(angle) / period
        along_y = 2 * np.pi * axis * np.sin(angle) / period + phase
        wave = np.outer(np.cos(along_y), np.sin(along_x)) + np.outer(
            np.sin(along_y), np.cos(along_x)
        )
        image += (amplitude * wave.astype(np.float32))[:, :, None] * direction
    for _ in range(int(rng.poisson(2.5 * clutter)) if clutter > 0 else 0):
        center_y, center_x = rng.uniform(0, size, size=2)
        sigma = rng.uniform(0.03, 0.12) * size
        color = rng.uniform(0, 1, size=3).astype(np.float32)
        opacity = rng.uniform(0.2, 0.6) * min(1.0, clutter)
        # Blend within 3 sigma of the center only (the weight is < 1.2 % of the peak outside).
        rows = slice(max(0, int(center_y - 3 * sigma)), min(size, int(center_y + 3 * sigma) + 1))
        cols = slice(max(0, int(center_x - 3 * sigma)), min(size, int(center_x + 3 * sigma) + 1))
        along_y = np.exp(-0.5 * ((axis[rows] - center_y) / sigma) ** 2)
        along_x = np.exp(-0.5 * ((axis[cols] - center_x) / sigma) ** 2)
        weight = (opacity * np.outer(along_y, along_x))[:, :, None].astype(np.float32)
        image[rows, cols] = image[rows, cols] * (1 - weight) + color * weight
    return image.astype(np.float32)


@functools.lru_cache(maxsize=4096)
def _cubic_matrix(n_in: int, n_out: int, align_corners: bool = False) -> np.ndarray:
    """float32 ``[n_out, n_in]``: bicubic resampling (Keys kernel, ``a = -0.75``, edge pixels
    repeated) of a length-``n_in`` signal to ``n_out`` samples, as ``torch.nn.functional.
    interpolate(mode="bicubic")`` does along one axis; ``out = M @ signal``."""
    outputs = np.arange(n_out, dtype=np.float64)
    if align_corners:
        source = outputs * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
    else:
        source = (outputs + 0.5) * (n_in / n_out) - 0.5
    first = np.floor(source)
    fraction = source - first
    a = -0.75
    matrix = np.zeros((n_out, n_in), dtype=np.float64)
    for tap in range(-1, 3):
        distance = np.abs(fraction - tap)
        weight = np.where(
            distance <= 1,
            ((a + 2) * distance - (a + 3)) * distance**2 + 1,
            np.where(distance < 2, ((distance - 5) * distance + 8) * distance * a - 4 * a, 0.0),
        )
        index = np.clip(first + tap, 0, n_in - 1).astype(np.int64)
        np.add.at(matrix, (np.arange(n_out), index), weight)
    matrix = matrix.astype(np.float32)
    matrix.setflags(write=False)
    return matrix


def _digit_patch(sample: np.ndarray, height: int, width: int) -> np.ndarray:
    """Upsample an 8x8 digit (with a 1-pixel empty margin) bicubically to float32
    ``[height, width]`` in ``[0, 1]``."""
    padded = np.pad(sample, 1)
    patch = _cubic_matrix(10, height) @ padded @ _cubic_matrix(10, width).T
    return np.clip(patch, 0.0, 1.0, out=patch)


@dataclass
class _Placed:
    top: int
    left: int
    intensity: np.ndarray  # float32 [h, w]
    ink: np.ndarray  # bool [h, w]
    digit: int
    sample_id: int

    def region(self) -> tuple[slice, slice]:
        height, width = self.ink.shape
        return slice(self.top, self.top + height), slice(self.left, self.left + width)


def _overlap(box: tuple[int, int, int, int], others: list[tuple[int, int, int, int]]) -> float:
    """Largest ``intersection / smaller area`` between ``box`` and any of ``others``
    (boxes as ``top, left, height, width``)."""
    worst = 0.0
    top, left, height, width = box
    for o_top, o_left, o_height, o_width in others:
        overlap_y = min(top + height, o_top + o_height) - max(top, o_top)
        overlap_x = min(left + width, o_left + o_width) - max(left, o_left)
        if overlap_y > 0 and overlap_x > 0:
            smaller = min(height * width, o_height * o_width)
            worst = max(worst, overlap_y * overlap_x / smaller)
    return worst


def _place_digits(scenes: DigitScenes, rng: np.random.Generator) -> list[_Placed]:
    images, digits = load_digit_samples()
    pool = scenes.sample_indices
    size = scenes.size
    wanted = int(rng.integers(scenes.min_digits, scenes.max_digits + 1))
    placed: list[_Placed] = []
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(wanted):
        sample_id = int(pool[rng.integers(len(pool))])
        digit_height = rng.uniform(*scenes.digit_scale) * size
        digit_width = digit_height * (1 + rng.uniform(-scenes.aspect_jitter, scenes.aspect_jitter))
        # The 8x8 sample plus its margin becomes a 10x10 patch.
        height = min(size, max(4, int(round(digit_height * 10 / 8))))
        width = min(size, max(4, int(round(digit_width * 10 / 8))))
        best: tuple[float, int, int] | None = None
        for _ in range(_PLACEMENT_TRIES):
            top = int(rng.integers(0, size - height + 1))
            left = int(rng.integers(0, size - width + 1))
            overlap = _overlap((top, left, height, width), boxes)
            if best is None or overlap < best[0]:
                best = (overlap, top, left)
            if overlap <= scenes.max_overlap:
                break
        assert best is not None
        overlap, top, left = best
        if overlap > scenes.max_overlap and len(placed) >= scenes.min_digits:
            continue  # no free place: leave this digit out
        intensity = _digit_patch(images[sample_id], height, width)
        ink = intensity >= INK_THRESHOLD
        if ink.sum() < _MIN_VISIBLE_PIXELS:
            continue
        placed.append(_Placed(top, left, intensity, ink, int(digits[sample_id]), sample_id))
        boxes.append((top, left, height, width))
    return placed


def _instance_map(size: int, placed: list[_Placed]) -> np.ndarray:
    instances = np.full((size, size), -1, dtype=np.int64)
    for k, item in enumerate(placed):
        instances[item.region()][item.ink] = k
    return instances


def _pick_color(rng: np.random.Generator, under: np.ndarray, contrast: tuple[float, float]):
    """An RGB color whose mean differs from the mean of ``under`` by about ``contrast``."""
    background = float(under.mean())
    difference = rng.uniform(*contrast)
    darker = background - difference >= 0 and (
        background + difference > 1 or rng.random() < background
    )
    target = background - difference if darker else background + difference
    color = target + rng.normal(0.0, 0.12, size=3)
    color += target - color.mean()  # keep the luminance difference, vary the hue
    return np.clip(color, 0.0, 1.0).astype(np.float32)


def _render(scenes: DigitScenes, rng: np.random.Generator) -> DigitScene:
    size = scenes.size
    image = _background(rng, size, scenes.clutter)
    placed = _place_digits(scenes, rng)
    # Leave out digits that later ones would hide (mostly), until every drawn digit is visible
    # enough; removing a digit only uncovers others, so this ends after a few rounds.
    while True:
        instances = _instance_map(size, placed)
        keep = []
        for k, item in enumerate(placed):
            visible = int((instances[item.region()] == k).sum())
            total = int(item.ink.sum())
            keep.append(visible >= max(_MIN_VISIBLE_PIXELS, scenes.min_visible * total))
        if all(keep):
            break
        placed = [item for item, kept in zip(placed, keep, strict=True) if kept]
    for item in placed:
        region = item.region()
        alpha = np.clip((item.intensity - INK_THRESHOLD + _EDGE) / (2 * _EDGE), 0.0, 1.0)
        color = _pick_color(rng, image[region], scenes.contrast)
        image[region] = image[region] * (1 - alpha[:, :, None]) + color * alpha[:, :, None]
    if scenes.noise > 0:
        image += scenes.noise * rng.standard_normal(image.shape, dtype=np.float32)
    np.clip(image, 0.0, 1.0, out=image)

    count = len(placed)
    boxes = np.zeros((count, 4), dtype=np.float32)
    areas = np.zeros(count, dtype=np.int64)
    for k, item in enumerate(placed):
        rows, cols = np.nonzero(instances[item.region()] == k)
        boxes[k] = (
            item.left + cols.min(),
            item.top + rows.min(),
            item.left + cols.max() + 1,
            item.top + rows.max() + 1,
        )
        areas[k] = rows.size
    return DigitScene(
        image=image,
        instances=instances,
        digits=np.array([item.digit for item in placed], dtype=np.int64),
        boxes=boxes,
        areas=areas,
        sample_ids=np.array([item.sample_id for item in placed], dtype=np.int64),
    )
