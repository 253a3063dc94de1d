"""Multi-level 2-D discrete wavelet transform of feature maps, matching PyWavelets.

``dwt2`` on ``x: [N, C, H, W]`` returns ``(low, highs)``:

* ``low: [N, C, H_J, W_J]`` the coarsest approximation band;
* ``highs[j - 1]: [N, C, 3, h_j, w_j]`` the detail bands of level ``j = 1..J`` (finest first), the
  orientations in PyWavelets' order and signs (``wavedec2``'s cH, cV, cD).

Padding mode is PyWavelets' ``"zero"``: a level maps a side of ``n`` pixels to
``floor((n + L - 1) / 2)`` coefficients for a filter of length ``L`` (``ceil(n / 2)`` for Haar), so
every size >= 1 works at every level. ``idwt2`` is the exact inverse; like ``waverec2`` it returns
the uncropped result (one pixel larger for odd sizes) unless ``size=(H, W)`` asks for a crop.

Haar has a fast path made of strided slices, adds and reshapes, whose backward pass is the other
transform (Haar with zero padding is orthogonal, so the adjoint of analysis is synthesis); other
orthogonal wavelets from PyWavelets' filter banks run as grouped (transposed) convolutions.
The transform is linear: ``dwt2(a - b) == dwt2(a) - dwt2(b)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_positive_int

__all__ = [
    "DWT2d",
    "IDWT2d",
    "WaveletBands",
    "auto_levels",
    "band_sizes",
    "dwt2",
    "idwt2",
    "wavelet_filters",
]

WaveletBands = tuple[Tensor, list[Tensor]]
"""``(low: [N, C, H_J, W_J], highs: list of [N, C, 3, h_j, w_j], finest first)``."""

# Decomposition low-pass filters of orthogonal wavelets (PyWavelets' ``Wavelet(name).dec_lo``),
# so that the core needs no PyWavelets at run time. Other orthogonal wavelets are looked up in
# PyWavelets when it is installed. The high-pass filter follows from the quadrature-mirror rule.
_DEC_LO: dict[str, tuple[float, ...]] = {
    "haar": (0.7071067811865476, 0.7071067811865476),
    "db1": (0.7071067811865476, 0.7071067811865476),
    "db2": (
        -0.12940952255126037,
        0.2241438680420134,
        0.8365163037378079,
        0.48296291314453416,
    ),
    "db3": (
        0.03522629188570953,
        -0.08544127388202666,
        -0.13501102001025458,
        0.45987750211849154,
        0.8068915093110925,
        0.33267055295008263,
    ),
    "db4": (
        -0.010597401785069032,
        0.0328830116668852,
        0.030841381835560764,
        -0.18703481171909309,
        -0.027983769416859854,
        0.6308807679298589,
        0.7148465705529157,
        0.2303778133088965,
    ),
}
_HAAR_NAMES = ("haar", "db1")


@cache
def wavelet_filters(wavelet: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Decomposition filters ``(dec_lo, dec_hi)`` of an orthogonal wavelet, as PyWavelets has them.

    Raises ``ValueError`` for an unknown or non-orthogonal wavelet, naming the ones that work.
    """
    if not isinstance(wavelet, str):
        raise TypeError(f"wavelet must be a name such as 'haar' or 'db2', got {type(wavelet)!r}")
    name = wavelet.lower()
    dec_lo = _DEC_LO.get(name)
    if dec_lo is None:
        try:
            import pywt
        except ImportError:
            pywt = None
        if pywt is not None and name in pywt.wavelist(kind="discrete"):
            w = pywt.Wavelet(name)
            if not w.orthogonal:
                raise ValueError(
                    f"wavelet {wavelet!r} is not orthogonal; freekd needs an orthogonal wavelet "
                    f"such as 'haar', 'db2' or 'sym4'"
                )
            dec_lo = tuple(float(v) for v in w.dec_lo)
        else:
            known = ", ".join(sorted(_DEC_LO))
            more = "" if pywt is not None else " (install PyWavelets for the others: sym*, coif*)"
            raise ValueError(
                f"unknown wavelet {wavelet!r}; use one of {known}, or any orthogonal "
                f"PyWavelets wavelet{more}"
            )
    length = len(dec_lo)
    # Quadrature mirror: dec_hi[k] = (-1)^(k+1) * dec_lo[L-1-k] (PyWavelets' convention).
    dec_hi = tuple(((-1) ** (k + 1)) * dec_lo[length - 1 - k] for k in range(length))
    return dec_lo, dec_hi


