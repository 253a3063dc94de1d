"""``freekd demo``: the whole FreeKD pipeline on the built-in digit scenes, in minutes on a CPU.

For one task (segmentation by default, or detection) it trains a teacher, a student without
distillation, students distilled with the two strongest baselines of the quality benchmark (the
FitNet feature MSE and MGD, :data:`BASELINES`), tunes the frequency prompts on the frozen teacher
and distills a FreeKD student (preset ``recommended``, ``mu: auto``), every student with the same
settings and seed; it evaluates the five models on the validation scenes and prints a table
(metric, parameters, time) with one line saying what it means. The run folder holds
``config.yaml``, ``metrics.json``, ``masks.png`` (the learned masks over a validation image),
``results.png`` (the table as a bar chart) and one folder per job with its logs and checkpoints.

The settings are the shipped recipes ``digits_demo_<task>.yaml`` (:data:`DEMO_CONFIGS`): the
quality benchmark's FPN pair (benchmarks/quality_v2.py) scaled down to 64-px scenes; ``quick``
applies :data:`QUICK_OVERRIDES` (fewer steps and images).
"""

from __future__ import annotations

import copy
import dataclasses
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


def _demo_settings(task: str) -> dict[str, Any]:
    """The settings of the shipped recipe ``digits_demo_<task>`` (less its ``run_dir``)."""
    import yaml

    from .._recipes import recipe_path

    settings = yaml.safe_load(recipe_path(f"digits_demo_{task}").read_text(encoding="utf-8"))
    settings.pop("run_dir", None)  # each demo run gets a fresh folder (default_run_dir)
    return settings


DEMO_CONFIGS: dict[str, dict[str, Any]] = {task: _demo_settings(task) for task in DEMO_TASKS}
"""The demo's settings per task, read from the shipped recipes ``digits_demo_<task>.yaml``
(``configs/`` in the repository, ``freekd/recipes/`` when installed: the one source)."""

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


_ARCH_NAMES = {
    "pspnet": "PSPNet",
    "deeplabv3": "DeepLabV3",
    "fpn": "FPN",
    "retinanet": "RetinaNet",
    "fcos": "FCOS",
    "faster_rcnn": "Faster R-CNN",
}
_BACKBONE_NAMES = {
    "mobilenetv3_small_050": "MobileNetV3-S-0.5",
    "mobilenetv3_small_100": "MobileNetV3-S",
    "mobilenetv3_large_100": "MobileNetV3-L",
}


def _label(arch: str, backbone: str) -> str:
    name = _BACKBONE_NAMES.get(backbone, f"R{backbone.removeprefix('resnet')}")
    return f"{_ARCH_NAMES.get(arch, arch)}-{name}"


BASELINES: dict[str, dict[str, Any]] = {
    "mse": {},
    "mgd": {"mu_factor": 1 / 3, "method_args": {"mask_ratio": 0.75}},
}
"""The baseline students of the demo: ``distill.method`` -> the other ``distill`` settings that
change (the weight rule is ``mu: auto`` for all; the factors and MGD's mask ratio are those the
segmentation benchmark picked, docs/results.md)."""

_ROWS = (  # (role in the summary, label, job): the demo's models in table order
    ("teacher", "teacher", "teacher"),
    ("baseline", "no distillation", "baseline"),
    ("mse", "MSE (FitNet)", "student"),
    ("mgd", "MGD", "student"),
    ("student", "FreeKD", "student"),
)


