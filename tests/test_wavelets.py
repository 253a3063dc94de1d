"""Tests of freekd.wavelets, checked against PyWavelets (an independent reference) and exact
properties (adjointness, energy, linearity), not against snapshots of its own output.

Layout: ours is ``(low: [N, C, H_J, W_J], highs: [[N, C, 3, h_j, w_j], ...] finest first)``;
PyWavelets' ``wavedec2`` returns ``[cA_J, (cH_J, cV_J, cD_J), ..., (cH_1, cV_1, cD_1)]``
(coarsest first). ``to_ours`` / ``to_pywt`` convert between the two.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from freekd.wavelets import DWT2d, IDWT2d, band_sizes, dwt2, idwt2, wavelet_filters

pywt = pytest.importorskip("pywt")

WAVELETS = ("haar", "db2")
SIZES = ((1, 1), (2, 3), (5, 1), (7, 11), (13, 21), (100, 168))
LEVELS = (1, 2, 3)
ORIENTATIONS = ("cH", "cV", "cD")
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


# ---------------------------------------------------------------------------------------------
# Helpers


def make_input(size, dtype=torch.float64, seed=0, batch=None, channels=None) -> torch.Tensor:
    """A random map; big maps get one sample and one channel to keep the file fast."""
    height, width = size
    big = height * width > 1000
    batch = batch if batch is not None else (1 if big else 2)
    channels = channels if channels is not None else (1 if big else 3)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, height, width, generator=generator, dtype=dtype)


def pywt_wavedec2(x: torch.Tensor, wavelet: str, levels: int) -> list:
    """PyWavelets' decomposition of the float64 copy of ``x``, its too-high-level warning muted."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Level value", category=UserWarning)
        return pywt.wavedec2(
            x.detach().cpu().double().numpy(), wavelet, mode="zero", level=levels, axes=(-2, -1)
        )


def pywt_waverec2(coeffs: list, wavelet: str) -> np.ndarray:
    return pywt.waverec2(coeffs, wavelet, mode="zero", axes=(-2, -1))


def to_ours(coeffs: list, dtype=torch.float64) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """PyWavelets' coefficient list -> our ``(low, highs)`` layout (finest first)."""
    low = torch.from_numpy(np.ascontiguousarray(coeffs[0])).to(dtype)
    highs = [torch.from_numpy(np.stack(details, axis=2)).to(dtype) for details in coeffs[:0:-1]]
    return low, highs


def to_pywt(low: torch.Tensor, highs: list[torch.Tensor]) -> list:
    """Our ``(low, highs)`` layout -> PyWavelets' coefficient list (float64 numpy)."""
    as_np = [h.detach().cpu().double().numpy() for h in highs]
    return [low.detach().cpu().double().numpy()] + [
        (h[:, :, 0], h[:, :, 1], h[:, :, 2]) for h in reversed(as_np)
    ]


def assert_close_np(actual: torch.Tensor, expected: np.ndarray, tol: float, what: str) -> None:
    assert tuple(actual.shape) == expected.shape, f"{what}: shape {tuple(actual.shape)}"
    np.testing.assert_allclose(
        actual.detach().cpu().double().numpy(), expected, rtol=tol, atol=tol, err_msg=what
    )


def assert_bands_match_pywt(low, highs, coeffs, tol: float) -> None:
    """Compare shapes and every band, each orientation separately, with PyWavelets' list."""
    assert len(highs) == len(coeffs) - 1, "number of levels"
    assert_close_np(low, coeffs[0], tol, "approximation band")
    for level, (high, details) in enumerate(zip(highs, coeffs[:0:-1], strict=True), start=1):
        assert high.dim() == 5 and high.shape[2] == 3, f"level {level}: {tuple(high.shape)}"
        for index, (name, expected) in enumerate(zip(ORIENTATIONS, details, strict=True)):
            assert_close_np(high[:, :, index], expected, tol, f"level {level} {name}")


def inner(a_bands, b_bands) -> torch.Tensor:
    """Euclidean inner product of two band sets."""
    (a_low, a_highs), (b_low, b_highs) = a_bands, b_bands
    return (a_low * b_low).sum() + sum((a * b).sum() for a, b in zip(a_highs, b_highs, strict=True))


