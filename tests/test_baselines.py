"""The baseline losses against hand-computed cases and independent formulations."""

from __future__ import annotations

import math

import pytest
import pywt
import torch
from torch import nn

from freekd.losses import (
    BASELINES,
    ChannelWiseDistillation,
    FeatureMSE,
    FreeKDLoss,
    FrequencyL1,
    LayerwiseLoss,
    MaskedGenerativeDistillation,
    build_loss,
    loss_class,
    loss_names,
    register_loss,
)
from tests.naive_freekd import naive_channel_weight


def test_mse_hand_computed_over_two_layers():
    student = [torch.zeros(2, 3, 4, 4), torch.ones(1, 2, 2, 2)]
    teacher = [torch.full((2, 3, 4, 4), 2.0), torch.full((1, 2, 2, 2), -2.0)]
    assert FeatureMSE()(student, teacher).item() == pytest.approx(4.0 + 9.0)


def test_cwd_hand_computed_kl():
    # One channel, two positions: p_t = softmax([0, 2 ln 3] / 2) = [1/4, 3/4], p_s = [1/2, 1/2].
    tau = 2.0
    teacher = torch.tensor([0.0, 2 * math.log(3)]).view(1, 1, 1, 2)
    student = torch.zeros(1, 1, 1, 2)
    kl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    loss = ChannelWiseDistillation(tau=tau)([student], [teacher])
    assert loss.item() == pytest.approx(tau**2 * kl, rel=1e-6)


def test_cwd_averages_over_batch_and_channels_and_ignores_channel_offsets():
    torch.manual_seed(0)
    teacher = torch.randn(2, 3, 5, 5)
    offsets = torch.randn(2, 3, 1, 1) * 10  # softmax over positions is blind to these
    cwd = ChannelWiseDistillation(tau=1.0)
    assert cwd([teacher + offsets], [teacher]).item() == pytest.approx(0.0, abs=1e-6)
    # Only channel (0, 0) differs: the loss is its KL / (N * C).
    student = teacher.clone()
    student[0, 0] = 0.0
    p = torch.softmax(teacher[0, 0].flatten(), 0)
    kl = (p * (p.log() - math.log(1 / 25))).sum().item()
    assert cwd([student], [teacher]).item() == pytest.approx(kl / 6, rel=1e-5)


def _identity_generator(channels: int) -> nn.Sequential:
    """conv3x3 - ReLU - conv3x3 with identity kernels: G(x) = relu(x)."""
    block = nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1),
    )
    with torch.no_grad():
        for conv in (block[0], block[2]):
            conv.weight.zero_()
            conv.bias.zero_()
            for c in range(channels):
                conv.weight[c, c, 1, 1] = 1.0
    return block


def test_mgd_without_masking_is_scaled_sum_of_squares():
    mgd = MaskedGenerativeDistillation([3], alpha=1.0, mask_ratio=0.0)
    mgd.generators[0] = _identity_generator(3)
    student, teacher = torch.ones(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    # sum((1 - 0)^2) over 2*3*4*4 = 96 elements, divided by N = 2.
    assert mgd([student], [teacher]).item() == pytest.approx(48.0)


def test_mgd_masks_the_drawn_positions():
    mgd = MaskedGenerativeDistillation([2], alpha=0.5, mask_ratio=0.6)
    mgd.generators[0] = _identity_generator(2)
    student = torch.full((3, 2, 5, 5), 2.0)
    torch.manual_seed(7)
    masked = torch.rand(3, 1, 5, 5) < 0.6  # the positions MGD zeroes (a 0.6 fraction on average)
    teacher = torch.full((3, 2, 5, 5), 2.0)  # kept: (2 - 2)^2 = 0, masked: (0 - 2)^2 = 4
    torch.manual_seed(7)
    loss = mgd([student], [teacher]).item()
    expected = 0.5 * 4 * 2 * masked.sum().item() / 3
    assert 0 < masked.sum() < masked.numel()
    assert loss == pytest.approx(expected)


def test_mgd_trains_its_generator_and_student_only():
    torch.manual_seed(0)
    mgd = MaskedGenerativeDistillation([4, 8])
    student = [torch.randn(2, 4, 6, 6, requires_grad=True), torch.randn(2, 8, 3, 3)]
    teacher = [torch.randn(2, 4, 6, 6, requires_grad=True), torch.randn(2, 8, 3, 3)]
    mgd(student, teacher).backward()
    assert all(p.grad is not None for p in mgd.parameters())
    assert student[0].grad is not None and teacher[0].grad is None


def _pywt_band_l1(student, teacher, levels, include_low):
    """FreeKD's band reduction via PyWavelets: per level, the mean |band_t - band_s| over the
    three orientations together (plus the low band's mean), summed over levels."""

    def bands(x):
        return pywt.wavedec2(x.numpy(), "haar", mode="zero", level=levels, axes=(-2, -1))

    total = 0.0
    for t_level, s_level in zip(bands(teacher)[1:], bands(student)[1:], strict=True):
        total += sum(abs(t - s).sum() for t, s in zip(t_level, s_level, strict=True)) / (
            3 * t_level[0].size
        )
    if include_low:
        total += abs(bands(teacher)[0] - bands(student)[0]).mean()
    return float(total)


@pytest.mark.parametrize("include_low", [True, False])
def test_frequency_l1_matches_pywavelets(include_low):
    torch.manual_seed(1)
    student = torch.randn(2, 3, 13, 10, dtype=torch.float64)
    teacher = torch.randn(2, 3, 13, 10, dtype=torch.float64)
    loss = FrequencyL1(levels=2, include_low=include_low)([student], [teacher])
    expected = _pywt_band_l1(student, teacher, 2, include_low)
    assert loss.item() == pytest.approx(expected, rel=1e-10)


def test_frequency_l1_relational_weights_channels_as_freekd():
    torch.manual_seed(2)
    feats = [torch.randn(2, 4, 8, 8, dtype=torch.float64) for _ in range(4)]
    student, teacher = feats[:2], feats[2:]
    loss = FrequencyL1([4, 4], levels=1, include_low=False, relational=True).double()
    value = loss(student, teacher).item()
    expected = 0.0
    for i in range(2):
        t_next = teacher[i + 1] if i + 1 < 2 else None
        s_next = student[i + 1] if i + 1 < 2 else None
        omega = naive_channel_weight(teacher[i], student[i], t_next, s_next)  # [N, C]
        for n in range(2):
            for c in range(4):
                per_channel = _pywt_band_l1(student[i][n, c], teacher[i][n, c], 1, False)
                expected += omega[n, c].item() * per_channel / 8
    assert value == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baselines_refuse_mismatched_features(name):
    loss = BASELINES[name](channels=[3]) if name in ("mgd",) else BASELINES[name]()
    with pytest.raises(ValueError, match="project the student"):
        loss([torch.zeros(1, 3, 4, 4)], [torch.zeros(1, 3, 5, 4)])
    with pytest.raises(ValueError, match="one student feature per"):
        loss([torch.zeros(1, 3, 4, 4)], [])
    with pytest.raises(TypeError, match="wrap a single feature"):
        loss(torch.zeros(1, 3, 4, 4), [torch.zeros(1, 3, 4, 4)])


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baselines_compute_in_float32_under_bf16(name):
    torch.manual_seed(3)
    loss = BASELINES[name](channels=[3]) if name in ("mgd",) else BASELINES[name]()
    student = torch.randn(2, 3, 8, 8)
    teacher = torch.randn(2, 3, 8, 8)
    torch.manual_seed(4)
    reference = loss([student], [teacher])
    torch.manual_seed(4)
    low = loss([student.bfloat16()], [teacher.bfloat16()])
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(reference.item(), rel=0.05)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="tau"):
        ChannelWiseDistillation(tau=0)
    with pytest.raises(ValueError, match="mask_ratio"):
        MaskedGenerativeDistillation([3], mask_ratio=1.0)
    with pytest.raises(ValueError, match="needs channels"):
        FrequencyL1(relational=True)
    with pytest.raises(ValueError, match="channels"):
        MaskedGenerativeDistillation([3])([torch.zeros(1, 4, 2, 2)], [torch.zeros(1, 4, 2, 2)])


