"""Stage 1's options and diagnostics: the centred re-synthesis, what tuning does to the teacher
(task losses, mask saturation), the damage warning, and their use in the tune-prompts job."""

from __future__ import annotations

import functools
import json
import logging

import pytest
import torch
import torch.nn.functional as F

from freekd import FreeKDLoss, dwt2, idwt2
from freekd.tuning import (
    PromptTuner,
    damage_warning,
    format_diagnostics,
    mask_statistics,
    merge_diagnostics,
    teacher_damaged,
)
from tests.conftest import TAPS, TinySegmenter, fixed_batch, segmentation_loss, trained_teacher

Segmenter = functools.partial(TinySegmenter, 16, dropout=0)  # no dropout layer


@pytest.fixture(scope="module")
def teacher_state():
    return trained_teacher(16, steps=40, dropout=0).state_dict()


def make_tuner(teacher_state, resynthesis="sum", **loss_options):
    teacher = Segmenter()
    teacher.load_state_dict(teacher_state)
    torch.manual_seed(1)
    loss = FreeKDLoss([16, 16], **loss_options)
    return PromptTuner(teacher, TAPS, loss, segmentation_loss, resynthesis=resynthesis)


def test_centered_mask_bands_are_twice_the_token_mean():
    generator = torch.Generator().manual_seed(0)
    loss = FreeKDLoss([5], num_prompts=3).double()
    prompt = loss.prompts[0]
    with torch.no_grad():
        prompt.tokens.normal_(0, 1, generator=generator)
    bands = dwt2(torch.randn(2, 5, 12, 10, dtype=torch.float64, generator=generator), 3)
    low_masks, high_masks = prompt.masks(bands)
    masked_low, masked_highs = prompt.mask_bands(bands, resynthesis="centered")
    expected_low = sum(2 * low_masks[:, t] * bands[0] for t in range(3)) / 3
    torch.testing.assert_close(masked_low, expected_low)
    for level, detail in enumerate(bands[1]):
        expected = sum(2 * high_masks[level][:, t : t + 1] * detail for t in range(3)) / 3
        torch.testing.assert_close(masked_highs[level], expected)
    with torch.no_grad():
        prompt.tokens.zero_()  # every mask 1/2: the centred re-synthesis is the identity
    feature = torch.randn(2, 5, 12, 10, dtype=torch.float64, generator=generator)
    identity = idwt2(prompt.mask_bands(dwt2(feature, 3), resynthesis="centered"), size=(12, 10))
    torch.testing.assert_close(identity, feature)


def test_diagnostics_report_losses_and_masks_and_centered_starts_at_the_teacher(teacher_state):
    tuner = make_tuner(teacher_state, "centered", num_prompts=6, levels=[2, 1])
    tuner.eval()
    report = tuner.diagnostics(fixed_batch())
    assert not tuner.training and tuner.taps.replace is not None  # mode and taps restored
    assert set(report) == {"clean_task", "resynthesized_task", "task_ratio", "masks"}
    assert list(report["masks"]) == ["layer0", "layer1"]
    assert list(report["masks"]["layer0"]) == ["low", "level1", "level2"]
    assert list(report["masks"]["layer1"]) == ["low", "level1"]
    for bands in report["masks"].values():
        for values in bands.values():
            assert set(values) == {"saturated", "mean"}
            assert values["saturated"] == 0.0 and abs(values["mean"] - 0.5) < 0.05
    plain = Segmenter().eval()  # the same teacher without hooks, norms in eval mode
    plain.load_state_dict(teacher_state)
    with torch.no_grad():
        expected_clean = segmentation_loss(plain, fixed_batch()).item()
    assert report["clean_task"] == pytest.approx(expected_clean, rel=1e-6)
    assert report["task_ratio"] == pytest.approx(
        report["resynthesized_task"] / report["clean_task"]
    )
    assert abs(report["task_ratio"] - 1) < 0.03  # centred at initialisation: ~ the teacher
    assert not teacher_damaged(report) and damage_warning(report) is None
    # "sum" with T = 6 triples every feature at initialisation (masks ~ 1/2).
    summed = make_tuner(teacher_state, "sum", num_prompts=6).diagnostics(fixed_batch())
    assert summed["resynthesized_task"] > report["resynthesized_task"]


def test_diagnostics_compare_passes_with_the_same_random_numbers(teacher_state):
    # A task loss that samples (as a detector's box sampler does): with open masks and the
    # centred re-synthesis the two passes must agree exactly, and the global state is kept.
    def sampling_loss(model, batch):
        images, labels = batch
        keep = torch.rand(labels.shape) < 0.5
        losses = F.cross_entropy(model(images), labels, reduction="none")
        return losses[keep].mean()

    teacher = Segmenter()
    teacher.load_state_dict(teacher_state)
    loss = FreeKDLoss([16, 16], num_prompts=1)
    with torch.no_grad():
        for prompt in loss.prompts:
            prompt.tokens.zero_()
    tuner = PromptTuner(teacher, TAPS, loss, sampling_loss, resynthesis="centered")
    state = torch.get_rng_state()
    report = tuner.diagnostics(fixed_batch())
    assert torch.equal(torch.get_rng_state(), state)
    assert report["resynthesized_task"] == pytest.approx(report["clean_task"], rel=1e-5)


