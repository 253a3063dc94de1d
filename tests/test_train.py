"""freekd.train: configs, schedules, resumable data, the three Lightning jobs, exact resume,
atomic checkpoints, run-folder protection, bf16, and a 2-process DDP run on CPU (gloo)."""

from __future__ import annotations

import csv
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from lightning.pytorch import Callback
from torch import nn
from torch.utils.data import Dataset

from freekd import FreeKDLoss
from freekd.checkpoints import state_sha256
from freekd.train import (
    DistillModule,
    OptimConfig,
    PromptTuningModule,
    ResumableDataLoader,
    ResumableSampler,
    ScheduleConfig,
    TeacherModule,
    TrainConfig,
    build_optimizer,
    build_scheduler,
    detection_2x_recipe,
    fit,
    make_train_loader,
    make_val_loader,
    prompt_tuning_recipe,
    resolve_resume,
    segmentation_poly_recipe,
)
from freekd.train import data as train_data
from freekd.tuning import PromptTuner
from tests.conftest import TinyNet, make_distiller, task_loss
from tests.ddp_check import run_ddp_check

REPO = Path(__file__).resolve().parents[1]

# Lightning's advice (few workers, small logging interval, ...) is noise for these tiny runs.
pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning"
)

# ---------------------------------------------------------------------------- tiny models, data


class Images(Dataset):
    """``size`` fixed random images and labels; ``augment``: noise and a random flip drawn from
    the global torch RNG in ``__getitem__`` (what exact resume must reproduce)."""

    def __init__(self, size: int = 10, augment: bool = True, seed: int = 123) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.randn(size, 3, 32, 32, generator=generator)
        self.labels = torch.randint(0, 4, (size,), generator=generator)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.augment:
            image = image + 0.1 * torch.randn(3, 32, 32)
            if torch.rand(()) < 0.5:
                image = image.flip(-1)
        return image, self.labels[index]


def fixed_batch(size: int = 4):
    data = Images(size, augment=False)
    return data.images, data.labels


def make_distill_module(
    seed: int = 0, lr: float = 0.05, total: int = 12, teacher_seed: int = 0
) -> DistillModule:
    """The distillation job of :func:`make_distiller`: the teacher of ``teacher_seed`` (as if
    loaded from its file: checkpoints leave it out), the student and projections of ``seed``."""
    distiller = make_distiller(teacher_seed)
    if seed != teacher_seed:
        other = make_distiller(seed)
        distiller.student.load_state_dict(other.student.state_dict())
        distiller.projections.load_state_dict(other.projections.state_dict())
    return DistillModule(
        distiller,
        OptimConfig("sgd", lr=lr, momentum=0.9, weight_decay=1e-4),
        ScheduleConfig("cosine", total_steps=total, warmup_steps=3, min_lr=1e-4),
    )


