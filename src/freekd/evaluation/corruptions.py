"""Common image corruptions at severities 1..5 (Hendrycks & Dietterich, ICLR 2019), in torch.

``corrupt(images, name, severity, seed=0, index_offset=0)`` corrupts a batch ``[N, 3, H, W]``
of images in ``[0, 1]`` (float, any float dtype; or ``uint8`` in ``0..255``) and returns a tensor
of the same shape, dtype, device and value range. The corruptions and their severity parameters
are those of the ``imagecorruptions`` package (Michaelis et al., 2019: the ImageNet-C code made
independent of the image size), which the robustness benchmarks for detection (COCO-C) and
segmentation (Cityscapes-C) use:

====================  =========================================================================
noise                 ``gaussian_noise``, ``shot_noise``, ``impulse_noise``
blur                  ``defocus_blur``, ``motion_blur``, ``gaussian_blur``
weather-like          ``brightness``, ``contrast``, ``fog``
digital               ``jpeg_compression``, ``pixelate``, ``elastic_transform``
extra (not in "all")  ``speckle_noise``, ``saturate``
====================  =========================================================================

Severity parameters are in pixels (blur radii, JPEG quality, ...), as in the benchmark: on small
images (the 64-pixel digit scenes) the blurs are relatively stronger than on 224-pixel ones.
Severity ``0`` returns the images unchanged.

**Determinism.** Every random draw comes from a ``torch.Generator`` seeded from
``(seed, name, severity, index)``, where ``index = index_offset + i`` is the position of image
``i`` in the whole evaluation set: a corrupted image does not depend on the batch size, the batch
it lands in, the device, or torch's global RNG.

Differences from ``imagecorruptions`` (numpy / OpenCV / scikit-image, one uint8 image at a
time): the images stay float (no rounding to 8 bits between steps, except inside JPEG); edges are
padded with ``replicate`` / torch's ``reflect`` (reflect-101) where scipy's half-sample
``reflect`` was used; the fog's diamond-square noise and all other random fields come from
torch's generator, so values differ from numpy's for the same seed while following the same
distributions.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_choice

__all__ = [
    "ALL_CORRUPTIONS",
    "CORRUPTIONS",
    "EXTRA_CORRUPTIONS",
    "SEVERITIES",
    "corrupt",
    "corruption_generator",
    "resolve_corruptions",
]

SEVERITIES = (1, 2, 3, 4, 5)

# ---------------------------------------------------------------------------- parameters
# Severity 1..5 parameters, from imagecorruptions 1.1 (ImageNet-C).
_GAUSSIAN_NOISE = (0.08, 0.12, 0.18, 0.26, 0.38)  # standard deviation
_SHOT_NOISE = (60.0, 25.0, 12.0, 5.0, 3.0)  # photons per unit intensity
_IMPULSE_NOISE = (0.03, 0.06, 0.09, 0.17, 0.27)  # fraction of values set to 0 or 1
_SPECKLE_NOISE = (0.15, 0.2, 0.35, 0.45, 0.6)  # multiplicative noise std
_DEFOCUS_BLUR = ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))  # disk radius, alias sigma
_MOTION_BLUR = ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))  # radius, sigma
_GAUSSIAN_BLUR = (1.0, 2.0, 3.0, 4.0, 6.0)  # sigma
_BRIGHTNESS = (0.1, 0.2, 0.3, 0.4, 0.5)  # added to the HSV value
_CONTRAST = (0.4, 0.3, 0.2, 0.1, 0.05)  # factor towards the per-channel mean
_FOG = ((1.5, 2.0), (2.0, 2.0), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4))  # strength, wibble decay
_JPEG_QUALITY = (25, 18, 15, 10, 7)
_PIXELATE = (0.6, 0.5, 0.4, 0.3, 0.25)  # down-scaling factor
_ELASTIC_ALPHA = (250 * 0.05, 250 * 0.065, 250 * 0.085, 250 * 0.1, 250 * 0.12)
_SATURATE = ((0.3, 0.0), (0.1, 0.0), (2.0, 0.0), (5.0, 0.1), (20.0, 0.2))  # HSV s * a + b

Generators = Sequence[torch.Generator]


# ---------------------------------------------------------------------------- helpers


def corruption_generator(seed: int, name: str, severity: int, index: int) -> torch.Generator:
    """The CPU generator of image ``index`` for ``name`` at ``severity`` under ``seed``.

    Seeded from a hash of the four values, so the streams of different images, corruptions,
    severities and seeds are unrelated."""
    key = f"freekd-corruption/{int(seed)}/{name}/{int(severity)}/{int(index)}".encode()
    value = int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)
    return torch.Generator().manual_seed(value)


def _draw(
    generators: Generators,
    shape: Sequence[int],
    device: torch.device,
    sampler: Callable[[torch.Generator], Tensor] | None = None,
) -> Tensor:
    """One draw per image, stacked: ``[N, *shape]`` uniform in [0, 1) unless ``sampler``."""
    draws = [
        sampler(g) if sampler is not None else torch.rand(tuple(shape), generator=g)
        for g in generators
    ]
    return torch.stack(draws).to(device)


def _pad(images: Tensor, pad_h: int, pad_w: int, mode: str = "replicate") -> Tensor:
    """Pad ``[N, C, H, W]`` by ``pad_h`` rows and ``pad_w`` columns on each side; torch's
    ``reflect`` needs a pad smaller than the size, ``replicate`` is used where it is not."""
    if mode == "reflect" and (pad_h >= images.shape[-2] or pad_w >= images.shape[-1]):
        mode = "replicate"
    return F.pad(images, (pad_w, pad_w, pad_h, pad_h), mode=mode)


def _gaussian_kernel1d(sigma: float, truncate: float, device: torch.device) -> Tensor:
    """Normalized Gaussian taps of radius ``int(truncate * sigma + 0.5)`` (scipy's)."""
    radius = max(int(truncate * sigma + 0.5), 0)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return weights / weights.sum()


def _gaussian_filter(
    images: Tensor, sigma: tuple[float, float], truncate: float = 4.0, mode: str = "replicate"
) -> Tensor:
    """Separable Gaussian blur of ``[N, C, H, W]`` with ``sigma = (sigma_y, sigma_x)``."""
    channels = images.shape[1]
    kernel_y = _gaussian_kernel1d(sigma[0], truncate, images.device)
    kernel_x = _gaussian_kernel1d(sigma[1], truncate, images.device)
    ry, rx = kernel_y.numel() // 2, kernel_x.numel() // 2
    out = _pad(images, ry, 0, mode)
    out = F.conv2d(out, kernel_y.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)
    out = _pad(out, 0, rx, mode)
    return F.conv2d(out, kernel_x.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)


def _rgb_value_saturation(images: Tensor) -> tuple[Tensor, Tensor]:
    """HSV value ``V = max(r, g, b)`` and saturation ``S = (V - min) / V`` (0 where ``V = 0``),
    each ``[N, 1, H, W]``."""
    value = images.amax(dim=1, keepdim=True)
    low = images.amin(dim=1, keepdim=True)
    saturation = torch.where(value > 0, (value - low) / value.clamp(min=1e-12), 0.0)
    return value, saturation


# ---------------------------------------------------------------------------- corruptions
# Each takes images [N, 3, H, W] float32 in [0, 1], the severity index 0..4 and one generator
# per image, and returns float32 images (clamped to [0, 1] by corrupt()).


def _gaussian_noise(x: Tensor, level: int, gens: Generators) -> Tensor:
    noise = _draw(gens, x.shape[1:], x.device, lambda g: torch.randn(x.shape[1:], generator=g))
    return x + _GAUSSIAN_NOISE[level] * noise


def _shot_noise(x: Tensor, level: int, gens: Generators) -> Tensor:
    photons = _SHOT_NOISE[level]
    rates = (x * photons).cpu()
    counts = torch.stack(
        [torch.poisson(rate, generator=g) for rate, g in zip(rates, gens, strict=True)]
    )
    return counts.to(x.device) / photons


def _impulse_noise(x: Tensor, level: int, gens: Generators) -> Tensor:
    draws = _draw(gens, (2, *x.shape[1:]), x.device)
    flipped = draws[:, 0] < _IMPULSE_NOISE[level]
    salt = draws[:, 1] < 0.5
    return torch.where(flipped, salt.to(x.dtype), x)


def _speckle_noise(x: Tensor, level: int, gens: Generators) -> Tensor:
    noise = _draw(gens, x.shape[1:], x.device, lambda g: torch.randn(x.shape[1:], generator=g))
    return x + x * _SPECKLE_NOISE[level] * noise


def _defocus_blur(x: Tensor, level: int, gens: Generators) -> Tensor:
    radius, alias_sigma = _DEFOCUS_BLUR[level]
    extent = max(8, radius)
    offsets = torch.arange(-extent, extent + 1, dtype=torch.float32, device=x.device)
    disk = ((offsets[:, None] ** 2 + offsets[None, :] ** 2) <= radius**2).float()
    disk = disk / disk.sum()
    # anti-aliasing: OpenCV's GaussianBlur with a 3x3 (radius <= 8) or 5x5 window
    window = 3 if radius <= 8 else 5
    taps = torch.arange(window, dtype=torch.float32, device=x.device) - window // 2
    gauss = torch.exp(-0.5 * (taps / alias_sigma) ** 2)
    gauss = gauss / gauss.sum()
    kernel = _pad(disk[None, None], window // 2, window // 2, "reflect")
    kernel = F.conv2d(kernel, (gauss[:, None] * gauss[None, :])[None, None])[0, 0]
    kernel = kernel / kernel.sum()
    channels = x.shape[1]
    padded = _pad(x, extent, extent, "reflect")
    return F.conv2d(padded, kernel.expand(channels, 1, -1, -1), groups=channels)


def _motion_blur(x: Tensor, level: int, gens: Generators) -> Tensor:
    """A one-sided Gaussian streak of ``2 * radius + 1`` taps along a random angle in
    [-45, 45] degrees per image (imagecorruptions' ``_motion_blur``; edges replicated)."""
    radius, sigma = _MOTION_BLUR[level]
    width = 2 * radius + 1
    taps = torch.arange(width, dtype=torch.float32)
    weights = torch.exp(-(taps**2) / (2 * sigma**2))
    weights = (weights / weights.sum()).tolist()
    height, width_px = x.shape[-2:]
    padded = _pad(x, width, width, "replicate")
    out = torch.empty_like(x)
    for i, g in enumerate(gens):
        angle = math.radians(float(torch.empty(()).uniform_(-45.0, 45.0, generator=g)))
        direction = (math.sin(angle), math.cos(angle))  # unit (dy, dx) of the streak
        blurred = torch.zeros_like(x[i])
        for step in range(width):
            dy = -math.ceil(step * direction[0] - 0.5)
            dx = -math.ceil(step * direction[1] - 0.5)
            if abs(dy) >= height or abs(dx) >= width_px:
                break  # the streak left the image
            top, left = width - dy, width - dx
            blurred += weights[step] * padded[i, :, top : top + height, left : left + width_px]
        out[i] = blurred
    return out


def _gaussian_blur(x: Tensor, level: int, gens: Generators) -> Tensor:
    sigma = _GAUSSIAN_BLUR[level]
    return _gaussian_filter(x, (sigma, sigma), truncate=4.0, mode="replicate")


def _brightness(x: Tensor, level: int, gens: Generators) -> Tensor:
    """HSV value ``V -> min(V + c, 1)`` with hue and saturation kept. In HSV -> RGB every channel
    is ``V`` times a function of hue and saturation, so the result is ``rgb * V' / V`` (and the
    grey ``V'`` for black pixels)."""
    value, _ = _rgb_value_saturation(x)
    new_value = (value + _BRIGHTNESS[level]).clamp(max=1.0)
    scale = new_value / value.clamp(min=1e-12)
    return torch.where(value > 0, x * scale, new_value.expand_as(x))


def _saturate(x: Tensor, level: int, gens: Generators) -> Tensor:
    """HSV saturation ``S -> clip(S * a + b, 0, 1)`` with hue and value kept: each channel is
    ``V - V * S * k(hue)``, so ``V - (V - rgb) * S' / S``; grey pixels (hue 0, red, as in
    scikit-image) become ``(V, V (1 - S'), V (1 - S'))``."""
    factor, shift = _SATURATE[level]
    value, saturation = _rgb_value_saturation(x)
    new_saturation = (saturation * factor + shift).clamp(0.0, 1.0)
    colored = value - (value - x) * new_saturation / saturation.clamp(min=1e-12)
    grey_low = value * (1 - new_saturation)
    grey = torch.cat([value, grey_low, grey_low], dim=1)
    return torch.where(saturation > 0, colored, grey)


def _contrast(x: Tensor, level: int, gens: Generators) -> Tensor:
    means = x.mean(dim=(-2, -1), keepdim=True)
    return (x - means) * _CONTRAST[level] + means


def _plasma_fractal(mapsize: int, decay: float, gens: Generators) -> Tensor:
    """Diamond-square noise ``[N, mapsize, mapsize]`` in [0, 1] (ImageNet-C's ``plasma_fractal``,
    one map per generator). ``mapsize`` is a power of two."""
    count = len(gens)
    maps = torch.zeros(count, mapsize, mapsize, dtype=torch.float64)
    step, wibble = mapsize, 100.0

    def wibbled_mean(total: Tensor) -> Tensor:
        shape = total.shape[1:]
        draws = torch.stack([torch.rand(shape, generator=g, dtype=torch.float64) for g in gens])
        return total / 4 + wibble * (draws * 2 * wibble - wibble)

    while step >= 2:
        half = step // 2
        corners = maps[:, 0:mapsize:step, 0:mapsize:step]
        square = corners + corners.roll(-1, dims=1)
        square = square + square.roll(-1, dims=2)
        maps[:, half:mapsize:step, half:mapsize:step] = wibbled_mean(square)
        centers = maps[:, half:mapsize:step, half:mapsize:step]
        corners = maps[:, 0:mapsize:step, 0:mapsize:step]
        left = centers + centers.roll(1, dims=1) + corners + corners.roll(-1, dims=2)
        maps[:, 0:mapsize:step, half:mapsize:step] = wibbled_mean(left)
        top = centers + centers.roll(1, dims=2) + corners + corners.roll(-1, dims=1)
        maps[:, half:mapsize:step, 0:mapsize:step] = wibbled_mean(top)
        step //= 2
        wibble /= decay
    flat = maps.reshape(count, -1)
    flat = flat - flat.min(dim=1, keepdim=True).values
    flat = flat / flat.max(dim=1, keepdim=True).values.clamp(min=1e-12)
    return flat.reshape(count, mapsize, mapsize).float()


def _fog(x: Tensor, level: int, gens: Generators) -> Tensor:
    strength, decay = _FOG[level]
    height, width = x.shape[-2:]
    mapsize = 1 << max(1, math.ceil(math.log2(max(height, width))))
    fog = _plasma_fractal(mapsize, decay, gens)[:, :height, :width].to(x.device)
    peak = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x + strength * fog[:, None]) * peak / (peak + strength)


def _jpeg_compression(x: Tensor, level: int, gens: Generators) -> Tensor:
    """Encode each image as a JPEG of the severity's quality with PIL (as imagecorruptions
    does) and decode it again."""
    import io

    import numpy as np
    from PIL import Image

    quality = _JPEG_QUALITY[level]
    as_bytes = (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    decoded = []
    for array in as_bytes:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        with Image.open(buffer) as image:
            decoded.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
    out = torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2)
    return out.to(x.device, torch.float32) / 255


def _pixelate(x: Tensor, level: int, gens: Generators) -> Tensor:
    """Box down-sampling to ``int(size * c)`` then nearest up-sampling (PIL BOX / NEAREST)."""
    height, width = x.shape[-2:]
    factor = _PIXELATE[level]
    small = (max(1, int(height * factor)), max(1, int(width * factor)))
    low = F.adaptive_avg_pool2d(x, small)
    return F.interpolate(low, size=(height, width), mode="nearest")


def _elastic_transform(x: Tensor, level: int, gens: Generators) -> Tensor:
    """Resample at ``(y + dy, x + dx)``: displacement fields uniform in
    ``±0.005 H`` per pixel, smoothed by a Gaussian of ``sigma = 0.01 (H, W)`` (truncated at 3
    sigma) and scaled by ``alpha``; bilinear, reflected at the edges (imagecorruptions 1.1)."""
    count, _, height, width = x.shape
    limit = height * 0.005
    fields = (_draw(gens, (2, height, width), x.device) * 2 - 1) * limit
    sigma = (max(height * 0.01, 1e-3), max(width * 0.01, 1e-3))
    fields = _gaussian_filter(fields, sigma, truncate=3.0, mode="reflect") * _ELASTIC_ALPHA[level]
    rows = torch.arange(height, dtype=torch.float32, device=x.device)[:, None]
    cols = torch.arange(width, dtype=torch.float32, device=x.device)[None, :]
    sample_y = rows + fields[:, 0]
    sample_x = cols + fields[:, 1]
    # grid_sample's normalized coordinates with align_corners=True: -1 / 1 = first / last pixel
    grid = torch.stack(
        [
            sample_x / max(width - 1, 1) * 2 - 1,
            sample_y / max(height - 1, 1) * 2 - 1,
        ],
        dim=-1,
    )
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=True)


