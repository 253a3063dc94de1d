"""Speed benchmark: what one distillation training step costs with each method.

A step is the teacher forward (frozen, stopped after its taps) + the student forward/backward on
its task loss + the distillation loss + the optimizer step. Shapes are the paper's:

- detection: RetinaNet ResNet-101 teacher -> ResNet-50 student, 800x1333 images, batch 2, the
  five FPN levels (256 channels) distilled;
- segmentation: PSPNet ResNet-101 -> PSPNet ResNet-18 (output stride 8), 512x1024 crops, batch 2,
  the last stage distilled (2048 vs 512 channels, 1x1-conv projection).

For each (task, method) row, in a fresh process: median wall time of the whole step, peak memory
during the step, and the distillation loss alone (forward + backward on the same feature shapes)
with its share of the step. FreeKD rows also time the loss under ``torch.compile`` and, on CUDA,
``torch.compile(mode="reduce-overhead")`` (CUDA graphs), where those work.

    .venv/bin/python benchmarks/step_speed.py                       # CPU, paper shapes (slow)
    .venv/bin/python benchmarks/step_speed.py --device cuda --out step_speed_cuda.md
    .venv/bin/python benchmarks/step_speed.py --quick               # small shapes, smoke run
    .venv/bin/python benchmarks/step_speed.py --tasks detection --methods none,freekd-official
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from loss_speed import _cpu_busy, _cpu_model, _current_rss_kb, _max_rss_kb, _timer

REPO = Path(__file__).resolve().parent.parent

TASKS: dict[str, dict[str, Any]] = {
    "detection": {
        "arch": "retinanet",
        "teacher": "resnet101",
        "student": "resnet50",
        "image": (800, 1333),
        "quick_image": (128, 192),
        "num_classes": 80,
    },
    "segmentation": {
        "arch": "pspnet",
        "teacher": "resnet101",
        "student": "resnet18",
        "image": (512, 1024),
        "quick_image": (64, 128),
        "num_classes": 19,
    },
}
METHODS = ("none", "mse", "cwd", "mgd", "freekd-paper", "freekd-official")
BATCH = 2


# ------------------------------------------------------------------------------------------------
# Child side: one row, in its own process.


def _batch(task: str, image: tuple[int, int], num_classes: int, device: str) -> Any:
    import torch

    generator = torch.Generator().manual_seed(0)
    images = torch.rand(BATCH, 3, *image, generator=generator).to(device)
    if task == "segmentation":
        masks = torch.randint(0, num_classes, (BATCH, *image), generator=generator)
        return images, masks.to(device)
    height, width = image
    targets = []
    for _ in range(BATCH):
        corners = torch.rand(4, 2, generator=generator) * torch.tensor([width / 2, height / 2])
        boxes = torch.cat([corners, corners + torch.tensor([width / 4, height / 4])], dim=1)
        labels = torch.randint(1, num_classes + 1, (4,), generator=generator)
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device)})
    return list(images), targets


def _loss(method: str, channels: list[int]):
    from freekd.losses import (
        ChannelWiseDistillation,
        FeatureMSE,
        FreeKDLoss,
        MaskedGenerativeDistillation,
    )

    if method == "mse":
        return FeatureMSE()
    if method == "cwd":
        return ChannelWiseDistillation(tau=4.0)
    if method == "mgd":
        return MaskedGenerativeDistillation(channels)
    loss = FreeKDLoss.preset(method.removeprefix("freekd-"), channels)
    for prompt in loss.prompts:  # stand-in for tuned prompts: random tokens, marked tuned
        prompt.tokens.normal_()
        prompt.tuned.fill_(True)
    return loss


def _model_args(task: str, image: tuple[int, int]) -> dict[str, Any]:
    if task == "detection":
        return {"min_size": min(image), "max_size": max(image)}
    return {}


def run_row(
    task: str, method: str, device: str, repeats: int, quick: bool, warmups: int, compile_loss: bool
) -> dict[str, Any]:
    """Time ``repeats`` training steps (after warm-ups) and the loss alone; one JSON row."""
    import torch

    from freekd.distill import Distiller
    from freekd.models import build_model

    torch.manual_seed(0)
    setting = TASKS[task]
    image = setting["quick_image"] if quick else setting["image"]
    args = _model_args(task, image)
    teacher = build_model(task, setting["arch"], setting["teacher"], setting["num_classes"], **args)
    student = build_model(task, setting["arch"], setting["student"], setting["num_classes"], **args)
    teacher.model.to(device)
    student.model.to(device)
    batch = _batch(task, image, setting["num_classes"], device)
    timer = _timer(device)

    if method == "none":
        model, loss = student.model, None
        parameters = list(model.parameters())

        def terms():
            return student.task_loss(model, batch)
    else:
        loss = _loss(method, list(teacher.tap_channels)).to(device)
        model = Distiller(
            teacher.model,
            student.model,
            list(teacher.taps),
            list(student.taps),
            {method: loss},
            student.task_loss,
            example_batch=batch,
        ).to(device)
        parameters = model.trainable_parameters()

        def terms():
            return model(batch)

    model.train()
    # lr 0: the same work as a real step, and weights that stay at their (random) start, so
    # that no row diverges on random inputs within its few steps.
    optimizer = torch.optim.SGD(parameters, lr=0.0, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        values = terms()
        total = sum(v for v in (values.values() if isinstance(values, dict) else [values]))
        total.backward()
        optimizer.step()

    rss_before = _current_rss_kb()
    for _ in range(warmups):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    step_ms = [timer(step) for _ in range(repeats)]
    row: dict[str, Any] = {"task": task, "method": method, "step_ms": statistics.median(step_ms)}
    row["step_runs"] = len(step_ms)
    if device == "cuda":
        row["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        row["memory_kind"] = "torch.cuda.max_memory_allocated during the timed steps"
    else:
        row["peak_mb"] = max(0, _max_rss_kb() - rss_before) / 1024
        row["memory_kind"] = "peak RSS during the steps minus RSS after building the models"
    if loss is not None:
        row.update(_loss_alone(loss, model, batch, device, repeats, method, compile_loss))
        row["loss_share"] = row["loss_ms"] / row["step_ms"]
    return row


def _loss_alone(
    loss, distiller, batch, device: str, repeats: int, method: str, compile_loss: bool
) -> dict:
    """Forward + backward of the distillation loss alone on the step's feature shapes."""
    import torch

    with torch.no_grad():
        distiller(batch)  # fills the taps
    teacher = [f.detach() for f in distiller._teacher_taps.features[: len(distiller.projections)]]
    student = [torch.randn_like(t).requires_grad_(True) for t in teacher]
    timer = _timer(device)

    def run(function):
        def once():
            for s in student:
                s.grad = None
            function(student, teacher).backward()

        once()
        once()
        return statistics.median(timer(once) for _ in range(max(repeats, 5)))

    result: dict[str, Any] = {"loss_ms": run(loss)}
    if method.startswith("freekd") and compile_loss:
        for name, mode in (("compile", "default"), ("cudagraphs", "reduce-overhead")):
            if name == "cudagraphs" and device != "cuda":
                result[f"loss_{name}_ms"] = "n/a on CPU"
                continue
            try:
                torch._dynamo.reset()
                result[f"loss_{name}_ms"] = run(torch.compile(loss, mode=mode))
            except Exception as error:  # noqa: BLE001 - reported in the table, not hidden
                result[f"loss_{name}_ms"] = f"failed: {type(error).__name__}"
    return result


