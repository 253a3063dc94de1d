"""The student as a Hugging Face style folder, and :func:`from_pretrained` to rebuild it offline.

A folder written by :func:`save_pretrained` (what ``freekd export --format hf`` writes)::

    config.json         what rebuilds the plain model: task, arch, backbone, num_classes, the
                        builder arguments (``model_args``), the input it takes, freekd's version
    model.safetensors   the student's state dict (nothing else; loads with strict=True)
    README.md           the model card: teacher, distillation settings, scores, how to reload
    run_config.yaml     the run's whole configuration (to reproduce it with the freekd command)

``from_pretrained(folder)`` builds the architecture named by ``config.json`` with
:func:`freekd.models.build_model` (no download: the settings that only chose initial weights,
such as ``weights_backbone``, are kept apart under ``initialization`` and not used) and loads
``model.safetensors`` into it with ``strict=True``. The folder can be uploaded as it is to the
Hugging Face hub; reloading takes a local folder (``huggingface_hub.snapshot_download`` fetches
one).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._io import atomic_write
from .._version import __version__
from ..checkpoints import export_student, read_safetensors_file
from .config import RunConfig, dump_config

__all__ = [
    "CARD_FILE",
    "CONFIG_FILE",
    "HF_FORMAT",
    "INITIALIZATION_ARGS",
    "RUN_CONFIG_FILE",
    "WEIGHTS_FILE",
    "from_pretrained",
    "model_card",
    "pretrained_config",
    "read_pretrained_config",
    "rebuild_args",
    "save_pretrained",
]

HF_FORMAT = "freekd-hf/1"
"""The ``format`` of ``config.json``; :func:`from_pretrained` refuses any other."""

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
RUN_CONFIG_FILE = "run_config.yaml"

INITIALIZATION_ARGS = ("weights_backbone", "encoder_weights", "progress")
"""Builder arguments that only choose or fetch initial weights: the exported weights replace
them, so they are recorded in ``config.json`` but not used to rebuild."""

_REQUIRED = {
    "format": str,
    "task": str,
    "arch": str,
    "backbone": str,
    "num_classes": int,
    "model_args": dict,
}
_EXPORT_HINT = "export one with freekd export --format hf"


# ---------------------------------------------------------------------------- config.json


def rebuild_args(task: str, args: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(model_args, initialization)``: the builder ``args`` of a run's model section split
    into what rebuilds the architecture and what only chose its initial weights
    (:data:`INITIALIZATION_ARGS`).

    A detector built with ``weights_backbone`` defaults to ``FrozenBatchNorm2d`` and 3 trainable
    ResNet stages (:func:`freekd.models.detection.build_detector`); those defaults are written
    out in ``model_args`` so that the rebuilt model has the same layers without the weights.
    """
    model_args = {k: v for k, v in args.items() if k not in INITIALIZATION_ARGS}
    initialization = {k: v for k, v in args.items() if k in INITIALIZATION_ARGS}
    if task == "detection" and initialization.get("weights_backbone") is not None:
        model_args.setdefault("frozen_bn", True)
        model_args.setdefault("trainable_backbone_layers", 3)
    return model_args, initialization


