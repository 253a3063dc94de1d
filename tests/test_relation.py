"""Relational channel weight against a direct formulation and a hand-computed case."""

from __future__ import annotations

import math

import pytest
import torch

from freekd import RelationalGate
from freekd.relation import effective_channels, relational_weight
from tests.naive_freekd import (
    naive_channel_weight,
    naive_cosine_relational_weight,
    naive_relational_weight,
)


def feature(shape, seed, channels=6):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, channels, *shape, dtype=torch.float64, generator=generator)


def test_hand_computed_single_pixel_case():
    f = torch.tensor([1.0, 0.0], dtype=torch.float64).view(1, 2, 1, 1)
    e = math.e
    # logits = F F^T = [[1, 0], [0, 0]]; rows of A: [e, 1] / (e + 1) and [1/2, 1/2]; column sums.
    expected = torch.tensor([[e / (e + 1) + 0.5, 1 / (e + 1) + 0.5]], dtype=torch.float64)
    torch.testing.assert_close(relational_weight(f), expected)


@pytest.mark.parametrize(
    ("next_shape", "next_channels"),
    [((7, 11), 6), ((13, 21), 6), ((7, 11), 4), (None, None)],
    ids=["coarser-next", "same-grid-next", "other-channels", "no-next"],
)
def test_relational_weight_equals_the_direct_formula(next_shape, next_channels):
    f = feature((13, 21), seed=0)
    nxt = None if next_shape is None else feature(next_shape, seed=1, channels=next_channels)
    got = relational_weight(f, nxt)
    torch.testing.assert_close(got, naive_relational_weight(f, nxt))
    torch.testing.assert_close(got.mean(dim=1), torch.ones(2, dtype=torch.float64))


def test_gate_combines_teacher_and_student_with_mean_one_and_no_feature_gradient():
    teacher, student = feature((9, 10), 0), feature((9, 10), 1).requires_grad_(True)
    teacher_next, student_next = feature((5, 5), 2), feature((5, 5), 3)
    omega = RelationalGate(6)(teacher, student, teacher_next, student_next)
    torch.testing.assert_close(
        omega, naive_channel_weight(teacher, student, teacher_next, student_next)
    )
    torch.testing.assert_close(omega.mean(1), torch.ones(2, dtype=torch.float64))
    assert not omega.requires_grad and list(RelationalGate(6).parameters()) == []


def test_mlp_gate_starts_at_the_parameter_free_weight_and_learns():
    teacher, student = feature((9, 10), 0), feature((9, 10), 1)
    gate = RelationalGate(6, gate="mlp").double()
    omega = gate(teacher, student)
    torch.testing.assert_close(omega, RelationalGate(6)(teacher, student))
    # A gradient that rewards channel 0 must move the weights toward it.
    optimiser = torch.optim.SGD(gate.parameters(), lr=1.0)
    for _ in range(20):
        optimiser.zero_grad()
        (-gate(teacher, student)[:, 0].mean()).backward()
        optimiser.step()
    trained = gate(teacher, student)
    assert (trained[:, 0] > omega[:, 0]).all()
    torch.testing.assert_close(trained.mean(1), torch.ones(2, dtype=torch.float64))


def test_bad_gate_settings_are_refused():
    with pytest.raises(ValueError, match="gate"):
        RelationalGate(6, gate="transformer")
    with pytest.raises(ValueError, match="channels"):
        RelationalGate(0)


def test_saturated_softmax_never_zeroes_the_combined_weight():
    # Large maps and magnitudes saturate the softmax: single weights underflow to 0 in float32,
    # and teacher and student may favour different channels. The product must not vanish.
    teacher = torch.full((1, 4, 32, 32), 100.0)
    teacher[:, 1] = 1.0  # column 1 loses every row of the teacher's softmax
    student = torch.ones(1, 4, 32, 32)
    student[:, 1] = 100.0  # column 1 wins every row of the student's softmax
    product = relational_weight(teacher) * relational_weight(student)
    assert (product == 0).all()  # the direct formula underflows: nothing left to normalise
    omega = RelationalGate(4)(teacher, student)
    assert torch.isfinite(omega).all()
    torch.testing.assert_close(omega.sum(1), torch.tensor([4.0]))


