"""Transformer features: the token-to-map adapter (explicit index loops as the reference), taps
with ``@tokens`` on timm ViTs, the ViT segmenter, and ViT -> CNN / ViT -> ViT distillation."""

from __future__ import annotations

import pytest
import timm
import torch

from freekd.distill import Distiller
from freekd.losses import FreeKDLoss
from freekd.models import build_model, default_taps
from freekd.taps import FeatureTaps, TapError, map_to_tokens, parse_tap_spec, tokens_to_map

SMALL_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2}


def reference_map(tokens: torch.Tensor, height: int, width: int, prefix: int) -> torch.Tensor:
    """``map[n, c, i, j] = tokens[n, prefix + i * width + j, c]``, by loops."""
    count, _, channels = tokens.shape
    out = torch.empty(count, channels, height, width)
    for i in range(height):
        for j in range(width):
            out[:, :, i, j] = tokens[:, prefix + i * width + j, :]
    return out


# ---------------------------------------------------------------------------- adapter


@pytest.mark.parametrize("grid", [(4, 4), (3, 5), (8, 2), (1, 1), (2, 7)])
@pytest.mark.parametrize("prefix", [0, 1, 5])
def test_tokens_to_map_round_trips(grid, prefix):
    height, width = grid
    tokens = torch.randn(2, prefix + height * width, 6)
    feature = tokens_to_map(tokens, grid, prefix)
    assert feature.shape == (2, 6, height, width)
    torch.testing.assert_close(feature, reference_map(tokens, height, width, prefix))
    back = map_to_tokens(feature, tokens[:, :prefix])
    torch.testing.assert_close(back, tokens)
    auto_prefix = tokens_to_map(tokens, grid, "auto")  # L - h * w
    torch.testing.assert_close(auto_prefix, feature)


@pytest.mark.parametrize(("side", "prefix"), [(4, 0), (4, 1), (6, 5), (3, 1)])
def test_square_grids_and_prefix_are_inferred(side, prefix):
    tokens = torch.randn(1, prefix + side * side, 3)
    expected = reference_map(tokens, side, side, prefix)
    torch.testing.assert_close(tokens_to_map(tokens, None, prefix), expected)
    torch.testing.assert_close(tokens_to_map(tokens, None, "auto"), expected)


def test_lengths_that_fit_no_grid_are_refused():
    with pytest.raises(TapError, match=r"70 tokens do not fit the 8x8 patch grid with 1 prefix"):
        tokens_to_map(torch.randn(1, 70, 4), (8, 8), 1)
    with pytest.raises(TapError, match=r"66 tokens minus 1 prefix tokens leave 65, not a square"):
        tokens_to_map(torch.randn(1, 66, 4), None, 1)
    with pytest.raises(TapError, match=r"fewer than the 8x8 grid"):
        tokens_to_map(torch.randn(1, 60, 4), (8, 8), "auto")
    with pytest.raises(TapError, match=r"do not make a square patch grid with 0..8 prefix"):
        tokens_to_map(torch.randn(1, 47, 4), None, "auto")
    with pytest.raises(TapError, match=r"takes tokens \[N, L, C\]"):
        tokens_to_map(torch.randn(1, 4, 8, 8))


def test_tap_specs():
    assert parse_tap_spec("blocks.11") == ("blocks.11", None, None)
    name, key, layout = parse_tap_spec("encoder.blocks.3@tokens=4x16+5")
    assert (name, key, layout.grid, layout.prefix_tokens) == ("encoder.blocks.3", None, (4, 16), 5)
    _, _, layout = parse_tap_spec("blocks.0@tokens+1")
    assert layout.grid is None and layout.prefix_tokens == 1 and str(layout) == "@tokens+1"
    assert parse_tap_spec("neck:0@nhwc")[1:] == ("0", parse_tap_spec("x@nhwc")[2])
    with pytest.raises(TapError, match="is not a layout"):
        parse_tap_spec("blocks.0@tokens=8")


# ---------------------------------------------------------------------------- taps on timm


