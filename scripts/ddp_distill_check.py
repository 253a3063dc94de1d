"""Distil a tiny student with 2 DDP processes on CPU (gloo) and compare what the ranks hold.

    python scripts/ddp_distill_check.py --out /tmp/ddp-check [--steps 6] [--devices 2]

Lightning's ``strategy="ddp"`` starts the second process by running this script again. At the
end of training every rank writes its student, teacher and projection weights, whether any
teacher parameter holds a gradient, and the dataset indices it trained on, to
``OUT/rank<r>.pt``; process 0 then compares the files and prints one JSON line:
``{"ok": true, "world_size": 2, "student_equal": true, ...}``. Exit status 0 when every check
holds, 1 otherwise.

``--poison-step K`` (with ``nonfinite="skip"``): process 0 alone gets a batch of NaN images at
step ``K`` (0-based); every process must skip that step (they agree through an all-reduce), so
the students stay equal, no weight changes at step ``K`` and the run goes on to the end. The
report then also holds ``skipped_per_rank`` and ``weights_kept_at_poisoned_step``.

``--poison-step K --raise`` (``nonfinite="raise"``): every process must raise
``NonFiniteError`` at step ``K`` (none waits for the other in a collective); the report holds
``raised_at_step`` per rank. ``--bare-poison-step K``: the same without Lightning, in a plain
DDP loop (2 processes started with ``torch.multiprocessing``, gradients all-reduced by hand)
that agrees through :func:`freekd.distill.all_ranks_finite`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from torch import nn
from torch.utils.data import Dataset

from freekd import FreeKDLoss
from freekd.distill import Distiller, NonFiniteError, all_ranks_finite, nonfinite_message
from freekd.train import (
    DistillModule,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
    fit,
    make_train_loader,
)


class TinyNet(nn.Module):
    """Conv net with two tapped stages: ``layer1`` ``[N, w, 16, 16]``, ``layer2``
    ``[N, 2w, 8, 8]`` for ``[N, 3, 32, 32]`` inputs; 4-class logits."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.layer1 = nn.Sequential(nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(2 * width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer2(self.layer1(self.stem(x))).mean((2, 3)))


class IndexedImages(Dataset):
    """``size`` random images with labels; items are ``(image, label, index)``."""

    def __init__(self, size: int = 16) -> None:
        generator = torch.Generator().manual_seed(7)
        self.images = torch.randn(size, 3, 32, 32, generator=generator)
        self.labels = torch.randint(0, 4, (size,), generator=generator)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index], self.labels[index], index


def task_loss(model: nn.Module, batch) -> torch.Tensor:
    images, labels, _ = batch
    return F.cross_entropy(model(images), labels)


def _student_state(pl_module) -> dict:
    return {k: v.detach().clone() for k, v in pl_module.distiller.student.state_dict().items()}


class RecordRank(Callback):
    """Writes this rank's weights, teacher gradients and seen indices at the end of training;
    with ``poison_step``, fills process 0's images with NaN at that step and keeps the student
    weights from before and after it."""

    def __init__(self, out: Path, poison_step: int | None = None) -> None:
        self.out, self.indices, self.poison_step = out, [], poison_step
        self.around_poison: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.indices.append(batch[2].tolist())
        if self.poison_step is not None and trainer.global_step == self.poison_step:
            self.around_poison.append(_student_state(pl_module))
            if trainer.global_rank == 0:
                batch[0].fill_(float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.poison_step is not None and trainer.global_step == self.poison_step + 1:
            self.around_poison.append(_student_state(pl_module))

    def on_train_end(self, trainer, pl_module) -> None:
        distiller = pl_module.distiller
        teacher_params = list(distiller.teacher.parameters())
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "student": {k: v.detach().clone() for k, v in distiller.student.state_dict().items()},
            "teacher": {k: v.detach().clone() for k, v in distiller.teacher.state_dict().items()},
            "projections": {
                k: v.detach().clone() for k, v in distiller.projections.state_dict().items()
            },
            "teacher_grads_none": all(p.grad is None for p in teacher_params),
            "teacher_requires_grad": any(p.requires_grad for p in teacher_params),
            "ddp_ignored": sorted(getattr(trainer.strategy.model, "parameters_to_ignore", [])),
            "indices": self.indices,
            "skipped": getattr(pl_module, "nonfinite_skipped", 0),
            # Parameters only: DDP gives every process the buffers of process 0 at the start
            # of each forward pass, so the other processes' buffers change then.
            "weights_kept": len(self.around_poison) == 2
            and all(
                torch.equal(self.around_poison[0][k], self.around_poison[1][k])
                for k, _ in distiller.student.named_parameters()
            ),
        }
        torch.save(record, self.out / f"rank{trainer.global_rank}.pt")
        trainer.strategy.barrier("freekd-ddp-check")


