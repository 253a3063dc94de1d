"""Mask pictures: layout and colour map."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from freekd import FreeKDLoss
from freekd.viz import colorize, prompt_mask_grid, render_prompt_masks
from tests.conftest import TinySegmenter


def test_colour_map_ends_and_shape():
    values = torch.tensor([[0.0, 1.0]])
    rgb = colorize(values)
    assert rgb.shape == (3, 1, 2)
    torch.testing.assert_close(rgb[:, 0, 0], torch.tensor([0.27, 0.00, 0.33]))
    torch.testing.assert_close(rgb[:, 0, 1], torch.tensor([0.99, 0.91, 0.14]))
    assert (rgb[:, 0, 0] != rgb[:, 0, 1]).all()


def test_grid_has_one_row_per_layer_and_one_column_per_map():
    image = torch.rand(3, 16, 20)
    masks = (torch.rand(1, 2, 1, 2, 3), [torch.rand(1, 2, 3, 8, 10), torch.rand(1, 2, 3, 4, 5)])
    picture = prompt_mask_grid(image, [masks, masks, masks])
    # input + low + 2 levels + 2 tokens of the finest level = 6 columns; 3 layers = 3 rows
    assert picture.shape == (3, 3 * 16, 6 * 20)
    torch.testing.assert_close(
        picture[:, :16, :20], (image - image.min()) / (image.max() - image.min())
    )


def test_render_writes_a_png_of_the_expected_size(tmp_path):
    torch.manual_seed(0)
    teacher = TinySegmenter(16)
    loss = FreeKDLoss.preset("paper", [16, 16], include_low=True)
    path = render_prompt_masks(
        teacher, ["stage2", "stage3"], loss, torch.rand(3, 32, 32), tmp_path / "masks.png"
    )
    with Image.open(path) as picture:
        # 2 layers; input + low + 3 levels + T=2 tokens = 7 columns of 32 px
        assert picture.size == (7 * 32, 2 * 32)
    assert teacher.training  # mode restored


def test_the_old_spelling_still_imports_with_a_deprecation_warning():
    import freekd.viz
    from freekd import relation

    with pytest.warns(DeprecationWarning, match=r"freekd.viz.colourise is deprecated.*colorize"):
        assert freekd.viz.colourise is colorize
    with pytest.warns(DeprecationWarning, match="use freekd.relation.normalize_log_weight"):
        from freekd.relation import normalise_log_weight
    assert normalise_log_weight is relation.normalize_log_weight
    with pytest.raises(AttributeError, match="no attribute 'colorise'"):
        freekd.viz.colorise  # noqa: B018
