"""Numerical safety: NaN/Inf in a feature (raise naming the tap, or skip the step on every
process), the loss and the transform under bf16/fp16 autocast and half inputs, and feature
magnitudes far from 1 (1e30, 1e-30, fp16's 6e4)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from freekd import FreeKDLoss
from freekd.distill import Distiller, NonFiniteError
from freekd.relation import relational_weight
from freekd.wavelets import dwt2, idwt2
from tests.conftest import make_distiller as shared_distiller
from tests.conftest import task_loss
from tests.ddp_check import run_ddp_check
from tests.naive_freekd import naive_relational_weight

pl = pytest.importorskip("lightning.pytorch")
from freekd.train import (  # noqa: E402
    DistillModule,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
    fit,
    make_train_loader,
)

REPO = Path(__file__).resolve().parents[1]


def make_distiller(nonfinite: str = "raise", seed: int = 0) -> Distiller:
    """The shared classification distiller with the DDP check script's models (no dropout)."""
    return shared_distiller(seed, dropout=None, nonfinite=nonfinite)


def poison_output(module: nn.Module, value: float = float("nan")):
    """A forward hook that puts ``value`` into one element of ``module``'s output."""

    def hook(_module, _inputs, output):
        output = output.clone()
        output[0, 0, 0, 0] = value
        return output

    return module.register_forward_hook(hook)


def batch(size: int = 2):
    generator = torch.Generator().manual_seed(5)
    return torch.randn(size, 3, 32, 32, generator=generator), torch.tensor([0, 1] * (size // 2))


# ---------------------------------------------------------------------------- raise / off


def test_raise_names_the_student_tap_and_the_fixes():
    distiller = make_distiller("raise")
    poison_output(distiller.student.layer2[0], float("inf"))
    with pytest.raises(NonFiniteError) as caught:
        distiller(batch())
    message = str(caught.value)
    assert isinstance(caught.value, FloatingPointError) and isinstance(caught.value, ValueError)
    assert "student feature of tap 'layer2'" in message and "\n" not in message
    for fix in ("lower the learning rate", "grad_clip_norm", "bf16 rather than fp16"):
        assert fix in message, message
    assert "nonfinite='skip'" in message
    assert caught.value.sources[0] == "student feature of tap 'layer2'"
    assert "student feature of tap 'layer1'" not in caught.value.sources  # only the bad ones


def test_raise_names_the_teacher_tap_and_points_at_the_teacher():
    distiller = make_distiller("raise")
    poison_output(distiller.teacher.layer1[0])
    with pytest.raises(
        NonFiniteError, match=r"teacher feature of tap 'layer1'.*teacher checkpoint"
    ):
        distiller(batch())


def test_raise_names_a_loss_term_when_the_features_are_finite():
    distiller = make_distiller("raise")
    distiller.task_loss = lambda model, b: task_loss(model, b) * float("inf")
    with pytest.raises(NonFiniteError, match=r"loss term 'task"):
        distiller(batch())


def test_off_does_not_check_and_finite_steps_record_nothing():
    distiller = make_distiller("off")
    poison_output(distiller.student.layer1[0])
    with torch.no_grad():
        terms = distiller(batch())
    assert math.isnan(terms["distill/freekd"].item()) and distiller.last_nonfinite == []
    clean = make_distiller("raise")
    assert all(torch.isfinite(v) for v in clean(batch()).values())
    assert clean.last_nonfinite == []


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match=r"unknown nonfinite 'ignore'; choose one of 'raise'"):
        make_distiller("ignore")


# ---------------------------------------------------------------------------- skip in training


class Batches(Dataset):
    """``steps`` batches of 2 fixed images, laid out for an unshuffled loader; the images of
    the batches in ``poisoned`` are NaN."""

    def __init__(self, steps: int, poisoned: tuple[int, ...]) -> None:
        generator = torch.Generator().manual_seed(11)
        self.images = torch.randn(2 * steps, 3, 32, 32, generator=generator)
        for step in poisoned:
            self.images[2 * step : 2 * step + 2] = float("nan")
        self.labels = torch.arange(2 * steps) % 4

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index], self.labels[index]


class StudentAfterEachStep(pl.Callback):
    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        state = pl_module.distiller.student.state_dict()
        self.states.append({k: v.detach().clone() for k, v in state.items()})