def tiny_vit(**kwargs):
    options = dict(SMALL_VIT, num_classes=0, global_pool="", img_size=32, patch_size=8)
    options.update(kwargs)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **options).eval()


@pytest.mark.parametrize(
    ("options", "size", "grid", "prefix"),
    [
        ({}, (32, 32), (4, 4), 1),
        ({"reg_tokens": 4}, (32, 32), (4, 4), 5),
        ({"class_token": False}, (32, 32), (4, 4), 0),
        ({"dynamic_img_size": True}, (24, 48), (3, 6), 1),
        ({"reg_tokens": 4, "dynamic_img_size": True}, (16, 40), (2, 5), 5),
    ],
)
def test_token_taps_find_grid_and_prefix_from_the_model(options, size, grid, prefix):
    model = tiny_vit(**options)
    images = torch.rand(2, 3, *size)
    raw = {}
    handle = model.blocks[1].register_forward_hook(lambda m, i, o: raw.setdefault("tokens", o))
    with torch.no_grad(), FeatureTaps(model, ["blocks.1@tokens", "blocks.0@tokens"]) as taps:
        model(images)
        late, early = taps.features
    handle.remove()
    assert late.shape == (2, 32, *grid) and early.shape == late.shape
    torch.testing.assert_close(late, reference_map(raw["tokens"], *grid, prefix))
    explicit = f"blocks.1@tokens={grid[0]}x{grid[1]}+{prefix}"
    with torch.no_grad(), FeatureTaps(model, [explicit]) as taps:
        model(images)
        torch.testing.assert_close(taps.features[0], late)


def test_a_wrong_grid_in_a_tap_is_named():
    model = tiny_vit()
    with (
        FeatureTaps(model, ["blocks.1@tokens=3x3+1"]) as taps,
        pytest.raises(
            TapError,
            match=r"tap 'blocks.1@tokens=3x3\+1': 17 tokens do not fit the 3x3.*blocks.1@tok",
        ),
    ):
        taps.run(model, torch.rand(1, 3, 32, 32))
    with FeatureTaps(model, ["blocks.1@nhwc"]) as taps, pytest.raises(TapError, match="@nhwc"):
        taps.run(model, torch.rand(1, 3, 32, 32))


def test_replacing_a_token_feature_keeps_the_prefix_tokens():
    model = tiny_vit(reg_tokens=4)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = model.forward_features(images)
        with FeatureTaps(model, ["blocks.1@tokens"], replace=lambda i, f: f):
            same = model.forward_features(images)
        torch.testing.assert_close(same, expected)
        seen = {}
        block = model.blocks[1]
        handle = block.register_forward_hook(lambda m, i, o: seen.setdefault("before", o.clone()))
        with FeatureTaps(model, ["blocks.1@tokens"], replace=lambda i, f: torch.zeros_like(f)):
            model.norm.register_forward_pre_hook(lambda m, i: seen.setdefault("after", i[0]))
            model.forward_features(images)
        handle.remove()
    torch.testing.assert_close(seen["after"][:, :5], seen["before"][:, :5])
    assert torch.count_nonzero(seen["after"][:, 5:]) == 0