_FUNCTIONS: dict[str, Callable[[Tensor, int, Generators], Tensor]] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur,
    "motion_blur": _motion_blur,
    "gaussian_blur": _gaussian_blur,
    "brightness": _brightness,
    "contrast": _contrast,
    "fog": _fog,
    "jpeg_compression": _jpeg_compression,
    "pixelate": _pixelate,
    "elastic_transform": _elastic_transform,
    "speckle_noise": _speckle_noise,
    "saturate": _saturate,
}

CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "motion_blur",
    "gaussian_blur",
    "brightness",
    "contrast",
    "fog",
    "jpeg_compression",
    "pixelate",
    "elastic_transform",
)
"""The corruptions of ``"all"`` (what mPC averages), in the benchmark's family order."""

EXTRA_CORRUPTIONS: tuple[str, ...] = ("speckle_noise", "saturate")
"""ImageNet-C's extra corruptions: available by name, not part of ``"all"``."""

ALL_CORRUPTIONS: tuple[str, ...] = CORRUPTIONS + EXTRA_CORRUPTIONS

RANDOM_CORRUPTIONS = frozenset(
    {
        "gaussian_noise",
        "shot_noise",
        "impulse_noise",
        "speckle_noise",
        "motion_blur",
        "fog",
        "elastic_transform",
    }
)
"""Corruptions that draw random numbers (the others are deterministic functions of the image)."""