# ------------------------------------------------------------------------------------------------
# Parent side: one child process per row, the markdown table.


def _run_child(task: str, method: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, __file__, "--row", f"{task}:{method}", "--device", args.device]
    command += ["--repeats", str(args.repeats), "--warmups", str(args.warmups)]
    command += (["--quick"] if args.quick else []) + ([] if args.compile else ["--no-compile"])
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    begin = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"task": task, "method": method, "error": f"exit {done.returncode}: {tail}"}
    row = json.loads(lines[-1])
    row["wall_s"] = time.perf_counter() - begin
    return row


def _ms(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, int | float) else str(value)


def render(rows: list[dict[str, Any]], args: argparse.Namespace, busy: str) -> str:
    import torch

    if args.device == "cuda":
        machine = torch.cuda.get_device_name(0)
    else:
        machine = f"{_cpu_model()}, {os.cpu_count()} cores"
    lines = [
        f"Step speed on {machine}, torch {torch.__version__}, {platform.python_version()}; "
        f"batch {BATCH}, fp32, {'quick shapes' if args.quick else 'paper shapes'}; "
        f"median of {args.repeats} steps after {args.warmups} warm-up(s), "
        f"{torch.get_num_threads()} thread(s); other load before the run: {busy}.",
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
        "",
        "| task | method | step ms | vs none | peak MB | loss ms (fwd+bwd) | loss share "
        "| compiled loss ms | CUDA-graph loss ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = {r["task"]: r["step_ms"] for r in rows if r["method"] == "none" and "step_ms" in r}
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['task']} | {row['method']} | {row['error']} |||||||")
            continue
        ratio = f"{row['step_ms'] / base[row['task']]:.2f}x" if row["task"] in base else ""
        share = f"{100 * row['loss_share']:.1f}%" if "loss_share" in row else ""
        lines.append(
            f"| {row['task']} | {row['method']} | {_ms(row['step_ms'])} | {ratio} "
            f"| {row['peak_mb']:.0f} | {_ms(row.get('loss_ms', ''))} | {share} "
            f"| {_ms(row.get('loss_compile_ms', ''))} | {_ms(row.get('loss_cudagraphs_ms', ''))} |"
        )
    kinds = {row.get("memory_kind") for row in rows} - {None}
    lines += [
        "",
        f"Peak memory: {', '.join(sorted(kinds))}. The `none` row is the student alone (no "
        f"teacher forward, no distillation loss); `vs none` is what distillation adds.",
    ]
    for row in rows:
        is_retinanet = (row.get("task"), row.get("method")) == ("detection", "freekd-official")
        if is_retinanet and "loss_share" in row:
            lines.append(
                f"FreeKD (official) loss share of the RetinaNet R101->R50 step: "
                f"{100 * row['loss_share']:.1f}%."
            )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--repeats", type=int, help="timed steps per row (CPU 3, CUDA 20)")
    parser.add_argument("--warmups", type=int, help="untimed steps first (CPU 1, CUDA 3)")
    parser.add_argument(
        "--no-compile", dest="compile", action="store_false", help="skip the compiled-loss rows"
    )
    parser.add_argument("--quick", action="store_true", help="small images: a smoke run")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 20 if args.device == "cuda" else 3
    if args.warmups is None:
        args.warmups = 3 if args.device == "cuda" else 1
    args.tasks, args.methods = args.tasks.split(","), args.methods.split(",")
    for task in args.tasks:
        if task not in TASKS:
            parser.error(f"unknown task {task!r}: choose from {', '.join(TASKS)}")
    for method in args.methods:
        if method not in METHODS:
            parser.error(f"unknown method {method!r}: choose from {', '.join(METHODS)}")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.row:
        task, method = args.row.split(":")
        row = run_row(
            task, method, args.device, args.repeats, args.quick, args.warmups, args.compile
        )
        print(json.dumps(row))
        return []
    busy = _cpu_busy()
    rows = []
    for task in args.tasks:
        for method in args.methods:
            row = _run_child(task, method, args)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    text = render(rows, args, busy)
    print(text)
    if args.out:
        args.out.write_text(text)
    return rows


if __name__ == "__main__":
    main()
