"""``freekd``: the command-line tool (train a teacher, tune prompts, distill, evaluate, export,
visualize, demo).

Every subcommand reads one YAML configuration (``--config``, a file or ``recipe:NAME`` for a
recipe shipped in the package, see ``docs/cli.md`` and ``freekd configs list``), changed on the
command line with ``--set key.sub=value``. The jobs themselves live
in :mod:`freekd.pipeline`; this module only parses the command line and reports errors: a
mistake the user can fix (a bad configuration value, a missing file, a run folder in use) is
printed as one line ``freekd: error: ...`` with exit status 2, in the command line's words
(:func:`cli_words`: ``--resume`` where the Python API says ``resume='last'``), anything else is
a bug and shows its traceback (``--debug`` shows it for every error). A Ctrl-C exits with 130,
a SIGTERM with 143, each after a checkpoint and one line saying how to resume. In a run of
several processes only rank 0 prints results and information.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import warnings
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from ._choices import ROLES, SPLITS
from ._recipes import copy_recipe, recipe_names, recipe_path, recipe_summary, resolve_config
from .losses.base import baseline_losses

__all__ = ["app", "cli_words", "main"]

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, as for a process that SIGTERM killed

app = typer.Typer(
    name="freekd",
    help=(
        "FreeKD knowledge distillation for detectors and segmenters.\n\n"
        "Typical project: train-teacher (or give teacher.checkpoint), tune-prompts, distill, "
        "evaluate, export. Each command takes a YAML config (-c FILE, or -c recipe:NAME for a "
        "shipped recipe: freekd configs list; docs/cli.md) and --set key.sub=value overrides. "
        "Start with: freekd demo --quick"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_STATE = {"debug": False}


class DemoTask(str, Enum):
    segmentation = "segmentation"
    detection = "detection"
    both = "both"


def _choice_enum(name: str, values: tuple[str, ...]) -> type[Enum]:
    """A ``str`` enum of ``values`` for a typer option (its help lists them in this order)."""
    return Enum(name, {value: value for value in values}, type=str)  # type: ignore[return-value]


Role = _choice_enum("Role", ROLES)
Split = _choice_enum("Split", SPLITS)


# ---------------------------------------------------------------------------- options

ConfigOption = Annotated[
    Path,
    typer.Option(
        "--config",
        "-c",
        help="YAML config of the run: a file (e.g. configs/coco_retinanet_r101_r50_paper.yaml) "
        "or recipe:NAME for a shipped recipe (freekd configs list).",
        show_default=False,
    ),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        metavar="KEY=VALUE",
        help="Override a config value, e.g. --set student.train.steps=500 --set data.batch_size=4 "
        "(values are read as YAML: 0.01, null, [1, 2]). Repeatable.",
        show_default=False,
    ),
]
RunDirOption = Annotated[
    Path | None,
    typer.Option(
        "--run-dir", "-o", help="Run folder (overrides run_dir of the config).", show_default=False
    ),
]
DeviceOption = Annotated[
    str | None,
    typer.Option(
        "--device",
        help="auto (a GPU when present), cpu or cuda (overrides device).",
        show_default=False,
    ),
]
ResumeOption = Annotated[
    bool,
    typer.Option("--resume", help="Continue this job from its last checkpoint in the run folder."),
]
ResumeFromOption = Annotated[
    Path | None,
    typer.Option(
        "--resume-from", help="Continue from this Lightning checkpoint (.ckpt).", show_default=False
    ),
]
ForceOption = Annotated[
    bool,
    typer.Option("--force", help="Clear the job's folder if it already holds a run."),
]


def _overrides(sets: list[str] | None, run_dir: Path | None, device: str | None) -> list[str]:
    overrides = list(sets or [])
    if run_dir is not None:
        overrides.append(f"run_dir={run_dir}")
    if device is not None:
        overrides.append(f"device={device}")
    return overrides


def _load(config: Path, sets: list[str] | None, run_dir: Path | None, device: str | None):
    from .pipeline.config import load_config

    return load_config(resolve_config(config), _overrides(sets, run_dir, device))


def _resume(resume: bool, resume_from: Path | None) -> str | None:
    """``--resume``: the job folder's last checkpoint, or a fresh start (said in the log) when
    the folder holds none yet (a run killed before its first checkpoint); ``--resume-from``:
    that file, which must exist."""
    if resume and resume_from is not None:
        raise ValueError("pass --resume or --resume-from, not both")
    if resume_from is not None:
        if not resume_from.is_file():
            raise FileNotFoundError(f"--resume-from {str(resume_from)!r} does not exist")
        return str(resume_from)
    return "auto" if resume else None


# ---------------------------------------------------------------------------- errors


def _raised_in_freekd(error: BaseException) -> bool:
    """Whether the innermost frame of ``error``'s traceback is freekd's own code (its
    messages are written for users) rather than a library's."""
    package = Path(__file__).resolve().parent
    traceback = error.__traceback__
    last = None
    while traceback is not None:
        last = traceback
        traceback = traceback.tb_next
    if last is None:
        return False
    try:
        return Path(last.tb_frame.f_code.co_filename).resolve().is_relative_to(package)
    except (OSError, ValueError):
        return False