def format_table(summary: dict[str, Any]) -> str:
    """The demo's result table (plain text), with the line that says what it means."""
    metric = summary["metric"]
    rows = [("model", "architecture", "parameters", metric, "train steps", "time")]
    for row in summary["rows"]:
        value, seconds = row["value"], row.get("seconds")
        rows.append(
            (
                row["name"],
                row["architecture"],
                f"{row['parameters'] / 1e6:.2f} M",
                "n/a" if value is None else f"{value:.2f}",
                str(row["steps"]),
                "" if seconds is None else f"{seconds:.0f} s",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [cell.rjust(width) for cell, width in zip(row[2:], widths[2:], strict=True)]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    title = (
        f"FreeKD demo: {summary['task']} on digits ({summary['val_images']} validation scenes, "
        f"{metric} in %), device {summary['device']}, {summary['seconds'] / 60:.1f} min"
    )
    return "\n".join([title, *lines, verdict(summary)]).rstrip()


def verdict(summary: dict[str, Any]) -> str:
    """One line: FreeKD's gain over no distillation, MSE and MGD, and what it rests on."""
    values = {row["role"]: row["value"] for row in summary["rows"]}
    if any(values.get(role) is None for role in ("baseline", "mse", "mgd", "student")):
        return "a score is missing (n/a): no comparison"
    metric = summary["metric"]
    over = {role: values["student"] - values[role] for role in ("baseline", "mse", "mgd")}
    return (
        f"FreeKD {over['baseline']:+.2f} {metric} over no distillation, {over['mse']:+.2f} over "
        f"MSE, {over['mgd']:+.2f} over MGD on this short run (one seed, {summary['val_images']} "
        f"scenes: differences of about 1 point are noise; docs/results.md has the paired-seed "
        f"benchmark)"
    )


def _run_stage(
    name: str,
    config: RunConfig,
    role: str,
    output: str,
    job: Callable[..., Any],
    resume: bool,
) -> float | None:
    """Run one job of the demo (or skip it when a resumed demo has it); its seconds."""
    done, resume_from = _stage_state(config, role, output) if resume else (False, None)
    if done:
        _say(f"[demo] {name}: already done ({job_dir(config, role) / output}), skipped")
        return None
    _say(f"[demo] {name} ...")
    start = time.perf_counter()
    result = job(config, resume=resume_from, force=resume_from is None)
    seconds = round(time.perf_counter() - start, 1)
    if not result.completed:
        raise RuntimeError(f"the {name} job stopped before its last step")
    _say(f"[demo] {name}: done in {seconds:.0f} s")
    return seconds


def baseline_config(config: RunConfig, method: str) -> RunConfig:
    """``config`` with the baseline loss ``method`` of :data:`BASELINES` as the distillation loss
    (``mu: auto``, the other settings of ``distill`` unchanged)."""
    settings = {"method": method, **BASELINES[method]}
    return dataclasses.replace(config, distill=dataclasses.replace(config.distill, **settings))


def run_demo(config: RunConfig, force: bool = False, resume: bool = False) -> dict[str, Any]:
    """Run the demo pipeline described by ``config`` into ``config.run_dir``: teacher, student
    without distillation, students distilled with MSE and MGD, prompts and the FreeKD student;
    returns
    (and writes to ``metrics.json``) the summary with the table rows, and writes ``masks.png``
    and ``results.png``."""
    start = time.perf_counter()
    run_dir = Path(config.run_dir)
    _prepare(run_dir, force, resume)
    dump_config(config, run_dir / "config.yaml")
    device = resolve_device(config.device)
    _say(f"[demo] {config.task} on digits, device {device}, run folder {run_dir}")
    baselines = {method: baseline_config(config, method) for method in BASELINES}
    configs = {"teacher": config, "baseline": config, **baselines, "student": config}
    seconds: dict[str, float | None] = {}
    if not config.teacher.checkpoint:
        seconds["teacher"] = _run_stage(
            "teacher", config, "teacher", "teacher.safetensors", train_teacher, resume
        )
    seconds["baseline"] = _run_stage(
        "student without distillation",
        config,
        "baseline",
        "student.safetensors",
        train_baseline,
        resume,
    )
    for method, baseline in baselines.items():
        seconds[method] = _run_stage(
            f"{method.upper()} student", baseline, "student", "student.safetensors", distill, resume
        )
    seconds["prompts"] = _run_stage(
        "prompt tuning", config, "prompts", "prompts.safetensors", tune_prompts, resume
    )
    seconds["student"] = _run_stage(
        "FreeKD student", config, "student", "student.safetensors", distill, resume
    )
    _say("[demo] evaluating ...")
    evaluation_start = time.perf_counter()
    results = {role: evaluate_model(configs[role], job) for role, _, job in _ROWS}
    seconds["evaluation"] = round(time.perf_counter() - evaluation_start, 1)
    masks = visualize(config)
    teacher_steps = config.teacher.train.steps if not config.teacher.checkpoint else "given"
    rows = [
        {
            "name": name,
            "role": role,
            "architecture": _label(results[role]["arch"], results[role]["backbone"]),
            "parameters": results[role]["parameters"],
            "value": results[role]["value"],
            "steps": teacher_steps if role == "teacher" else config.student.train.steps,
            "seconds": seconds.get(role),
            "scores": results[role]["scores"],
        }
        for role, name, _ in _ROWS
    ]
    summary = {
        "task": config.task,
        "metric": PRIMARY_METRIC[config.task],
        "device": device,
        "val_images": results["student"]["images"],
        "rows": rows,
        "timings_s": seconds,
        "seconds": round(time.perf_counter() - start, 1),
        "masks": str(masks),
        "run_dir": str(run_dir),
        "command": " ".join(sys.argv),
    }
    summary["verdict"] = verdict(summary)
    chart = results_chart(summary, run_dir / "results.png")
    summary["chart"] = None if chart is None else str(chart)
    write_json(summary, run_dir / "metrics.json")
    return summary


def results_chart(summary: dict[str, Any], path: Path) -> Path | None:
    """A bar chart of the table's metric per model (PNG), or ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        _say("[demo] results.png skipped: matplotlib is not installed (pip install matplotlib)")
        return None
    rows = [row for row in summary["rows"] if row["value"] is not None]
    figure, axes = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    colors = ["0.55", "0.75", "tab:blue", "tab:green", "tab:orange"][: len(rows)]
    bars = axes.bar([row["name"] for row in rows], [row["value"] for row in rows], color=colors)
    axes.bar_label(bars, fmt="%.1f")
    axes.set_ylabel(f"{summary['metric']} (%)")
    axes.set_title(
        f"FreeKD demo: {summary['task']} on digits, {summary['val_images']} validation scenes, "
        f"one seed",
        fontsize=9,
    )
    axes.set_ylim(0, max(row["value"] for row in rows) * 1.15 + 1)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def default_run_dir(task: str) -> Path:
    """``runs/demo-<task>-<date>-<time>``: a fresh folder for each demo run."""
    return Path("runs") / f"demo-{task}-{datetime.now():%Y%m%d-%H%M%S}"