def _is_haar(wavelet: str) -> bool:
    return isinstance(wavelet, str) and wavelet.lower() in _HAAR_NAMES


def band_sizes(size: tuple[int, int], levels: int, wavelet: str = "haar") -> list[tuple[int, int]]:
    """Sizes ``(h_j, w_j)`` of the bands of levels ``1..J`` for a map of ``size=(H, W)``.

    Same as PyWavelets' ``dwt_coeff_len(n, filter_len, "zero")`` applied level by level.
    """
    length = len(wavelet_filters(wavelet)[0])
    sizes, (h, w) = [], size
    for _ in range(levels):
        h, w = (h + length - 1) // 2, (w + length - 1) // 2
        sizes.append((h, w))
    return sizes


def auto_levels(
    sizes: Sequence[tuple[int, int]],
    min_band: int = 2,
    max_levels: int = 3,
    wavelet: str = "haar",
) -> list[int]:
    """Wavelet levels per distilled layer from the layers' map sizes ``(H_i, W_i)``.

    For each layer, the largest ``J <= max_levels`` whose coarsest band (:func:`band_sizes`;
    ``ceil(n / 2)`` per level for Haar) is at least ``min_band`` on both sides; at least 1.
    E.g. with the defaults, 32x32 -> 3 (16, 8, 4), 8x8 -> 2 (4, 2), 4x4 -> 1. Pass the result as
    ``FreeKDLoss(levels=...)``: the loss builds its prompts at construction, so it needs the
    levels then, and this helper needs the sizes (from one forward pass of the teacher, e.g.
    :func:`freekd.taps.probe_features`).

    Returns:
        One level count per layer, each in ``1..max_levels``.

    Raises:
        ValueError: a size is not two positive integers, or ``min_band`` / ``max_levels`` < 1.

    Example:
        >>> auto_levels([(32, 32), (8, 8), (4, 4)])
        [3, 2, 1]
    """
    check_positive_int("min_band", min_band)
    check_positive_int("max_levels", max_levels)
    levels = []
    for index, size in enumerate(sizes):
        height, width = _check_size(index, size)
        bands = band_sizes((height, width), max_levels, wavelet)
        fitting = [j for j, (h, w) in enumerate(bands, start=1) if min(h, w) >= min_band]
        levels.append(max(fitting, default=1))
    return levels


def _check_size(index: int, size: object) -> tuple[int, int]:
    """``size`` as ``(H, W)``, two positive ints; a ``ValueError`` naming ``sizes[index]``."""
    if (
        not isinstance(size, Sequence)
        or len(size) != 2
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in size)
    ):
        raise ValueError(f"sizes[{index}] must be (H, W), two integers >= 1, got {size!r}")
    return int(size[0]), int(size[1])


# --------------------------------------------------------------------------------------------
# Haar fast path: one level, with hand-written adjoints as backward passes. The forward passes run
# without autograd (inside custom Functions), so they write into preallocated outputs instead of
# stacking: large fresh allocations, not arithmetic, dominate the time on a CPU.