def pretrained_config(
    config: RunConfig,
    role: str,
    num_classes: int,
    image_size: tuple[int, int],
    class_names: list[str] | None = None,
    source: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``config.json`` of the student of ``config`` (``role``: ``student`` or
    ``baseline``): what :func:`from_pretrained` rebuilds it from, and the input it takes
    (``image_size``: ``(H, W)`` of the validation images it was exported with)."""
    from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD

    section = config.student
    model_args, initialization = rebuild_args(config.task, section.args)
    if config.task == "segmentation":
        normalize = (
            {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
            if config.data.normalize
            else None
        )
        model_input = {
            "images": "[N, 3, H, W] float, values in [0, 1] before normalization",
            "normalize": normalize,
            "image_size": list(image_size),
            "output": "logits [N, num_classes, H, W]",
        }
    else:
        model_input = {
            "images": "list of [3, H, W] float in [0, 1], any size (the model resizes and "
            "normalizes them itself)",
            "normalize": None,
            "image_size": list(image_size),
            "output": "eval mode: one {boxes [D, 4] (x1, y1, x2, y2 pixels), scores [D], "
            "labels [D] in 1..num_classes} per image",
        }
    return {
        "format": HF_FORMAT,
        "library_name": "freekd",
        "freekd_version": __version__,
        "task": config.task,
        "arch": section.arch,
        "backbone": section.backbone,
        "num_classes": num_classes,
        "model_args": model_args,
        "initialization": initialization,
        "class_names": class_names,
        "input": model_input,
        "role": role,
        "source": dict(source or {}),
    }


def _check_fields(data: Any, path: Path) -> dict[str, Any]:
    """``data`` (the parsed ``config.json``) when it is a freekd export's, else ``ValueError``."""
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not an object: {_EXPORT_HINT}")
    found = data.get("format")
    if found != HF_FORMAT:
        said = f"its format is {found!r}" if found is not None else "it has no 'format'"
        raise ValueError(
            f"{path} is not a config.json of freekd's export ({said}, expected {HF_FORMAT!r}): "
            f"{_EXPORT_HINT}, or read it with the library that wrote it"
        )
    for key, kind in _REQUIRED.items():
        if not isinstance(data.get(key), kind) or (kind is int and isinstance(data[key], bool)):
            raise ValueError(
                f"{path}: {key!r} must be a {kind.__name__}, found {data.get(key)!r}: "
                f"{_EXPORT_HINT} again"
            )
    return data


def read_pretrained_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The checked ``config.json`` of an exported folder.

    Raises:
        FileNotFoundError: ``folder`` or its ``config.json`` does not exist.
        ValueError: ``config.json`` is not valid JSON, not freekd's (``format``), or lacks a
            field (each names the file and the fix).
    """
    folder = Path(folder)
    if not folder.is_dir():
        kind = "is a file" if folder.exists() else "does not exist"
        raise FileNotFoundError(
            f"{str(folder)!r} {kind}: pass the folder that freekd export --format hf wrote"
        )
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(folder)!r} is not a freekd export (it has no {CONFIG_FILE}): {_EXPORT_HINT}"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}): {_EXPORT_HINT} again") from None
    return _check_fields(data, path)


# ---------------------------------------------------------------------------- reload


def _fit_problems(model: nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    """What keeps ``state`` from loading strictly into ``model`` ('' when nothing)."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    shapes = [
        f"{key} {tuple(state[key].shape)} vs {tuple(value.shape)}"
        for key, value in expected.items()
        if key in state and state[key].shape != value.shape
    ]
    parts = [
        f"{label} {len(items)} ({', '.join(items[:2])}{', ...' if len(items) > 2 else ''})"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes))
        if items
    ]
    return "; ".join(parts)


