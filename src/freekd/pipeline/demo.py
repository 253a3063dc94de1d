"""``freekd demo``: the whole FreeKD pipeline on the built-in digit scenes, in minutes on a CPU.

For one task (segmentation by default, or detection) it trains a teacher and a baseline
student, tunes the frequency prompts on the frozen teacher, distills a FreeKD student with the
same settings as the baseline, evaluates the three models on the validation scenes and prints a
table (metric and parameters). The run folder holds ``config.yaml``, ``metrics.json``,
``masks.png`` (the learned masks over a validation image) and one folder per job with its
Lightning logs and checkpoints.

The settings are :data:`DEMO_CONFIGS` (also shipped as ``configs/digits_demo_*.yaml``);
``quick`` applies :data:`QUICK_OVERRIDES` (fewer steps and images).
"""

from __future__ import annotations

import copy
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from .builders import job_dir, resolve_device
from .config import RunConfig, dump_config, load_config
from .jobs import (
    PRIMARY_METRIC,
    distill,
    evaluate_model,
    train_baseline,
    train_teacher,
    tune_prompts,
    visualize,
    write_json,
)

__all__ = [
    "DEMO_CONFIGS",
    "DEMO_TASKS",
    "QUICK_OVERRIDES",
    "default_run_dir",
    "demo_config",
    "format_table",
    "run_demo",
]

DEMO_TASKS = ("segmentation", "detection")

_ADAMW = {"name": "adamw", "lr": 0.001, "weight_decay": 0.0001}

DEMO_CONFIGS: dict[str, dict[str, Any]] = {
    "segmentation": {
        "description": "FreeKD demo: digit-scene segmentation, PSPNet-R34 teacher -> PSPNet-R18 "
        "student, from scratch on a CPU",
        "task": "segmentation",
        "seed": 0,
        "device": "auto",
        "data": {
            "name": "digits",
            "args": {"size": 64, "digit_scale": [0.4, 0.7], "max_digits": 3, "clutter": 0.5},
            "train_args": {"length": 4000},
            "val_args": {"length": 200},
            "batch_size": 4,
            "val_batch_size": 25,
            "crop_size": 64,
            "scale_range": [0.8, 1.25],
            "hflip_prob": 0.0,
        },
        "teacher": {
            "arch": "pspnet",
            "backbone": "resnet34",
            "train": {
                "steps": 800,
                "optimizer": dict(_ADAMW),
                "schedule": {"kind": "cosine", "min_lr": 0.00001},
            },
        },
        "student": {
            "arch": "pspnet",
            "backbone": "resnet18",
            "train": {
                "steps": 300,
                "optimizer": dict(_ADAMW),
                "schedule": {"kind": "cosine", "min_lr": 0.00001},
            },
        },
        "prompts": {
            "steps": 40,
            "optimizer": {"name": "adam", "lr": 0.01, "weight_decay": 0.001},
            "schedule": {"kind": "cosine", "min_lr": 0.000001},
        },
        "distill": {"preset": "paper", "mu": 1.0, "projection": "auto"},
        "train": {"checkpoint_every_steps": 100, "keep_checkpoints": 1, "log_every_steps": 10},
    },
    "detection": {
        "description": "FreeKD demo: digit-scene detection, RetinaNet-R34 teacher -> "
        "RetinaNet-R18 student, from scratch on a CPU",
        "task": "detection",
        "seed": 0,
        "device": "auto",
        "data": {
            "name": "digits",
            "args": {"size": 96, "digit_scale": [0.25, 0.45], "max_digits": 3, "clutter": 0.5},
            "train_args": {"length": 4000},
            "val_args": {"length": 100},
            "batch_size": 8,
            "val_batch_size": 20,
            "hflip_prob": 0.0,
        },
        "teacher": {
            "arch": "retinanet",
            "backbone": "resnet34",
            "args": {"min_size": 96, "max_size": 96},
            "train": {
                "steps": 300,
                "optimizer": {"name": "adamw", "lr": 0.0005, "weight_decay": 0.0001},
                "schedule": {"kind": "cosine", "warmup_steps": 50, "min_lr": 0.000005},
            },
        },
        "student": {
            "arch": "retinanet",
            "backbone": "resnet18",
            "args": {"min_size": 96, "max_size": 96},
            "train": {
                "steps": 150,
                "optimizer": {"name": "adamw", "lr": 0.0005, "weight_decay": 0.0001},
                "schedule": {"kind": "cosine", "warmup_steps": 50, "min_lr": 0.000005},
            },
        },
        "prompts": {
            "steps": 40,
            "optimizer": {"name": "adam", "lr": 0.01, "weight_decay": 0.001},
            "schedule": {"kind": "cosine", "min_lr": 0.000001},
        },
        "distill": {"preset": "paper", "mu": 1.0, "projection": "auto"},
        "train": {
            "grad_clip_norm": 35.0,
            "checkpoint_every_steps": 100,
            "keep_checkpoints": 1,
            "log_every_steps": 10,
        },
    },
}
"""The demo's settings per task (``configs/digits_demo_<task>.yaml`` holds the same)."""