def test_damage_is_flagged_when_the_masks_close(teacher_state):
    tuner = make_tuner(teacher_state, "centered", mask_logits="normalized")
    with torch.no_grad():
        for prompt in tuner.loss.prompts:
            prompt.tokens.fill_(-50.0)  # ReLU features: the low band is >= 0, its masks ~ 0
    report = tuner.diagnostics(fixed_batch())
    assert report["masks"]["layer0"]["low"]["saturated"] == 1.0
    assert report["masks"]["layer0"]["low"]["mean"] < 1e-6
    assert teacher_damaged(report) and report["resynthesized_task"] > 1.1 * report["clean_task"]
    message = damage_warning(report, fix="do this")
    assert message.startswith("prompt tuning raised the teacher's task loss from ")
    assert message.endswith("%): do this")
    table = format_diagnostics(report)
    assert "layer0" in table and "level3" in table and "100.0%" in table


def test_mask_statistics_and_merge_hand_cases():
    low = torch.tensor([0.0, 0.5, 1.0, 0.25]).view(1, 2, 1, 1, 2)
    high = torch.full((1, 2, 3, 1, 1), 0.9995)
    stats = mask_statistics((low, [high]))
    assert stats == {
        "low": {"saturated": 0.5, "mean": 0.4375},
        "level1": {"saturated": 1.0, "mean": pytest.approx(0.9995)},
    }
    first = {"clean_task": 1.0, "resynthesized_task": 2.0, "task_ratio": 2.0, "masks": {}}
    second = {"clean_task": 3.0, "resynthesized_task": 2.0, "task_ratio": 2 / 3, "masks": {}}
    first["masks"] = {"layer0": {"low": {"saturated": 0.0, "mean": 0.2}}}
    second["masks"] = {"layer0": {"low": {"saturated": 1.0, "mean": 0.4}}}
    merged = merge_diagnostics([first, second])
    assert merged["clean_task"] == 2.0 and merged["task_ratio"] == 1.0
    assert merged["masks"]["layer0"]["low"] == {"saturated": 0.5, "mean": pytest.approx(0.3)}


def test_tuner_uses_the_prompts_levels_and_logits_and_records_resynthesis(teacher_state, tmp_path):
    tuner = make_tuner(teacher_state, "centered", levels=[2, 1], mask_logits="scaled")
    tuner(fixed_batch())
    masks = tuner._masks
    with torch.no_grad():
        feature = tuner.taps.originals[0]  # stage2's output before its re-synthesis
        expected = tuner.loss.prompts[0].masks(dwt2(feature, 2))
    torch.testing.assert_close(masks[0][0], expected[0])
    assert len(masks[0][1]) == 2 and len(masks[1][1]) == 1
    path = tuner.save_prompts(tmp_path / "p.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        assert json.loads(handle.metadata()["resynthesis"]) == "centered"
    with pytest.raises(ValueError, match="resynthesis"):
        make_tuner(teacher_state, "mean")


# ---------------------------------------------------------------------- the tune-prompts job


def tiny_config(*overrides):
    from freekd.pipeline.demo import demo_config

    return demo_config(
        "segmentation",
        quick=True,
        overrides=[
            "data.args.size=32",
            "data.crop_size=32",
            "data.train_args.length=6",
            "data.batch_size=2",
            "device=cpu",
            *overrides,
        ],
    )


def test_config_accepts_the_resynthesis_setting():
    from freekd.pipeline.schema import ConfigError

    assert tiny_config().prompts.resynthesis == "centered"  # the measured default
    assert tiny_config("prompts.resynthesis=sum").prompts.resynthesis == "sum"
    with pytest.raises(ConfigError, match="prompts.resynthesis"):
        tiny_config("prompts.resynthesis=mean")


def test_tune_prompts_job_reports_the_diagnostics_and_warns_on_damage(caplog):
    from freekd.pipeline import jobs
    from freekd.pipeline.builders import build_data

    config = tiny_config()
    train_set = build_data(config, "train")
    torch.manual_seed(0)
    teacher = Segmenter(classes=11)
    batch = (
        torch.stack([train_set[i][0] for i in range(2)]),
        torch.stack([train_set[i][1] for i in range(2)]),
    )
    optimizer = torch.optim.Adam(teacher.parameters(), lr=0.01)
    for _ in range(40):  # fitted to these scenes: zeroed features then cost it a lot
        optimizer.zero_grad()
        segmentation_loss(teacher, batch).backward()
        optimizer.step()
    loss = FreeKDLoss([16, 16], mask_logits="normalized")
    tuner = PromptTuner(teacher, TAPS, loss, segmentation_loss, resynthesis="centered")
    with caplog.at_level(logging.INFO, logger="freekd"):
        metrics = jobs._report_tuning(config, tuner, train_set, 2)
    assert set(metrics) == {"diagnostics/clean_task", "diagnostics/resynthesized_task"}
    assert "prompt diagnostics" in caplog.text and "layer1" in caplog.text
    assert "raised the teacher's task loss" not in caplog.text
    caplog.clear()
    with torch.no_grad():
        for prompt in loss.prompts:
            prompt.tokens.fill_(-50.0)
    with caplog.at_level(logging.INFO, logger="freekd"):
        jobs._report_tuning(config, tuner, train_set, 2)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "prompt tuning raised the teacher's task loss from" in warnings[0].getMessage()
    assert "prompts.resynthesis: centered" in warnings[0].getMessage()