def _haar_analysis(x: Tensor) -> tuple[Tensor, Tensor]:
    """One Haar level. ``x: [N, C, H, W]`` -> ``low: [N, C, h, w]`` and
    ``high: [N, C, 3, h, w]`` (cH, cV, cD), ``h = ceil(H / 2)``, ``w = ceil(W / 2)``."""
    height, width = x.shape[-2:]
    if height % 2 or width % 2:
        x = F.pad(x, (0, width % 2, 0, height % 2))
    batch, channels, height, width = x.shape
    pixels = x.reshape(batch, channels, height // 2, 2, width // 2, 2)
    top_left, top_right = pixels[:, :, :, 0, :, 0], pixels[:, :, :, 0, :, 1]
    bottom_left, bottom_right = pixels[:, :, :, 1, :, 0], pixels[:, :, :, 1, :, 1]
    top_sum, top_diff = top_left + top_right, top_left - top_right
    bottom_sum, bottom_diff = bottom_left + bottom_right, bottom_left - bottom_right
    low = torch.add(top_sum, bottom_sum).mul_(0.5)
    high = x.new_empty(batch, channels, 3, height // 2, width // 2)
    torch.sub(top_sum, bottom_sum, out=high[:, :, 0])  # cH: detail along H, approx along W
    torch.add(top_diff, bottom_diff, out=high[:, :, 1])  # cV: approx along H, detail along W
    torch.sub(top_diff, bottom_diff, out=high[:, :, 2])  # cD
    return low, high.mul_(0.5)


def _haar_synthesis(low: Tensor, high: Tensor) -> Tensor:
    """Inverse of one Haar level: ``low: [N, C, h, w]``, ``high: [N, C, 3, h, w]`` ->
    ``[N, C, 2h, 2w]``."""
    batch, channels, height, width = low.shape
    horizontal, vertical, diagonal = high.unbind(dim=2)
    top_sum, bottom_sum = low + horizontal, low - horizontal
    top_diff, bottom_diff = vertical + diagonal, vertical - diagonal
    out = low.new_empty(batch, channels, height, 2, width, 2)
    torch.add(top_sum, top_diff, out=out[:, :, :, 0, :, 0])
    torch.sub(top_sum, top_diff, out=out[:, :, :, 0, :, 1])
    torch.add(bottom_sum, bottom_diff, out=out[:, :, :, 1, :, 0])
    torch.sub(bottom_sum, bottom_diff, out=out[:, :, :, 1, :, 1])
    return out.view(batch, channels, 2 * height, 2 * width).mul_(0.5)


class _HaarAnalysis(torch.autograd.Function):
    """Haar analysis ``x -> (low, high)`` whose backward is synthesis (its adjoint)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> tuple[Tensor, Tensor]:
        ctx.size = tuple(x.shape[-2:])
        return _haar_analysis(x)

    @staticmethod
    def backward(ctx, grad_low: Tensor | None, grad_high: Tensor | None) -> Tensor:
        height, width = ctx.size
        band_size = ((height + 1) // 2, (width + 1) // 2)
        reference = grad_low if grad_low is not None else grad_high
        if grad_low is None:
            grad_low = reference.new_zeros(*reference.shape[:2], *band_size)
        if grad_high is None:
            grad_high = reference.new_zeros(*reference.shape[:2], 3, *band_size)
        return _HaarSynthesis.apply(grad_low, grad_high)[..., :height, :width]


class _HaarSynthesis(torch.autograd.Function):
    """Haar synthesis ``(low, high) -> x`` whose backward is analysis (its adjoint)."""

    @staticmethod
    def forward(ctx, low: Tensor, high: Tensor) -> Tensor:
        return _haar_synthesis(low, high)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        return _HaarAnalysis.apply(grad)


# --------------------------------------------------------------------------------------------
# Filter-bank path for any orthogonal wavelet: grouped (transposed) convolutions.


def _band_kernels(wavelet: str, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The four separable 2-D analysis kernels ``[4, 1, L, L]`` (LL, cH, cV, cD), flipped for
    ``conv2d`` (a cross-correlation) so that the result is PyWavelets' convolution."""
    dec_lo, dec_hi = wavelet_filters(wavelet)
    lo = torch.tensor(dec_lo[::-1], dtype=torch.float64)
    hi = torch.tensor(dec_hi[::-1], dtype=torch.float64)
    # First factor: filter along H; second: along W. cH = detail along H, approximation along W.
    pairs = ((lo, lo), (hi, lo), (lo, hi), (hi, hi))
    kernels = torch.stack([torch.outer(a, b) for a, b in pairs]).unsqueeze(1)
    return kernels.to(dtype=dtype, device=device)


def _conv_analysis(x: Tensor, wavelet: str) -> tuple[Tensor, Tensor]:
    """One filter-bank level. ``x: [N, C, H, W]`` -> ``low: [N, C, h, w]``,
    ``high: [N, C, 3, h, w]``, ``h = (H + L - 1) // 2``."""
    batch, channels = x.shape[:2]
    kernels = _band_kernels(wavelet, x.dtype, x.device)
    length = kernels.shape[-1]
    # PyWavelets keeps every output that can be non-zero: L - 2 zeros before, L - 1 after.
    padded = F.pad(x, (length - 2, length - 1, length - 2, length - 1))
    out = F.conv2d(padded, kernels.repeat(channels, 1, 1, 1), stride=2, groups=channels)
    bands = out.view(batch, channels, 4, *out.shape[-2:])
    return bands[:, :, 0], bands[:, :, 1:]


def _conv_synthesis(low: Tensor, high: Tensor, wavelet: str) -> Tensor:
    """Inverse of one filter-bank level: ``low: [N, C, h, w]``, ``high: [N, C, 3, h, w]`` ->
    ``[N, C, 2h - L + 2, 2w - L + 2]``."""
    bands = torch.cat((low.unsqueeze(2), high), dim=2)
    batch, channels, _, height, width = bands.shape
    kernels = _band_kernels(wavelet, bands.dtype, bands.device)
    length = kernels.shape[-1]
    return F.conv_transpose2d(
        bands.reshape(batch, channels * 4, height, width),
        kernels.repeat(channels, 1, 1, 1),
        stride=2,
        padding=length - 2,
        groups=channels,
    )


# --------------------------------------------------------------------------------------------
# Public functions.


def dwt2(x: Tensor, levels: int = 3, wavelet: str = "haar") -> WaveletBands:
    """Multi-level 2-D DWT of ``x: [N, C, H, W]`` (PyWavelets' ``wavedec2``, mode ``"zero"``).

    Differentiable; any float dtype; bands keep ``x``'s dtype and device (also under autocast).
    Haar runs as reshapes and adds, other orthogonal wavelets as strided convolutions.

    Returns:
        ``(low, highs)``: ``low: [N, C, H_J, W_J]``; ``highs[j - 1]: [N, C, 3, h_j, w_j]`` for
        levels ``j = 1..levels``, finest first, orientations (cH, cV, cD) in PyWavelets' order
        and signs; sizes ``ceil(n / 2)`` per level for Haar (:func:`band_sizes`).

    Raises:
        ValueError: ``x`` is not ``[N, C, H, W]`` with ``C, H, W >= 1``, ``levels < 1``, or the
            wavelet is unknown or not orthogonal.
        TypeError: ``x`` is not floating point.

    Example:
        >>> import torch
        >>> low, highs = dwt2(torch.randn(2, 4, 16, 16), levels=3)
        >>> low.shape, [tuple(h.shape) for h in highs]
        (torch.Size([2, 4, 2, 2]), [(2, 4, 3, 8, 8), (2, 4, 3, 4, 4), (2, 4, 3, 2, 2)])
    """
    check_positive_int("levels", levels)
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(
            f"dwt2 expects a 4-D tensor [N, C, H, W], got {shape}: add the missing batch or "
            f"channel dimension (x[None])"
        )
    if not x.is_floating_point():
        raise TypeError(
            f"dwt2 expects a floating-point tensor, got {x.dtype}: convert it with x.float()"
        )
    if min(x.shape[1:]) < 1:
        raise ValueError(
            f"dwt2 needs at least one channel and one pixel, got [N, C, H, W] = "
            f"{tuple(x.shape)}: check the feature that was passed"
        )
    haar = _is_haar(wavelet)
    if not haar:
        wavelet_filters(wavelet)  # validate the name before any work
    highs: list[Tensor] = []
    low = x
    # Bands keep x's dtype, also under autocast (which would run the convolutions in half).
    with torch.autocast(device_type=x.device.type, enabled=False):
        for _ in range(levels):
            low, high = _HaarAnalysis.apply(low) if haar else _conv_analysis(low, wavelet)
            highs.append(high)
    return low, highs


def _check_bands(bands: object) -> tuple[Tensor, Sequence[Tensor]]:
    """``bands`` as ``(low, highs)``, or a ``ValueError`` / ``TypeError`` saying what it is."""
    if not isinstance(bands, tuple | list) or len(bands) != 2:
        what = tuple(bands.shape) if isinstance(bands, Tensor) else type(bands).__name__
        raise ValueError(f"idwt2 takes the pair (low, highs) that dwt2 returned, got {what}")
    low, highs = bands
    if not isinstance(low, Tensor) or low.dim() != 4:
        what = tuple(low.shape) if isinstance(low, Tensor) else type(low).__name__
        raise ValueError(f"idwt2: the approximation band must be [N, C, h, w], got {what}")
    if isinstance(highs, Tensor) or not isinstance(highs, Sequence) or len(highs) == 0:
        raise ValueError(
            "idwt2 needs at least one level of detail bands: highs must be a non-empty list "
            "of [N, C, 3, h, w] tensors (one per level, finest first), as dwt2 returns them"
        )
    for detail in highs:
        if not isinstance(detail, Tensor):
            raise ValueError(f"idwt2: detail bands must be tensors, got {type(detail).__name__}")
    return low, highs


def idwt2(bands: WaveletBands, wavelet: str = "haar", size: Sequence[int] | None = None) -> Tensor:
    """Inverse of :func:`dwt2`: ``(low, highs)`` -> ``[N, C, H', W']``.

    Like PyWavelets' ``waverec2``, an intermediate approximation one pixel larger than the next
    detail band is cropped to it, and the result is returned uncropped (``H' >= H``) unless
    ``size=(H, W)`` is given.

    Returns:
        The reconstruction ``[N, C, H', W']`` (``[N, C, H, W]`` with ``size``), in the bands'
        dtype.

    Raises:
        ValueError: ``bands`` is not the pair :func:`dwt2` returns, the bands do not fit each
            other, or ``size`` is larger than the reconstruction.
        TypeError: the bands are not floating point or differ in dtype.

    Example:
        >>> import torch
        >>> x = torch.randn(1, 3, 15, 9, dtype=torch.float64)
        >>> torch.allclose(idwt2(dwt2(x, 2), size=x.shape[-2:]), x)
        True
    """
    low, highs = _check_bands(bands)
    haar = _is_haar(wavelet)
    if not haar:
        wavelet_filters(wavelet)
    for detail in reversed(highs):
        if detail.dim() != 5 or detail.shape[2] != 3:
            raise ValueError(f"detail bands must be [N, C, 3, h, w], got {tuple(detail.shape)}")
        if not detail.is_floating_point() or not low.is_floating_point():
            raise TypeError(
                f"idwt2 expects floating-point bands, got {low.dtype} and {detail.dtype}"
            )
        height, width = detail.shape[-2:]
        # dwt2 leaves the approximation equal to the next detail band or one pixel larger.
        fits = height <= low.shape[-2] <= height + 1 and width <= low.shape[-1] <= width + 1
        if not fits or low.shape[:2] != detail.shape[:2]:
            raise ValueError(
                f"approximation {tuple(low.shape)} does not fit detail bands "
                f"{tuple(detail.shape)}: pass the pair that dwt2 returned"
            )
        low = low[..., :height, :width]
        if low.dtype != detail.dtype:
            raise TypeError(
                f"idwt2: approximation ({low.dtype}) and detail bands ({detail.dtype}) differ in "
                f"dtype: pass the bands that dwt2 returned, or convert them to one dtype"
            )
        with torch.autocast(device_type=low.device.type, enabled=False):
            low = (
                _HaarSynthesis.apply(low, detail) if haar else _conv_synthesis(low, detail, wavelet)
            )
    if size is not None:
        height, width = size
        if height > low.shape[-2] or width > low.shape[-1]:
            raise ValueError(
                f"size {tuple(size)} is larger than the reconstruction {tuple(low.shape[-2:])}"
            )
        low = low[..., :height, :width]
    return low


class DWT2d(nn.Module):
    """Module form of :func:`dwt2` (no parameters): ``DWT2d(levels, wavelet)(x) -> (low, highs)``.

    Example:
        >>> import torch
        >>> low, highs = DWT2d(levels=2)(torch.randn(1, 2, 8, 8))
        >>> low.shape, len(highs)
        (torch.Size([1, 2, 2, 2]), 2)
    """

    def __init__(self, levels: int = 3, wavelet: str = "haar") -> None:
        super().__init__()
        check_positive_int("levels", levels)
        wavelet_filters(wavelet)
        self.levels, self.wavelet = levels, wavelet

    def forward(self, x: Tensor) -> WaveletBands:
        return dwt2(x, self.levels, self.wavelet)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, wavelet={self.wavelet!r}"


class IDWT2d(nn.Module):
    """Module form of :func:`idwt2` (no parameters): ``IDWT2d(wavelet)(bands, size) -> x``.

    Example:
        >>> import torch
        >>> x = torch.randn(1, 2, 8, 8, dtype=torch.float64)
        >>> torch.allclose(IDWT2d()(DWT2d(levels=2)(x)), x)
        True
    """

    def __init__(self, wavelet: str = "haar") -> None:
        super().__init__()
        wavelet_filters(wavelet)
        self.wavelet = wavelet

    def forward(self, bands: WaveletBands, size: Sequence[int] | None = None) -> Tensor:
        return idwt2(bands, self.wavelet, size)

    def extra_repr(self) -> str:
        return f"wavelet={self.wavelet!r}"
