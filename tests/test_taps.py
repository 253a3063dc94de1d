"""FeatureTaps: capture and replace the outputs of named submodules."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from freekd.taps import FeatureTaps, TapError, probe_features


class TinyPyramid(nn.Module):
    """Three conv stages and a neck that returns an ordered dict of maps."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.stages = nn.ModuleList(nn.Conv2d(4, 4, 3, stride=2, padding=1) for _ in range(3))
        self.neck = DictNeck()
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        pyramid = self.neck(maps)
        return [self.head(m) for m in pyramid.values()]


class DictNeck(nn.Module):
    def forward(self, maps):
        return OrderedDict((str(i), m * 2) for i, m in enumerate(maps))


class ListModule(nn.Module):
    def forward(self, x):
        return [x + 1, x + 2]


class NotATensor(nn.Module):
    def forward(self, x):
        return {"shape": x.shape}


def test_capture_single_tensors_and_all_dict_entries_in_order():
    torch.manual_seed(0)
    model = TinyPyramid()
    x = torch.randn(2, 3, 16, 16)
    stage_outputs = []
    handles = [
        s.register_forward_hook(lambda m, i, o: stage_outputs.append(o)) for s in model.stages
    ]
    with FeatureTaps(model, ["stages.0", "neck"]) as taps:
        model(x)
    for h in handles:
        h.remove()
    features = taps.features
    assert len(features) == 4
    torch.testing.assert_close(features[0], stage_outputs[0])
    for got, stage in zip(features[1:], stage_outputs, strict=True):
        torch.testing.assert_close(got, stage * 2)


def test_pick_entries_of_a_dict_or_a_list():
    model = nn.Sequential(nn.Identity(), ListModule())
    x = torch.randn(1, 2, 3, 3)
    with FeatureTaps(model, ["1:1", "1:0"]) as taps:
        model(x)
    torch.testing.assert_close(taps.features[0], x + 2)
    torch.testing.assert_close(taps.features[1], x + 1)
    pyramid = TinyPyramid()
    with FeatureTaps(pyramid, ["neck:2"]) as taps:
        pyramid(torch.randn(1, 3, 16, 16))
    assert taps.features[0].shape == (1, 4, 2, 2)


def test_replace_changes_what_the_rest_of_the_model_sees():
    torch.manual_seed(0)
    model = TinyPyramid()
    x = torch.randn(1, 3, 16, 16)
    seen = []
    with FeatureTaps(model, ["neck:0", "neck:2"], replace=lambda i, f: torch.full_like(f, i + 1.0)):
        outputs = model(x)
    head = model.head
    # The head ran on the constant maps: 1 for entry 0, 2 for entry 2; entry 1 untouched.
    expected0 = head(torch.ones(1, 4, 8, 8))
    expected2 = head(torch.full((1, 4, 2, 2), 2.0))
    torch.testing.assert_close(outputs[0], expected0)
    torch.testing.assert_close(outputs[2], expected2)
    with FeatureTaps(model, ["neck:1"]) as taps:
        model(x)
        seen = taps.features[0]
    torch.testing.assert_close(outputs[1], head(seen))


def test_replace_on_a_single_tensor_output_and_originals_are_kept():
    model = nn.Sequential(nn.Conv2d(1, 1, 1), nn.ReLU())
    x = torch.randn(1, 1, 4, 4)
    with FeatureTaps(model, ["0"], replace=lambda i, f: -f) as taps:
        out = model(x)
    torch.testing.assert_close(out, torch.relu(-model[0](x)))
    torch.testing.assert_close(taps.originals[0], model[0](x))
    torch.testing.assert_close(taps.features[0], -model[0](x))


def test_hooks_are_removed_on_exit():
    model = nn.Sequential(nn.Conv2d(1, 1, 1))
    with FeatureTaps(model, ["0"], replace=lambda i, f: f * 0):
        assert len(model[0]._forward_hooks) == 1
    assert len(model[0]._forward_hooks) == 0
    x = torch.randn(1, 1, 2, 2)
    assert model(x).abs().sum() > 0


def test_stop_after_capture_skips_the_rest_of_the_model():
    calls = []
    model = TinyPyramid()
    model.head.register_forward_hook(lambda m, i, o: calls.append(1))
    taps = FeatureTaps(model, ["stages.1"], stop_after_capture=True)
    assert taps.run(model, torch.randn(1, 3, 16, 16)) is None
    assert taps.features[0].shape == (1, 4, 4, 4) and calls == []
    taps.remove()