QUICK_OVERRIDES: dict[str, list[str]] = {
    "segmentation": [
        "teacher.train.steps=120",
        "student.train.steps=80",
        "prompts.steps=10",
        "data.val_args.length=50",
    ],
    "detection": [
        "teacher.train.steps=60",
        "student.train.steps=30",
        "prompts.steps=10",
        "data.val_args.length=40",
    ],
}
"""``--quick``: the same pipeline with fewer steps and validation images."""


def demo_config(
    task: str,
    quick: bool = False,
    config_path: str | Path | None = None,
    overrides: Sequence[str] = (),
    run_dir: str | Path | None = None,
) -> RunConfig:
    """The demo's :class:`RunConfig` for ``task``: the built-in settings (or ``config_path``
    merged over them), the quick profile, then ``overrides``."""
    if task not in DEMO_TASKS:
        raise ValueError(f"unknown demo task {task!r}: choose segmentation, detection or both")
    extra = [*(QUICK_OVERRIDES[task] if quick else []), *overrides]
    if run_dir is not None:
        extra.append(f"run_dir={run_dir}")
    return load_config(config_path, extra, base=copy.deepcopy(DEMO_CONFIGS[task]))


def _prepare(run_dir: Path, force: bool, resume: bool) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise NotADirectoryError(f"run folder {str(run_dir)!r} is a file: choose a folder path")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not resume:
        if not force:
            raise FileExistsError(
                f"run folder {str(run_dir)!r} already holds a run: continue it with --resume, "
                f"overwrite it with --force, or choose another --run-dir"
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def _stage_state(config: RunConfig, role: str, output: str) -> tuple[bool, str | None]:
    """``(done, resume)`` of one stage of a resumed demo."""
    directory = job_dir(config, role)
    if (directory / output).is_file():
        return True, None
    if (directory / "checkpoints" / "last.ckpt").is_file():
        return False, "last"
    return False, None


def _say(text: str) -> None:
    print(text, flush=True)


def _label(arch: str, backbone: str) -> str:
    names = {
        "pspnet": "PSPNet",
        "deeplabv3": "DeepLabV3",
        "retinanet": "RetinaNet",
        "fcos": "FCOS",
        "faster_rcnn": "Faster R-CNN",
    }
    return f"{names.get(arch, arch)}-R{backbone.removeprefix('resnet')}"


def format_table(summary: dict[str, Any]) -> str:
    """The demo's result table (plain text)."""
    metric = summary["metric"]
    rows = [("model", "architecture", "parameters", metric, "train steps")]
    for row in summary["rows"]:
        value = row["value"]
        rows.append(
            (
                row["name"],
                row["architecture"],
                f"{row['parameters'] / 1e6:.1f} M",
                "n/a" if value is None else f"{value:.2f}",
                str(row["steps"]),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [cell.rjust(width) for cell, width in zip(row[2:], widths[2:], strict=True)]
        lines.append("  ".join(cells))
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    title = (
        f"FreeKD demo: {summary['task']} on digits ({summary['val_images']} validation scenes, "
        f"{metric} in %), device {summary['device']}, {summary['seconds'] / 60:.1f} min"
    )
    delta = summary.get("freekd_minus_baseline")
    footer = (
        f"FreeKD student - baseline student: {delta:+.2f} {metric}" if delta is not None else ""
    )
    return "\n".join([title, *lines, footer]).rstrip()


def _run_stage(
    name: str,
    config: RunConfig,
    role: str,
    output: str,
    job: Callable[..., Any],
    resume: bool,
    timings: dict[str, float],
) -> None:
    done, resume_from = _stage_state(config, role, output) if resume else (False, None)
    if done:
        _say(f"[demo] {name}: already done ({job_dir(config, role) / output}), skipped")
        return
    _say(f"[demo] {name} ...")
    start = time.perf_counter()
    result = job(config, resume=resume_from, force=resume_from is None)
    timings[role] = round(time.perf_counter() - start, 1)
    if not result.completed:
        raise RuntimeError(f"the {name} job stopped before its last step")
    _say(f"[demo] {name}: done in {timings[role]:.0f} s")


def run_demo(config: RunConfig, force: bool = False, resume: bool = False) -> dict[str, Any]:
    """Run the demo pipeline described by ``config`` into ``config.run_dir``; returns (and
    writes to ``metrics.json``) the summary with the table rows."""
    start = time.perf_counter()
    run_dir = Path(config.run_dir)
    _prepare(run_dir, force, resume)
    dump_config(config, run_dir / "config.yaml")
    device = resolve_device(config.device)
    _say(f"[demo] {config.task} on digits, device {device}, run folder {run_dir}")
    timings: dict[str, float] = {}
    if not config.teacher.checkpoint:
        _run_stage(
            "teacher", config, "teacher", "teacher.safetensors", train_teacher, resume, timings
        )
    _run_stage(
        "baseline student",
        config,
        "baseline",
        "student.safetensors",
        train_baseline,
        resume,
        timings,
    )
    _run_stage(
        "prompt tuning", config, "prompts", "prompts.safetensors", tune_prompts, resume, timings
    )
    _run_stage("FreeKD student", config, "student", "student.safetensors", distill, resume, timings)
    _say("[demo] evaluating ...")
    evaluation_start = time.perf_counter()
    results = {role: evaluate_model(config, role) for role in ("teacher", "baseline", "student")}
    timings["evaluation"] = round(time.perf_counter() - evaluation_start, 1)
    masks = visualize(config)
    steps = {
        "teacher": config.teacher.train.steps if not config.teacher.checkpoint else None,
        "baseline": config.student.train.steps,
        "student": config.student.train.steps,
    }
    names = {"teacher": "teacher", "baseline": "baseline student", "student": "FreeKD student"}
    rows = [
        {
            "name": names[role],
            "role": role,
            "architecture": _label(result["arch"], result["backbone"]),
            "parameters": result["parameters"],
            "value": result["value"],
            "steps": steps[role] if steps[role] is not None else "given",
            "scores": result["scores"],
        }
        for role, result in results.items()
    ]
    baseline, student = results["baseline"]["value"], results["student"]["value"]
    summary = {
        "task": config.task,
        "metric": PRIMARY_METRIC[config.task],
        "device": device,
        "val_images": results["student"]["images"],
        "rows": rows,
        "freekd_minus_baseline": (
            None if baseline is None or student is None else student - baseline
        ),
        "timings_s": timings,
        "seconds": round(time.perf_counter() - start, 1),
        "masks": str(masks),
        "run_dir": str(run_dir),
        "command": " ".join(sys.argv),
    }
    write_json(summary, run_dir / "metrics.json")
    return summary


def default_run_dir(task: str) -> Path:
    """``runs/demo-<task>-<date>-<time>``: a fresh folder for each demo run."""
    return Path("runs") / f"demo-{task}-{datetime.now():%Y%m%d-%H%M%S}"


def demo_yaml(task: str) -> str:
    """The built-in settings of ``task`` as the YAML of ``configs/digits_demo_<task>.yaml``."""
    import yaml

    header = (
        f"# The settings of `freekd demo --task {task}` (kept equal to freekd.pipeline.demo."
        f"DEMO_CONFIGS by a test).\n"
        f"# Run them as they are with `freekd demo --task {task}`, or pass this file with\n"
        f"# --config after editing it. Needs nothing but a CPU: the digit scenes are built in,\n"
        f"# every model starts from random weights. `--quick` also sets: "
        f"{', '.join(QUICK_OVERRIDES[task])}.\n"
    )
    data = {"run_dir": f"runs/demo-{task}", **DEMO_CONFIGS[task]}
    return header + yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)