_WORKER_ERROR = re.compile(r"^Caught (\w+) in DataLoader worker process \d+\.\s*Original Traceback")


def _worker_error(error: BaseException) -> tuple[str, bool] | None:
    """``(original message, raised in freekd)`` of an exception that a DataLoader worker raised
    and torch re-raised in the main process (its message holds the worker's traceback as text),
    ``None`` for any other exception."""
    text = str(error.args[0]) if error.args else ""
    if not _WORKER_ERROR.match(text):
        return None
    lines = [line for line in text.splitlines() if line.strip()]
    files = re.findall(r'File "([^"]+)", line \d+', text)
    package = Path(__file__).resolve().parent
    try:
        in_freekd = bool(files) and Path(files[-1]).resolve().is_relative_to(package)
    except (OSError, ValueError):
        in_freekd = False
    last = lines[-1].strip()
    message = last.split(": ", 1)[1] if ": " in last else last
    return message, in_freekd


def _is_user_error(error: BaseException) -> bool:
    from ._extras import MissingExtraError
    from .pipeline.schema import ConfigError

    if isinstance(
        error,
        ConfigError
        | MissingExtraError
        | FileNotFoundError
        | FileExistsError
        | NotADirectoryError
        | IsADirectoryError
        | PermissionError,
    ):
        return True
    try:
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        if isinstance(error, MisconfigurationException):
            return True
    except ImportError:  # pragma: no cover
        pass
    if isinstance(error, ModuleNotFoundError):  # an optional package, named with its extra
        return "pip install" in str(error) and _raised_in_freekd(error)
    if not isinstance(error, ValueError | TypeError | KeyError):
        return False
    worker = _worker_error(error)
    return worker[1] if worker is not None else _raised_in_freekd(error)


# The Python API's words in messages -> the command line's (the API keeps its own words).
_CLI_WORDS: tuple[tuple[str, str], ...] = (
    (r"resume='(?:last|auto)'", "--resume"),
    (r"force=True", "--force"),
    (r"choose another run_dir\b", "choose another --run-dir"),
    (r"nonfinite='skip'", "--set distill.nonfinite=skip"),
    (r"projection='auto'", "--set distill.projection=auto"),
    (
        r",? or pass max_(?:missing|unexpected)= to accept it",
        ": pass this model's own weights, or set the arch and backbone the file was saved with",
    ),
    (r"pass prefix= to choose", "pass a file that holds one model (e.g. a job's .safetensors)"),
    (r"save it again with FreeKDLoss\.save_prompts, or tune", "tune"),
    (r"start it without resuming", "start it without --resume / --resume-from"),
    (r"pass a larger tolerance=", "pass a larger --tolerance"),
)


def _option_words(text: str) -> str:
    """The part of :func:`cli_words` that needs no pipeline import (:data:`_CLI_WORDS`)."""
    for pattern, replacement in _CLI_WORDS:
        text = re.sub(pattern, replacement, text)
    return text