def skip_module(seed: int = 0) -> DistillModule:
    """The ``"skip"`` job: the teacher of seed 0 (as if loaded from its file: checkpoints leave
    it out), the student and projections of ``seed``."""
    distiller = make_distiller("skip")
    if seed:
        other = make_distiller("skip", seed)
        distiller.student.load_state_dict(other.student.state_dict())
        distiller.projections.load_state_dict(other.projections.state_dict())
    return DistillModule(
        distiller,
        OptimConfig("adamw", lr=0.01, weight_decay=0.1),
        ScheduleConfig("cosine", total_steps=6, warmup_steps=1),
    )


def train_config(run_dir: Path, steps: int) -> TrainConfig:
    return TrainConfig(
        max_steps=steps,
        run_dir=run_dir,
        checkpoint_every_steps=1,
        accelerator="cpu",
        logger=None,
        progress_bar=False,
        model_summary=False,
        sanity_val_steps=0,
    )


def assert_equal_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert a.keys() == b.keys() and not different, f"entries differ: {different}"


def test_skip_leaves_student_weights_buffers_and_optimizer_untouched(tmp_path):
    module = skip_module()
    before = {k: v.clone() for k, v in module.distiller.student.state_dict().items()}
    recorder = StudentAfterEachStep()
    loader = DataLoader(Batches(4, poisoned=(1,)), batch_size=2)
    result = fit(module, loader, config=train_config(tmp_path / "run", 4), callbacks=[recorder])
    states = recorder.states
    assert result.global_step == 4 and module.nonfinite_skipped == 1
    assert result.metrics["train/nonfinite_skipped"] == 1.0
    assert not any(torch.equal(before[k], states[0][k]) for k in ("head.weight", "stem.0.weight"))
    assert_equal_states(states[0], states[1])  # the NaN step: weights and BatchNorm unchanged
    assert not torch.equal(states[1]["head.weight"], states[2]["head.weight"])  # trains on
    assert all(torch.isfinite(v).all() for v in states[3].values() if v.is_floating_point())
    optimizer = result.trainer.optimizers[0]
    steps = {float(optimizer.state[p]["step"]) for p in module.distiller.student.parameters()}
    assert steps == {3.0}, "Adam's step counter advanced on the skipped step"
    assert result.trainer.lr_scheduler_configs[0].scheduler.last_epoch == 4  # schedule in step


def test_a_resumed_run_with_a_skipped_step_ends_bit_exact(tmp_path):
    data = Batches(4, poisoned=(1,))

    def loader():  # in order and resumable in the middle of the epoch
        return make_train_loader(data, batch_size=2, shuffle=False)

    straight = skip_module()
    fit(straight, loader(), config=train_config(tmp_path / "a", 4))
    first = skip_module()
    fit(first, loader(), config=train_config(tmp_path / "b", 2))
    assert first.nonfinite_skipped == 1
    resumed = skip_module(seed=1)  # other initial weights: the checkpoint must replace them
    fit(resumed, loader(), config=train_config(tmp_path / "b", 4), resume="last")
    assert resumed.nonfinite_skipped == 1  # the count came back from the checkpoint
    assert_equal_states(
        straight.distiller.student.state_dict(), resumed.distiller.student.state_dict()
    )


def test_raise_in_training_stops_with_the_step_and_the_tap(tmp_path):
    module = DistillModule(
        make_distiller("raise"),
        OptimConfig("sgd", lr=0.01),
        ScheduleConfig("constant", total_steps=3),
    )
    loader = DataLoader(Batches(3, poisoned=(2,)), batch_size=2)
    with pytest.raises(NonFiniteError, match=r"teacher feature of tap 'layer1'.* at step 2;"):
        fit(module, loader, config=train_config(tmp_path / "run", 3))


def test_two_processes_skip_together_when_only_one_sees_nan(tmp_path):
    """2-process gloo DDP: process 0 alone gets NaN images at step 2; both skip it."""
    report, stderr = run_ddp_check(tmp_path, "--poison-step", "2")
    assert report["skipped_per_rank"] == [1, 1], report
    assert report["student_equal"] and report["projections_equal"], report
    assert report["weights_kept_at_poisoned_step"] and report["student_finite"], report
    assert report["global_step"] == 6 and report["ok"], report
    assert "another process saw NaN or Inf at step 2" in stderr


# ---------------------------------------------------------------------------- autocast, dtypes