def build_module(seed: int = 0, nonfinite: str = "raise") -> DistillModule:
    torch.manual_seed(seed)
    teacher, student = TinyNet(8), TinyNet(4)
    example = (torch.randn(2, 3, 32, 32), torch.zeros(2, dtype=torch.long), [0, 1])
    distiller = Distiller(
        teacher,
        student,
        ["layer1", "layer2"],
        ["layer1", "layer2"],
        {"freekd": FreeKDLoss.preset("paper", [8, 16])},
        task_loss,
        example,
        nonfinite=nonfinite,
    )
    return DistillModule(
        distiller,
        OptimConfig("sgd", lr=0.05, momentum=0.9),
        ScheduleConfig("cosine", total_steps=6, warmup_steps=2),
    )


def compare(
    out: Path, world_size: int, initial_student: dict, poison_step: int | None = None
) -> dict:
    records = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
    first = records[0]

    def same(key: str) -> bool:
        return all(
            first[key].keys() == r[key].keys()
            and all(torch.equal(first[key][k], r[key][k]) for k in first[key])
            for r in records[1:]
        )

    seen = [sorted(i for batch in r["indices"] for i in batch) for r in records]
    report = {
        "world_size": world_size,
        "ranks_reporting": [r["rank"] for r in records],
        "student_equal": same("student"),
        "projections_equal": same("projections"),
        "teacher_equal": same("teacher"),
        "teacher_grads_none": all(r["teacher_grads_none"] for r in records),
        "teacher_requires_grad": any(r["teacher_requires_grad"] for r in records),
        "teacher_ignored_by_ddp": all(
            any(name.startswith("distiller.teacher.") for name in r["ddp_ignored"]) for r in records
        ),
        "student_trained": any(
            not torch.equal(first["student"][k], initial_student[k]) for k in initial_student
        ),
        "ranks_saw_different_data": all(s != seen[0] for s in seen[1:]),
        "batches_per_rank": [len(r["indices"]) for r in records],
    }
    checks = [
        "student_equal",
        "projections_equal",
        "teacher_equal",
        "teacher_grads_none",
        "teacher_ignored_by_ddp",
        "student_trained",
        "ranks_saw_different_data",
    ]
    if poison_step is not None:
        report["skipped_per_rank"] = [r["skipped"] for r in records]
        report["weights_kept_at_poisoned_step"] = all(r["weights_kept"] for r in records)
        report["student_finite"] = all(
            bool(torch.isfinite(v).all())
            for v in first["student"].values()
            if v.is_floating_point()
        )
        report["every_rank_skipped_once"] = report["skipped_per_rank"] == [1] * world_size
        checks += ["weights_kept_at_poisoned_step", "student_finite", "every_rank_skipped_once"]
    report["ok"] = all(report[k] for k in checks) and not report["teacher_requires_grad"]
    return report


def _write_raised(out: Path, rank: int, step: int, message: str) -> None:
    text = json.dumps({"rank": rank, "step": step, "message": message})
    (out / f"raised-rank{rank}.json").write_text(text)


def _raise_report(out: Path, world_size: int, poison_step: int, wait: float = 60.0) -> dict:
    """Process 0: wait for every rank's ``raised-rank<r>.json`` and compare the steps."""
    deadline = time.monotonic() + wait
    files = [out / f"raised-rank{r}.json" for r in range(world_size)]
    while not all(f.is_file() for f in files) and time.monotonic() < deadline:
        time.sleep(0.2)
    raised = [json.loads(f.read_text()) if f.is_file() else None for f in files]
    steps = [r["step"] if r else None for r in raised]
    return {
        "world_size": world_size,
        "raised_at_step": steps,
        "messages": [r["message"] if r else None for r in raised],
        "ok": steps == [poison_step] * world_size,
    }


