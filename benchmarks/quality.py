"""Quality benchmark: does FreeKD beat the other distillation losses on the built-in digits?

For each task, one teacher (cached) and then the same student schedule with each method: no
distillation, FitNet MSE, CWD, MGD, FreeKD (paper and official presets) and, in the full preset,
the FreeKD ablations; several seeds. Writes into ``--out`` (default ``runs/quality``):

    <task>/teacher/                    the cached teacher (reused by every later run)
    <task>/<method>/seed<k>/           one pipeline run folder per student (prompts + student)
    results.json                       every score, the settings and the timings
    results.md                         mean +- std per method and task, the teacher, the verdicts
    results.png                        the same as a bar chart (needs matplotlib)

A finished run (its ``result.json``) is never redone, so a rerun only trains what is missing,
e.g. after adding a seed or a method. ``--robustness`` also scores the students (no distillation,
MSE, FreeKD paper and official) on corrupted images
(:func:`freekd.evaluation.evaluate_robustness`).

    .venv/bin/python benchmarks/quality.py --preset small        # ~1 h on a 2-core CPU
    .venv/bin/python benchmarks/quality.py --preset full         # + detection and ablations
    .venv/bin/python benchmarks/quality.py --preset cuda         # one data-centre GPU
    .venv/bin/python benchmarks/quality.py --preset small --methods none,freekd-paper --seeds 1
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from freekd.pipeline import distill, evaluate_model, train_baseline, train_teacher, tune_prompts
from freekd.pipeline.config import RunConfig, config_from_dict

# ----------------------------------------------------------------------------- settings

#: The settings v1 was measured on: the demo's settings of that time (PSPNet / RetinaNet on 64- and
#: 96-px digit scenes), kept here so that v1 stays reproducible after the demo moved on, with the
#: then-default stage-1 re-synthesis ``sum`` written out.
V1_SETTINGS: dict[str, dict[str, Any]] = {
    "segmentation": {
        "description": "FreeKD demo: digit-scene segmentation, PSPNet-R34 teacher -> "
        "PSPNet-R18 student, from scratch on a CPU",
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
                "optimizer": {"name": "adamw", "lr": 0.001, "weight_decay": 0.0001},
                "schedule": {"kind": "cosine", "min_lr": 1e-05},
            },
        },
        "student": {
            "arch": "pspnet",
            "backbone": "resnet18",
            "train": {
                "steps": 300,
                "optimizer": {"name": "adamw", "lr": 0.001, "weight_decay": 0.0001},
                "schedule": {"kind": "cosine", "min_lr": 1e-05},
            },
        },
        "prompts": {
            "steps": 40,
            "optimizer": {"name": "adam", "lr": 0.01, "weight_decay": 0.001},
            "schedule": {"kind": "cosine", "min_lr": 1e-06},
            "resynthesis": "sum",
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
                "schedule": {"kind": "cosine", "warmup_steps": 50, "min_lr": 5e-06},
            },
        },
        "student": {
            "arch": "retinanet",
            "backbone": "resnet18",
            "args": {"min_size": 96, "max_size": 96},
            "train": {
                "steps": 150,
                "optimizer": {"name": "adamw", "lr": 0.0005, "weight_decay": 0.0001},
                "schedule": {"kind": "cosine", "warmup_steps": 50, "min_lr": 5e-06},
            },
        },
        "prompts": {
            "steps": 40,
            "optimizer": {"name": "adam", "lr": 0.01, "weight_decay": 0.001},
            "schedule": {"kind": "cosine", "min_lr": 1e-06},
            "resynthesis": "sum",
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

#: What changes from :data:`V1_SETTINGS`: the v1 teachers (ResNet-50) and student schedules.
TASK_CHANGES: dict[str, dict[str, Any]] = {
    "segmentation": {
        "teacher": {"backbone": "resnet50", "train": {"steps": 800}},
        "student": {"backbone": "resnet18", "train": {"steps": 300}},
    },
    "detection": {
        "teacher": {"backbone": "resnet50", "train": {"steps": 400}},
        "student": {"backbone": "resnet18", "train": {"steps": 150}},
    },
}


def _merge(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _distill(**settings: Any) -> dict[str, Any]:
    """A method as a change to the run settings: ``distill`` keys (+ ``prompts`` changes)."""
    prompts = settings.pop("prompts", None)
    change: dict[str, Any] = {"distill": {"mu": 1.0, **settings}}
    if prompts is not None:
        change["prompts"] = prompts
    return change


#: Each method as a change to the run settings; ``None``: the student alone (baseline).
#: Loss weights are the published ones: CWD's segmentation setting (tau 4, weight 3), MGD's
#: alpha 2e-5 (mask ratio 0.75 for segmentation, 0.65 for detection), FreeKD and MSE weight 1.
MAIN_METHODS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "mse": _distill(method="mse"),
    "cwd": _distill(method="cwd", mu=3.0, method_args={"tau": 4.0}),
    "mgd": _distill(method="mgd", method_args={"alpha": 2e-5}),
    "freekd-paper": _distill(preset="paper"),
    "freekd-official": _distill(preset="official"),
}

#: FreeKD ablations, each the paper preset with one part changed.
ABLATIONS: dict[str, dict[str, Any]] = {
    "paper-no-masks": _distill(
        method="frequency", method_args={"relational": True, "include_low": False}
    ),
    "frequency-l1": _distill(method="frequency"),  # all bands, no masks, no channel weight
    "paper-no-relational": _distill(preset="paper", loss={"relational": False}),
    "paper-low-band": _distill(preset="paper", loss={"include_low": True}),
    "paper-T1": _distill(preset="paper", loss={"num_prompts": 1}),
    "paper-T6": _distill(preset="paper", loss={"num_prompts": 6}),
    "paper-level": _distill(preset="paper", loss={"granularity": "level"}),
    "paper-dice": _distill(preset="paper", loss={"dissimilarity": "dice"}),
}

#: What else could make FreeKD win: its weight, longer prompt tuning, more distilled layers.
INVESTIGATIONS: dict[str, dict[str, Any]] = {
    "paper-mu0.3": _distill(preset="paper", mu=0.3),
    "paper-mu3": _distill(preset="paper", mu=3.0),
    "paper-mu10": _distill(preset="paper", mu=10.0),
    "paper-prompts200": _distill(preset="paper", prompts={"steps": 200}),
    "high-bands-l1": _distill(method="frequency", method_args={"include_low": False}),
    "official-mu3": _distill(preset="official", mu=3.0),
    "official-low-band": _distill(preset="official", loss={"include_low": True}),
    "official+mse": _distill(preset="official", mse_weight=1.0),
    "paper-layer3+4": _distill(
        preset="paper",
        teacher_taps=["encoder.layer3", "encoder.layer4"],
        student_taps=["encoder.layer3", "encoder.layer4"],
    ),
}

#: Methods whose taps only the segmenters have.
SEGMENTATION_ONLY = {"paper-layer3+4"}

METHODS: dict[str, dict[str, Any] | None] = {
    **MAIN_METHODS,
    **{
        name: _merge({"distill": {"method": "freekd"}}, change)
        for name, change in ABLATIONS.items()
    },
    **INVESTIGATIONS,
}

PRESETS: dict[str, dict[str, Any]] = {
    # A 2-core CPU in about an hour: the demo's ResNet-34 teacher (a ResNet-50 PSPNet step at
    # output stride 8 costs ~2 s there, 800 of them alone would take half an hour).
    "small": {
        "tasks": ["segmentation"],
        "methods": list(MAIN_METHODS),
        "seeds": 2,
        "device": "cpu",
        "changes": {"teacher": {"backbone": "resnet34"}},
    },
    "full": {
        "tasks": ["segmentation", "detection"],
        "methods": list(METHODS),
        "seeds": 3,
        "device": "auto",
        "changes": {},
    },
    # One data-centre GPU: both tasks, the main methods, three seeds, the CPU schedules (steps
    # of a few ms each: the run is bound by start-up and evaluation). Estimated, not yet timed.
    "cuda": {
        "tasks": ["segmentation", "detection"],
        "methods": list(MAIN_METHODS),
        "seeds": 3,
        "device": "cuda",
        "changes": {},
    },
    # Seconds: checks that every path runs (the tests use it); its numbers mean nothing.
    "smoke": {
        "tasks": ["segmentation"],
        "methods": list(MAIN_METHODS),
        "seeds": 1,
        "device": "cpu",
        "changes": {
            "teacher": {"backbone": "resnet18", "train": {"steps": 2}},
            "student": {"train": {"steps": 2}},
            "prompts": {"steps": 2},
            "data": {
                "args": {"size": 32},
                "crop_size": 32,
                "train_args": {"length": 8},
                "val_args": {"length": 4},
                "batch_size": 2,
                "val_batch_size": 4,
            },
            "train": {"checkpoint_every_steps": 2, "log_every_steps": 1},
        },
    },
}

ROBUSTNESS_METHODS = ("none", "mse", "freekd-paper", "freekd-official")
METRIC = {"segmentation": "mIoU", "detection": "mAP"}
MIN_GAP = 5.0  # points the teacher must beat the undistilled student by

log = logging.getLogger("quality")


def task_settings(task: str, preset: str, device: str) -> dict[str, Any]:
    """The run settings (plain data) of ``task`` before the method and seed are chosen."""
    settings = _merge(V1_SETTINGS[task], TASK_CHANGES[task])
    settings = _merge(settings, PRESETS[preset]["changes"])
    settings["device"] = device
    settings["description"] = f"freekd quality benchmark: {task}"
    return settings


def method_config(
    settings: dict[str, Any], method: str, seed: int, run_dir: Path, teacher: Path
) -> RunConfig:
    """``settings`` with the cached ``teacher``, the ``seed`` and ``method``'s distill changes."""
    change = METHODS[method]
    data = _merge(settings, {"run_dir": str(run_dir), "seed": seed})
    data["teacher"]["checkpoint"] = str(teacher)
    if change is not None:
        data["distill"] = {"preset": "paper", "mu": 1.0, "projection": "auto"}
        if method == "mgd" and settings["task"] == "segmentation":
            change = _merge(change, {"distill": {"method_args": {"mask_ratio": 0.75}}})
        data = _merge(data, change)
    return config_from_dict(data, source=f"quality benchmark ({method})")


