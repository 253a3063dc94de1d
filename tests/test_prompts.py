"""FrequencyPrompt: masks, masked bands and dissimilarity against direct per-token loops."""

from __future__ import annotations

import pytest
import torch

from freekd import FrequencyPrompt, dwt2
from freekd.prompts import mask_overlap
from tests.naive_freekd import naive_dissimilarity, naive_token_mask


def bands_of(channels=5, shape=(12, 17), levels=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, channels, *shape, dtype=torch.float64, generator=generator)
    return dwt2(x, levels)


def prompt_with_random_tokens(granularity, num_prompts=3, channels=5, levels=3, seed=1):
    prompt = FrequencyPrompt(channels, num_prompts, levels, granularity).double()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        prompt.tokens.copy_(torch.randn(prompt.tokens.shape, generator=generator))
    return prompt


@pytest.mark.parametrize("granularity", ["level", "band"])
def test_masks_have_the_documented_shapes_and_equal_per_token_sigmoids(granularity):
    bands = bands_of()
    prompt = prompt_with_random_tokens(granularity)
    low_masks, high_masks = prompt.masks(bands)
    k = 1 if granularity == "level" else 3
    assert low_masks.shape == (2, 3, 1, *bands[0].shape[-2:])
    for mask, detail in zip(high_masks, bands[1], strict=True):
        assert mask.shape == (2, 3, k, *detail.shape[-2:])
    tokens = prompt.tokens.detach()
    for t in range(3):
        torch.testing.assert_close(low_masks[:, t, 0], naive_token_mask(tokens[0, t], bands[0]))
        for level, detail in enumerate(bands[1], start=1):
            for o in range(k):
                group = 1 + (level - 1) * k + o
                band = detail.sum(2) if granularity == "level" else detail[:, :, o]
                expected = naive_token_mask(tokens[group, t], band)
                torch.testing.assert_close(high_masks[level - 1][:, t, o], expected)


def test_masks_skip_the_low_band_when_asked():
    low_masks, high_masks = prompt_with_random_tokens("band").masks(bands_of(), include_low=False)
    assert low_masks is None and len(high_masks) == 3


@pytest.mark.parametrize("granularity", ["level", "band"])
def test_mask_bands_multiplies_each_band_by_the_sum_of_its_token_masks(granularity):
    bands = bands_of()
    prompt = prompt_with_random_tokens(granularity)
    low_masks, high_masks = prompt.masks(bands)
    masked_low, masked_highs = prompt.mask_bands(bands)
    expected_low = sum(low_masks[:, t] * bands[0] for t in range(3))  # [N,1,h,w] * [N,C,h,w]
    torch.testing.assert_close(masked_low, expected_low)
    for level, detail in enumerate(bands[1]):
        for o in range(3):
            mask_index = 0 if granularity == "level" else o
            expected = sum(
                high_masks[level][:, t, mask_index].unsqueeze(1) * detail[:, :, o] for t in range(3)
            )
            torch.testing.assert_close(masked_highs[level][:, :, o], expected)


def test_overlap_hand_computed_case():
    masks = torch.tensor([[[1.0, 0.0], [0.5, 0.5]]])  # two masks of two pixels
    # Jaccard: sum(min) = 0.5, sum(max) = 1.5; Dice: 2 * 0.5 / (1 + 0.5).
    torch.testing.assert_close(mask_overlap(masks, "jaccard"), torch.tensor([1 / 3]))
    torch.testing.assert_close(mask_overlap(masks, "dice"), torch.tensor([2 / 3]))


@pytest.mark.parametrize("kind", ["jaccard", "dice"])
def test_overlap_equals_pairwise_loops_and_has_gradients(kind):
    generator = torch.Generator().manual_seed(0)
    masks = torch.rand(3, 4, 30, dtype=torch.float64, generator=generator).requires_grad_(True)
    got = mask_overlap(masks, kind)
    for row in range(3):
        torch.testing.assert_close(got[row], naive_dissimilarity(masks[row : row + 1], kind))
    assert torch.autograd.gradcheck(lambda m: mask_overlap(m, kind), (masks,))


@pytest.mark.parametrize("granularity", ["level", "band"])
@pytest.mark.parametrize("kind", ["jaccard", "dice"])
def test_dissimilarity_is_mean_over_images_summed_over_groups(granularity, kind):
    bands = bands_of()
    prompt = prompt_with_random_tokens(granularity)
    masks = prompt.masks(bands)
    low_masks, high_masks = masks
    expected = naive_dissimilarity(low_masks[:, :, 0].flatten(2), kind)
    for mask in high_masks:
        for o in range(mask.shape[2]):
            expected = expected + naive_dissimilarity(mask[:, :, o].flatten(2), kind)
    torch.testing.assert_close(prompt.dissimilarity(masks, kind), expected)


def test_dissimilarity_is_zero_for_one_prompt_and_counts_groups_for_identical_masks():
    bands = bands_of()
    single = prompt_with_random_tokens("band", num_prompts=1)
    assert single.dissimilarity(single.masks(bands)).item() == 0.0
    same = prompt_with_random_tokens("level", num_prompts=3)
    with torch.no_grad():
        same.tokens.copy_(same.tokens[:, :1].expand_as(same.tokens))
    # Identical masks overlap fully: 1 per group; "level" over 3 levels has 1 + 3 groups.
    for kind in ("jaccard", "dice"):
        torch.testing.assert_close(
            same.dissimilarity(same.masks(bands), kind), torch.tensor(4.0, dtype=torch.float64)
        )


def test_tuned_flag_is_saved_in_the_state_dict():
    prompt = FrequencyPrompt(4)
    assert not bool(prompt.tuned)
    prompt.mark_tuned()
    fresh = FrequencyPrompt(4)
    fresh.load_state_dict(prompt.state_dict())
    assert bool(fresh.tuned)
    torch.testing.assert_close(fresh.tokens, prompt.tokens)


def test_bands_of_other_channels_or_levels_are_refused():
    prompt = FrequencyPrompt(5, levels=3).double()
    with pytest.raises(ValueError, match="5 channels"):
        prompt.masks(bands_of(channels=4))
    with pytest.raises(ValueError, match="levels=3"):
        prompt.masks(bands_of(levels=2))
    with pytest.raises(ValueError, match="granularity"):
        FrequencyPrompt(5, granularity="pixel")
    with pytest.raises(ValueError, match="num_prompts"):
        FrequencyPrompt(5, num_prompts=0)