def _bare_worker(rank: int, out: Path, world_size: int, steps: int, poison_step: int) -> None:
    """One process of a plain DDP loop (no Lightning): NaN images on rank 0 at
    ``poison_step``; every rank must raise there, agreeing through ``all_ranks_finite``."""
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"file://{out / 'rendezvous'}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),  # a rank left waiting fails the check instead of hanging
    )
    try:
        distiller = build_module(nonfinite="raise").distiller.train()
        parameters = distiller.trainable_parameters()
        optimizer = torch.optim.SGD(parameters, lr=0.05)
        data = IndexedImages()
        for step in range(steps):
            images = data.images[2 * step : 2 * step + 2].clone()
            batch = (images, data.labels[2 * step : 2 * step + 2], [2 * step, 2 * step + 1])
            if rank == 0 and step == poison_step:
                images.fill_(float("nan"))
            terms = distiller(batch, raise_nonfinite=False)
            if not all_ranks_finite(terms):
                sources = distiller.last_nonfinite or ["loss term of another process"]
                raise NonFiniteError(nonfinite_message(sources), sources)
            optimizer.zero_grad()
            sum(terms.values()).backward()
            for parameter in parameters:
                if parameter.grad is not None:
                    torch.distributed.all_reduce(parameter.grad)
                    parameter.grad /= world_size
            optimizer.step()
        _write_raised(out, rank, -1, "no error")
    except NonFiniteError as error:
        _write_raised(out, rank, step, str(error))
    finally:
        torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument(
        "--poison-step",
        type=int,
        default=None,
        help="give process 0 NaN images at this step (0-based); runs with nonfinite='skip'",
    )
    parser.add_argument(
        "--raise",
        dest="raise_nonfinite",
        action="store_true",
        help="with --poison-step: nonfinite='raise', every process must raise at that step",
    )
    parser.add_argument(
        "--bare-poison-step",
        type=int,
        default=None,
        help="a plain DDP loop without Lightning, NaN on process 0 at this step: every "
        "process must raise there (freekd.distill.all_ranks_finite)",
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.bare_poison_step is not None:
        torch.multiprocessing.spawn(
            _bare_worker,
            args=(args.out, args.devices, args.steps, args.bare_poison_step),
            nprocs=args.devices,
            join=True,
        )
        report = _raise_report(args.out, args.devices, args.bare_poison_step, wait=1.0)
        print(json.dumps(report))
        return 0 if report["ok"] else 1
    raising = args.poison_step is not None and args.raise_nonfinite
    nonfinite = "raise" if args.poison_step is None or raising else "skip"
    module = build_module(nonfinite=nonfinite)
    initial_student = {
        k: v.detach().clone() for k, v in module.distiller.student.state_dict().items()
    }
    config = TrainConfig(
        max_steps=args.steps,
        run_dir=args.out / "run",
        checkpoint_every_steps=3,
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp",
        logger=None,
        progress_bar=False,
        model_summary=False,
        sanity_val_steps=0,
    )
    loader = make_train_loader(IndexedImages(), batch_size=2, seed=3)
    recorder = RecordRank(args.out, args.poison_step)
    if raising:
        rank = int(os.environ.get("LOCAL_RANK", "0"))
        try:
            fit(module, loader, config=config, callbacks=[recorder])
            _write_raised(args.out, rank, -1, "no error")
        except NonFiniteError as error:
            _write_raised(args.out, rank, module.global_step, str(error))
        if rank != 0:
            return 0
        report = _raise_report(args.out, args.devices, args.poison_step)
        print(json.dumps(report))
        return 0 if report["ok"] else 1
    result = fit(module, loader, config=config, callbacks=[recorder])
    if result.trainer.global_rank != 0:
        return 0
    report = compare(args.out, args.devices, initial_student, args.poison_step)
    report["global_step"] = result.global_step
    print(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