def analysis_matrix(size, wavelet: str, levels: int) -> np.ndarray:
    """PyWavelets' multi-level analysis as an explicit matrix ``[n_coeffs, H * W]`` (our band
    order: low, then highs finest first, each [3, h, w]), built from its images of a basis."""
    height, width = size
    basis = np.eye(height * width).reshape(height * width, 1, height, width)
    low, highs = to_ours(pywt_wavedec2(torch.from_numpy(basis), wavelet, levels))
    columns = [low.flatten(1)] + [h.flatten(1) for h in highs]
    return torch.cat(columns, dim=1).numpy().T


def flatten_bands(low, highs) -> torch.Tensor:
    """Flatten one sample / one channel's bands in the order of ``analysis_matrix``."""
    return torch.cat([low.flatten()] + [h.flatten() for h in highs])


# ---------------------------------------------------------------------------------------------
# 1. Analysis equals pywt.wavedec2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("wavelet", WAVELETS)
def test_dwt2_matches_pywt_wavedec2(wavelet, size, levels, dtype):
    x = make_input(size, dtype)
    low, highs = dwt2(x, levels=levels, wavelet=wavelet)
    assert low.dtype == dtype and all(h.dtype == dtype for h in highs)
    assert_bands_match_pywt(low, highs, pywt_wavedec2(x, wavelet, levels), TOL[dtype])


@pytest.mark.parametrize("wavelet", ["db1", "db3", "db4", "sym4", "coif1"])
def test_dwt2_other_orthogonal_wavelets_match_pywt(wavelet):
    """The hard-coded filters (db1..db4) and those looked up in PyWavelets (sym4, coif1)."""
    x = make_input((13, 21))
    low, highs = dwt2(x, levels=2, wavelet=wavelet)
    coeffs = pywt_wavedec2(x, wavelet, 2)
    assert_bands_match_pywt(low, highs, coeffs, 1e-12)
    assert_close_np(idwt2((low, highs), wavelet), pywt_waverec2(coeffs, wavelet), 1e-12, "rec")


@pytest.mark.parametrize("wavelet", ["haar", "db1", "db2", "db3", "db4", "sym4", "coif1"])
def test_wavelet_filters_equal_pywt(wavelet):
    dec_lo, dec_hi = wavelet_filters(wavelet)
    reference = pywt.Wavelet(wavelet)
    np.testing.assert_allclose(dec_lo, reference.dec_lo, rtol=0, atol=1e-15)
    np.testing.assert_allclose(dec_hi, reference.dec_hi, rtol=0, atol=1e-15)


@pytest.mark.parametrize("wavelet", WAVELETS)
@pytest.mark.parametrize("layout", ["transposed", "channels_last", "sliced"], ids=lambda name: name)
def test_dwt2_non_contiguous_input(wavelet, layout):
    base = make_input((9, 13), torch.float32)
    if layout == "transposed":
        x = make_input((13, 9), torch.float32).transpose(-1, -2)
    elif layout == "channels_last":
        x = base.contiguous(memory_format=torch.channels_last)
    else:
        x = make_input((9, 26), torch.float32)[..., ::2]
    assert not x.is_contiguous()
    low, highs = dwt2(x, levels=2, wavelet=wavelet)
    assert_bands_match_pywt(low, highs, pywt_wavedec2(x, wavelet, 2), 1e-5)


# ---------------------------------------------------------------------------------------------
# 2. Synthesis equals pywt.waverec2, and perfect reconstruction


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("wavelet", WAVELETS)
def test_idwt2_matches_pywt_waverec2_and_reconstructs(wavelet, size, levels, dtype):
    x = make_input(size, dtype)
    low, highs = dwt2(x, levels=levels, wavelet=wavelet)
    expected = pywt_waverec2(to_pywt(low, highs), wavelet)
    uncropped = idwt2((low, highs), wavelet=wavelet)
    assert uncropped.dtype == dtype
    assert_close_np(uncropped, expected, TOL[dtype], "uncropped reconstruction")
    cropped = idwt2((low, highs), wavelet=wavelet, size=size)
    assert_close_np(cropped, x.double().numpy(), TOL[dtype], "perfect reconstruction")


@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("wavelet", WAVELETS)
def test_idwt2_of_pywt_coefficients(wavelet, size, levels):
    """Feed PyWavelets' own coefficients (not ours) into idwt2."""
    coeffs = pywt_wavedec2(make_input(size, seed=1), wavelet, levels)
    result = idwt2(to_ours(coeffs), wavelet=wavelet)
    assert_close_np(result, pywt_waverec2(coeffs, wavelet), 1e-12, "idwt2(pywt coeffs)")


