"""Mask pictures: the labelled layout (titles, rows, tile size, color bar) and the color map."""

from __future__ import annotations

import json

import numpy
import pytest
import torch
from PIL import Image

from freekd import FreeKDLoss
from freekd.viz import colorize, prompt_mask_figure, prompt_mask_grid, render_prompt_masks
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


COLUMNS = [
    "image",
    "teacher |level 1|",
    "mask: low band",
    "mask: level 1",
    "mask: level 2",
    "mask: level 3",
    "level 1, token 1",
    "level 1, token 2",
    "overlay: level 1",
]


def test_render_writes_a_labelled_png_with_tiles_of_at_least_128_px(tmp_path):
    torch.manual_seed(0)
    teacher = TinySegmenter(16)
    loss = FreeKDLoss.preset("paper", [16, 16], include_low=True)
    image = torch.rand(3, 32, 48)
    path = render_prompt_masks(
        teacher, ["stage2", "stage3"], loss, image, tmp_path / "masks.png", title="two layers"
    )
    assert teacher.training  # mode restored
    with Image.open(path) as picture:
        text, size = dict(picture.text), picture.size
    assert text["Title"] == "two layers" and text["freekd:colorbar"] == "mask value"
    assert json.loads(text["freekd:columns"]) == COLUMNS
    # rows: the taps and the grid of their finest band (32x48 -> 16x24 -> level 1 8x12)
    assert json.loads(text["freekd:rows"]) == [
        "stage2 level 1 band: 8x12",
        "stage3 level 1 band: 4x6",
    ]
    assert text["freekd:tile"] == "128x192"  # the shorter side upscaled to 128 px
    # 9 tiles of 192 px with gaps, a label column on the left, a color bar on the right
    assert size[0] > 9 * 192 + 8 * 6 and size[1] > 2 * 128 + 6


def test_figure_structure_titles_drawn_above_every_column():
    torch.manual_seed(0)
    low, highs = torch.rand(1, 3, 1, 2, 2), [torch.rand(1, 3, 1, 8, 8), torch.rand(1, 3, 1, 4, 4)]
    bands = [torch.randn(1, 5, 3, 8, 8)]
    figure = prompt_mask_figure(torch.rand(3, 16, 16), [(low, highs)], bands, ["fpn.p3"])
    assert figure.columns == [
        "image",
        "teacher |level 1|",
        "mask: low band",
        "mask: level 1",
        "mask: level 2",
        "level 1, token 1",
        "level 1, token 2",
        "level 1, token 3",
        "overlay: level 1",
    ]
    assert figure.rows == ["fpn.p3 level 1 band: 8x8"] and figure.tile == (128, 128)
    pixels = torch.from_numpy(numpy.asarray(figure.image)).float()
    assert len(figure.column_boxes) == len(figure.columns)
    for left, top, right, bottom in figure.column_boxes:  # each title box holds dark text
        assert right - left == 128 and (pixels[top:bottom, left:right] < 100).any()
    # Without the teacher's bands and the low band's masks: those columns are left out.
    bare = prompt_mask_figure(torch.rand(3, 200, 300), [(None, highs)])
    assert "teacher |level 1|" not in bare.columns and "mask: low band" not in bare.columns
    assert bare.rows == ["layer 0 level 1 band: 8x8"] and bare.tile == (200, 300)
    with pytest.raises(ValueError, match="2 row names for 1 layers"):
        prompt_mask_figure(torch.rand(3, 16, 16), [(low, highs)], row_names=["a", "b"])


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


def test_rows_are_named_by_tap_and_by_pyramid_level():
    from freekd.viz import _row_names

    assert _row_names(["encoder.layer3", "encoder.layer4"], 2) == [
        "encoder.layer3",
        "encoder.layer4",
    ]
    assert _row_names(["backbone.fpn"], 3) == [
        "backbone.fpn[0]",
        "backbone.fpn[1]",
        "backbone.fpn[2]",
    ]
    assert _row_names(["a", "b"], 3) == ["layer 0", "layer 1", "layer 2"]