def cli_words(text: str) -> str:
    """``text`` (a message of the Python API) in the command line's words: ``--resume`` for
    ``resume='last'``, ``--force`` for ``force=True``, ``train.devices`` for
    ``TrainConfig.devices``, ``--set ...`` for keyword arguments, ... (:data:`_CLI_WORDS`)."""
    from .pipeline.config import TrainerSection

    text = _option_words(text)
    trainer_keys = "|".join(f.name for f in dataclasses.fields(TrainerSection))
    return re.sub(rf"\bTrainConfig\.({trainer_keys})\b", r"train.\1", text)


def _message(error: BaseException) -> str:
    worker = _worker_error(error)
    if worker is not None:
        text = worker[0]
    elif isinstance(error, KeyError) and error.args:
        text = str(error.args[0])
    else:
        text = str(error)
    return cli_words(" ".join(text.split()) or type(error).__name__)


def _rank_tag() -> str:
    """``" (rank N)"`` in a process of rank > 0 of a multi-process run, else ``""``."""
    from .train.runner import is_rank_zero

    if is_rank_zero():
        return ""
    rank = os.environ.get("RANK") or os.environ.get("LOCAL_RANK") or "?"
    return f" (rank {rank})"


def _echo(text: str) -> None:
    """Print a result line: on the process of rank 0 only (every process of a multi-process
    run gets to the end of the job)."""
    from .train.runner import is_rank_zero

    if is_rank_zero():
        typer.echo(text)


def _run(job: Callable[[], Any]) -> Any:
    """Run ``job``; user errors -> one line on stderr and exit status 2; a Ctrl-C (130) or a
    SIGTERM (143) -> one line saying where it stopped and how to resume."""
    from .train.runner import StoppedBySignal, is_rank_zero

    try:
        _quiet_libraries()
        return job()
    except StoppedBySignal as stopped:  # every process stops: rank 0 says so
        if is_rank_zero():
            typer.echo(f"freekd: {cli_words(stopped.message)}", err=True)
        raise typer.Exit(EXIT_TERMINATED) from None
    except KeyboardInterrupt as interrupt:
        detail = f": {_message(interrupt)}" if str(interrupt) else ""
        if is_rank_zero():
            typer.echo(f"freekd: interrupted{detail}", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except Exception as error:
        if _STATE["debug"] or not _is_user_error(error):
            raise
        typer.echo(f"freekd: error{_rank_tag()}: {_message(error)}", err=True)
        raise typer.Exit(EXIT_USER_ERROR) from None


def _quiet_libraries() -> None:
    """Keep the output readable: freekd's messages, Lightning's warnings only."""
    from .train.progress import ConsoleHandler  # information on stdout, warnings on stderr

    freekd_logger = logging.getLogger("freekd")
    if not freekd_logger.handlers and not logging.getLogger().handlers:
        freekd_logger.addHandler(ConsoleHandler())
    from .train.runner import is_rank_zero

    # The other processes of a multi-process run repeat what rank 0 says: warnings only.
    freekd_logger.setLevel(logging.INFO if is_rank_zero() else logging.WARNING)
    import lightning.pytorch  # noqa: F401  (it sets its loggers' levels when imported)

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for message in (
        r".*isinstance\(treespec, LeafSpec\).*",
        r".*does not have many workers.*",
        r".*number of training batches .* is smaller than the logging interval.*",
        r".*does not have a deterministic implementation.*",
    ):
        warnings.filterwarnings("ignore", message=message)


# ---------------------------------------------------------------------------- commands


def _print_version(value: bool) -> None:
    """``--version``: print the version and exit, before the command is looked for (so that
    ``freekd --version`` alone works)."""
    if value:
        from ._version import __version__

        typer.echo(f"freekd {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the full traceback of every error.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            help="Print the version and exit.",
            is_eager=True,
            expose_value=False,
            callback=_print_version,
        ),
    ] = False,
) -> None:
    """FreeKD knowledge distillation for detectors and segmenters."""
    _STATE["debug"] = debug or os.environ.get("FREEKD_DEBUG", "") not in ("", "0")