# ---------------------------------------------------------------------- cosine kind, sources


def test_cosine_hand_computed_case():
    # psi(F) channels [1, 0] and [1, 0], F channels [1, 0] and [0, 1]: cosines [[1, 0], [1, 0]];
    # at tau 1 each row of A is [e, 1] / (e + 1); omega is the column sum.
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64).view(1, 2, 1, 2)
    nxt = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64).view(1, 2, 1, 2)
    e = math.e
    expected = torch.tensor([[2 * e / (e + 1), 2 / (e + 1)]], dtype=torch.float64)
    torch.testing.assert_close(relational_weight(f, nxt, "cosine", temperature=1.0), expected)


@pytest.mark.parametrize(
    ("next_shape", "next_channels"),
    [((7, 11), 6), ((13, 21), 6), ((7, 11), 4), (None, None)],
    ids=["coarser-next", "same-grid-next", "other-channels", "no-next"],
)
def test_cosine_weight_equals_the_direct_formula(next_shape, next_channels):
    f = feature((13, 21), seed=0)
    nxt = None if next_shape is None else feature(next_shape, seed=1, channels=next_channels)
    got = relational_weight(f, nxt, "cosine", temperature=0.1)
    torch.testing.assert_close(got, naive_cosine_relational_weight(f, nxt, 0.1))
    torch.testing.assert_close(got.mean(dim=1), torch.ones(2, dtype=torch.float64))


def test_cosine_weight_ignores_magnitudes_and_stays_spread_on_large_maps():
    generator = torch.Generator().manual_seed(0)
    means = torch.randn(1, 64, 1, 1, dtype=torch.float64, generator=generator) * 0.5
    large = means + torch.randn(1, 64, 32, 32, dtype=torch.float64, generator=generator)
    noise = torch.randn(1, 64, 16, 16, dtype=torch.float64, generator=generator)
    coarser = torch.nn.functional.avg_pool2d(large, 2) + 0.5 * noise
    cosine = relational_weight(large, coarser, kind="cosine")
    torch.testing.assert_close(relational_weight(large * 1e6, coarser, kind="cosine"), cosine)
    raw = relational_weight(large, coarser)
    assert effective_channels(cosine).item() > 4 * effective_channels(raw).item()


@pytest.mark.parametrize("kind", ["raw", "cosine"])
@pytest.mark.parametrize("source", ["product", "teacher"])
def test_gate_kinds_and_sources_equal_the_direct_formula(kind, source):
    teacher, student = feature((9, 10), 0), feature((9, 10), 1)
    teacher_next, student_next = feature((5, 5), 2), feature((5, 5), 3)
    gate = RelationalGate(6, kind=kind, temperature=0.3, source=source)
    omega = gate(teacher, student, teacher_next, student_next)
    expected = naive_channel_weight(teacher, student, teacher_next, student_next, kind, 0.3, source)
    torch.testing.assert_close(omega, expected)
    mlp = RelationalGate(6, "mlp", kind=kind, temperature=0.3, source=source).double()
    torch.testing.assert_close(mlp(teacher, student, teacher_next, student_next), expected)


def test_effective_channels_hand_cases():
    uniform = torch.ones(2, 8)
    torch.testing.assert_close(effective_channels(uniform), torch.tensor([8.0, 8.0]))
    one_hot = torch.zeros(1, 8)
    one_hot[0, 3] = 8.0
    torch.testing.assert_close(effective_channels(one_hot), torch.tensor([1.0]))
    two = torch.tensor([[2.0, 2.0, 0.0, 0.0]])  # (4)^2 / 8
    torch.testing.assert_close(effective_channels(two), torch.tensor([2.0]))


def test_bad_kind_source_or_temperature_is_refused():
    with pytest.raises(ValueError, match="relational kind"):
        RelationalGate(6, kind="dot")
    with pytest.raises(ValueError, match="relation_source"):
        RelationalGate(6, source="student")
    with pytest.raises(ValueError, match="relation_temperature"):
        RelationalGate(6, kind="cosine", temperature=-1.0)