def resolve_corruptions(corruptions: str | Sequence[str] | None) -> list[str]:
    """Corruption names from ``"all"``, one name, a comma-separated string or a list.

    ``None`` or ``[]`` gives ``[]``; ``"all"`` gives :data:`CORRUPTIONS`; unknown names raise a
    ``ValueError`` naming the valid ones; duplicates are dropped (first kept)."""
    if corruptions is None:
        return []
    if isinstance(corruptions, str):
        corruptions = [part.strip() for part in corruptions.split(",") if part.strip()]
    names: list[str] = []
    for name in corruptions:
        check_choice("corruption", name, (*ALL_CORRUPTIONS, "all"))
        for item in list(CORRUPTIONS) if name == "all" else [name]:
            if item not in names:
                names.append(item)
    return names


def _check_severity(severity: object) -> int:
    if isinstance(severity, bool) or not isinstance(severity, int) or not 0 <= severity <= 5:
        raise ValueError(
            f"corruption severity must be an integer 0..5 (0: clean), got {severity!r}"
        )
    return severity


def corrupt(
    images: Tensor,
    name: str,
    severity: int,
    seed: int = 0,
    index_offset: int = 0,
) -> Tensor:
    """``images`` with corruption ``name`` at ``severity`` (0: unchanged, 1..5: benchmark levels).

    Args:
        images: ``[N, 3, H, W]`` (or one ``[3, H, W]`` image) in ``[0, 1]`` (floating point) or
            ``0..255`` (``uint8``); before any mean/std normalization.
        name: one of :data:`ALL_CORRUPTIONS`.
        severity: ``0..5``.
        seed: run seed; with ``index_offset`` it fixes every random draw (see the module
            docstring).
        index_offset: the position in the evaluation set of ``images[0]``.

    Returns:
        The corrupted images: same shape, dtype and device, values in ``[0, 1]`` (``0..255``).
        Not differentiable (evaluation only).
    """
    check_choice("corruption", name, ALL_CORRUPTIONS)
    severity = _check_severity(severity)
    if not isinstance(images, Tensor):
        raise TypeError(f"corrupt() takes an image tensor [N, 3, H, W], got {type(images)}")
    single = images.dim() == 3
    batch = images[None] if single else images
    if batch.dim() != 4 or batch.shape[1] != 3:
        raise ValueError(
            f"corrupt() takes RGB images [N, 3, H, W] (or [3, H, W]), got {tuple(images.shape)}"
        )
    is_uint8 = batch.dtype == torch.uint8
    if not is_uint8 and not batch.is_floating_point():
        raise ValueError(
            f"corrupt() takes float images in [0, 1] or uint8 images, got dtype {batch.dtype}"
        )
    if severity == 0 or batch.shape[0] == 0:
        return images.clone()
    with torch.no_grad():
        x = batch.float() / 255 if is_uint8 else batch.float()
        x = x.clamp(0.0, 1.0)
        generators = [
            corruption_generator(seed, name, severity, index_offset + i) for i in range(len(x))
        ]
        out = _FUNCTIONS[name](x, severity - 1, generators).clamp(0.0, 1.0)
        out = (out * 255).round().to(torch.uint8) if is_uint8 else out.to(batch.dtype)
    return out[0] if single else out
