"""FreeKDLoss against the independent per-token formulation in ``naive_freekd.py``."""

from __future__ import annotations

import logging

import pytest
import torch

from freekd import FreeKDLoss, dwt2
from freekd.losses.base import _MaskedBandL1
from tests.conftest import pyramid, randomize_prompts
from tests.naive_freekd import naive_freekd_loss, naive_token_mask, naive_wavedec2


@pytest.mark.parametrize("granularity", ["level", "band"])
@pytest.mark.parametrize("include_low", [False, True])
@pytest.mark.parametrize("relational", [False, True])
def test_loss_and_gradient_equal_naive_per_token_formulation(granularity, include_low, relational):
    teacher, student = pyramid(seed=0), pyramid(seed=1, grad=True)
    loss_fn = FreeKDLoss(
        [6, 6, 6],
        num_prompts=3,
        granularity=granularity,
        include_low=include_low,
        relational=relational,
    ).double()
    randomize_prompts(loss_fn)
    loss = loss_fn(student, teacher)
    grads = torch.autograd.grad(loss, student)
    tokens = [p.tokens.detach() for p in loss_fn.prompts]
    expected = naive_freekd_loss(student, teacher, tokens, granularity, include_low, relational)
    expected_grads = torch.autograd.grad(expected, student)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-12)


def test_db2_and_two_levels_equal_naive():
    teacher, student = pyramid(seed=2), pyramid(seed=3, grad=True)
    loss_fn = FreeKDLoss([6, 6, 6], num_prompts=2, levels=2, wavelet="db2").double()
    randomize_prompts(loss_fn)
    tokens = [p.tokens.detach() for p in loss_fn.prompts]
    expected = naive_freekd_loss(student, teacher, tokens, "band", False, True, 2, "db2")
    torch.testing.assert_close(loss_fn(student, teacher), expected, rtol=1e-10, atol=1e-12)


def test_float32_matches_float64_reference():
    teacher, student = pyramid(seed=4), pyramid(seed=5)
    loss_fn = FreeKDLoss.preset("paper", [6, 6, 6])
    randomize_prompts(loss_fn)
    low_precision = loss_fn([s.float() for s in student], [t.float() for t in teacher])
    assert low_precision.dtype == torch.float32
    reference = loss_fn.double()(student, teacher)
    torch.testing.assert_close(low_precision.double(), reference, rtol=1e-5, atol=1e-6)


def test_last_terms_sum_to_the_weighted_total():
    teacher, student = pyramid(seed=0), pyramid(seed=1)
    loss_fn = FreeKDLoss([6, 6, 6], loss_weight=2.5).double()
    randomize_prompts(loss_fn)
    total = loss_fn(student, teacher)
    assert sorted(loss_fn.last_terms) == ["layer0", "layer1", "layer2"]
    torch.testing.assert_close(sum(loss_fn.last_terms.values()), total)
    unweighted = FreeKDLoss([6, 6, 6]).double()
    unweighted.load_state_dict(loss_fn.state_dict())
    torch.testing.assert_close(unweighted(student, teacher) * 2.5, total)


def test_identical_student_gives_zero_loss_and_zero_gradient():
    teacher = pyramid(seed=0)
    student = [t.clone().requires_grad_(True) for t in teacher]
    loss_fn = FreeKDLoss.preset("paper", [6, 6, 6], include_low=True).double()
    randomize_prompts(loss_fn)
    loss = loss_fn(student, teacher)
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.count_nonzero(s.grad) == 0 for s in student)


def test_no_gradient_reaches_teacher_or_prompts():
    teacher, student = pyramid(seed=0, grad=True), pyramid(seed=1, grad=True)
    loss_fn = FreeKDLoss.preset("paper", [6, 6, 6]).double()
    randomize_prompts(loss_fn)
    loss_fn(student, teacher).backward()
    assert all(t.grad is None for t in teacher)
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in student)
    assert all(not p.requires_grad and p.grad is None for p in loss_fn.parameters())