def _report(result: Any) -> None:
    from .pipeline.jobs import job_summary

    _echo(job_summary(result))


def _run_training_job(
    name: str,
    config: Path,
    sets: list[str] | None,
    run_dir: Path | None,
    device: str | None,
    resume: bool,
    resume_from: Path | None,
    force: bool,
) -> None:
    """Run the training job ``freekd.pipeline.jobs.<name>`` on the loaded configuration."""

    def job() -> None:
        from .pipeline import jobs
        from .pipeline.builders import check_devices

        cfg = _load(config, sets, run_dir, device)
        check_devices(cfg)  # before any data is read or any process started
        run = getattr(jobs, name)
        _report(run(cfg, resume=_resume(resume, resume_from), force=force))

    _run(job)


def _distill_help() -> str:
    """The ``distill`` command's help; the baselines are the registered losses but FreeKD."""
    return (
        "Stage 2: distill the student from the frozen teacher with the tuned prompts.\n\n"
        "Objective: student task loss + distill.mu * FreeKD (+ distill.mse_weight * feature MSE "
        "+ distill.head_weight * SmoothL1 on the box-regression heads, the official recipe's "
        "extra terms), or with distill.method a baseline loss instead of FreeKD "
        f"({', '.join(baseline_losses())}: no prompts needed). Uses student.{{arch, backbone, "
        "args, train}. Writes run_dir/student_freekd/ (student_<method>/ for a baseline) with "
        "checkpoints, logs and student.safetensors (the student alone)."
    )


@app.command("train-teacher")
def train_teacher_command(
    config: ConfigOption,
    sets: SetOption = None,
    run_dir: RunDirOption = None,
    device: DeviceOption = None,
    resume: ResumeOption = False,
    resume_from: ResumeFromOption = None,
    force: ForceOption = False,
) -> None:
    """Train the teacher on its own task loss (when you have no trained teacher).

    Uses teacher.{arch, backbone, args, train} and data; writes run_dir/teacher/ with
    checkpoints, logs and teacher.safetensors (what tune-prompts and distill then load). Not
    needed when teacher.checkpoint points to trained weights.
    """

    _run_training_job("train_teacher", config, sets, run_dir, device, resume, resume_from, force)


@app.command("tune-prompts")
def tune_prompts_command(
    config: ConfigOption,
    sets: SetOption = None,
    run_dir: RunDirOption = None,
    device: DeviceOption = None,
    resume: ResumeOption = False,
    resume_from: ResumeFromOption = None,
    force: ForceOption = False,
) -> None:
    """Stage 1: tune the frequency prompts on the frozen teacher.

    Needs the teacher's weights (teacher.checkpoint, or run_dir/teacher/teacher.safetensors).
    The prompt settings (T, granularity, ...) come from distill.preset and distill.loss, the
    schedule from prompts.{steps, optimizer, schedule}. Writes run_dir/prompts/prompts.safetensors.
    """

    _run_training_job("tune_prompts", config, sets, run_dir, device, resume, resume_from, force)


@app.command("distill", help=_distill_help())
def distill_command(
    config: ConfigOption,
    sets: SetOption = None,
    run_dir: RunDirOption = None,
    device: DeviceOption = None,
    resume: ResumeOption = False,
    resume_from: ResumeFromOption = None,
    force: ForceOption = False,
    baseline: Annotated[
        bool,
        typer.Option(
            "--baseline",
            help="Train the student on its task loss alone instead "
            "(the baseline to compare with), into run_dir/student_baseline.",
        ),
    ] = False,
) -> None:
    """Stage 2 (the help text is :func:`_distill_help`, which lists the registered losses)."""
    name = "train_baseline" if baseline else "distill"
    _run_training_job(name, config, sets, run_dir, device, resume, resume_from, force)