@pytest.mark.parametrize("wavelet", WAVELETS)
def test_idwt2_of_arbitrary_bands_matches_pywt(wavelet):
    """Bands that are not the image of any x (random in every band) still invert like pywt."""
    template = pywt_wavedec2(make_input((13, 21)), wavelet, 3)
    rng = np.random.default_rng(3)
    coeffs = [rng.standard_normal(template[0].shape)] + [
        tuple(rng.standard_normal(d.shape) for d in details) for details in template[1:]
    ]
    result = idwt2(to_ours(coeffs), wavelet=wavelet)
    assert_close_np(result, pywt_waverec2(coeffs, wavelet), 1e-12, "idwt2(random bands)")


# ---------------------------------------------------------------------------------------------
# 3. band_sizes


@pytest.mark.parametrize("levels", [1, 2, 3, 5])
@pytest.mark.parametrize("size", [(1, 1), (5, 1), (2, 3), (7, 11), (64, 64), (100, 168)])
@pytest.mark.parametrize("wavelet", ["haar", "db2", "db3", "sym4"])
def test_band_sizes_match_pywt_dwt_coeff_len(wavelet, size, levels):
    filter_len = pywt.Wavelet(wavelet).dec_len
    expected, (height, width) = [], size
    for _ in range(levels):
        height = pywt.dwt_coeff_len(height, filter_len, "zero")
        width = pywt.dwt_coeff_len(width, filter_len, "zero")
        expected.append((height, width))
    assert band_sizes(size, levels, wavelet) == expected


# ---------------------------------------------------------------------------------------------
# 4. Gradients


@pytest.mark.parametrize("wavelet", WAVELETS)
def test_dwt2_gradcheck_and_gradgradcheck(wavelet):
    x = make_input((5, 7), batch=1, channels=2).requires_grad_()

    def bands(x):
        low, highs = dwt2(x, levels=2, wavelet=wavelet)
        return (low, *highs)

    assert torch.autograd.gradcheck(bands, (x,))
    assert torch.autograd.gradgradcheck(bands, (x,))


@pytest.mark.parametrize("wavelet", WAVELETS)
def test_idwt2_gradcheck_and_gradgradcheck(wavelet):
    low, highs = dwt2(make_input((5, 7), batch=1, channels=1), levels=2, wavelet=wavelet)
    inputs = (low.requires_grad_(), *(h.requires_grad_() for h in highs))

    def cropped(low, *highs):
        return idwt2((low, list(highs)), wavelet=wavelet, size=(5, 7))

    def uncropped(low, *highs):
        return idwt2((low, list(highs)), wavelet=wavelet)

    for function in (cropped, uncropped):
        assert torch.autograd.gradcheck(function, inputs)
        assert torch.autograd.gradgradcheck(function, inputs)