def features(channels=(8, 16), sizes=(16, 8), scale: float = 1.0, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    teacher = [
        scale * torch.randn(2, c, s, s, generator=generator)
        for c, s in zip(channels, sizes, strict=True)
    ]
    student = [t + scale * 0.5 * torch.randn(t.shape, generator=generator) for t in teacher]
    return student, teacher


@pytest.mark.parametrize("preset", ["paper", "official"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loss_on_half_features_and_under_autocast_matches_float32(preset, dtype):
    loss = FreeKDLoss.preset(preset, [8, 16])
    student, teacher = features()
    reference = loss(student, teacher)
    half_student, half_teacher = [s.to(dtype) for s in student], [t.to(dtype) for t in teacher]
    on_half = loss(half_student, half_teacher)
    # Computed in float32: equal to the float32 loss of the rounded values.
    upcast = loss([s.float() for s in half_student], [t.float() for t in half_teacher])
    assert on_half.dtype == torch.float32 and torch.equal(on_half, upcast)
    torch.testing.assert_close(on_half, reference, rtol=2e-2, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = loss(student, teacher)
    assert under_autocast.dtype == torch.float32 and torch.equal(under_autocast, reference)


@pytest.mark.parametrize("wavelet", ["haar", "db2"])
def test_transform_keeps_its_dtype_and_values_under_autocast(wavelet):
    x = torch.randn(2, 3, 13, 10, generator=torch.Generator().manual_seed(1))
    low, highs = dwt2(x, 3, wavelet)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low_ac, highs_ac = dwt2(x, 3, wavelet)
        back = idwt2((low_ac, highs_ac), wavelet, size=(13, 10))
    assert low_ac.dtype == torch.float32 and back.dtype == torch.float32
    assert torch.equal(low_ac, low) and all(
        torch.equal(a, b) for a, b in zip(highs_ac, highs, strict=True)
    )
    torch.testing.assert_close(back, x, rtol=0, atol=1e-5)


@pytest.mark.parametrize("wavelet", ["haar", "db2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_transform_round_trip_in_half_precision(wavelet, dtype):
    x = torch.randn(1, 2, 12, 9, generator=torch.Generator().manual_seed(2))
    bands = dwt2(x.to(dtype), 2, wavelet)
    assert bands[0].dtype == dtype and all(h.dtype == dtype for h in bands[1])
    back = idwt2(bands, wavelet, size=(12, 9))
    tolerance = 8 * torch.finfo(dtype).eps * x.abs().max()
    assert back.dtype == dtype and (back.float() - x).abs().max() <= tolerance


# ---------------------------------------------------------------------------- magnitudes


@pytest.mark.parametrize("scale", [1e30, 1e-30])
@pytest.mark.parametrize("preset", ["paper", "official"])
def test_extreme_magnitudes_give_the_float64_loss(scale, preset):
    """Features of 1e30 (products overflow float32) and 1e-30 (products underflow): the float32
    loss is finite and equals the same loss computed in float64."""
    loss = FreeKDLoss.preset(preset, [8, 16])
    student, teacher = features(scale=scale)
    value = loss(student, teacher)
    reference = loss([s.double() for s in student], [t.double() for t in teacher])
    assert torch.isfinite(value) and value > 0
    torch.testing.assert_close(value.double(), reference, rtol=1e-4, atol=0)
    low_masks, high_masks = loss.prompts[0].masks(dwt2(teacher[0], 3))
    assert all(torch.isfinite(m).all() and m.min() >= 0 and m.max() <= 1 for m in high_masks)


def test_fp16_features_at_the_edge_of_their_range_give_a_finite_loss():
    loss = FreeKDLoss.preset("paper", [8, 16])
    student, teacher = features(scale=1.0)
    largest = max(f.abs().max() for f in student + teacher)
    half = [[(f / largest * 6e4).half() for f in group] for group in (student, teacher)]
    assert max(f.abs().max() for f in half[0] + half[1]) >= 5.9e4
    value = loss(*half)
    reference = loss(*[[f.double() for f in group] for group in half])
    assert torch.isfinite(value)
    torch.testing.assert_close(value.double(), reference, rtol=1e-4, atol=0)


@pytest.mark.parametrize("scale", [1e30, 1e-30, 1.0])
def test_relational_weight_is_finite_and_exact_at_any_magnitude(scale):
    generator = torch.Generator().manual_seed(3)
    feature = scale * torch.randn(2, 6, 5, 5, generator=generator)
    following = scale * torch.randn(2, 6, 3, 3, generator=generator)
    weight = relational_weight(feature, following)
    assert weight.dtype == torch.float32 and torch.isfinite(weight).all()
    expected = naive_relational_weight(feature.double(), following.double())
    torch.testing.assert_close(weight, expected.float(), rtol=1e-4, atol=1e-5)