def _severities(text: str) -> list[int]:
    """``"1,3,5"`` -> ``[1, 3, 5]``; anything but integers 1..5 is a user error."""
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        levels = []
    if not levels or any(not 1 <= level <= 5 for level in levels):
        raise ValueError(
            f"--severities {text!r}: give integers 1..5 separated by commas, e.g. 1,2,3,4,5"
        )
    return levels


@app.command("evaluate")
def evaluate_command(
    config: ConfigOption,
    sets: SetOption = None,
    run_dir: RunDirOption = None,
    device: DeviceOption = None,
    model: Annotated[
        Role,
        typer.Option(
            "--model",
            "-m",
            help="Which model of the run: its architecture (teacher "
            "or student section) and its default weights.",
        ),
    ] = Role.student,
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            "--checkpoint",
            help="Weights to score instead of the run's: .safetensors, "
            ".pt, or a job's Lightning .ckpt.",
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            help="Metrics JSON (default: <job folder>/metrics.json).",
            show_default=False,
        ),
    ] = None,
    corruptions: Annotated[
        str | None,
        typer.Option(
            "--corruptions",
            help="Also score corrupted copies of the validation set: 'all' (12 corruptions: "
            "noise, blur, brightness/contrast/fog, JPEG/pixelate/elastic) or names separated "
            "by commas, e.g. gaussian_noise,fog. Adds clean, mPC and rPC to the JSON.",
            show_default=False,
        ),
    ] = None,
    severities: Annotated[
        str,
        typer.Option(
            "--severities", help="Corruption severities to average, from 1..5, e.g. 1,3,5."
        ),
    ] = "1,2,3,4,5",
    corruption_seed: Annotated[
        int | None,
        typer.Option(
            "--corruption-seed",
            help="Seed of the random corruptions (default: the config's seed).",
            show_default=False,
        ),
    ] = None,
    coco_backend: Annotated[
        str,
        typer.Option(
            "--coco-backend",
            help="Detection: who computes COCO AP: auto (faster-coco-eval when installed, "
            "else pycocotools), faster_coco_eval or pycocotools (same numbers).",
        ),
    ] = "auto",
) -> None:
    """Score a teacher or student on the validation set: mIoU (segmentation) or COCO box AP
    (detection), in percent. Prints the result and writes it as JSON. With --corruptions, also
    its robustness: the mean score over corruptions and severities (mPC) and mPC / clean (rPC)."""

    def job() -> None:
        from .pipeline.jobs import evaluate_model

        levels = _severities(severities)
        cfg = _load(config, sets, run_dir, device)
        result = evaluate_model(
            cfg,
            model.value,
            checkpoint,
            output,
            corruptions=corruptions,
            severities=levels,
            corruption_seed=corruption_seed,
            coco_backend=coco_backend,
        )
        typer.echo(
            f"{result['role']} {result['arch']}/{result['backbone']} "
            f"({result['parameters'] / 1e6:.1f} M parameters) on {result['images']} images: "
            f"{result['metric']} = {result['value']:.2f}"
        )
        from .pipeline.jobs import score_tables

        for table in score_tables(result):  # per class, per corruption: with headers
            typer.echo(table)
        typer.echo(f"metrics: {result['output']}")

    _run(job)


def _export_line(result: Path, export_format: str, cfg: Any) -> str:
    """What ``freekd export`` prints about the file or folder it wrote."""
    model = f"{cfg.student.arch}/{cfg.student.backbone}"
    if export_format == "safetensors":
        return f"student weights: {result} (loads with strict=True into {model})"
    if export_format == "hf":
        return (
            f"student folder: {result} (config.json, model.safetensors, README.md, "
            f"run_config.yaml; reload offline with freekd.pipeline.from_pretrained)"
        )
    import json

    from .pipeline.jobs import onnx_record

    record_path = onnx_record(result)
    record = json.loads(record_path.read_text(encoding="utf-8"))
    return (
        f"student ONNX: {result} ({record['exporter']} exporter, opset {record['opset']}); "
        f"onnxruntime vs PyTorch max abs difference {record['max_abs_diff']:.3g} "
        f"(tolerance {record['tolerance']:g}) on {record['compared']}; record: {record_path}"
    )


