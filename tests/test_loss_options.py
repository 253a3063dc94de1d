"""The FreeKD loss's options beyond the paper and the official code, each against the direct
formulation in ``naive_freekd.py`` (value and student gradient, float64)."""

from __future__ import annotations

import json

import pytest
import torch

from freekd import FreeKDLoss, FrequencyPrompt, auto_levels, dwt2
from freekd.losses.freekd import PRESETS
from tests.conftest import pyramid, randomize_prompts
from tests.naive_freekd import naive_freekd_loss, naive_token_mask


def assert_matches_naive(loss_fn: FreeKDLoss, naive_kwargs: dict, scale: float = 1.0) -> None:
    """``loss_fn`` (float64, random prompts) equals the naive loss, value and student gradient."""
    teacher, student = pyramid(seed=0, scale=scale), pyramid(seed=1, grad=True, scale=scale)
    randomize_prompts(loss_fn)
    loss = loss_fn(student, teacher)
    grads = torch.autograd.grad(loss, student)
    tokens = [p.tokens.detach() for p in loss_fn.prompts]
    expected = naive_freekd_loss(student, teacher, tokens, **naive_kwargs)
    expected_grads = torch.autograd.grad(expected, student)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-12)


# ---------------------------------------------------------------------- mask logits


@pytest.mark.parametrize("mask_logits", ["scaled", "normalized"])
@pytest.mark.parametrize("granularity", ["level", "band"])
def test_mask_logit_options_equal_the_per_token_masks(mask_logits, granularity):
    generator = torch.Generator().manual_seed(0)
    bands = dwt2(torch.randn(2, 5, 12, 17, dtype=torch.float64, generator=generator) * 4, 3)
    prompt = FrequencyPrompt(5, 3, 3, granularity, mask_logits=mask_logits).double()
    with torch.no_grad():
        prompt.tokens.copy_(torch.randn(prompt.tokens.shape, generator=generator))
    low_masks, high_masks = prompt.masks(bands)
    tokens = prompt.tokens.detach()
    k = 1 if granularity == "level" else 3
    for t in range(3):
        expected_low = naive_token_mask(tokens[0, t], bands[0], mask_logits)
        torch.testing.assert_close(low_masks[:, t, 0], expected_low)
        for level, detail in enumerate(bands[1], start=1):
            for o in range(k):
                band = detail.sum(2) if granularity == "level" else detail[:, :, o]
                expected = naive_token_mask(tokens[1 + (level - 1) * k + o, t], band, mask_logits)
                torch.testing.assert_close(high_masks[level - 1][:, t, o], expected)


def test_normalized_logits_ignore_the_band_magnitude_and_zero_pixels():
    generator = torch.Generator().manual_seed(0)
    feature = torch.randn(2, 5, 8, 8, dtype=torch.float64, generator=generator)
    feature[:, :, :4, :4] = 0  # all-zero pixels in every band (2 Haar levels)
    prompt = FrequencyPrompt(5, 2, 2, mask_logits="normalized").double()
    with torch.no_grad():
        prompt.tokens.normal_(0, 3, generator=generator)
    masks = prompt.masks(dwt2(feature, 2))
    scaled = prompt.masks(dwt2(feature * 1000, 2))
    for a, b in zip([masks[0], *masks[1]], [scaled[0], *scaled[1]], strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)
    assert (masks[0][:, :, 0, 0, 0] == 0.5).all()  # logit 0 on an all-zero pixel


