"""Fuzzing ``dwt2`` / ``idwt2`` and ``FreeKDLoss`` over random shapes, dtypes, levels and
settings: each call gives a correct result or one of the documented errors (``ValueError`` /
``TypeError`` with freekd's message), never an error from deep inside torch."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from freekd import FreeKDLoss
from freekd.wavelets import dwt2, idwt2

FUZZ = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.uint8]
# Round-trip tolerance relative to the largest input value, per dtype.
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 5e-2, torch.float16: 5e-3}
# Our messages start with one of these (documented errors, not torch's internals).
OURS = ("dwt2", "idwt2", "levels", "layer", "FreeKDLoss", "unknown", "num_prompts", "channels")


def assert_ours(error: Exception) -> None:
    message = str(error)
    assert isinstance(error, ValueError | TypeError), f"{type(error).__name__}: {message}"
    assert message.startswith(OURS), f"not a freekd message: {message!r}"


@FUZZ
@given(
    shape=st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 17), st.integers(0, 17)),
    levels=st.integers(-1, 6),
    dtype=st.sampled_from(DTYPES),
    wavelet=st.sampled_from(["haar", "db2", "db3"]),
    seed=st.integers(0, 2**16),
)
def test_dwt2_idwt2_round_trip_or_a_documented_error(shape, levels, dtype, wavelet, seed):
    generator = torch.Generator().manual_seed(seed)
    x = (10 * torch.randn(shape, generator=generator, dtype=torch.float64)).to(dtype)
    try:
        low, highs = dwt2(x, levels, wavelet)
    except (ValueError, TypeError) as error:
        assert_ours(error)
        expected_error = levels < 1 or not x.is_floating_point() or 0 in shape[1:]
        assert expected_error, f"refused a valid input: {error}"
        return
    assert levels >= 1 and x.is_floating_point() and 0 not in shape[1:]
    assert len(highs) == levels and low.dtype == dtype
    assert all(h.shape[:3] == (shape[0], shape[1], 3) for h in highs)
    back = idwt2((low, highs), wavelet, size=shape[-2:])
    assert back.shape == x.shape and back.dtype == dtype
    if x.numel():
        scale = max(float(x.abs().max()), 1.0)
        error = float((back.double() - x.double()).abs().max())
        assert error <= TOLERANCE[dtype] * scale * levels, (error, dtype, levels)


@FUZZ
@given(
    channels=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    num_prompts=st.integers(0, 4),
    levels=st.integers(0, 4),
    granularity=st.sampled_from(["band", "level", "pixel"]),
    relational=st.booleans(),
    include_low=st.booleans(),
    size=st.integers(1, 12),
    batch=st.integers(0, 2),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
    drop_layer=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_freekd_loss_is_finite_or_a_documented_error(
    channels,
    num_prompts,
    levels,
    granularity,
    relational,
    include_low,
    size,
    batch,
    dtype,
    drop_layer,
    seed,
):
    generator = torch.Generator().manual_seed(seed)
    try:
        loss = FreeKDLoss(
            channels,
            num_prompts=num_prompts,
            levels=levels,
            granularity=granularity,
            relational=relational,
            include_low=include_low,
        )
    except (ValueError, TypeError) as error:
        assert_ours(error)
        assert num_prompts < 1 or levels < 1 or granularity == "pixel", error
        return
    assert num_prompts >= 1 and levels >= 1 and granularity != "pixel"
    sizes = [max(1, size // 2**i) for i in range(len(channels))]  # fine to coarse
    teacher = [
        torch.randn(batch, c, s, s, generator=generator).to(dtype)
        for c, s in zip(channels, sizes, strict=True)
    ]
    student = [t.float().add(torch.randn(t.shape, generator=generator)).to(dtype) for t in teacher]
    if drop_layer:
        student = student[:-1]
    try:
        value = loss(student, teacher)
    except (ValueError, TypeError) as error:
        assert_ours(error)
        assert drop_layer or batch == 0, f"refused a valid input: {error}"
        return
    assert not drop_layer and batch > 0
    assert value.dim() == 0 and math.isfinite(float(value)) and float(value) >= 0
    again = loss([s.double() for s in student], [t.double() for t in teacher])
    assert float(value) == pytest.approx(float(again), rel=1e-4, abs=1e-6)