@app.command("export")
def export_command(
    config: ConfigOption,
    sets: SetOption = None,
    run_dir: RunDirOption = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            "--checkpoint",
            help="Lightning checkpoint of a distill run (default: "
            "run_dir/student_freekd/checkpoints/last.ckpt).",
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            help="Where to write the student (default: for safetensors the student.safetensors "
            "that distill wrote at that step, else <job folder>/exported/<checkpoint name>"
            ".safetensors; <...>_hf/ for hf; <...>.onnx for onnx).",
            show_default=False,
        ),
    ] = None,
    baseline: Annotated[
        bool, typer.Option("--baseline", help="Export from the baseline run instead.")
    ] = False,
    export_format: Annotated[
        str,
        typer.Option(
            "--format",
            help="safetensors (the state dict), hf (a folder: config.json, model.safetensors, "
            "a model card README.md; freekd.pipeline.from_pretrained reloads it) or onnx "
            "(checked against PyTorch with onnxruntime; pip install 'freekd[onnx]').",
        ),
    ] = "safetensors",
    tolerance: Annotated[
        float | None,
        typer.Option(
            "--tolerance",
            help="onnx: the largest accepted max abs difference between onnxruntime's and "
            "PyTorch's outputs on the first validation image (default 1e-3).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Write the student alone (no teacher, prompts or projections) from a distillation
    checkpoint: as safetensors (it loads with strict=True into the plain model, checked), as a
    Hugging Face style folder with a model card (--format hf, reloaded as a check), or as ONNX
    (--format onnx: segmenters with torch.export, torchvision detectors with the TorchScript
    exporter; onnxruntime's outputs checked against PyTorch's)."""

    def job() -> None:
        from ._checks import check_choice
        from ._choices import EXPORT_FORMATS
        from .pipeline.jobs import export

        check_choice("export format (--format)", export_format, EXPORT_FORMATS)
        if tolerance is not None and export_format != "onnx":
            raise ValueError("--tolerance sets the ONNX check: use it with --format onnx")
        checked = {} if tolerance is None else {"tolerance": tolerance}
        cfg = _load(config, sets, run_dir, None)
        role = "baseline" if baseline else "student"
        path = export(cfg, checkpoint, output, role, export_format, **checked)
        typer.echo(_export_line(path, export_format, cfg))

    _run(job)


@app.command("visualize")
def visualize_command(
    config: ConfigOption,
    sets: SetOption = None,
    run_dir: RunDirOption = None,
    device: DeviceOption = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            "--checkpoint", help="Teacher weights (default: the run's teacher).", show_default=False
        ),
    ] = None,
    prompts: Annotated[
        Path | None,
        typer.Option(
            "--prompts", help="Prompt file (default: the run's tuned prompts).", show_default=False
        ),
    ] = None,
    index: Annotated[int, typer.Option("--index", help="Which image of the split.")] = 0,
    split: Annotated[
        Split, typer.Option("--split", help="Data split to take it from.")
    ] = Split.val,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", help="PNG to write (default: run_dir/masks.png).", show_default=False
        ),
    ] = None,
) -> None:
    """Draw the learned frequency masks over an input image (PNG): one row per distilled
    layer; columns: the image, the low band, each wavelet level (mean over the prompts), then
    each prompt's mask of the finest level."""

    def job() -> None:
        from .pipeline.jobs import visualize

        cfg = _load(config, sets, run_dir, device)
        path = visualize(cfg, checkpoint, prompts, output, index, split.value)
        typer.echo(f"masks: {path}")

    _run(job)


@app.command("demo")
def demo_command(
    task: Annotated[
        DemoTask,
        typer.Option("--task", help="segmentation (default, the faster one), detection, or both."),
    ] = DemoTask.segmentation,
    quick: Annotated[
        bool, typer.Option("--quick", help="Fewer steps and images: under 3 minutes on a CPU.")
    ] = False,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="YAML merged over the built-in demo settings, a file or recipe:NAME "
            "(recipe:digits_demo_<task> holds them).",
            show_default=False,
        ),
    ] = None,
    sets: SetOption = None,
    run_dir: Annotated[
        Path | None,
        typer.Option(
            "--run-dir",
            "-o",
            help="Run folder (default: runs/demo-<task>-<time>).",
            show_default=False,
        ),
    ] = None,
    device: DeviceOption = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue an interrupted demo in --run-dir.")
    ] = False,
    force: ForceOption = False,
) -> None:
    """Run the whole pipeline on the built-in digit scenes and print a table.

    Trains a teacher, a student alone and students distilled with MSE and MGD, tunes the
    prompts, distills a FreeKD student with the same settings, and scores the five (mIoU or COCO
    AP, parameter counts). CPU by default, a GPU when present. The run folder holds config.yaml,
    metrics.json, masks.png and teacher/, student_baseline/, student_mse/, student_mgd/,
    prompts/, student_freekd/ with logs and checkpoints. About 12
    minutes on a 2-core CPU for segmentation (--quick: under 3).
    """

    def job() -> None:
        from .pipeline.builders import check_devices
        from .pipeline.demo import DEMO_TASKS, default_run_dir, demo_config, format_table, run_demo

        if resume and run_dir is None:
            raise ValueError("--resume needs --run-dir: the folder of the demo to continue")
        tasks = list(DEMO_TASKS) if task is DemoTask.both else [task.value]
        configs = []
        for name in tasks:
            base = run_dir if run_dir is not None else default_run_dir(task.value)
            folder = base / name if len(tasks) > 1 else base
            overrides = _overrides(sets, None, device)
            merged = resolve_config(config) if config is not None else None
            configs.append(demo_config(name, quick, merged, overrides, run_dir=folder))
        for cfg in configs:
            check_devices(cfg)  # before any stage starts
        summaries = [run_demo(cfg, force=force, resume=resume) for cfg in configs]
        for summary in summaries:
            _echo("")
            _echo(format_table(summary))
            chart = ", results.png" if summary.get("chart") else ""
            _echo(f"run folder: {summary['run_dir']} (metrics.json, masks.png{chart}, config.yaml)")

    _run(job)