def from_pretrained(folder: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """The plain student model of an exported folder (:func:`save_pretrained`), in eval mode.

    Builds ``config.json``'s architecture with :func:`freekd.models.build_model` (offline: no
    initial weights are fetched) and loads ``model.safetensors`` with ``strict=True``. The model
    takes what ``config.json``'s ``input`` says (segmenters: normalized ``[N, 3, H, W]`` ->
    logits ``[N, K, H, W]``; detectors: a list of ``[3, H, W]`` images in ``[0, 1]``).

    Raises:
        FileNotFoundError: the folder, its ``config.json`` or ``model.safetensors`` is missing.
        ValueError: ``config.json`` is not freekd's or names a model that does not exist, or the
            weights do not fit the model it names (one line naming the file and the fix).

    Example:
        >>> from freekd.pipeline.hub import from_pretrained  # doctest: +SKIP
        >>> model = from_pretrained("runs/mine/student_freekd/exported/last_hf")  # doctest: +SKIP
    """
    from ..models import build_model

    info = read_pretrained_config(folder)
    config_path = Path(folder) / CONFIG_FILE
    weights = Path(folder) / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(
            f"{str(Path(folder))!r} has {CONFIG_FILE} but no {WEIGHTS_FILE}: {_EXPORT_HINT} again"
        )
    try:
        spec = build_model(
            info["task"], info["arch"], info["backbone"], info["num_classes"], **info["model_args"]
        )
    except (TypeError, ValueError) as error:
        raise ValueError(f"{config_path}: {error}") from None
    state, _ = read_safetensors_file(weights, "exported weights")
    problems = _fit_problems(spec.model, state)
    if problems:
        raise ValueError(
            f"{weights} does not fit the {info['task']} model {info['arch']}/{info['backbone']} "
            f"with {info['num_classes']} classes that {CONFIG_FILE} names ({problems}): "
            f"{_EXPORT_HINT} again instead of editing {CONFIG_FILE}"
        )
    spec.model.load_state_dict(state, strict=True)
    return spec.model.to(device).eval()


# ---------------------------------------------------------------------------- writing


def _check_target(folder: Path) -> None:
    """Refuse a non-empty ``folder`` that is not an earlier export (its files would mix)."""
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{str(folder)!r} is a file: give a folder for the export")
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    try:
        read_pretrained_config(folder)
    except (FileNotFoundError, ValueError):
        raise FileExistsError(
            f"{str(folder)!r} holds other files (it is no freekd export): choose a new or "
            f"empty folder"
        ) from None


def save_pretrained(
    model: nn.Module,
    folder: str | os.PathLike,
    info: Mapping[str, Any],
    card: str,
    config: RunConfig,
) -> Path:
    """Write ``folder`` (module docstring): ``info`` as ``config.json`` (see
    :func:`pretrained_config`), ``model``'s state dict as ``model.safetensors``, ``card`` as
    ``README.md`` and ``config`` as ``run_config.yaml``, each file atomically. An existing
    export in ``folder`` is replaced; a folder with other files is refused. Returns the folder."""
    folder = Path(folder)
    _check_target(folder)
    keys = ("task", "arch", "backbone", "num_classes", "role")
    metadata = {key: info[key] for key in keys} | {"args": info["model_args"]}
    export_student(model, folder / WEIGHTS_FILE, metadata)
    text = json.dumps(dict(info), indent=2) + "\n"
    atomic_write(folder / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    atomic_write(folder / CARD_FILE, lambda tmp: Path(tmp).write_text(card, encoding="utf-8"))
    dump_config(config, folder / RUN_CONFIG_FILE)
    return folder


# ---------------------------------------------------------------------------- model card


_PIPELINE_TAGS = {"segmentation": "image-segmentation", "detection": "object-detection"}


def _front_matter(task: str) -> list[str]:
    tag = "semantic-segmentation" if task == "segmentation" else "object-detection"
    return [
        "---",
        "library_name: freekd",
        f"pipeline_tag: {_PIPELINE_TAGS[task]}",
        f"tags: [knowledge-distillation, freekd, {tag}]",
        "---",
        "",
    ]


def _distillation_lines(config: RunConfig, role: str, mu: float | None) -> list[str]:
    """The card's "Distillation" section: the teacher and the settings of stage 1 and 2."""
    if role == "baseline":
        return [
            "## Training",
            "",
            "Trained on its own task loss alone, without a teacher (`freekd distill --baseline`: "
            "the baseline that distilled students are compared with).",
            "",
        ]
    settings, teacher = config.distill, config.teacher
    weight = f"{settings.mu}" if settings.mu != "auto" else "auto"
    if settings.mu == "auto" and mu is not None:
        weight = f"auto (calibrated to {mu:.4g})"
    rows = [
        ("teacher", f"{teacher.arch}/{teacher.backbone}"),
        ("teacher weights", teacher.checkpoint or "trained by freekd train-teacher"),
        ("method", settings.method),
        ("preset", settings.preset if settings.method == "freekd" else "-"),
        ("loss overrides", json.dumps(settings.loss if settings.method == "freekd" else {})),
        ("method arguments", json.dumps(settings.method_args)),
        ("weight mu", weight),
        ("projection", settings.projection),
        ("teacher taps", ", ".join(settings.teacher_taps or []) or "the model's default"),
        ("student taps", ", ".join(settings.student_taps or []) or "the model's default"),
        ("spatial MSE weight", f"{settings.mse_weight:g}"),
        ("head SmoothL1 weight", f"{settings.head_weight:g}"),
        ("student steps", str(config.student.train.steps)),
    ]
    if settings.method == "freekd":
        prompts = config.prompts
        rows += [
            ("prompt tuning steps", str(prompts.steps)),
            ("prompt re-synthesis", prompts.resynthesis),
            ("dissimilarity weight", f"{prompts.dissimilarity_weight:g}"),
        ]
    return [
        "## Distillation",
        "",
        f"Distilled from the teacher {teacher.arch}/{teacher.backbone} with `{settings.method}`"
        f"{' (FreeKD, arXiv 2311.12079)' if settings.method == 'freekd' else ''}.",
        "",
        "| setting | value |",
        "| --- | --- |",
        *[f"| {name} | {value} |" for name, value in rows],
        "",
    ]


def _score_lines(metrics: Mapping[str, Any] | None, checkpoint: str, role: str) -> list[str]:
    """The card's "Scores" section from a job's ``metrics.json`` (``freekd evaluate``)."""
    if not metrics or "value" not in metrics:
        return [
            "## Scores",
            "",
            f"Not evaluated: run `freekd evaluate --model {role}` before exporting to list the "
            f"scores here.",
            "",
        ]
    lines = [
        "## Scores",
        "",
        f"{metrics.get('metric', 'score')} = {metrics['value']:.2f} on {metrics.get('images', '?')}"
        f" validation images (`freekd evaluate`, from `metrics.json`).",
    ]
    evaluated = str(metrics.get("checkpoint", ""))
    if evaluated and Path(evaluated).name != Path(checkpoint).name:
        lines.append(
            f"These are the scores of `{evaluated}`; the weights here come from `{checkpoint}`."
        )
    scores = metrics.get("scores")
    if isinstance(scores, Mapping):
        plain = {k: v for k, v in scores.items() if isinstance(v, int | float)}
        if plain:
            lines += ["", "| score | value |", "| --- | --- |"]
            lines += [f"| {name} | {value:.4g} |" for name, value in plain.items()]
    robustness = metrics.get("robustness")
    if isinstance(robustness, Mapping) and "mPC" in robustness:
        summary = f"mPC {robustness['mPC']:.2f}, rPC {robustness.get('rPC', float('nan')):.1f}%"
        lines += ["", f"Corruption robustness: {summary}."]
    return [*lines, ""]


def _usage_lines(info: Mapping[str, Any], config: RunConfig, role: str) -> list[str]:
    """The card's "Use" and "Reproduce" sections (the jobs that made the model, in order)."""
    inputs = info["input"]
    distill = "freekd distill -c run_config.yaml -o runs/again" + (
        " --baseline" if role == "baseline" else ""
    )
    steps = [distill]
    if role == "student":
        prompts = ["freekd tune-prompts -c run_config.yaml -o runs/again"]
        teacher = (
            []
            if config.teacher.checkpoint
            else ["freekd train-teacher -c run_config.yaml -o runs/again"]
        )
        steps = [*teacher, *(prompts if config.distill.method == "freekd" else []), distill]
    flag = " --baseline" if role == "baseline" else ""
    normalize = inputs.get("normalize")
    normalized = (
        f", normalized with mean {normalize['mean']} and std {normalize['std']}"
        if normalize
        else ""
    )
    height, width = inputs["image_size"]
    return [
        "## Use",
        "",
        "```python",
        "from freekd.pipeline import from_pretrained",
        "",
        'model = from_pretrained("path/to/this/folder")  # offline; eval mode',
        "```",
        "",
        f"Input: {inputs['images']}{normalized}; exported at {height}x{width}. Output: "
        f"{inputs['output']}. The plain model's `state_dict` is `model.safetensors`; "
        f"`config.json` names its architecture.",
        "",
        "## Reproduce",
        "",
        "`run_config.yaml` holds the run's settings:",
        "",
        "```sh",
        *steps,
        f"freekd export -c run_config.yaml -o runs/again --format hf{flag}",
        "```",
        "",
    ]


def model_card(
    info: Mapping[str, Any],
    config: RunConfig,
    metrics: Mapping[str, Any] | None = None,
    mu: float | None = None,
    parameters: int | None = None,
) -> str:
    """The ``README.md`` of an exported folder: what the model is (``info``: its
    ``config.json``), how it was trained or distilled (``config``; ``mu``: the weight that
    ``mu: auto`` chose), its scores (``metrics``: the job's ``metrics.json``), how to reload and
    reproduce it."""
    role = str(info.get("role", "student"))
    name = f"{info['arch']}/{info['backbone']}"
    size = f", {parameters / 1e6:.2f} M parameters" if parameters is not None else ""
    source = info.get("source", {})
    checkpoint = str(source.get("checkpoint", ""))
    step = f" (step {source['step']})" if source.get("step") is not None else ""
    run = f" Run: {config.description}" if config.description else ""
    what = "student distilled with freekd" if role == "student" else "baseline student (freekd)"
    lines = [
        *_front_matter(info["task"]),
        f"# {name}: {what}",
        "",
        f"A {info['task']} model, {name} with {info['num_classes']} classes{size}, exported by "
        f"freekd {info['freekd_version']} from `{checkpoint}`{step}.{run}",
        "",
        *_distillation_lines(config, role, mu),
        *_score_lines(metrics, checkpoint, role),
        *_usage_lines(info, config, role),
    ]
    return "\n".join(lines)