def config(run_dir: Path, steps: int, **overrides) -> TrainConfig:
    settings = dict(
        max_steps=steps,
        run_dir=run_dir,
        checkpoint_every_steps=1,
        accelerator="cpu",
        devices=1,
        logger=None,
        progress_bar=False,
        model_summary=False,
        sanity_val_steps=0,
        log_every_steps=1,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def repeated(batch, times: int) -> Dataset:
    """A dataset that is ``batch`` (images, labels) ``times`` over, item by item."""
    images, labels = batch

    class Repeated(Dataset):
        def __len__(self) -> int:
            return len(images) * times

        def __getitem__(self, index: int):
            return images[index % len(images)], labels[index % len(labels)]

    return Repeated()


def clone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"entries differ: {different}"


# ---------------------------------------------------------------------------- configs


def test_config_errors_name_the_field_and_the_fix():
    with pytest.raises(
        ValueError, match=r"unknown OptimConfig.name 'rmsprop'.*'sgd', 'adam', 'adamw'"
    ):
        OptimConfig(name="rmsprop")
    with pytest.raises(ValueError, match=r"OptimConfig.lr=0.*> 0"):
        OptimConfig(lr=0)
    with pytest.raises(ValueError, match=r"ScheduleConfig.total_steps=None.*'cosine'"):
        ScheduleConfig(kind="cosine")
    with pytest.raises(ValueError, match=r"ScheduleConfig.milestones.*increasing"):
        ScheduleConfig(kind="step", milestones=(5, 3))
    with pytest.raises(ValueError, match=r"ScheduleConfig.warmup_ratio=2"):
        ScheduleConfig(warmup_ratio=2)
    with pytest.raises(ValueError, match=r"unknown TrainConfig.precision 'fp16'.*'bf16-mixed'"):
        TrainConfig(precision="fp16")
    with pytest.raises(ValueError, match=r"TrainConfig.max_steps=0.*integer >= 1"):
        TrainConfig(max_steps=0)
    with pytest.raises(
        ValueError,
        match=r"unknown TrainConfig.logger 'neptune'; choose one of 'csv', 'tensorboard', "
        r"'wandb', 'mlflow'",
    ):
        TrainConfig(logger="neptune")
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1e-5)
    with pytest.raises(ValueError, match="min_lr=0.001 is above the learning rate"):
        build_scheduler(optimizer, ScheduleConfig("cosine", total_steps=5, min_lr=1e-3))
    with pytest.raises(ValueError, match="no parameters"):
        build_optimizer([], OptimConfig())


def test_recipes_hold_the_papers_settings():
    optim, schedule = prompt_tuning_recipe()
    assert (optim.name, optim.lr, optim.weight_decay) == ("adam", 0.01, 1e-3)
    assert (schedule.kind, schedule.total_steps, schedule.min_lr) == ("cosine", 2000, 1e-6)
    optim, schedule = detection_2x_recipe(steps_per_epoch=100)
    assert (optim.name, optim.lr, optim.momentum, optim.weight_decay) == ("sgd", 0.02, 0.9, 1e-4)
    assert (schedule.warmup_steps, schedule.warmup_ratio) == (1000, 0.001)
    assert schedule.milestones == (1600, 2200) and schedule.total_steps == 2400
    optim, schedule = segmentation_poly_recipe()
    assert (optim.lr, optim.weight_decay, schedule.power, schedule.min_lr) == (
        0.01,
        5e-4,
        0.9,
        1e-4,
    )


# ---------------------------------------------------------------------------- schedules


def lr_curve(optim: OptimConfig, schedule: ScheduleConfig, steps: int) -> list[float]:
    """The learning rate used by optimizer steps ``0 .. steps - 1``."""
    optimizer = build_optimizer([nn.Parameter(torch.zeros(1))], optim)
    scheduler = build_scheduler(optimizer, schedule)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_linear_warmup_from_ratio_then_constant():
    rates = lr_curve(
        OptimConfig(lr=0.1), ScheduleConfig("constant", warmup_steps=4, warmup_ratio=0.001), 6
    )
    # 0.1 * (0.001 + 0.999 * t / 4) for t < 4, then 0.1
    expected = [0.0001, 0.025075, 0.05005, 0.075025, 0.1, 0.1]
    assert rates == pytest.approx(expected, rel=1e-12)


def test_step_schedule_and_detection_2x_warmup():
    rates = lr_curve(OptimConfig(lr=0.02), ScheduleConfig("step", milestones=(3, 5)), 7)
    assert rates == pytest.approx([0.02, 0.02, 0.02, 0.002, 0.002, 0.0002, 0.0002], rel=1e-12)
    rates = lr_curve(*detection_2x_recipe(steps_per_epoch=100), steps=2401)
    assert rates[0] == pytest.approx(2e-5, rel=1e-12)  # 0.02 * 0.001
    assert rates[500] == pytest.approx(0.01001, rel=1e-12)  # 0.02 * (0.001 + 0.999 / 2)
    assert rates[1000] == rates[1599] == pytest.approx(0.02, rel=1e-12)
    assert rates[1600] == rates[2199] == pytest.approx(0.002, rel=1e-12)
    assert rates[2200] == rates[2400] == pytest.approx(0.0002, rel=1e-12)