def test_unknown_name_lists_the_closest_valid_names():
    with pytest.raises(TapError, match=r"no submodule 'stage\.1'.*stages\.1"):
        FeatureTaps(TinyPyramid(), ["stage.1"])


@pytest.mark.parametrize(
    ("taps", "match"),
    [
        ([], "non-empty"),
        ("stages.0", "non-empty"),
        (["stages.0", "stages.0"], "twice"),
        ([":0"], "module path"),
    ],
)
def test_bad_tap_lists_are_refused(taps, match):
    with pytest.raises(TapError, match=match):
        FeatureTaps(TinyPyramid(), taps)


def test_bad_entries_and_outputs_are_explained():
    model = TinyPyramid()
    x = torch.randn(1, 3, 16, 16)
    with FeatureTaps(model, ["neck:7"]), pytest.raises(TapError, match="no entry '7'"):
        model(x)
    with FeatureTaps(model, ["stages.0:1"]), pytest.raises(TapError, match="single tensor"):
        model(x)
    odd = nn.Sequential(NotATensor())
    with FeatureTaps(odd, ["0"]), pytest.raises(TapError, match="tensor"):
        odd(x)
    with FeatureTaps(model, ["head"]) as taps:
        model.stem(x)
        with pytest.raises(TapError, match="did not fire"):
            taps.features  # noqa: B018


class CoarseFirst(nn.Module):
    """Computes ``coarse`` before ``fine`` (as an FPN's top-down pass does)."""

    def __init__(self) -> None:
        super().__init__()
        self.coarse = nn.Conv2d(2, 2, 1)
        self.fine = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        coarse = self.coarse(x[..., ::2, ::2])
        fine = self.fine(x) + nn.functional.interpolate(coarse, scale_factor=2.0)
        return fine, coarse


def test_replace_accepts_taps_listed_fine_to_coarse_when_they_fire_coarse_first():
    torch.manual_seed(0)
    model = CoarseFirst()
    x = torch.randn(1, 2, 4, 4)
    seen = []

    def replace(index, feature):
        seen.append((index, tuple(feature.shape)))
        return feature * (index + 2.0)

    with FeatureTaps(model, ["fine", "coarse"], replace=replace) as taps:
        fine, coarse = model(x)
        assert [f.shape[-1] for f in taps.features] == [4, 2]  # listed order
    # the replacement saw each feature under its listed index, whatever the firing order
    assert seen == [(1, (1, 2, 2, 2)), (0, (1, 2, 4, 4))]
    expected_coarse = model.coarse(x[..., ::2, ::2]) * 3.0
    torch.testing.assert_close(coarse, expected_coarse)
    expected_fine = model.fine(x) * 2.0 + nn.functional.interpolate(
        expected_coarse, scale_factor=2.0
    )
    torch.testing.assert_close(fine, expected_fine)


def test_out_of_order_multi_feature_tap_is_refused_with_the_fix():
    model = TinyPyramid()
    # "stages.2" fires before "neck" although listed after it, and "neck" yields 3 features:
    # the offset guessed for "stages.2" (1) was wrong, so the pass is refused with the fix.
    with (
        FeatureTaps(model, ["neck", "stages.2"], replace=lambda i, f: f),
        pytest.raises(TapError, match="order the model computes them"),
    ):
        model(torch.randn(1, 3, 16, 16))


def test_probe_features_gives_the_shapes_and_leaves_the_model_as_it_was():
    model = TinyPyramid().train()
    model.stages[0].eval()  # a submodule's own flag survives the probe
    shapes = probe_features(model, ["stages.0", "neck"], torch.zeros(2, 3, 16, 16))
    assert shapes == [
        torch.Size([2, 4, 8, 8]),
        torch.Size([2, 4, 8, 8]),
        torch.Size([2, 4, 4, 4]),
        torch.Size([2, 4, 2, 2]),
    ]
    assert model.training and not model.stages[0].training and model.stages[1].training
    assert not model.stem._forward_hooks and not model.neck._forward_hooks
    with pytest.raises(TapError, match="no submodule 'stagez'"):
        probe_features(model, ["stagez"], torch.zeros(1, 3, 16, 16))