@pytest.mark.parametrize(
    ("use_low", "use_levels"),
    [(True, (0, 1)), (True, ()), (False, (0,)), (False, (1,))],
    ids=["all", "low-only", "finest-only", "coarsest-only"],
)
@pytest.mark.parametrize("wavelet", WAVELETS)
def test_dwt2_gradient_equals_pywt_adjoint(wavelet, use_low, use_levels):
    """The gradient of <dwt2(x), w> is A^T w with A PyWavelets' analysis matrix, also when the
    loss uses only some bands (the others then get no gradient at all)."""
    size, levels = (5, 7), 2
    x = make_input(size, batch=1, channels=1).requires_grad_()
    low, highs = dwt2(x, levels=levels, wavelet=wavelet)
    generator = torch.Generator().manual_seed(5)

    def weights(band, used):
        if not used:
            return torch.zeros_like(band)
        return torch.randn(band.shape, generator=generator, dtype=band.dtype)

    weights_low = weights(low, use_low)
    weights_highs = [weights(h, j in use_levels) for j, h in enumerate(highs)]
    loss = (low * weights_low).sum() if use_low else 0
    for j in use_levels:
        loss = loss + (highs[j] * weights_highs[j]).sum()
    (grad,) = torch.autograd.grad(loss, x)
    expected = (
        analysis_matrix(size, wavelet, levels).T @ flatten_bands(weights_low, weights_highs).numpy()
    )
    assert np.abs(expected).max() > 1e-3  # not trivially zero
    np.testing.assert_allclose(grad.flatten().numpy(), expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# 5. Orthogonality: synthesis is the adjoint of analysis, analysis preserves the norm


@pytest.mark.parametrize("size", [(5, 1), (7, 11), (13, 21)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("wavelet", WAVELETS)
def test_idwt2_is_adjoint_of_dwt2(wavelet, size):
    x = make_input(size)
    bands = dwt2(x, levels=3, wavelet=wavelet)
    generator = torch.Generator().manual_seed(7)
    low, highs = bands
    y_bands = (
        torch.randn(low.shape, generator=generator, dtype=x.dtype),
        [torch.randn(h.shape, generator=generator, dtype=x.dtype) for h in highs],
    )
    lhs = inner(bands, y_bands)
    rhs = (x * idwt2(y_bands, wavelet=wavelet, size=size)).sum()
    assert abs(lhs.item()) > 1e-3  # not trivially zero
    assert lhs.item() == pytest.approx(rhs.item(), rel=1e-10, abs=1e-10)


@pytest.mark.parametrize("wavelet", WAVELETS)
def test_idwt2_equals_pywt_adjoint_matrix(wavelet):
    """idwt2(y, size) == A^T y with A built from PyWavelets alone, for arbitrary bands y."""
    size, levels = (5, 7), 2
    matrix = analysis_matrix(size, wavelet, levels)
    shapes = dwt2(torch.zeros(1, 1, *size, dtype=torch.float64), levels, wavelet)
    generator = torch.Generator().manual_seed(11)
    y_low = torch.randn(shapes[0].shape, generator=generator, dtype=torch.float64)
    y_highs = [torch.randn(h.shape, generator=generator, dtype=torch.float64) for h in shapes[1]]
    result = idwt2((y_low, y_highs), wavelet=wavelet, size=size)
    expected = matrix.T @ flatten_bands(y_low, y_highs).numpy()
    np.testing.assert_allclose(result.flatten().numpy(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("wavelet", WAVELETS)
def test_dwt2_preserves_energy(wavelet):
    x = make_input((13, 21))
    bands = dwt2(x, levels=3, wavelet=wavelet)
    assert inner(bands, bands).item() == pytest.approx((x * x).sum().item(), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# 6. Dtypes and devices


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("wavelet", WAVELETS)
def test_low_precision_keeps_dtype_and_is_close(wavelet, dtype):
    x = make_input((13, 21), torch.float32).to(dtype)
    low, highs = dwt2(x, levels=3, wavelet=wavelet)
    assert low.dtype == dtype and all(h.dtype == dtype for h in highs)
    coeffs = pywt_wavedec2(x, wavelet, 3)  # reference on the same (rounded) input, in float64
    scale = max(np.abs(coeffs[0]).max(), *(np.abs(d).max() for ds in coeffs[1:] for d in ds))
    assert_bands_match_pywt(low, highs, coeffs, tol=2e-2 * scale)
    rebuilt = idwt2((low, highs), wavelet=wavelet, size=(13, 21))
    assert rebuilt.dtype == dtype
    reference = x.double().numpy()
    assert_close_np(rebuilt, reference, 2e-2 * np.abs(reference).max(), "reconstruction")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("wavelet", WAVELETS)
def test_float_dtypes_are_kept(wavelet, dtype):
    x = make_input((7, 11), dtype).requires_grad_()
    low, highs = dwt2(x, levels=2, wavelet=wavelet)
    assert low.dtype == dtype and all(h.dtype == dtype for h in highs)
    rebuilt = idwt2((low, highs), wavelet=wavelet, size=(7, 11))
    assert rebuilt.dtype == dtype
    (grad,) = torch.autograd.grad(rebuilt.sum(), x)
    assert grad.dtype == dtype


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("wavelet", WAVELETS)
def test_cuda_matches_cpu(wavelet):
    x_cpu = make_input((13, 21), torch.float32).requires_grad_()
    x_cuda = x_cpu.detach().cuda().requires_grad_()
    low_cpu, highs_cpu = dwt2(x_cpu, levels=3, wavelet=wavelet)
    low_cuda, highs_cuda = dwt2(x_cuda, levels=3, wavelet=wavelet)
    assert low_cuda.is_cuda and all(h.is_cuda for h in highs_cuda)
    for a, b in zip([low_cpu, *highs_cpu], [low_cuda, *highs_cuda], strict=True):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-5)
    rebuilt_cpu = idwt2((low_cpu, highs_cpu), wavelet=wavelet, size=(13, 21))
    rebuilt_cuda = idwt2((low_cuda, highs_cuda), wavelet=wavelet, size=(13, 21))
    assert rebuilt_cuda.is_cuda
    torch.testing.assert_close(rebuilt_cuda.cpu(), rebuilt_cpu, rtol=1e-5, atol=1e-5)
    weights = torch.randn(low_cpu.shape)
    (grad_cpu,) = torch.autograd.grad((low_cpu * weights).sum(), x_cpu)
    (grad_cuda,) = torch.autograd.grad((low_cuda * weights.cuda()).sum(), x_cuda)
    torch.testing.assert_close(grad_cuda.cpu(), grad_cpu, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# 7. Linearity


@pytest.mark.parametrize("wavelet", WAVELETS)
def test_dwt2_and_idwt2_are_linear(wavelet):
    a, b = make_input((13, 21), seed=1), make_input((13, 21), seed=2)
    low_a, highs_a = dwt2(a, levels=3, wavelet=wavelet)
    low_b, highs_b = dwt2(b, levels=3, wavelet=wavelet)
    low_d, highs_d = dwt2(a - 2.5 * b, levels=3, wavelet=wavelet)
    torch.testing.assert_close(low_d, low_a - 2.5 * low_b, rtol=1e-12, atol=1e-12)
    for d, ha, hb in zip(highs_d, highs_a, highs_b, strict=True):
        torch.testing.assert_close(d, ha - 2.5 * hb, rtol=1e-12, atol=1e-12)
    combined = idwt2(
        (low_a - low_b, [ha - hb for ha, hb in zip(highs_a, highs_b, strict=True)]), wavelet
    )
    separate = idwt2((low_a, highs_a), wavelet) - idwt2((low_b, highs_b), wavelet)
    torch.testing.assert_close(combined, separate, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# 8. Module forms


@pytest.mark.parametrize("wavelet", WAVELETS)
def test_modules_equal_functions(wavelet):
    x = make_input((7, 11))
    forward, inverse = DWT2d(levels=2, wavelet=wavelet), IDWT2d(wavelet=wavelet)
    assert list(forward.parameters()) == [] and list(inverse.parameters()) == []
    low, highs = forward(x)
    expected_low, expected_highs = dwt2(x, levels=2, wavelet=wavelet)
    assert len(highs) == 2
    torch.testing.assert_close(low, expected_low, rtol=0, atol=0)
    for got, expected in zip(highs, expected_highs, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(inverse((low, highs)), idwt2((low, highs), wavelet), rtol=0, atol=0)
    torch.testing.assert_close(inverse((low, highs), size=(7, 11)), x, rtol=1e-12, atol=1e-12)


def test_module_reprs():
    assert repr(DWT2d(levels=2, wavelet="db2")) == "DWT2d(levels=2, wavelet='db2')"
    assert repr(DWT2d()) == "DWT2d(levels=3, wavelet='haar')"
    assert repr(IDWT2d(wavelet="db2")) == "IDWT2d(wavelet='db2')"


def test_modules_validate_arguments():
    with pytest.raises(ValueError, match="levels"):
        DWT2d(levels=0)
    with pytest.raises(ValueError, match="unknown wavelet"):
        DWT2d(wavelet="nope")
    with pytest.raises(ValueError, match="orthogonal"):
        IDWT2d(wavelet="bior2.2")


# ---------------------------------------------------------------------------------------------
# 9. Bad input


@pytest.mark.parametrize("wavelet", WAVELETS)
def test_dwt2_rejects_bad_input(wavelet):
    x = make_input((8, 8))
    with pytest.raises(ValueError, match="4-D"):
        dwt2(x[0], levels=1, wavelet=wavelet)
    with pytest.raises(ValueError, match="4-D"):
        dwt2(x.numpy(), levels=1, wavelet=wavelet)
    with pytest.raises(TypeError, match="floating-point"):
        dwt2(torch.ones(1, 1, 8, 8, dtype=torch.int64), levels=1, wavelet=wavelet)
    for levels in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="levels"):
            dwt2(x, levels=levels, wavelet=wavelet)


@pytest.mark.parametrize(
    ("wavelet", "error", "word"),
    [
        ("nope", ValueError, "unknown wavelet"),
        ("bior2.2", ValueError, "not orthogonal"),
        ("rbio1.3", ValueError, "not orthogonal"),
        (None, TypeError, "wavelet must be a name"),
    ],
)
def test_bad_wavelet_names(wavelet, error, word):
    x = make_input((8, 8))
    with pytest.raises(error, match=word):
        dwt2(x, levels=1, wavelet=wavelet)
    with pytest.raises(error, match=word):
        band_sizes((8, 8), 1, wavelet)
    with pytest.raises(error, match=word):
        wavelet_filters(wavelet)
    low, highs = dwt2(x, levels=1, wavelet="db2")
    with pytest.raises(error, match=word):
        idwt2((low, highs), wavelet=wavelet)


def _mismatched(case: str, wavelet: str):
    low, highs = dwt2(make_input((13, 21)), levels=2, wavelet=wavelet)
    if case == "low too small":
        return low[..., :-1, :], highs
    if case == "low other channels":
        return low[:, :2], highs
    if case == "low other batch":
        return low[:1], highs
    if case == "two orientations":
        return low, [highs[0], highs[1][:, :, :2]]
    if case == "detail 4-D":
        return low, [highs[0], highs[1][:, :, 0]]
    if case == "low two pixels too large":
        return torch.nn.functional.pad(low, (0, 2, 0, 2)), highs
    if case == "finest detail too small":
        return low, [highs[0][..., :-3, :-3], highs[1]]
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "low too small",
        "low other channels",
        "low other batch",
        "two orientations",
        "detail 4-D",
        "low two pixels too large",
        "finest detail too small",
    ],
)
@pytest.mark.parametrize("wavelet", WAVELETS)
def test_idwt2_rejects_mismatched_bands(wavelet, case):
    with pytest.raises(ValueError, match=r"detail bands|does not fit"):
        idwt2(_mismatched(case, wavelet), wavelet=wavelet)


@pytest.mark.parametrize("wavelet", WAVELETS)
def test_idwt2_rejects_bad_size_and_empty_highs(wavelet):
    bands = dwt2(make_input((7, 11)), levels=2, wavelet=wavelet)
    uncropped = idwt2(bands, wavelet=wavelet).shape[-2:]  # (8, 12)
    for size in [(uncropped[0] + 1, 11), (7, uncropped[1] + 1), (100, 100)]:
        with pytest.raises(ValueError, match="larger than the reconstruction"):
            idwt2(bands, wavelet=wavelet, size=size)
    assert idwt2(bands, wavelet=wavelet, size=tuple(uncropped)).shape[-2:] == uncropped
    with pytest.raises(ValueError, match="at least one level"):
        idwt2((bands[0], []), wavelet=wavelet)


def test_idwt2_rejects_integer_bands():
    low, highs = dwt2(make_input((8, 8)), levels=1)
    with pytest.raises(TypeError, match="floating-point"):
        idwt2((low.long(), [h.long() for h in highs]))


# ---------------------------------------------------------------------------------------------
# 10. Property test


@settings(max_examples=30, deadline=None)
@given(
    height=st.integers(1, 40),
    width=st.integers(1, 40),
    levels=st.integers(1, 4),
    wavelet=st.sampled_from(WAVELETS),
    seed=st.integers(0, 2**16),
)
def test_property_shapes_and_perfect_reconstruction(height, width, levels, wavelet, seed):
    x = make_input((height, width), seed=seed, batch=1, channels=2)
    low, highs = dwt2(x, levels=levels, wavelet=wavelet)
    coeffs = pywt_wavedec2(x, wavelet, levels)
    assert tuple(low.shape) == coeffs[0].shape
    assert [tuple(h.shape) for h in highs] == [
        (*details[0].shape[:2], 3, *details[0].shape[2:]) for details in coeffs[:0:-1]
    ]
    assert [tuple(h.shape[-2:]) for h in highs] == band_sizes((height, width), levels, wavelet)
    rebuilt = idwt2((low, highs), wavelet=wavelet, size=(height, width))
    torch.testing.assert_close(rebuilt, x, rtol=1e-10, atol=1e-10)