def test_poly_schedule():
    rates = lr_curve(
        OptimConfig(lr=0.01), ScheduleConfig("poly", total_steps=10, power=0.9, min_lr=1e-4), 13
    )
    # 1e-4 + (0.01 - 1e-4) * (1 - t / 10) ** 0.9;  0.5 ** 0.9 = 0.5358867312681466
    assert rates[0] == pytest.approx(0.01, rel=1e-12)
    assert rates[5] == pytest.approx(1e-4 + 0.0099 * 0.5358867312681466, rel=1e-12)
    assert rates[10] == rates[12] == pytest.approx(1e-4, rel=1e-12)


def test_cosine_schedule_of_the_prompt_recipe():
    rates = lr_curve(*prompt_tuning_recipe(), steps=2001)
    # 1e-6 + (0.01 - 1e-6) * (1 + cos(pi t / 2000)) / 2;  (1 + cos(pi/4)) / 2 = 0.853553390593
    assert rates[0] == pytest.approx(0.01, rel=1e-12)
    assert rates[500] == pytest.approx(1e-6 + 0.009999 * 0.8535533905932737, rel=1e-12)
    assert rates[1000] == pytest.approx(0.0050005, rel=1e-12)
    assert rates[2000] == pytest.approx(1e-6, rel=1e-9)


# ---------------------------------------------------------------------------- resumable data


def test_sampler_orders_depend_on_seed_and_epoch_and_shard_over_ranks(monkeypatch):
    sampler = ResumableSampler(10, seed=1)
    epoch0 = list(sampler)
    assert sorted(epoch0) == list(range(10))
    assert list(ResumableSampler(10, seed=1)) == epoch0
    sampler.set_epoch(1)
    assert list(sampler) != epoch0 and sorted(sampler) == list(range(10))
    assert list(ResumableSampler(10, seed=2)) != epoch0
    shares = []
    for rank in range(3):
        monkeypatch.setattr(train_data, "_rank_and_world", lambda rank=rank: (rank, 3))
        shares.append(list(ResumableSampler(10, seed=1)))
        assert len(ResumableSampler(10, seed=1)) == 4
    merged = [i for position in zip(*shares, strict=True) for i in position]
    assert merged == (epoch0 + epoch0)[:12]  # padded to a multiple of 3, like DistributedSampler


def test_loader_state_continues_mid_epoch_and_across_epochs():
    dataset = repeated(fixed_batch(10), 1)

    def labels(batch):
        return batch[1].tolist()

    reference = ResumableDataLoader(dataset, batch_size=3, seed=4)
    epoch0 = [labels(b) for b in reference]
    reference.sampler.set_epoch(1)
    epoch1 = [labels(b) for b in reference]
    assert epoch0 != epoch1

    loader = ResumableDataLoader(dataset, batch_size=3, seed=4)
    iterator = iter(loader)
    first = [labels(next(iterator)) for _ in range(2)]
    state = loader.state_dict()
    assert state["epoch"] == 0 and state["batches"] == 2 and first == epoch0[:2]

    resumed = ResumableDataLoader(dataset, batch_size=3, seed=4)
    resumed.load_state_dict(state)
    assert [labels(b) for b in resumed] == epoch0[2:]
    assert resumed.state_dict()["batches"] == len(resumed) == 4
    resumed.sampler.set_epoch(1)
    assert [labels(b) for b in resumed] == epoch1  # the next epoch is whole again


# ---------------------------------------------------------------------------- the three jobs


