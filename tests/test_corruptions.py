"""Image corruptions (freekd.evaluation.corruptions) against independent references (colorsys,
scipy, hand-computed values and noise statistics), their determinism, and the
robustness evaluation (clean / mPC / rPC) through ``evaluate_model`` and ``freekd evaluate``."""

from __future__ import annotations

import colorsys
import json
import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from freekd.evaluation import evaluate_robustness
from freekd.evaluation.corruptions import (
    ALL_CORRUPTIONS,
    CORRUPTIONS,
    RANDOM_CORRUPTIONS,
    corrupt,
    resolve_corruptions,
)


def scene(count: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth colour gradients with a bright square: ``[count, 3, size, size]`` in [0.1, 0.9]."""
    generator = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, size)
    images = torch.empty(count, 3, size, size)
    for i in range(count):
        weights = torch.rand(3, 2, generator=generator)
        images[i] = 0.1 + 0.5 * (weights[:, :1, None] * ramp[None, :, None])
        images[i] += 0.2 * weights[:, 1:, None] * ramp[None, None, :]
        images[i, :, size // 4 : size // 2, size // 4 : size // 2] = 0.9
    return images.clamp(0, 1)


# ---------------------------------------------------------------------------- contract


@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
@pytest.mark.parametrize("severity", [1, 3, 5])
def test_each_corruption_changes_the_image_and_keeps_shape_dtype_range(name, severity):
    images = scene()
    out = corrupt(images, name, severity, seed=0)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert float((out - images).abs().mean()) > 1e-3, f"{name} at {severity} changed nothing"
    assert torch.equal(out, corrupt(images, name, severity, seed=0)), "not deterministic"
    if name in RANDOM_CORRUPTIONS:
        assert not torch.equal(out, corrupt(images, name, severity, seed=1)), "seed unused"


@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_severity_zero_is_the_identity_and_the_input_is_untouched(name):
    images = scene()
    copy = images.clone()
    assert torch.equal(corrupt(images, name, 0), images)
    corrupt(images, name, 3)
    assert torch.equal(images, copy)


def test_severity_grows_the_change():
    images = scene(count=4, size=48)
    for name in ("gaussian_noise", "gaussian_blur", "contrast", "defocus_blur", "impulse_noise"):
        changes = [float((corrupt(images, name, s) - images).abs().mean()) for s in (1, 3, 5)]
        assert changes[0] < changes[1] < changes[2], (name, changes)


@pytest.mark.parametrize("name", sorted(RANDOM_CORRUPTIONS))
def test_an_image_does_not_depend_on_its_batch(name):
    images = scene(count=4)
    whole = corrupt(images, name, 3, seed=5)
    for i in range(4):
        alone = corrupt(images[i : i + 1], name, 3, seed=5, index_offset=i)
        torch.testing.assert_close(alone[0], whole[i], rtol=0, atol=1e-6)
    assert not torch.equal(whole[0], corrupt(images[:1], name, 3, seed=5, index_offset=1)[0])


def test_uint8_float64_and_single_images():
    images = scene(count=2)
    as_bytes = (images * 255).round().to(torch.uint8)
    out = corrupt(as_bytes, "contrast", 2)
    assert out.dtype == torch.uint8 and out.shape == as_bytes.shape
    expected = corrupt(as_bytes.float() / 255, "contrast", 2)
    assert int(((out.float() / 255 - expected).abs() * 255).max().round()) <= 1
    double = corrupt(images.double(), "fog", 2)
    assert double.dtype == torch.float64
    single = corrupt(images[0], "gaussian_noise", 1, index_offset=0)
    assert single.shape == images[0].shape
    assert torch.equal(single, corrupt(images[:1], "gaussian_noise", 1)[0])


def test_clear_errors():
    images = scene(count=1)
    with pytest.raises(ValueError, match="unknown corruption 'gausian_noise'.*did you mean"):
        corrupt(images, "gausian_noise", 1)
    for severity in (6, -1, 2.5, True):
        with pytest.raises(ValueError, match="severity must be an integer 0..5"):
            corrupt(images, "fog", severity)
    with pytest.raises(ValueError, match=r"RGB images \[N, 3, H, W\]"):
        corrupt(torch.rand(2, 1, 8, 8), "fog", 1)
    with pytest.raises(ValueError, match="float images"):
        corrupt(torch.zeros(1, 3, 8, 8, dtype=torch.int32), "fog", 1)
    assert resolve_corruptions("all") == list(CORRUPTIONS) and len(CORRUPTIONS) == 12
    assert resolve_corruptions("fog, contrast,fog") == ["fog", "contrast"]
    assert resolve_corruptions(["all", "saturate"])[-1] == "saturate"
    assert resolve_corruptions(None) == []
    with pytest.raises(ValueError, match="unknown corruption 'frost'"):
        resolve_corruptions("fog,frost")


# ---------------------------------------------------------------------------- references


def test_brightness_and_saturate_match_colorsys():
    pixels = [(0.5, 0.5, 0.5), (0.8, 0.4, 0.2), (0.1, 0.7, 0.3), (0.95, 0.9, 0.2), (0, 0, 0)]
    image = torch.tensor(pixels).T.reshape(1, 3, 1, len(pixels))
    for severity, shift in enumerate((0.1, 0.2, 0.3, 0.4, 0.5), start=1):
        out = corrupt(image, "brightness", severity)[0, :, 0].T
        for pixel, got in zip(pixels, out, strict=True):
            h, s, v = colorsys.rgb_to_hsv(*pixel)
            expected = colorsys.hsv_to_rgb(h, s, min(v + shift, 1.0))
            assert got.tolist() == pytest.approx(expected, abs=1e-6)
    assert corrupt(image, "brightness", 1)[0, :, 0, 0].tolist() == pytest.approx([0.6] * 3)
    for severity, (factor, offset) in enumerate(
        ((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)), start=1
    ):
        out = corrupt(image, "saturate", severity)[0, :, 0].T
        for pixel, got in zip(pixels, out, strict=True):
            h, s, v = colorsys.rgb_to_hsv(*pixel)
            expected = colorsys.hsv_to_rgb(h, min(max(s * factor + offset, 0), 1), v)
            assert got.tolist() == pytest.approx(expected, abs=1e-6)


def test_contrast_by_hand():
    image = torch.zeros(1, 3, 2, 2)
    image[0, 0] = torch.tensor([[0.2, 0.4], [0.6, 0.8]])  # mean 0.5
    image[0, 1] = 0.3
    image[0, 2] = torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # mean 0.5
    out = corrupt(image, "contrast", 1)  # factor 0.4 towards each channel's mean
    assert out[0, 0].flatten().tolist() == pytest.approx([0.38, 0.46, 0.54, 0.62])
    assert out[0, 1].flatten().tolist() == pytest.approx([0.3] * 4)
    assert out[0, 2].flatten().tolist() == pytest.approx([0.3, 0.7, 0.3, 0.7])
    assert corrupt(image, "contrast", 5)[0, 0, 0, 0].item() == pytest.approx(0.5 - 0.3 * 0.05)


def test_gaussian_blur_matches_scipy():
    images = scene(count=2, size=40)
    for severity, sigma in ((1, 1.0), (3, 3.0), (5, 6.0)):
        out = corrupt(images, "gaussian_blur", severity)
        expected = ndimage.gaussian_filter(
            images.numpy(), sigma=(0, 0, sigma, sigma), mode="nearest", truncate=4.0
        )
        np.testing.assert_allclose(out.numpy(), expected, atol=2e-6)


def test_pixelate_is_block_means_by_hand():
    images = scene(count=2, size=32)
    out = corrupt(images, "pixelate", 2)  # factor 0.5: 2x2 blocks of their mean
    means = images.reshape(2, 3, 16, 2, 16, 2).mean(dim=(3, 5))
    expected = means.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    torch.testing.assert_close(out, expected)


def test_jpeg_properties():
    images = scene(count=2, size=32)
    errors = []
    for severity in (1, 5):  # quality 25 and 7
        out = corrupt(images, "jpeg_compression", severity)
        errors.append(float((out - images).abs().mean()))
        # a decoded JPEG is (nearly) a fixed point of the same compression
        again = corrupt(out, "jpeg_compression", severity)
        assert float((again - out).abs().mean()) < 0.5 * errors[-1]
        assert (out * 255 - (out * 255).round()).abs().max() < 1e-4  # 8-bit values
    assert errors[0] < errors[1]
    # a flat grey image (8x8 blocks, no chroma) survives JPEG up to rounding
    grey = torch.full((1, 3, 16, 16), 128 / 255)
    assert float((corrupt(grey, "jpeg_compression", 5) - grey).abs().max()) <= 2 / 255


def test_noise_statistics():
    flat = torch.full((4, 3, 64, 64), 0.5)
    diff = corrupt(flat, "gaussian_noise", 1) - flat  # std 0.08, never clipped at 0.5 +- 5 sd
    assert abs(float(diff.mean())) < 0.005 and float(diff.std()) == pytest.approx(0.08, rel=0.05)
    shot = corrupt(flat, "shot_noise", 1)  # Poisson(0.5 * 60) / 60: mean 0.5, var 0.5 / 60
    assert float(shot.mean()) == pytest.approx(0.5, abs=0.005)
    assert float(shot.var()) == pytest.approx(0.5 / 60, rel=0.1)
    impulse = corrupt(flat, "impulse_noise", 4)  # 17 % of the values set to 0 or 1
    salt, pepper = float((impulse == 1).float().mean()), float((impulse == 0).float().mean())
    assert salt + pepper == pytest.approx(0.17, abs=0.01)
    assert salt == pytest.approx(pepper, abs=0.01)
    assert float((impulse == 0.5).float().mean()) == pytest.approx(0.83, abs=0.01)


def test_blurs_preserve_flat_images_and_spread_a_point():
    flat = torch.full((1, 3, 48, 48), 0.4)
    for name in ("defocus_blur", "motion_blur", "gaussian_blur", "elastic_transform"):
        torch.testing.assert_close(corrupt(flat, name, 3), flat, atol=1e-5, rtol=0)
    point = torch.zeros(1, 3, 64, 64)
    point[0, :, 32, 32] = 1.0
    disk = corrupt(point, "defocus_blur", 3)[0, 0]  # radius 6, anti-aliased by a 3x3 window
    rows, cols = torch.nonzero(disk > 1e-4, as_tuple=True)
    radius = ((rows - 32) ** 2 + (cols - 32) ** 2).float().sqrt().max()
    assert 6 <= float(radius) <= 6 + 1.5
    assert float(disk.sum()) == pytest.approx(1.0, abs=1e-4)
    streak = corrupt(point, "motion_blur", 1)[0, 0]  # 21 taps along one line from the point
    lit = torch.nonzero(streak > 1e-6)
    assert 5 <= len(lit) <= 21 and float(streak.sum()) == pytest.approx(1.0, abs=1e-4)
    assert float(streak[32, 32]) == float(streak.max())  # the first tap weighs most


def test_fog_bounds():
    flat = torch.full((2, 3, 40, 40), 0.3)
    for severity, strength in ((1, 1.5), (5, 3.0)):
        out = corrupt(flat, "fog", severity)
        low, high = 0.3 * 0.3 / (0.3 + strength), (0.3 + strength) * 0.3 / (0.3 + strength)
        assert float(out.min()) >= low - 1e-6 and float(out.max()) <= high + 1e-6
        assert float(out.max() - out.min()) > 0.5 * (high - low)  # the fog varies in space


# ---------------------------------------------------------------------------- robustness


class _ThresholdSegmenter(torch.nn.Module):
    """Class 1 where the first channel is above 0.5: clean masks score 100 mIoU."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        score = images[:, :1] - 0.5
        return torch.cat([-score, score], dim=1) * 10


def test_evaluate_robustness_summaries():
    images = torch.zeros(6, 3, 16, 16)
    images[:, 0] = 0.15  # dark red background (HSV value 0.15), a white 8x8 square
    images[:, :, 4:12, 4:12] = 1.0
    masks = (images[:, 1] > 0.5).long()
    loader = [(images[:3], masks[:3]), (images[3:], masks[3:])]
    model = _ThresholdSegmenter()
    result = evaluate_robustness(
        "segmentation",
        model,
        loader,
        corruptions=["brightness", "contrast"],
        severities=[1, 5],
        num_classes=2,
    )
    rows = result["per_corruption"]
    assert result["clean"] == pytest.approx(100.0)
    # brightness +0.1: background 0.25, still < 0.5; +0.5: 0.65, all pixels class 1:
    # IoU 0 (background) and 64 / 256 (square)
    assert rows["brightness"] == pytest.approx({"1": 100.0, "5": 12.5, "mean": 56.25})
    # contrast 0.4 towards the mean 0.3625: 0.6175 / 0.2775, still separated; 0.05: the
    # square falls to 0.394, all pixels class 0: IoU 192 / 256 and 0
    assert rows["contrast"] == pytest.approx({"1": 100.0, "5": 37.5, "mean": 68.75})
    assert result["mPC"] == pytest.approx(62.5) and result["rPC"] == pytest.approx(62.5)
    # normalised loaders: the images are un-normalised before the corruption
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    normalised = [((im - m) / s, mk) for im, mk in loader]

    class Normalised(torch.nn.Module):
        def forward(self, x):
            return model(x * s + m)

    again = evaluate_robustness(
        "segmentation",
        Normalised(),
        normalised,
        corruptions=["brightness", "contrast"],
        severities=[1, 5],
        num_classes=2,
        normalization=(mean, std),
    )
    for name in rows:
        assert again["per_corruption"][name] == pytest.approx(rows[name])
    with pytest.raises(ValueError, match="severities must be"):
        evaluate_robustness("segmentation", model, loader, "fog", [0], num_classes=2)


def test_evaluate_model_and_cli_write_the_robustness(tmp_path):
    from typer.testing import CliRunner

    from freekd.checkpoints import export_student
    from freekd.cli import app
    from freekd.models import build_model
    from freekd.pipeline.config import load_config
    from freekd.pipeline.jobs import evaluate_model

    args = {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}
    config_text = f"""\
task: segmentation
run_dir: {tmp_path / "run"}
device: cpu
data:
  name: digits
  args: {{size: 32, max_digits: 1, digit_scale: [0.4, 0.7]}}
  val_args: {{length: 6}}
  val_batch_size: 4
  crop_size: 32
teacher: {{arch: vit_seg, backbone: vit_tiny_patch16_224, args: {json.dumps(args)}}}
student: {{arch: vit_seg, backbone: vit_tiny_patch16_224, args: {json.dumps(args)}}}
"""
    config_path = tmp_path / "run.yaml"
    config_path.write_text(config_text)
    torch.manual_seed(0)
    spec = build_model("segmentation", "vit_seg", "vit_tiny_patch16_224", 11, **args)
    weights = export_student(spec.model, tmp_path / "model.safetensors", {})
    config = load_config(config_path)
    out = tmp_path / "metrics.json"
    result = evaluate_model(
        config, "student", weights, out, corruptions="fog,pixelate", severities=[1, 2]
    )
    written = json.loads(out.read_text())
    robustness = written["robustness"]
    assert set(robustness["per_corruption"]) == {"fog", "pixelate"}
    assert set(robustness["per_corruption"]["fog"]) == {"1", "2", "mean"}
    assert robustness["clean"] == pytest.approx(written["value"])
    assert robustness["seed"] == 0 and robustness["severities"] == [1, 2]
    means = [row["mean"] for row in robustness["per_corruption"].values()]
    assert robustness["mPC"] == pytest.approx(sum(means) / 2)
    if robustness["clean"]:
        assert robustness["rPC"] == pytest.approx(100 * robustness["mPC"] / robustness["clean"])
    assert result["robustness"]["mPC"] == pytest.approx(robustness["mPC"])
    # the same seed scores the same corrupted images
    again = evaluate_model(config, "student", weights, None, corruptions=["fog"], severities=[2])
    assert again["robustness"]["per_corruption"]["fog"]["2"] == pytest.approx(
        robustness["per_corruption"]["fog"]["2"]
    )
    runner = CliRunner()
    common = ["evaluate", "-c", str(config_path), "--checkpoint", str(weights)]
    ok = runner.invoke(
        app, [*common, "--corruptions", "contrast", "--severities", "1", "--output", str(out)]
    )
    assert ok.exit_code == 0, ok.output
    assert "mPC" in ok.output and "contrast" in ok.output
    assert json.loads(out.read_text())["robustness"]["corruptions"] == ["contrast"]
    bad = runner.invoke(app, [*common, "--corruptions", "fogg"])
    assert bad.exit_code == 2 and "did you mean 'fog'" in bad.output
    bad = runner.invoke(app, [*common, "--corruptions", "fog", "--severities", "0,6"])
    assert bad.exit_code == 2 and "--severities" in bad.output
    assert not math.isnan(result["value"])


def test_detection_batches_are_corrupted_image_by_image():
    from freekd.evaluation.robustness import _corrupted_batches, _Normalizer

    images = list(scene(count=3, size=24))
    images[1] = images[1][:, :16]  # detection images may differ in size
    targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 3
    loader = [(images[:2], targets[:2]), (images[2:], targets[2:])]
    batches = list(_corrupted_batches("detection", loader, "fog", 2, 7, _Normalizer(None)))
    corrupted = [image for batch in batches for image in batch[0]]
    assert [b[1] for b in batches] == [targets[:2], targets[2:]]
    for index, (image, out) in enumerate(zip(images, corrupted, strict=True)):
        assert out.shape == image.shape
        expected = corrupt(image[None], "fog", 2, seed=7, index_offset=index)[0]
        torch.testing.assert_close(out, expected)