# ----------------------------------------------------------------------------- runs


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _write_json(data: Any, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def ensure_teacher(task: str, settings: dict[str, Any], out: Path) -> tuple[Path, float]:
    """Train (once) and score the task's teacher; the settings it was trained with are kept
    next to it and a later run with other teacher settings is refused."""
    run_dir = out / task
    config = config_from_dict(_merge(settings, {"run_dir": str(run_dir), "seed": 0}))
    weights = run_dir / "teacher" / "teacher.safetensors"
    record_path = run_dir / "teacher" / "benchmark_teacher.json"
    wanted = {"teacher": settings["teacher"], "data": settings["data"]}
    record = _read_json(record_path)
    if record is not None and weights.is_file():
        if record["settings"] != json.loads(json.dumps(wanted)):
            raise SystemExit(
                f"{weights} was trained with other teacher or data settings: delete "
                f"{run_dir / 'teacher'} to train a new one, or use another --out"
            )
        return weights, record["value"]
    log.info("[%s] training the teacher (%s steps)", task, settings["teacher"]["train"]["steps"])
    start = time.perf_counter()
    result = train_teacher(config, force=True)
    if not result.completed:
        raise SystemExit("the teacher job stopped before its last step")
    score = evaluate_model(config, "teacher")
    record = {
        "settings": wanted,
        "value": score["value"],
        "seconds": round(time.perf_counter() - start, 1),
    }
    _write_json(record, record_path)
    return weights, score["value"]


def run_student(
    task: str, settings: dict[str, Any], method: str, seed: int, out: Path, teacher: Path
) -> dict[str, Any]:
    """Train and score one student (cached in its folder's ``result.json``)."""
    run_dir = out / task / method / f"seed{seed}"
    cached = _read_json(run_dir / "result.json")
    if cached is not None:
        return cached
    config = method_config(settings, method, seed, run_dir, teacher)
    start = time.perf_counter()
    if METHODS[method] is None:
        jobs, role = [train_baseline], "baseline"
    elif config.distill.method == "freekd":
        jobs, role = [tune_prompts, distill], "student"
    else:
        jobs, role = [distill], "student"
    for job in jobs:
        result = job(config, force=True)
        if not result.completed:
            raise SystemExit(f"{task}/{method}/seed{seed}: {job.__name__} stopped early")
    score = evaluate_model(config, role)
    record = {
        "task": task,
        "method": method,
        "seed": seed,
        "value": score["value"],
        "scores": score["scores"],
        "seconds": round(time.perf_counter() - start, 1),
        "role": role,
        "weights": score["checkpoint"],
    }
    _write_json(record, run_dir / "result.json")
    return record


def robustness(
    task: str,
    settings: dict[str, Any],
    record: dict[str, Any],
    out: Path,
    teacher: Path,
    images: int | None,
) -> dict[str, Any]:
    """Clean metric, mPC and rPC of one student on corrupted validation images (cached)."""
    run_dir = out / task / record["method"] / f"seed{record['seed']}"
    path = run_dir / "robustness.json"
    cached = _read_json(path)
    if cached is not None:
        return cached
    config = method_config(settings, record["method"], record["seed"], run_dir, teacher)
    config.data.val_limit = images  # the first ``images`` validation scenes (None: all)
    score = evaluate_model(
        config,
        record["role"],
        output=run_dir / "robustness_metrics.json",
        corruptions="all",
        corruption_seed=0,  # the same corrupted images for every student
    )
    result = {key: score["robustness"][key] for key in ("clean", "mPC", "rPC", "per_corruption")}
    result["images"] = score["images"]
    _write_json(result, path)
    return result


# ----------------------------------------------------------------------------- report


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def verdict(method: dict[str, float], reference: dict[str, float], name: str) -> str:
    """Whether ``method`` beat ``reference``, by how much, and against the seeds' spread."""
    difference = method["mean"] - reference["mean"]
    word = "beats" if difference > 0 else "does not beat"
    if len(method["values"]) < 2 or len(reference["values"]) < 2:
        return f"{word} {name}: {difference:+.2f} (one seed: no spread measured)"
    spread = max(method["std"], reference["std"])
    size = "larger" if abs(difference) > spread else "not larger"
    return f"{word} {name}: {difference:+.2f} ({size} than the seed spread, std {spread:.2f})"


def summarise(records: list[dict[str, Any]], teachers: dict[str, float]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for task in teachers:
        rows: dict[str, dict[str, Any]] = {}
        for record in records:
            if record["task"] == task:
                rows.setdefault(record["method"], {"values": []})["values"].append(record["value"])
        for row in rows.values():
            row["mean"], row["std"] = mean_std(row["values"])
        summary[task] = {"teacher": teachers[task], "methods": rows}
    return summary


def markdown(summary: dict[str, Any], robust: dict[str, Any], header: str) -> str:
    lines = [header, ""]
    for task, data in summary.items():
        metric = METRIC[task]
        rows = data["methods"]
        seeds = max((len(r["values"]) for r in rows.values()), default=0)
        lines += [
            f"### {task} ({metric}, mean ± std over {seeds} seeds)",
            "",
            f"| method | {metric} | per seed | vs no distillation |",
            "|---|---|---|---|",
            f"| teacher | {data['teacher']:.2f} | | |",
        ]
        base = rows.get("none")
        for name, row in rows.items():
            delta = f"{row['mean'] - base['mean']:+.2f}" if base and name != "none" else ""
            per_seed = ", ".join(f"{v:.2f}" for v in row["values"])
            lines.append(
                f"| {name} | {row['mean']:.2f} ± {row['std']:.2f} | {per_seed} | {delta} |"
            )
        if base is not None:
            gap = data["teacher"] - base["mean"]
            ok = "enough" if gap >= MIN_GAP else f"LESS than {MIN_GAP}: nothing to distil"
            lines += ["", f"Teacher - undistilled student: {gap:.2f} points ({ok})."]
        for freekd in ("freekd-paper", "freekd-official"):
            if freekd not in rows:
                continue
            lines.append("")
            for other in ("none", "mse", "cwd", "mgd"):
                if other in rows:
                    lines.append(f"- {freekd} {verdict(rows[freekd], rows[other], other)}")
        if robust.get(task):
            lines += [
                "",
                f"Robustness ({metric} on the first --robustness-images validation scenes, "
                f"corrupted: 12 corruptions x severities 1-5, seed 0; mPC = mean over them, "
                f"rPC = 100 * mPC / clean):",
                "",
                "| method | clean | mPC | rPC |",
                "|---|---|---|---|",
            ]
            for name, values in robust[task].items():
                clean, mpc, rpc = (mean_std(values[k])[0] for k in ("clean", "mPC", "rPC"))
                lines.append(f"| {name} | {clean:.2f} | {mpc:.2f} | {rpc:.1f}% |")
        lines.append("")
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install matplotlib): no plot")
        return None
    figure, axes = plt.subplots(1, len(summary), figsize=(6 * len(summary), 4), squeeze=False)
    for axis, (task, data) in zip(axes[0], summary.items(), strict=True):
        names = list(data["methods"])
        means = [data["methods"][n]["mean"] for n in names]
        stds = [data["methods"][n]["std"] for n in names]
        axis.bar(range(len(names)), means, yerr=stds, capsize=4, color="tab:blue")
        axis.axhline(data["teacher"], color="tab:red", linestyle="--", label="teacher")
        axis.set_xticks(range(len(names)), names, rotation=45, ha="right")
        axis.set_ylabel(METRIC[task])
        axis.set_title(f"digits {task}")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--small", action="store_const", const="small", dest="preset")
    parser.add_argument("--out", type=Path, default=Path("runs/quality"))
    parser.add_argument("--tasks", help="comma-separated subset of the preset's tasks")
    parser.add_argument(
        "--methods",
        help=f"comma-separated, from: {', '.join(METHODS)}; or the groups main, "
        "ablations, investigations, all",
    )
    parser.add_argument("--seeds", type=int, help="seeds 0..N-1 (default: the preset's)")
    parser.add_argument("--device", help="cpu, cuda or auto (default: the preset's)")
    parser.add_argument("--robustness", action="store_true", help="also score on corruptions")
    parser.add_argument(
        "--robustness-images", type=int, default=100, help="validation scenes for --robustness"
    )
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    args.tasks = args.tasks.split(",") if args.tasks else preset["tasks"]
    groups = {
        "main": list(MAIN_METHODS),
        "ablations": list(ABLATIONS),
        "investigations": list(INVESTIGATIONS),
        "all": list(METHODS),
    }
    names = args.methods.split(",") if args.methods else preset["methods"]
    args.methods = [m for name in names for m in groups.get(name, [name])]
    args.seeds = args.seeds if args.seeds is not None else preset["seeds"]
    args.device = args.device or preset["device"]
    for name in args.methods:
        if name not in METHODS:
            parser.error(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    for task in args.tasks:
        if task not in TASK_CHANGES:
            parser.error(f"unknown task {task!r}; choose from {', '.join(TASK_CHANGES)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    records, teachers, robust = [], {}, {}
    for task in args.tasks:
        settings = task_settings(task, args.preset, args.device)
        teacher, teachers[task] = ensure_teacher(task, settings, args.out)
        log.info("[%s] teacher %s %.2f", task, METRIC[task], teachers[task])
        for seed in range(args.seeds):
            for method in args.methods:
                if task != "segmentation" and method in SEGMENTATION_ONLY:
                    continue
                record = run_student(task, settings, method, seed, args.out, teacher)
                log.info("[%s] %s seed %d: %.2f", task, method, seed, record["value"])
                records.append(record)
                if args.robustness and method in ROBUSTNESS_METHODS:
                    scores = robustness(
                        task, settings, record, args.out, teacher, args.robustness_images
                    )
                    row = robust.setdefault(task, {}).setdefault(method, {})
                    for key in ("clean", "mPC", "rPC"):
                        row.setdefault(key, []).append(scores[key])
    summary = summarise(records, teachers)
    hours = (time.perf_counter() - start) / 3600
    header = (
        f"Quality benchmark, preset {args.preset}, {args.seeds} seeds, on {machine()}, "
        f"torch {torch.__version__}; this invocation took {hours:.2f} h (cached runs excluded)."
    )
    text = markdown(summary, robust, header)
    (args.out / "results.md").write_text(text)
    _write_json(
        {
            "args": {k: str(v) for k, v in vars(args).items()},
            "summary": summary,
            "robustness": robust,
            "records": records,
        },
        args.out / "results.json",
    )
    picture = plot(summary, args.out / "results.png")
    print(text)
    print(
        f"written: {args.out / 'results.md'}, {args.out / 'results.json'}"
        + (f", {picture}" if picture else "")
    )
    return summary


if __name__ == "__main__":
    main()