def test_mlp_gate_starts_at_parameter_free_weight_and_is_trained():
    teacher, student = pyramid(seed=0), pyramid(seed=1, grad=True)
    free = FreeKDLoss([6, 6, 6]).double()
    mlp = FreeKDLoss([6, 6, 6], gate="mlp").double()
    randomize_prompts(free)
    mlp.prompts.load_state_dict(free.prompts.state_dict())
    loss_mlp = mlp(student, teacher)
    torch.testing.assert_close(loss_mlp, free(student, teacher))
    loss_mlp.backward()
    trainable = [p for p in mlp.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
    assert any(p.grad.abs().sum() > 0 for p in trainable)


def test_distillation_lowers_the_loss():
    teacher = pyramid(seed=0, dtype=torch.float32)
    student = pyramid(seed=1, dtype=torch.float32, grad=True)
    loss_fn = FreeKDLoss.preset("paper", [6, 6, 6])
    randomize_prompts(loss_fn)
    optimiser = torch.optim.Adam(student, lr=0.05)
    first = loss_fn(student, teacher).item()
    for _ in range(30):
        optimiser.zero_grad()
        loss_fn(student, teacher).backward()
        optimiser.step()
    assert loss_fn(student, teacher).item() < 0.5 * first


def test_presets_configure_the_paper_and_the_official_loss():
    paper = FreeKDLoss.preset("paper", [8])
    assert (paper.num_prompts, paper.granularity, paper.dissimilarity) == (2, "band", "jaccard")
    assert paper.relational and not paper.include_low
    assert paper.prompts[0].tokens.shape == (1 + 3 * 3, 2, 8)
    official = FreeKDLoss.preset("official", [8, 16])
    assert (official.num_prompts, official.granularity, official.dissimilarity) == (
        6,
        "level",
        "dice",
    )
    assert not official.relational and not official.include_low
    assert official.prompts[1].tokens.shape == (4, 6, 16)
    assert FreeKDLoss.preset("official", [8], num_prompts=4).num_prompts == 4
    with pytest.raises(ValueError, match="preset"):
        FreeKDLoss.preset("fast", [8])


# ---------------------------------------------------------------------- official checkpoints


def official_state_dict(channels=(6, 6, 6), num_prompts=6, seed=0, prefix="distiller.loss."):
    generator = torch.Generator().manual_seed(seed)
    inner = {}
    for i, c in enumerate(channels):
        inner[f"{prefix}mask_modules.{i}.mask_token"] = torch.randn(
            4, num_prompts, c, generator=generator
        )
        inner[f"{prefix}mask_modules.{i}.prob.0.weight"] = torch.randn(1, c, generator=generator)
    inner["student.backbone.conv1.weight"] = torch.randn(3, 3, generator=generator)
    return {"meta": {"epoch": 3}, "state_dict": inner}


def test_from_official_reproduces_the_official_masks_and_loss():
    checkpoint = official_state_dict(channels=(6, 6, 6), num_prompts=6)
    loss_fn = FreeKDLoss.from_official(checkpoint).double()
    assert loss_fn.num_prompts == 6 and loss_fn.channels == [6, 6, 6]
    assert all(bool(p.tuned) for p in loss_fn.prompts)
    teacher, student = pyramid(seed=0), pyramid(seed=1, grad=True)
    tokens = [
        checkpoint["state_dict"][f"distiller.loss.mask_modules.{i}.mask_token"].double()
        for i in range(3)
    ]
    # The official formula: mask of level j from the sum of its three orientations, per token.
    bands = dwt2(teacher[0], 3)
    low_masks, high_masks = loss_fn.prompts[0].masks(bands)
    coeffs = naive_wavedec2(teacher[0], "haar", 3)
    for t in range(6):
        torch.testing.assert_close(low_masks[:, t, 0], naive_token_mask(tokens[0][0, t], coeffs[0]))
        for level in (1, 2, 3):
            expected = naive_token_mask(tokens[0][level, t], sum(coeffs[-level]))
            torch.testing.assert_close(high_masks[level - 1][:, t, 0], expected)
    expected = naive_freekd_loss(student, teacher, tokens, "level", False, False)
    torch.testing.assert_close(loss_fn(student, teacher), expected, rtol=1e-10, atol=1e-12)


def test_official_checkpoint_without_wrapper_or_prefix_loads():
    checkpoint = official_state_dict(channels=(4,), num_prompts=2, prefix="")["state_dict"]
    loss_fn = FreeKDLoss.preset("official", [4], num_prompts=2)
    loss_fn.load_official_state_dict(checkpoint)
    torch.testing.assert_close(loss_fn.prompts[0].tokens, checkpoint["mask_modules.0.mask_token"])


def test_official_loader_refuses_other_prompt_count_or_channels_naming_both():
    checkpoint = official_state_dict(channels=(6, 6), num_prompts=6)
    with pytest.raises(ValueError, match=r"T=6.*T=2"):
        FreeKDLoss.preset("official", [6, 6], num_prompts=2).load_official_state_dict(checkpoint)
    with pytest.raises(ValueError, match=r"6 channels.*8"):
        FreeKDLoss.preset("official", [8, 8]).load_official_state_dict(checkpoint)
    with pytest.raises(ValueError, match="2 layers.*3"):
        FreeKDLoss.preset("official", [6, 6, 6]).load_official_state_dict(checkpoint)
    with pytest.raises(ValueError, match="granularity"):
        FreeKDLoss.preset("paper", [6, 6]).load_official_state_dict(checkpoint)
    with pytest.raises(ValueError, match="mask_token"):
        FreeKDLoss.from_official({"state_dict": {"backbone.weight": torch.zeros(1)}})


# ---------------------------------------------------------------------- precision and input


def test_bfloat16_features_and_autocast_give_float32_results_close_to_float32():
    teacher, student = pyramid(seed=0, dtype=torch.float32), pyramid(seed=1, dtype=torch.float32)
    loss_fn = FreeKDLoss.preset("paper", [6, 6, 6])
    randomize_prompts(loss_fn)
    reference = loss_fn(student, teacher)
    bf16 = loss_fn([s.bfloat16() for s in student], [t.bfloat16() for t in teacher])
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, reference, rtol=2e-2, atol=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = loss_fn(student, teacher)
    assert autocast.dtype == torch.float32
    torch.testing.assert_close(autocast, reference, rtol=1e-5, atol=1e-6)


def test_huge_feature_magnitudes_stay_finite():
    teacher = [t * 1e4 for t in pyramid(seed=0, dtype=torch.float32)]
    student = [(s * 1e4).requires_grad_(True) for s in pyramid(seed=1, dtype=torch.float32)]
    loss_fn = FreeKDLoss.preset("paper", [6, 6, 6])
    randomize_prompts(loss_fn)
    loss = loss_fn([s.half() for s in student], [t.half() for t in teacher])
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(s.grad).all() for s in student)