def test_teacher_module_lowers_the_loss_and_steps_the_schedule_per_step(tmp_path):
    torch.manual_seed(0)
    model = TinyNet(4)
    batch = fixed_batch()
    before = task_loss(model.eval(), batch).item()
    model.train()
    module = TeacherModule(
        model,
        task_loss,
        OptimConfig("adam", lr=0.01),
        ScheduleConfig("constant", warmup_steps=4, warmup_ratio=0.1),
    )
    loader = make_train_loader(repeated(batch, 2), batch_size=4, seed=0)
    val_loader = make_val_loader(repeated(batch, 1), batch_size=2)
    settings = dict(logger="csv", val_every_steps=4, checkpoint_every_steps=2, keep_checkpoints=2)
    result = fit(module, loader, val_loader, config=config(tmp_path / "run", 12, **settings))
    after = task_loss(model.eval(), batch).item()
    assert after < 0.8 * before
    assert result.global_step == 12 and math.isfinite(result.metrics["train/loss"])
    assert result.metrics["val/loss"] == pytest.approx(after, rel=1e-5)  # validated at step 12
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["last.ckpt", "step=000010.ckpt", "step=000012.ckpt"]
    with open(tmp_path / "run" / "logs" / "version_0" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    rates = [float(r["lr-Adam"]) for r in rows if r.get("lr-Adam")]
    assert rates[:6] == pytest.approx([0.001, 0.00325, 0.0055, 0.00775, 0.01, 0.01], rel=1e-6)
    assert sum(1 for r in rows if r.get("train/task")) == 12  # logged at every step


def test_prompt_tuning_trains_only_the_prompts_and_saves_them(tmp_path):
    torch.manual_seed(0)
    teacher = TinyNet(8)
    loss = FreeKDLoss.preset("paper", [8, 16])
    tuner = PromptTuner(teacher, ["layer1", "layer2"], loss, task_loss)
    teacher_before = clone_state(teacher)
    prompts_before = [p.tokens.detach().clone() for p in loss.prompts]
    batch = fixed_batch()
    with torch.no_grad():
        objective_before = tuner(batch)["loss"].item()
    module = PromptTuningModule(tuner, OptimConfig("adam", lr=0.05), ScheduleConfig())
    loader = make_train_loader(repeated(batch, 2), batch_size=4, seed=0)
    result = fit(module, loader, config=config(tmp_path / "run", 10))

    optimized = {id(p) for g in result.trainer.optimizers[0].param_groups for p in g["params"]}
    assert optimized == {id(p.tokens) for p in loss.prompts}
    assert_states_equal(teacher_before, teacher.state_dict())  # BN statistics too
    assert all(p.grad is None for p in teacher.parameters())
    assert all(
        not torch.equal(a, p.tokens) for a, p in zip(prompts_before, loss.prompts, strict=True)
    )
    with torch.no_grad():
        assert tuner(batch)["loss"].item() < objective_before

    path = tmp_path / "run" / "prompts.safetensors"
    assert module.prompts_path == path and path.is_file()
    fresh = FreeKDLoss.preset("paper", [8, 16])
    fresh.load_prompts(path)
    for tuned, loaded in zip(loss.prompts, fresh.prompts, strict=True):
        assert torch.equal(tuned.tokens, loaded.tokens) and bool(loaded.tuned)
    # The checkpoint holds the prompts, not the frozen teacher (only its fingerprint).
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert not [k for k in saved["state_dict"] if k.startswith("tuner.teacher.")]
    assert {f"tuner.loss.prompts.{i}.tokens" for i in range(2)} <= set(saved["state_dict"])
    assert saved["freekd"]["frozen_sha256"] == state_sha256(teacher)


def test_distill_module_optimizes_student_and_projections_only(tmp_path):
    distiller = make_distiller(dropout=0.0)
    module = DistillModule(distiller, OptimConfig("sgd", lr=0.05), ScheduleConfig())
    assert all(p.conv is not None for p in distiller.projections)  # 4 -> 8 and 8 -> 16 channels
    teacher_before = clone_state(distiller.teacher)
    batch = fixed_batch()

    def distill_term() -> float:  # train mode as in training (BN on batch statistics)
        with torch.no_grad():
            return distiller(batch)["distill/freekd"].item()

    before = distill_term()
    loader = make_train_loader(repeated(batch, 2), batch_size=4, seed=0)
    result = fit(module, loader, config=config(tmp_path / "run", 15))
    exported = safetensors.torch.load_file(tmp_path / "run" / "student.safetensors")
    assert_states_equal(exported, distiller.student.state_dict())
    assert distill_term() < 0.8 * before

    optimized = {id(p) for g in result.trainer.optimizers[0].param_groups for p in g["params"]}
    student = {id(p) for p in distiller.student.parameters()}
    projections = {id(p) for p in distiller.projections.parameters()}
    frozen = {id(p) for p in distiller.teacher.parameters()}
    frozen |= {id(p) for p in distiller.feature_losses.parameters()}
    assert optimized == student | projections and not optimized & frozen
    assert_states_equal(teacher_before, distiller.teacher.state_dict())
    assert {"train/distill/freekd/layer0", "train/distill/freekd/layer1"} <= set(result.metrics)
    layers = (
        result.metrics["train/distill/freekd/layer0"]
        + result.metrics["train/distill/freekd/layer1"]
    )
    assert layers == pytest.approx(result.metrics["train/distill/freekd"], rel=1e-5)


class GradNorms(Callback):
    """Global gradient norm of each optimizer step (the gradients are clipped by then)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_before_zero_grad(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if grads:
            self.norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))


@pytest.mark.parametrize("clip", [None, 1e-3])
def test_gradient_clipping_by_global_norm(tmp_path, clip):
    norms = GradNorms()
    fit(
        make_distill_module(),
        make_train_loader(Images(8), batch_size=2),
        config=config(tmp_path / "run", 4, grad_clip_norm=clip),
        callbacks=[norms],
    )
    assert len(norms.norms) == 3  # the gradients of steps 1-3, seen before step 2-4 zero them
    if clip is None:
        assert min(norms.norms) > 1e-2
    else:
        assert max(norms.norms) <= clip * (1 + 1e-5)


def test_bf16_mixed_precision_on_cpu_gives_finite_losses(tmp_path):
    module = make_distill_module(total=3)
    dtypes = []
    module.distiller.student.layer1.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    loader = make_train_loader(Images(8), batch_size=2, seed=0)
    result = fit(module, loader, config=config(tmp_path / "run", 3, precision="bf16-mixed"))
    assert torch.bfloat16 in dtypes  # autocast was on in the student
    for name in ("train/loss", "train/task", "train/distill/freekd"):
        assert math.isfinite(result.metrics[name]), name


# ---------------------------------------------------------------------------- exact resume

STEPS = 12  # 10 samples, batch 2: 5 steps per epoch, so the runs cross two epoch boundaries


def resume_config(run_dir: Path, steps: int, **overrides) -> TrainConfig:
    return config(run_dir, steps, val_every_steps=3, checkpoint_every_steps=5, **overrides)


def run_distillation(run_dir: Path, steps: int, seed: int = 0, resume=None, callbacks=()):
    """Distil on augmented data (global torch RNG), dropout in the student, validation on
    augmented data every 3 steps; returns the module."""
    module = make_distill_module(seed=seed, total=STEPS)
    fit(
        module,
        make_train_loader(Images(10), batch_size=2, seed=1),
        make_val_loader(Images(4), batch_size=2),
        config=resume_config(run_dir, steps),
        resume=resume,
        callbacks=callbacks,
    )
    return module


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    """Student and projection weights after an uninterrupted run of STEPS steps."""
    module = run_distillation(tmp_path_factory.mktemp("uninterrupted") / "run", STEPS)
    return clone_state(module.distiller.student) | {
        f"projections.{k}": v for k, v in clone_state(module.distiller.projections).items()
    }


def final_state(module: DistillModule) -> dict[str, torch.Tensor]:
    return clone_state(module.distiller.student) | {
        f"projections.{k}": v for k, v in clone_state(module.distiller.projections).items()
    }


def test_resume_from_a_mid_epoch_checkpoint_is_exact(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    run_distillation(run_dir, 7)  # stops after step 7: 2 batches into the second epoch
    checkpoint = run_dir / "checkpoints" / "step=000007.ckpt"
    state = torch.load(checkpoint, weights_only=True)  # plain data only
    assert state["global_step"] == 7
    # No teacher tensor in the checkpoint: its fingerprint only (the student's are all there).
    module = make_distill_module()
    teacher_keys = {k for k in module.state_dict() if k.startswith("distiller.teacher.")}
    assert teacher_keys and not teacher_keys & set(state["state_dict"])
    assert set(state["state_dict"]) == set(module.state_dict()) - teacher_keys
    assert state["freekd"]["frozen_sha256"] == state_sha256(module.distiller.teacher)
    # last.ckpt is a link to the newest step file, not a copy.
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.is_symlink() and last.resolve() == checkpoint.resolve()
    # Resume in a fresh process state: other initial weights, other RNG state.
    torch.manual_seed(999)
    resumed = run_distillation(run_dir, STEPS, seed=5, resume=checkpoint)
    assert_states_equal(uninterrupted, final_state(resumed))


def test_resuming_with_another_teacher_is_refused_in_one_line(tmp_path):
    run_dir = tmp_path / "run"
    fit(make_distill_module(), make_train_loader(Images(4), 2), config=config(run_dir, 2))
    other_teacher = make_distill_module(teacher_seed=1)
    other_teacher.frozen_source = "teacher_v2.safetensors"
    with pytest.raises(ValueError, match="the teacher differs from the one the run was") as error:
        fit(
            other_teacher,
            make_train_loader(Images(4), 2),
            config=config(run_dir, 4),
            resume="last",
        )
    message = str(error.value)
    assert "\n" not in message and "teacher_v2.safetensors" in message and "force=True" in message
    # The same teacher (its weights equal, however loaded) resumes.
    result = fit(
        make_distill_module(seed=3),
        make_train_loader(Images(4), 2),
        config=config(run_dir, 4),
        resume="last",
    )
    assert result.global_step == 4


class SendSigint(Callback):
    """Sends this process a SIGINT (a Ctrl-C) at the end of step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_writes_a_checkpoint_at_the_step_boundary_and_resume_is_exact(
    tmp_path, uninterrupted
):
    run_dir = tmp_path / "run"
    handler = signal.getsignal(signal.SIGINT)
    # Step 6 is a validation step: the resumed run skips that validation, the uninterrupted one
    # runs it on augmented data; validation must not shift the training randomness.
    with pytest.raises(KeyboardInterrupt, match="stopped by Ctrl-C at step 6"):
        run_distillation(run_dir, STEPS, callbacks=[SendSigint(6)])
    assert signal.getsignal(signal.SIGINT) is handler  # our handler is gone again
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    assert not (run_dir / "student.safetensors").exists()  # the run did not complete
    resumed = run_distillation(run_dir, STEPS, seed=5, resume="auto")
    assert_states_equal(uninterrupted, final_state(resumed))


class SendSigterm(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 4:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_stops_at_the_step_boundary_with_a_checkpoint(tmp_path):
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    run_dir = tmp_path / "run"
    with pytest.raises(SIGTERMException):
        fit(
            make_distill_module(),
            make_train_loader(Images(10), 2),
            config=config(run_dir, 8, checkpoint_every_steps=3, val_every_steps=2),
            val_loader=make_val_loader(Images(2), 2),
            callbacks=[SendSigterm()],
        )
    checkpoints = run_dir / "checkpoints"
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 4
    assert not (checkpoints / "interrupted.ckpt").exists()  # the stop was clean
    assert resolve_resume("auto", run_dir) == checkpoints / "last.ckpt"
    assert resolve_resume("auto", tmp_path / "new") is None


class DoubleSigint(Callback):
    """Two Ctrl-Cs during step ``step``: the second one interrupts in the middle of the step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def test_a_second_ctrl_c_interrupts_at_once_and_writes_interrupted_ckpt(tmp_path):
    handler = signal.getsignal(signal.SIGINT)
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt, match="interrupted at step 3"):
        fit(
            make_distill_module(),
            make_train_loader(Images(10), 2),
            config=config(run_dir, 8, checkpoint_every_steps=2),
            callbacks=[DoubleSigint(3)],
        )
    assert signal.getsignal(signal.SIGINT) is handler
    checkpoints = run_dir / "checkpoints"
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 2
    assert torch.load(checkpoints / "interrupted.ckpt", weights_only=True)["global_step"] == 3


# ---------------------------------------------------------------------------- checkpoints, folders


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one_intact(tmp_path, monkeypatch):
    real_save = torch.save
    calls = []

    def crashing_save(obj, target, *args, **kwargs):
        calls.append(str(target))
        if len(calls) == 3:  # step 3: step=000003.ckpt is being written
            Path(target).write_bytes(b"half a checkpoint")
            raise OSError("disk full")
        return real_save(obj, target, *args, **kwargs)

    monkeypatch.setattr(torch, "save", crashing_save)
    run_dir = tmp_path / "run"
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(OSError, match="disk full"):
        fit(make_distill_module(), make_train_loader(Images(10), 2), config=config(run_dir, 6))
    monkeypatch.setattr(torch, "save", real_save)
    assert signal.getsignal(signal.SIGINT) is handler  # Ctrl-C works again after the crash
    checkpoints = run_dir / "checkpoints"
    assert not [c for c in calls if "last.ckpt" in c]  # a link, never written by torch.save
    assert Path(calls[2]).name.startswith(".step=000003.ckpt.")  # written to a temporary file
    last = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2  # last.ckpt still points at the previous step file, whole
    assert (checkpoints / "last.ckpt").resolve() == (checkpoints / "step=000002.ckpt").resolve()
    assert not (checkpoints / "step=000003.ckpt").exists()
    assert not list(checkpoints.glob(".*.tmp"))  # no temporary file left behind


def test_a_fresh_run_refuses_a_used_run_folder_unless_forced(tmp_path):
    run_dir = tmp_path / "run"
    fit(make_distill_module(), make_train_loader(Images(4), 2), config=config(run_dir, 1))
    with pytest.raises(FileExistsError, match=r"already holds a run.*resume='last'.*force=True"):
        fit(make_distill_module(), make_train_loader(Images(4), 2), config=config(run_dir, 1))
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    stale = run_dir / "stale.txt"
    stale.write_text("from the old run")
    fit(
        make_distill_module(),
        make_train_loader(Images(4), 2),
        config=config(run_dir, 1),
        force=True,
    )
    assert not stale.exists() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        fit(
            make_distill_module(),
            make_train_loader(Images(4), 2),
            config=config(tmp_path / "other", 1),
            resume="last",
        )


def test_a_plain_dataloader_trains_and_make_val_loader_refuses_to_shard_twice(tmp_path):
    from torch.utils.data import DataLoader

    plain = DataLoader(Images(6), batch_size=2, shuffle=True)
    result = fit(make_distill_module(), plain, config=config(tmp_path / "run", 2))
    assert result.global_step == 2 and plain.generator is not None  # its own generator now
    with pytest.raises(ValueError, match="make_val_loader shards the validation data by itself"):
        fit(
            make_distill_module(),
            plain,
            make_val_loader(Images(2), 2),
            config=config(tmp_path / "other", 2),
        )


# ---------------------------------------------------------------------------- DDP


def test_two_process_ddp_distillation_on_cpu_ends_with_identical_students(tmp_path):
    """Lightning's ``strategy="ddp"`` on CPU (gloo) with 2 processes, run by
    scripts/ddp_distill_check.py in a subprocess (the second process re-runs the script)."""
    report, _ = run_ddp_check(tmp_path)
    assert report["world_size"] == 2 and report["ranks_reporting"] == [0, 1]
    assert report["student_equal"] and report["projections_equal"], report
    assert report["teacher_equal"] and report["teacher_grads_none"], report
    assert report["teacher_ignored_by_ddp"] and not report["teacher_requires_grad"], report
    assert report["student_trained"] and report["ranks_saw_different_data"], report
    assert report["global_step"] == 6 and report["ok"]


# ---------------------------------------------------------------------------- packaging


def test_the_core_does_not_import_lightning():
    code = "import sys, freekd, freekd.distill, freekd.tuning; print('lightning' in sys.modules)"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert output.stdout.strip() == "False", output.stderr