def test_nhwc_taps_permute():
    class ChannelsLast(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stage = torch.nn.Identity()

        def forward(self, x):
            return self.stage(x.permute(0, 2, 3, 1))

    model = ChannelsLast()
    images = torch.rand(2, 5, 3, 4)
    with FeatureTaps(model, ["stage@nhwc"]) as taps:
        model(images)
        torch.testing.assert_close(taps.features[0], images)


# ---------------------------------------------------------------------------- segmenter


def test_vit_segmenter_shapes_taps_and_registry():
    spec = build_model(
        "segmentation",
        "vit_seg",
        "vit_small_patch14_reg4_dinov2",
        5,
        img_size=32,
        patch_size=8,
        depth=1,
        decoder="linear",
    )
    assert spec.taps == ["encoder.norm@tokens"] and spec.tap_channels == [384]
    assert default_taps("segmentation", "vit_seg", "vit_base_patch16_224") == (
        ["encoder.norm@tokens"],
        [768],
    )
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad(), FeatureTaps(spec.model, spec.taps) as taps:
        logits = spec.model(images)
        (feature,) = taps.features
    assert logits.shape == (2, 5, 32, 32) and feature.shape == (2, 384, 4, 4)
    with torch.no_grad():  # other sizes: the grid is ceil(H / 8) x ceil(W / 8)
        assert spec.model(torch.rand(1, 3, 20, 44)).shape == (1, 5, 20, 44)
        assert spec.predict(spec.model, torch.rand(1, 3, 20, 44)).shape == (1, 20, 44)
    batch = (images, torch.randint(0, 5, (2, 32, 32)))
    assert torch.isfinite(spec.task_loss(spec.model, batch))
    with pytest.raises(ValueError, match="unknown timm ViT 'vit_smal_patch16_224'.*did you mean"):
        build_model("segmentation", "vit_seg", "vit_smal_patch16_224", 5)
    with pytest.raises(ValueError, match="local checkpoint files only"):
        build_model("segmentation", "vit_seg", "vit_tiny_patch16_224", 5, encoder_weights="dino")


def test_encoder_weights_load_from_a_local_file(tmp_path):
    import safetensors.torch

    source = tiny_vit(img_size=32)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    path = tmp_path / "encoder.safetensors"
    safetensors.torch.save_file(state, str(path))
    spec = build_model(
        "segmentation",
        "vit_seg",
        "vit_tiny_patch16_224",
        3,
        img_size=32,
        patch_size=8,
        encoder_weights=str(path),
        **SMALL_VIT,
    )
    loaded = spec.model.encoder.state_dict()
    for key, value in state.items():
        torch.testing.assert_close(loaded[key], value)


# ---------------------------------------------------------------------------- distillation


def vit_teacher(num_classes: int = 4):
    return build_model(
        "segmentation",
        "vit_seg",
        "vit_tiny_patch16_224",
        num_classes,
        img_size=64,
        patch_size=8,
        **SMALL_VIT,
    )


@pytest.mark.parametrize("student_kind", ["cnn", "vit"])
def test_a_vit_teacher_distils_into_a_cnn_or_a_vit(student_kind):
    torch.manual_seed(0)
    teacher = vit_teacher()
    if student_kind == "cnn":
        student = build_model("segmentation", "pspnet", "resnet18", 4)  # layer4: [N, 512, 8, 8]
    else:
        student = build_model(
            "segmentation",
            "vit_seg",
            "vit_tiny_patch16_224",
            4,
            img_size=64,
            patch_size=8,
            embed_dim=16,
            depth=1,
            num_heads=2,
        )
    batch = (torch.rand(2, 3, 64, 64), torch.randint(0, 4, (2, 64, 64)))
    loss = FreeKDLoss.preset("paper", teacher.tap_channels)
    distiller = Distiller(
        teacher.model,
        student.model,
        teacher.taps,
        student.taps,
        {"freekd": loss},
        student.task_loss,
        example_batch=batch,
    )
    terms = distiller(batch)
    total = sum(terms.values())
    assert torch.isfinite(total) and float(terms["distill/freekd"].detach()) > 0
    total.backward()
    grads = [p.grad for p in student.model.parameters() if p.requires_grad]
    assert any(g is not None and float(g.abs().sum()) > 0 for g in grads)
    assert all(torch.isfinite(g).all() for g in grads if g is not None)
    assert all(p.grad is None for p in teacher.model.parameters())


def test_prompt_tuning_runs_through_the_token_taps():
    from freekd.tuning import PromptTuner

    torch.manual_seed(0)
    teacher = vit_teacher()
    loss = FreeKDLoss.preset("paper", teacher.tap_channels)
    tuner = PromptTuner(teacher.model, teacher.taps, loss, teacher.task_loss)
    batch = (torch.rand(2, 3, 64, 64), torch.randint(0, 4, (2, 64, 64)))
    terms = tuner(batch)
    assert torch.isfinite(terms["loss"])
    terms["loss"].backward()
    grads = [p.grad for p in tuner.trainable_parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)