def test_untuned_prompts_log_one_warning(caplog):
    loss_fn = FreeKDLoss([6, 6, 6])
    teacher, student = pyramid(seed=0, dtype=torch.float32), pyramid(seed=1, dtype=torch.float32)
    with caplog.at_level(logging.WARNING, logger="freekd"):
        loss_fn(student, teacher)
        loss_fn(student, teacher)
    assert sum("never tuned" in r.message for r in caplog.records) == 1
    caplog.clear()
    tuned = FreeKDLoss([6, 6, 6])
    randomize_prompts(tuned)
    with caplog.at_level(logging.WARNING, logger="freekd"):
        tuned(student, teacher)
    assert not caplog.records


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(channels=[]), "channels"),
        (dict(channels=256), "channels"),
        (dict(channels=[8, 0]), r"channels\[1\]"),
        (dict(channels=[8], num_prompts=0), "num_prompts"),
        (dict(channels=[8], levels=0), "levels"),
        (dict(channels=[8], wavelet="nope"), "wavelet"),
        (dict(channels=[8], granularity="pixel"), "granularity"),
        (dict(channels=[8], dissimilarity="cosine"), "dissimilarity"),
        (dict(channels=[8], gate="attention"), "gate"),
        (dict(channels=[8], loss_weight=float("nan")), "loss_weight"),
    ],
)
def test_bad_configuration_is_refused_with_the_name_of_the_setting(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FreeKDLoss(**kwargs)


def test_bad_features_are_refused_with_a_clear_message():
    loss_fn = FreeKDLoss([6, 6, 6])
    teacher, student = pyramid(dtype=torch.float32), pyramid(seed=1, dtype=torch.float32)
    with pytest.raises(ValueError, match="3 layers"):
        loss_fn(student[:2], teacher[:2])
    with pytest.raises(ValueError, match="2 student and 3 teacher"):
        loss_fn(student[:2], teacher)
    with pytest.raises(TypeError, match="list"):
        loss_fn(student[0], teacher[0])
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        loss_fn([student[0][0], *student[1:]], teacher)
    with pytest.raises(ValueError, match="project the student"):
        loss_fn([student[0][:, :4], *student[1:]], teacher)
    with pytest.raises(ValueError, match="channels"):
        FreeKDLoss([8, 8, 8])(student, teacher)
    with pytest.raises(TypeError, match="floating point"):
        loss_fn([s.long() for s in student], teacher)


def test_masked_band_l1_gradcheck():
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 3, 3, 4, 5, dtype=torch.float64, generator=generator)
    student = torch.randn(2, 3, 3, 4, 5, dtype=torch.float64, generator=generator)
    mask = torch.rand(2, 1, 1, 4, 5, dtype=torch.float64, generator=generator)
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: _MaskedBandL1.apply(teacher, s, mask), (student,))
    expected = ((teacher - student).abs() * mask).sum(dim=(2, 3, 4))
    torch.testing.assert_close(_MaskedBandL1.apply(teacher, student, mask), expected)