# ---------------------------------------------------------------------------- recipes

configs_app = typer.Typer(
    help="The recipes shipped with freekd: list, show or copy them (or pass -c recipe:NAME).",
    no_args_is_help=True,
)
app.add_typer(configs_app, name="configs")

RecipeName = Annotated[
    str,
    typer.Argument(
        help="Recipe name, e.g. digits_demo_segmentation (freekd configs list).", show_default=False
    ),
]


def _recipe_job(job: Callable[[], None]) -> None:
    """Run a recipe command: a wrong name or an existing file -> one line, exit status 2 (no
    pipeline import: these commands take milliseconds)."""
    try:
        job()
    except (FileNotFoundError, FileExistsError, IsADirectoryError, PermissionError) as error:
        if _STATE["debug"]:
            raise
        typer.echo(f"freekd: error: {_option_words(str(error))}", err=True)
        raise typer.Exit(EXIT_USER_ERROR) from None


@configs_app.command("list")
def configs_list_command() -> None:
    """List the shipped recipes: name and what each runs."""
    names = recipe_names()
    width = max(len(name) for name in names)
    for name in names:
        typer.echo(f"{name:{width}s}  {recipe_summary(name)}")


@configs_app.command("show")
def configs_show_command(name: RecipeName) -> None:
    """Print a shipped recipe."""
    _recipe_job(lambda: typer.echo(recipe_path(name).read_text(encoding="utf-8"), nl=False))


@configs_app.command("copy")
def configs_copy_command(
    name: RecipeName,
    destination: Annotated[
        str | None,
        typer.Argument(
            help="File or folder to copy it to (default: NAME.yaml here).", show_default=False
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Copy a shipped recipe to edit it (then pass the copy with -c)."""
    _recipe_job(lambda: typer.echo(f"copied: {copy_recipe(name, destination, force)}"))


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``freekd`` script."""
    app(args=argv, prog_name="freekd")


if __name__ == "__main__":  # pragma: no cover
    main()