def test_every_loss_is_registered_under_the_pipeline_names():
    assert loss_names() == ("freekd", "mse", "cwd", "mgd", "frequency")
    assert dict(BASELINES) == {
        "mse": FeatureMSE,
        "cwd": ChannelWiseDistillation,
        "mgd": MaskedGenerativeDistillation,
        "frequency": FrequencyL1,
    }
    assert loss_class("freekd") is FreeKDLoss
    for cls in (FreeKDLoss, *BASELINES.values()):
        assert issubclass(cls, LayerwiseLoss)
    assert isinstance(build_loss("cwd", tau=2.0), ChannelWiseDistillation)
    with pytest.raises(ValueError, match=r"unknown loss 'cdw' \(did you mean 'cwd'\?\)"):
        loss_class("cdw")


def test_a_registered_loss_reaches_build_loss_baselines_and_the_pipeline():
    from freekd.losses import base
    from freekd.pipeline.config import DistillSection

    @register_loss("test-sum-l1")
    class SumL1(LayerwiseLoss):
        def __init__(self, channels=None, scale: float = 1.0) -> None:
            super().__init__()
            self.channels, self.scale = channels, scale

        def layer_loss(self, index, student, teacher):
            return self.scale * (student[index] - teacher[index]).abs().sum()

    try:
        assert "test-sum-l1" in BASELINES and "test-sum-l1" in loss_names()
        loss = build_loss("test-sum-l1", scale=2.0)
        student, teacher = [torch.zeros(1, 2, 2, 2)], [torch.ones(1, 2, 2, 2)]
        assert loss(student, teacher).item() == 16.0
        assert set(loss.last_terms) == {"layer0"}
        assert DistillSection(method="test-sum-l1").method == "test-sum-l1"
        with pytest.raises(ValueError, match="is taken by"):
            register_loss("test-sum-l1")(FeatureMSE)
        with pytest.raises(TypeError, match="LayerwiseLoss subclass"):
            register_loss("test-module")(nn.Identity)
    finally:
        base._LOSSES.pop("test-sum-l1", None)
    assert "test-sum-l1" not in BASELINES


def test_the_base_upcasts_checks_and_weights_every_loss():
    class Plain(LayerwiseLoss):
        loss_weight = 3.0

        def layer_loss(self, index, student, teacher):
            assert student[index].dtype == torch.float32 and not teacher[index].requires_grad
            return (student[index] - teacher[index]).sum()

    student = [torch.ones(1, 1, 2, 2, dtype=torch.bfloat16, requires_grad=True)]
    teacher = [torch.zeros(1, 1, 2, 2, dtype=torch.bfloat16, requires_grad=True)]
    total = Plain()(student, teacher)
    assert total.dtype == torch.float32 and total.item() == 12.0
    assert Plain().last_terms == {}
    with pytest.raises(TypeError, match="Plain: student_feats must be a list"):
        Plain()(student[0], teacher)
    with pytest.raises(NotImplementedError, match="layer_loss"):
        LayerwiseLoss()(student, teacher)