def test_scaled_logits_are_the_raw_ones_over_sqrt_channels():
    bands = dwt2(pyramid(channels=16)[0], 3)
    raw = FrequencyPrompt(16, 2, 3).double()
    scaled = FrequencyPrompt(16, 2, 3, mask_logits="scaled").double()
    with torch.no_grad():
        scaled.tokens.copy_(raw.tokens)
        raw.tokens.div_(4.0)  # sqrt(16)
    for a, b in zip(raw.masks(bands)[1], scaled.masks(bands)[1], strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mask_logits", ["scaled", "normalized"])
def test_loss_with_mask_logit_options_equals_naive(mask_logits):
    loss_fn = FreeKDLoss([6, 6, 6], num_prompts=3, include_low=True, mask_logits=mask_logits)
    assert all(p.mask_logits == mask_logits for p in loss_fn.prompts)
    assert_matches_naive(
        loss_fn.double(),
        dict(include_low=True, mask_logits=mask_logits),
        scale=5.0,
    )


# ---------------------------------------------------------------------- relational weight


@pytest.mark.parametrize("source", ["product", "teacher"])
@pytest.mark.parametrize("gate", ["parameter-free", "mlp"])
def test_cosine_relational_loss_equals_naive(source, gate):
    loss_fn = FreeKDLoss(
        [6, 6, 6],
        relational="cosine",
        relation_temperature=0.2,
        relation_source=source,
        gate=gate,
    ).double()
    assert loss_fn.relational and loss_fn.relational_kind == "cosine"
    naive = dict(relation_kind="cosine", relation_temperature=0.2, relation_source=source)
    assert_matches_naive(loss_fn, naive)


def test_teacher_source_with_the_raw_weight_equals_naive():
    loss_fn = FreeKDLoss([6, 6, 6], relation_source="teacher").double()
    assert_matches_naive(loss_fn, dict(relation_source="teacher"))


@pytest.mark.parametrize(
    ("setting", "kind", "on"), [(True, "raw", True), ("raw", "raw", True), (False, "off", False)]
)
def test_relational_accepts_booleans_and_names(setting, kind, on):
    loss_fn = FreeKDLoss([6], relational=setting)
    assert (loss_fn.relational_kind, loss_fn.relational) == (kind, on)
    assert (loss_fn.gates is not None) == on
    assert FreeKDLoss([6], relational="off").gates is None


# ---------------------------------------------------------------------- levels


def test_per_layer_levels_equal_naive():
    loss_fn = FreeKDLoss([6, 6, 6], levels=[3, 2, 1], include_low=True).double()
    assert loss_fn.layer_levels == [3, 2, 1] and loss_fn.levels == [3, 2, 1]
    assert [p.levels for p in loss_fn.prompts] == [3, 2, 1]
    assert [p.tokens.shape[0] for p in loss_fn.prompts] == [10, 7, 4]
    assert_matches_naive(loss_fn, dict(include_low=True, levels=[3, 2, 1]))


def test_equal_per_layer_levels_read_as_one_integer():
    loss_fn = FreeKDLoss([6, 6], levels=[2, 2])
    assert loss_fn.levels == 2 and loss_fn.layer_levels == [2, 2]
    assert "levels=2" in repr(loss_fn)


def test_official_loader_refuses_levels_other_than_three_anywhere():
    loss_fn = FreeKDLoss.preset("official", [6, 6], levels=[3, 2])
    state = {f"mask_modules.{i}.mask_token": torch.zeros(4, 6, 6) for i in range(2)}
    with pytest.raises(ValueError, match="3 levels"):
        loss_fn.load_official_state_dict(state)


@pytest.mark.parametrize(
    ("size", "levels"),
    [
        ((32, 32), 3),  # 16, 8, 4
        ((8, 8), 2),  # 4, 2 (then 1)
        ((5, 5), 2),  # 3, 2 (then 1)
        ((4, 4), 1),  # 2 (then 1)
        ((3, 3), 1),  # 2
        ((2, 2), 1),  # 1: at least one level
        ((1, 1), 1),
        ((64, 16), 3),  # 32x8, 16x4, 8x2
        ((16, 8), 2),  # 8x4, 4x2 (then 2x1)
        ((100, 152), 3),  # 50x76, 25x38, 13x19
    ],
)
def test_auto_levels_hand_computed(size, levels):
    assert auto_levels([size]) == [levels]


def test_auto_levels_options_and_bad_input():
    assert auto_levels([(64, 64), (8, 8)], min_band=2, max_levels=5) == [5, 2]  # 32..2; 4, 2
    assert auto_levels([(32, 32)], min_band=8) == [2]  # 16, 8
    assert auto_levels([(32, 32)], max_levels=1) == [1]
    with pytest.raises(ValueError, match="min_band"):
        auto_levels([(8, 8)], min_band=0)
    with pytest.raises(ValueError, match=r"sizes\[1\]"):
        auto_levels([(8, 8), (8,)])


@pytest.mark.parametrize(
    ("levels", "match"),
    [
        ([3, 2], "lists 2 values"),
        ([3, 0, 1], r"levels\[1\]"),
        ("auto", "auto_levels"),
        (0, "levels"),
    ],
)
def test_bad_levels_are_refused(levels, match):
    with pytest.raises(ValueError, match=match):
        FreeKDLoss([6, 6, 6], levels=levels)


# ---------------------------------------------------------------------- band weighting


@pytest.mark.parametrize("granularity", ["level", "band"])
@pytest.mark.parametrize("include_low", [False, True])
def test_coefficient_weighting_equals_naive(granularity, include_low):
    loss_fn = FreeKDLoss(
        [6, 6, 6],
        granularity=granularity,
        include_low=include_low,
        band_weighting="coefficient",
        levels=[3, 2, 2],
    ).double()
    naive = dict(
        granularity=granularity,
        include_low=include_low,
        band_weighting="coefficient",
        levels=[3, 2, 2],
    )
    assert_matches_naive(loss_fn, naive)


def test_coefficient_weighting_is_a_plain_mean_with_open_masks():
    # All tokens 0: every mask 1/2, so the loss is 1/2 the mean |D| over all distilled
    # coefficients of each layer (summed over layers).
    teacher, student = pyramid(seed=0), pyramid(seed=1)
    loss_fn = FreeKDLoss([6, 6, 6], relational=False, band_weighting="coefficient").double()
    expected = 0
    for t, s in zip(teacher, student, strict=True):
        low, highs = dwt2(t - s, 3)
        flat = torch.cat([h.flatten() for h in highs])
        expected = expected + 0.5 * flat.abs().mean()
    with torch.no_grad():
        for prompt in loss_fn.prompts:
            prompt.tokens.zero_()
            prompt.mark_tuned()
    torch.testing.assert_close(loss_fn(student, teacher), expected)


# ---------------------------------------------------------------------- FreeKD+


@pytest.mark.parametrize("include_low", [False, True])
def test_decoupled_low_band_l2_equals_naive(include_low):
    loss_fn = FreeKDLoss([6, 6, 6], include_low=include_low, decoupled=True).double()
    # The low band is the L2 term whatever include_low says.
    assert_matches_naive(loss_fn, dict(include_low=False, decoupled=True))


def test_decoupled_with_coefficient_weighting_equals_naive():
    loss_fn = FreeKDLoss([6, 6, 6], decoupled=True, band_weighting="coefficient").double()
    assert_matches_naive(loss_fn, dict(decoupled=True, band_weighting="coefficient"))


@pytest.mark.parametrize("granularity", ["level", "band"])
@pytest.mark.parametrize("include_low", [False, True])
def test_student_refined_masks_equal_naive(granularity, include_low):
    loss_fn = FreeKDLoss(
        [6, 6, 6], granularity=granularity, include_low=include_low, student_masks=True
    ).double()
    naive = dict(granularity=granularity, include_low=include_low, student_masks=True)
    assert_matches_naive(loss_fn, naive)


def test_student_masks_start_after_the_warmup_counted_in_training_mode():
    teacher, student = pyramid(seed=0), pyramid(seed=1)
    refined = FreeKDLoss([6, 6, 6], student_masks=True, student_mask_warmup=2).double()
    plain = FreeKDLoss([6, 6, 6]).double()
    randomize_prompts(refined)
    plain.prompts.load_state_dict(refined.prompts.state_dict())
    teacher_only, with_student = plain(student, teacher), None
    refined.eval()
    torch.testing.assert_close(refined(student, teacher), teacher_only)  # eval: not counted
    assert int(refined.student_mask_calls) == 0
    refined.train()
    for _ in range(2):
        torch.testing.assert_close(refined(student, teacher), teacher_only)
    with_student = refined(student, teacher)
    assert not torch.allclose(with_student, teacher_only)
    tokens = [p.tokens.detach() for p in refined.prompts]
    expected = naive_freekd_loss(student, teacher, tokens, student_masks=True)
    torch.testing.assert_close(with_student, expected, rtol=1e-10, atol=1e-12)
    assert int(refined.student_mask_calls) == 3
    assert "student_mask_calls" in refined.state_dict()
    assert "student_mask_calls" not in plain.state_dict()
    refined.eval()  # past the warm-up: eval calls refine too
    torch.testing.assert_close(refined(student, teacher), expected, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------- presets and checks


def test_presets_registry_and_the_recommended_preset():
    assert FreeKDLoss.presets() == tuple(PRESETS) and "recommended" in FreeKDLoss.presets()
    assert {"paper", "official"} <= set(FreeKDLoss.presets())
    loss_fn = FreeKDLoss.preset("recommended", [8, 8])
    assert (loss_fn.num_prompts, loss_fn.granularity, loss_fn.dissimilarity) == (
        2,
        "band",
        "jaccard",
    )
    assert loss_fn.mask_logits == "normalized" and loss_fn.relational_kind == "cosine"
    assert (loss_fn.relation_temperature, loss_fn.relation_source) == (0.1, "product")
    assert not loss_fn.include_low and loss_fn.band_weighting == "band"
    for name in ("paper", "official"):  # the faithful presets use none of the options
        preset = FreeKDLoss.preset(name, [8])
        assert (preset.mask_logits, preset.band_weighting) == ("raw", "band")
        assert not preset.decoupled and not preset.student_masks
        assert preset.relational_kind in ("raw", "off")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(mask_logits="unit"), "mask_logits"),
        (dict(relational="softmax"), "relational"),
        (dict(relation_temperature=0.0), "relation_temperature"),
        (dict(relation_temperature=float("inf")), "relation_temperature"),
        (dict(relation_source="student"), "relation_source"),
        (dict(band_weighting="pixel"), "band_weighting"),
        (dict(student_mask_warmup=-1), "student_mask_warmup"),
    ],
)
def test_bad_option_values_name_the_setting(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FreeKDLoss([6], **kwargs)
    with pytest.raises(ValueError, match="resynthesis"):
        FrequencyPrompt(6).mask_bands(dwt2(torch.zeros(1, 6, 4, 4)), resynthesis="product")


# ---------------------------------------------------------------------- prompt files


def test_prompt_files_keep_the_new_settings_and_refuse_a_mismatch(tmp_path):
    loss_fn = FreeKDLoss([6, 6, 6], levels=[3, 2, 1], mask_logits="normalized")
    randomize_prompts(loss_fn)
    path = loss_fn.save_prompts(tmp_path / "p.safetensors", resynthesis="centered")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert json.loads(metadata["mask_logits"]) == "normalized"
    assert json.loads(metadata["levels"]) == [3, 2, 1]
    assert json.loads(metadata["resynthesis"]) == "centered"
    fresh = FreeKDLoss([6, 6, 6], levels=[3, 2, 1], mask_logits="normalized")
    fresh.load_prompts(path)
    for a, b in zip(fresh.prompts, loss_fn.prompts, strict=True):
        torch.testing.assert_close(a.tokens, b.tokens)
    with pytest.raises(ValueError, match=r"mask_logits: file 'normalized', loss 'raw'"):
        FreeKDLoss([6, 6, 6], levels=[3, 2, 1]).load_prompts(path)
    with pytest.raises(ValueError, match=r"levels: file \[3, 2, 1\], loss 3"):
        FreeKDLoss([6, 6, 6], mask_logits="normalized").load_prompts(path)


def test_prompt_files_without_mask_logits_load_as_raw(tmp_path):
    # A file written before mask_logits existed: uniform levels as one integer, no mask_logits.
    loss_fn = FreeKDLoss([6, 6])
    randomize_prompts(loss_fn)
    path = loss_fn.save_prompts(tmp_path / "new.safetensors")
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    del metadata["mask_logits"]
    assert json.loads(metadata["levels"]) == 3
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata)
    raw = FreeKDLoss([6, 6], levels=[3, 3])
    raw.load_prompts(old)
    torch.testing.assert_close(raw.prompts[1].tokens, loss_fn.prompts[1].tokens)
    with pytest.raises(ValueError, match=r"mask_logits: file 'raw', loss 'scaled'"):
        FreeKDLoss([6, 6], mask_logits="scaled").load_prompts(old)


def test_prompts_copy_in_memory_between_losses_of_one_configuration():
    source = FreeKDLoss.preset("paper", [6, 6], levels=[2, 1])
    randomize_prompts(source)
    source.prompts[0].mark_tuned()
    target = FreeKDLoss.preset("paper", [6, 6], levels=[2, 1], relational="cosine")
    target.copy_prompts_from(source)
    for mine, theirs in zip(target.prompts, source.prompts, strict=True):
        assert torch.equal(mine.tokens, theirs.tokens) and mine.tokens is not theirs.tokens
        assert bool(mine.tuned) == bool(theirs.tuned)
    assert not target.prompts[0].tokens.requires_grad  # still frozen for stage 2
    other = FreeKDLoss.preset("official", [6, 6])
    with pytest.raises(ValueError, match=r"num_prompts: source 6, loss 2.*granularity"):
        FreeKDLoss.preset("paper", [6, 6]).copy_prompts_from(other)
    with pytest.raises(ValueError, match=r"channels: source \[6\], loss \[6, 6\]"):
        target.copy_prompts_from(FreeKDLoss.preset("paper", [6]))
