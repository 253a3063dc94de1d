"""Every input a user can get wrong raises one clear line: what is wrong, where, and the fix;
no setting, signal or file makes the tool silently do something else.

Each case in ``CASES`` builds the bad input (files under ``tmp_path``), asserts the exception
type and that the message names the offending thing and the fix (regular expressions on its key
words), and that it is one line. ``CLI_CASES`` run the real ``freekd`` command (in this process,
or as a subprocess where a signal or a fresh process matters) on a tiny project (a PSPNet-R34
teacher trained 2 steps, prompts tuned 4 steps, on 32-pixel digit scenes): exit status, one
line on stderr, no traceback, the fix in the command line's words. The corrupt-file sweep feeds
every file type the command line reads, truncated and garbled, to every subcommand that reads
it. ``python tests/test_bad_input.py`` prints both tables of messages.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from freekd import FreeKDLoss
from freekd.distill import Distiller
from freekd.pipeline.schema import ConfigError
from freekd.taps import TapError
from freekd.wavelets import dwt2, idwt2
from tests.conftest import task_loss

# ---------------------------------------------------------------------------- helpers


class Net(nn.Module):
    """``[N, 3, 16, 16]`` -> 2 logits. ``a``: ``[N, w, 16, 16]``, ``b``: ``[N, w, 8, 8]``,
    ``pooled``: ``[N, w]`` (not a map), ``text``: returns a string (not a tensor)."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, width, 3, padding=1)
        self.b = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.pooled = nn.Flatten(1)
        self.text = Text()
        self.head = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feature = self.b(self.a(x))
        self.text(feature)
        return self.head(self.pooled(feature.mean((2, 3), keepdim=True)))


class Text(nn.Module):
    def forward(self, x: torch.Tensor) -> str:
        return "not a tensor"


BATCH = (torch.randn(2, 3, 16, 16), torch.zeros(2, dtype=torch.long))
X = torch.randn(2, 4, 8, 8)


def distiller(teacher_taps, student_taps, teacher_width=4, student_width=4, **kwargs):
    channels = kwargs.pop("channels", [teacher_width] * len(teacher_taps))
    return Distiller(
        Net(teacher_width),
        Net(student_width),
        teacher_taps,
        student_taps,
        {"freekd": FreeKDLoss(channels)},
        task_loss,
        BATCH,
        **kwargs,
    )


def prompt_file(tmp_path: Path) -> Path:
    return FreeKDLoss([4, 4]).save_prompts(tmp_path / "prompts.safetensors")


def config_file(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(
        "task: segmentation\nteacher: {arch: pspnet, backbone: resnet50}\n"
        "student: {arch: pspnet, backbone: resnet18}\n" + extra
    )
    return path


def load(path: Path) -> None:
    from freekd.pipeline.config import load_config

    load_config(path)


def coco(tmp_path: Path, images: list[dict], write_images: bool = True, image_bytes=None) -> Path:
    """A COCO folder: ``images/`` and ``instances.json`` with one box per listed image."""
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    for entry in images if write_images else []:
        path = folder / entry["file_name"]
        if image_bytes is not None:
            path.write_bytes(image_bytes)
        else:
            Image.new("RGB", (entry["width"], entry["height"])).save(path)
    annotations = [
        {"id": i + 1, "image_id": e["id"], "category_id": 1, "bbox": [1, 1, 4, 4], "iscrowd": 0}
        for i, e in enumerate(images)
    ]
    document = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "digit"}],
    }
    (tmp_path / "instances.json").write_text(json.dumps(document))
    return tmp_path


IMAGE = {"id": 1, "file_name": "a.png", "width": 8, "height": 8}


def coco_item(tmp_path: Path, **kwargs) -> None:
    from freekd.data import CocoDetection

    root = coco(tmp_path, [IMAGE], **kwargs)
    CocoDetection(root / "images", root / "instances.json")[0]


def coco_dataset(tmp_path: Path, images: list[dict]) -> None:
    from freekd.data import CocoDetection

    root = coco(tmp_path, images)
    CocoDetection(root / "images", root / "instances.json")


def segmentation_folder(tmp_path: Path, make_folders: bool) -> None:
    from freekd.data import SegmentationFolder

    if make_folders:
        (tmp_path / "images").mkdir()
        (tmp_path / "masks").mkdir()
    SegmentationFolder(tmp_path, num_classes=3)


def used_run_folder(tmp_path: Path) -> None:
    from freekd.train.runner import _prepare_run_dir

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").mkdir()
    _prepare_run_dir(tmp_path / "run", resuming=False, force=False)


def resume_without_checkpoint(tmp_path: Path) -> None:
    from freekd.train.runner import resolve_resume

    resolve_resume("last", tmp_path / "run")


# ---------------------------------------------------------------------------- the cases


@dataclass
class Case:
    """``make(tmp_path)`` must raise ``error`` with a message matching every pattern."""

    name: str
    make: Callable[[Path], object]
    error: type[BaseException]
    patterns: tuple[str, ...]


CASES = [
    # -- features
    Case(
        "feature lists of different lengths (loss)",
        lambda _: FreeKDLoss([4, 4])([X, X], [X]),
        ValueError,
        (r"distills 2 layers", r"2 student and 1 teacher features"),
    ),
    Case(
        "taps yielding different feature counts (distiller)",
        lambda _: distiller(["a", "b"], ["b"]),
        ValueError,
        (r"student taps \['b'\] yield 1", r"teacher taps \['a', 'b'\] yield 2", "one to one"),
    ),
    Case(
        "non-4-D feature (loss)",
        lambda _: FreeKDLoss([4, 4])([X, X[0]], [X, X[0]]),
        ValueError,
        (r"layer 1: student feature", r"\[N, C, H, W\]", r"\(4, 8, 8\)", r"feature\[None\]"),
    ),
    Case(
        "non-4-D feature (tapped layer)",
        lambda _: distiller(["pooled"], ["pooled"]),
        ValueError,
        (r"layer 0", r"must be \[N, C, H, W\]", r"\(2, 4\)", r"tap layers that output maps"),
    ),
    Case(
        "non-4-D input to dwt2",
        lambda _: dwt2(X[0]),
        ValueError,
        (r"dwt2 expects a 4-D tensor \[N, C, H, W\]", r"\(4, 8, 8\)", r"x\[None\]"),
    ),
    Case(
        "empty feature (a size of 0)",
        lambda _: FreeKDLoss([4])([X[:0]], [X[:0]]),
        ValueError,
        (r"layer 0", r"\(0, 4, 8, 8\) are empty", "non-empty batch"),
    ),
    Case(
        "integer feature",
        lambda _: FreeKDLoss([4])([X.long()], [X.long()]),
        TypeError,
        (r"layer 0: student feature must be floating point", "int64", r"\.float\(\)"),
    ),
    Case(
        "student and teacher shapes differ (loss)",
        lambda _: FreeKDLoss([4])([X[..., :4, :4]], [X]),
        ValueError,
        (r"student feature \(2, 4, 4, 4\) differs from teacher", "projection='auto'"),
    ),
    Case(
        "channel mismatch with projection='none'",
        lambda _: distiller(["b"], ["b"], teacher_width=8, projection="none"),
        ValueError,
        (r"\(2, 4, 8, 8\) and teacher \(2, 8, 8, 8\)", "projection='none'", "projection='auto'"),
    ),
    Case(
        "grid mismatch with projection='none'",
        lambda _: distiller(["b"], ["a"], projection="none"),
        ValueError,
        (r"\(2, 4, 16, 16\) and teacher \(2, 4, 8, 8\)", "projection='auto'"),
    ),
    Case(
        "loss built for other channels",
        lambda _: distiller(["b"], ["b"], channels=[8])(BATCH),
        ValueError,
        (r"features have 4 channels", r"built for 8", r"pass channels=\[4\]"),
    ),
    Case(
        "tap name that does not exist",
        lambda _: distiller(["bb"], ["b"]),
        TapError,
        (r"tap 'bb'", r"no submodule 'bb'", r"closest: \['b'\]"),
    ),
    Case(
        "tap whose output is not a tensor",
        lambda _: distiller(["text"], ["b"]),
        TapError,
        (r"tap 'text'", r"returned str", r"needs a tensor, a list/tuple of tensors or a dict"),
    ),
    # -- settings
    Case(
        "T < 1",
        lambda _: FreeKDLoss([4], num_prompts=0),
        ValueError,
        (r"num_prompts \(T\) must be an integer >= 1, got 0",),
    ),
    Case(
        "levels < 1 (loss)",
        lambda _: FreeKDLoss([4], levels=0),
        ValueError,
        (r"levels must be an integer >= 1, got 0",),
    ),
    Case(
        "levels < 1 (dwt2)",
        lambda _: dwt2(X, levels=-1),
        ValueError,
        (r"levels must be an integer >= 1, got -1",),
    ),
    Case(
        "unknown wavelet",
        lambda _: FreeKDLoss([4], wavelet="haarr"),
        ValueError,
        (r"unknown wavelet 'haarr'", r"use one of db1, db2, db3, db4, haar"),
    ),
    Case(
        "non-orthogonal wavelet",
        lambda _: dwt2(X, 1, "bior2.2"),
        ValueError,
        (r"'bior2.2' is not orthogonal", r"such as 'haar', 'db2'"),
    ),
    Case(
        "unknown preset",
        lambda _: FreeKDLoss.preset("papr", [4]),
        ValueError,
        (r"unknown preset 'papr'", r"choose one of 'paper', 'official'"),
    ),
    Case(
        "unknown granularity",
        lambda _: FreeKDLoss([4], granularity="bands"),
        ValueError,
        (r"unknown granularity 'bands'", r"choose one of 'level', 'band'"),
    ),
    Case(
        "unknown dissimilarity",
        lambda _: FreeKDLoss([4], dissimilarity="iou"),
        ValueError,
        (r"unknown dissimilarity 'iou'", r"choose one of 'jaccard', 'dice'"),
    ),
    Case(
        "unknown non-finite policy",
        lambda _: distiller(["b"], ["b"], nonfinite="ignore"),
        ValueError,
        (r"unknown nonfinite 'ignore'", r"'raise', 'skip', 'off'"),
    ),
    # -- transforms
    Case(
        "integer input to dwt2",
        lambda _: dwt2(torch.ones(1, 1, 4, 4, dtype=torch.long)),
        TypeError,
        (r"floating-point tensor, got torch.int64", r"x.float\(\)"),
    ),
    Case(
        "idwt2 given a tensor instead of (low, highs)",
        lambda _: idwt2(X),
        ValueError,
        (r"idwt2 takes the pair \(low, highs\) that dwt2 returned", r"\(2, 4, 8, 8\)"),
    ),
    Case(
        "idwt2 given bands of different dtypes",
        lambda _: idwt2((torch.randn(1, 1, 2, 2), [torch.randn(1, 1, 3, 2, 2).double()])),
        TypeError,
        (r"torch.float32\) and detail bands \(torch.float64\) differ", "one dtype"),
    ),
    # -- prompt checkpoints
    Case(
        "prompt checkpoint made for other channels",
        lambda tmp: FreeKDLoss([8, 4]).load_prompts(prompt_file(tmp)),
        ValueError,
        (r"prompts.safetensors", r"channels: file \[4, 4\], loss \[8, 4\]", "tune prompts"),
    ),
    Case(
        "prompt checkpoint made for another T",
        lambda tmp: FreeKDLoss([4, 4], num_prompts=3).load_prompts(prompt_file(tmp)),
        ValueError,
        (r"num_prompts: file 2, loss 3", "build the loss with the file's settings"),
    ),
    Case(
        "prompt checkpoint that does not exist",
        lambda tmp: FreeKDLoss([4]).load_prompts(tmp / "nope.safetensors"),
        FileNotFoundError,
        (r"nope.safetensors' does not exist", r"tune prompts \(stage 1\) or fix the path"),
    ),
    # -- configuration files
    Case(
        "config: unknown key",
        lambda tmp: load(config_file(tmp, "distill: {mue: 2}\n")),
        ConfigError,
        (r"run.yaml: distill.mue: unknown key", r"did you mean 'mu'\?"),
    ),
    Case(
        "config: wrong type",
        lambda tmp: load(config_file(tmp, "distill: {mu: lots}\n")),
        ConfigError,
        (r"run.yaml: distill.mu: expected a number or 'auto', got 'lots'",),
    ),
    Case(
        "config: missing required value",
        lambda tmp: load(_without_backbone(config_file(tmp, ""))),
        ConfigError,
        (r"run.yaml: teacher.backbone: missing: this setting is required",),
    ),
    # -- data
    Case(
        "missing annotation file",
        lambda tmp: _coco_paths(tmp, annotations=False),
        FileNotFoundError,
        (r"COCO annotation file not found: .*instances.json", "pass the path of the instances"),
    ),
    Case(
        "missing image folder",
        lambda tmp: _coco_paths(tmp, images=False),
        FileNotFoundError,
        (r"COCO image folder not found: .*images", "pass the folder that holds the images"),
    ),
    Case(
        "unreadable image",
        lambda tmp: coco_item(tmp, image_bytes=b"this is not a PNG"),
        ValueError,
        (r"cannot read image .*a.png", r"re-export it as PNG or JPEG"),
    ),
    Case(
        "annotation pointing to a missing image",
        lambda tmp: coco_item(tmp, write_images=False),
        FileNotFoundError,
        (r"image 'a.png' \(image id 1\) listed in .*instances.json not found", "check image_dir"),
    ),
    Case(
        "empty data set",
        lambda tmp: coco_dataset(tmp, []),
        ValueError,
        (r"instances.json: the data set is empty", r"'images' list is empty", "check the file"),
    ),
    Case(
        "missing segmentation folder",
        lambda tmp: segmentation_folder(tmp / "nowhere", make_folders=False),
        FileNotFoundError,
        (r"data set folder not found: .*nowhere", r"expected .*images/NAME.png"),
    ),
    Case(
        "empty segmentation folder",
        lambda tmp: segmentation_folder(tmp, make_folders=True),
        ValueError,
        (r"SegmentationFolder: no images", r"data set is empty", "put the images there"),
    ),
    # -- runs
    Case(
        "run folder already used (no force)",
        used_run_folder,
        FileExistsError,
        (r"run folder .*run' already holds a run", "resume='last'", "force=True"),
    ),
    Case(
        "resume with no checkpoint",
        resume_without_checkpoint,
        FileNotFoundError,
        (r"cannot resume from .*last.ckpt", "no such checkpoint file"),
    ),
]


def _without_backbone(path: Path) -> Path:
    path.write_text(
        path.read_text().replace("{arch: pspnet, backbone: resnet50}", "{arch: pspnet}")
    )
    return path


def _coco_paths(tmp_path: Path, images: bool = True, annotations: bool = True) -> None:
    from freekd.data import CocoDetection

    if images:
        (tmp_path / "images").mkdir()
    if annotations:
        (tmp_path / "instances.json").write_text("{}")
    CocoDetection(tmp_path / "images", tmp_path / "instances.json")


def raised(case: Case, tmp_path: Path) -> BaseException:
    with pytest.raises(case.error) as caught:
        case.make(tmp_path)
    return caught.value


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_one_clear_line(case: Case, tmp_path: Path):
    error = raised(case, tmp_path)
    message = str(error.args[0]) if isinstance(error, KeyError) else str(error)
    assert "\n" not in message.strip(), f"more than one line: {message!r}"
    for pattern in case.patterns:
        assert re.search(pattern, message), f"{pattern!r} not in {message!r}"


# ---------------------------------------------------------------------------- command line


def cli(*args: str):
    from typer.testing import CliRunner

    from freekd.cli import app

    return CliRunner().invoke(app, list(args))


def assert_one_line_exit_2(result, *patterns: str) -> None:
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert "\n" not in message and message.startswith("freekd: error: "), message
    assert "Traceback" not in result.output
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not in {message!r}"


def test_cli_missing_data_path(tmp_path):
    data = "{name: segmentation-folder, args: {root: nowhere, num_classes: 3}, crop_size: 32}"
    path = config_file(tmp_path, f"data: {data}\n")
    result = cli("train-teacher", "-c", str(path), "--run-dir", str(tmp_path / "run"))
    assert_one_line_exit_2(result, r"data set folder not found: nowhere", r"expected nowhere/")


def test_cli_unknown_dataset_argument(tmp_path):
    path = config_file(tmp_path, "data: {name: digits, args: {sise: 32}, crop_size: 32}\n")
    result = cli("train-teacher", "-c", str(path), "--run-dir", str(tmp_path / "run"))
    assert_one_line_exit_2(result, r"dataset 'digits'", r"sise", r"it takes \[")


def test_cli_misspelt_preset_names_the_key_and_file(tmp_path):
    path = config_file(tmp_path, "distill: {preset: offical}\n")
    result = cli("distill", "-c", str(path), "--run-dir", str(tmp_path / "run"))
    assert_one_line_exit_2(result, r"distill.preset", r"did you mean 'official'", str(path))


def test_cli_resume_from_a_missing_checkpoint(tmp_path):
    path = config_file(tmp_path, "data: {crop_size: 32}\n")
    missing = tmp_path / "gone.ckpt"
    result = cli("train-teacher", "-c", str(path), "--resume-from", str(missing))
    assert_one_line_exit_2(result, r"--resume-from .*gone.ckpt' does not exist")


# ---------------------------------------------------------------------------- a tiny project

REPO = Path(__file__).resolve().parents[1]
FREEKD = [sys.executable, "-m", "freekd.cli"]
TINY = """\
task: segmentation
run_dir: {run_dir}
device: cpu
data:
  name: digits
  args: {{size: 32, max_digits: 2, digit_scale: [0.4, 0.7]}}
  train_args: {{length: 8}}
  val_args: {{length: 4}}
  batch_size: 2
  val_batch_size: 4
  crop_size: 32
  hflip_prob: 0.0
teacher:
  arch: pspnet
  backbone: resnet34
  train: {{steps: 2, optimizer: {{name: adamw, lr: 0.001}}}}
student:
  arch: pspnet
  backbone: resnet18
  train: {{steps: 2, optimizer: {{name: adamw, lr: 0.001}}}}
prompts: {{steps: 4}}
train: {{checkpoint_every_steps: 1, keep_checkpoints: 2, log_every_steps: 1, logger: null}}
"""


@dataclass
class Project:
    """A run folder where ``train-teacher`` (2 steps) and ``tune-prompts`` (4 steps, cosine)
    ran on the tiny config: its files, for the cases to misuse."""

    folder: Path
    config: Path
    run_dir: Path
    teacher: Path  # teacher/teacher.safetensors (PSPNet-R34, with its metadata)
    prompts: Path  # prompts/prompts.safetensors
    teacher_ckpt: Path  # teacher/checkpoints/last.ckpt
    prompts_ckpt: Path  # prompts/checkpoints/last.ckpt

    def config_with(self, folder: Path, extra: str = "") -> Path:
        """The tiny config with the settings of the YAML text ``extra`` merged over it (a data
        set's ``args`` replaced), running into ``folder/run``."""
        import yaml

        folder.mkdir(parents=True, exist_ok=True)
        base = yaml.safe_load(TINY.format(run_dir=folder / "run"))
        path = folder / "run.yaml"
        path.write_text(yaml.safe_dump(_merged(base, yaml.safe_load(extra) or {})))
        return path


_REPLACED = {("data", "args"), ("data", "train_args"), ("data", "val_args")}


def _merged(base: dict, update: dict, path: tuple[str, ...] = ()) -> dict:
    merged = dict(base)
    for key, value in update.items():
        inner = (*path, key)
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and inner not in _REPLACED:
            merged[key] = _merged(merged[key], value, inner)
        else:
            merged[key] = value
    return merged


def make_project(folder: Path) -> Project:
    folder.mkdir(parents=True, exist_ok=True)
    run_dir = folder / "run"
    config = folder / "tiny.yaml"
    config.write_text(TINY.format(run_dir=run_dir))
    for command in ("train-teacher", "tune-prompts"):
        result = invoke(command, "-c", config)
        assert result.exit_code == 0, result.output
    return Project(
        folder,
        config,
        run_dir,
        run_dir / "teacher" / "teacher.safetensors",
        run_dir / "prompts" / "prompts.safetensors",
        run_dir / "teacher" / "checkpoints" / "last.ckpt",
        run_dir / "prompts" / "checkpoints" / "last.ckpt",
    )


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Project:
    return make_project(tmp_path_factory.mktemp("project"))


def invoke(*args):
    """The command line in this process (typer's runner): the result with ``stderr``."""
    from typer.testing import CliRunner

    from freekd.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback: the test fails with it
    return result


@contextlib.contextmanager
def captured_log() -> Iterator[list[str]]:
    """The messages freekd logs inside the block (its warnings and information)."""
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Collect(level=logging.INFO)
    freekd_logger = logging.getLogger("freekd")
    freekd_logger.addHandler(handler)
    try:
        yield records
    finally:
        freekd_logger.removeHandler(handler)


@contextlib.contextmanager
def offline(folder: Path) -> Iterator[None]:
    """No network: torch's hub cache is an empty folder and every download fails as it does
    without a network connection."""
    import urllib.error

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    previous, real = os.environ.get("TORCH_HOME"), torch.hub.download_url_to_file
    os.environ["TORCH_HOME"] = str(folder / "torch-home")
    torch.hub.download_url_to_file = no_network
    try:
        yield
    finally:
        torch.hub.download_url_to_file = real
        if previous is None:
            os.environ.pop("TORCH_HOME", None)
        else:
            os.environ["TORCH_HOME"] = previous


@dataclass
class Outcome:
    """What one command did: exit status, the line that reports it, everything it printed."""

    exit_code: int
    line: str
    output: str


def in_process(*args) -> Outcome:
    result = invoke(*args)
    return Outcome(result.exit_code, result.stderr.strip(), result.output)


def truncated(path: Path, keep: float = 0.5) -> Path:
    """A copy of ``path`` cut after ``keep`` of its bytes."""
    data = path.read_bytes()
    target = path.with_name(f"truncated-{path.name}")
    target.write_bytes(data[: max(1, int(len(data) * keep))])
    return target


def garbled(path: Path, seed: int = 0) -> Path:
    """A file of ``path``'s name and size holding random bytes."""
    size = max(64, path.stat().st_size)
    target = path.with_name(f"garbled-{path.name}")
    target.write_bytes(random.Random(seed).randbytes(size))
    return target


# ---------------------------------------------------------------------------- the command line


@dataclass
class CliCase:
    """One row of the command line's table: ``run(project, folder)`` -> :class:`Outcome`,
    which must exit with ``exit_code``, report in one line matching ``patterns`` and show none
    of ``absent`` (the Python API's words, a traceback)."""

    row: str
    name: str
    run: Callable[[Project, Path], Outcome]
    patterns: tuple[str, ...]
    exit_code: int = 2
    absent: tuple[str, ...] = ("Traceback", "resume='last'", "force=True", "max_missing=")
    gpu_free: bool = False  # the case assumes a machine without GPU


def _recipe_devices(project: Project, folder: Path) -> Outcome:
    sets = ["--set", "train.devices=8", "--set", "train.strategy=ddp", "--device", "auto"]
    return in_process("tune-prompts", "-c", project.config_with(folder), *sets)


def _evaluate_other_weights(weights: Callable[[Project], Path]):
    def run(project: Project, folder: Path) -> Outcome:
        args = ["-c", project.config, "-m", "student", "--checkpoint", weights(project)]
        return in_process("evaluate", *args, "--output", folder / "metrics.json")

    return run


def _sigterm_during_tune_prompts(project: Project, folder: Path) -> Outcome:
    """``freekd tune-prompts`` in its own process, sent SIGTERM once training runs."""
    config = project.config_with(folder, "prompts: {steps: 500, file: null}\n")
    run_dir = folder / "run"
    (run_dir / "teacher").mkdir(parents=True)
    (run_dir / "teacher" / "teacher.safetensors").write_bytes(project.teacher.read_bytes())
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [*FREEKD, "tune-prompts", "-c", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
        cwd=folder,
    )
    last = run_dir / "prompts" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 180
    while not last.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    lines = [line for line in stderr.splitlines() if line.strip()]
    done = (run_dir / "prompts" / "prompts.safetensors").exists()
    output = stdout + stderr + ("\nprompts.safetensors written" if done else "")
    return Outcome(process.returncode, lines[-1] if lines else "", output)


def _resume_other_job(project: Project, folder: Path) -> Outcome:
    config = project.config_with(
        folder,
        f"teacher: {{checkpoint: {project.teacher}}}\nprompts: {{file: {project.prompts}}}\n",
    )
    return in_process("distill", "-c", config, "--resume-from", project.teacher_ckpt)


def _broken_teacher_checkpoint(project: Project, folder: Path) -> Outcome:
    config = project.config_with(
        folder, f"teacher: {{checkpoint: {truncated(_copy(project.teacher, folder))}}}\n"
    )
    return in_process("tune-prompts", "-c", config)


def _copy(path: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / path.name
    target.write_bytes(path.read_bytes())
    return target


def _evaluate_broken(project: Project, folder: Path) -> Outcome:
    broken = truncated(_copy(project.teacher, folder))
    return in_process("evaluate", "-c", project.config, "-m", "teacher", "--checkpoint", broken)


def _resume_from_broken(project: Project, folder: Path) -> Outcome:
    broken = truncated(_copy(project.prompts_ckpt, folder))
    config = project.config_with(folder, f"teacher: {{checkpoint: {project.teacher}}}\n")
    return in_process("tune-prompts", "-c", config, "--resume-from", broken)


def _text_file_as_weights(project: Project, folder: Path) -> Outcome:
    folder.mkdir(parents=True, exist_ok=True)
    text = folder / "teacher.pt"
    text.write_text("these are not weights\n")
    return in_process("evaluate", "-c", project.config, "-m", "teacher", "--checkpoint", text)


def _corrupt_image_in_a_worker(project: Project, folder: Path) -> Outcome:
    """A corrupt image read by a DataLoader worker process (torch re-raises its error with
    the worker's traceback as text)."""
    image = _in_place(garbled)(_segmentation_folder(folder)[0])
    extra = _data_folder(project, image).replace("data: {", "data: {num_workers: 1, ")
    config = project.config_with(folder, extra)
    return in_process("evaluate", "-c", config, "-m", "teacher")


def _offline_backbone(project: Project, folder: Path) -> Outcome:
    config = project.config_with(folder)
    with offline(folder):
        return in_process(
            "distill",
            "--baseline",
            "-c",
            config,
            "--set",
            "student.args.weights_backbone=IMAGENET1K_V1",
        )


def _resume_before_first_checkpoint(project: Project, folder: Path) -> Outcome:
    """What a run SIGKILLed before its first checkpoint leaves, then ``--resume``."""
    config = project.config_with(folder, "teacher: {train: {steps: 1}}\n")
    job = folder / "run" / "teacher"
    (job / "checkpoints").mkdir(parents=True)
    (job / "logs" / "version_0").mkdir(parents=True)
    (job / "config.yaml").write_text(config.read_text())
    with captured_log() as log:
        result = invoke("train-teacher", "-c", config, "--resume")
    said = [m for m in log if "no checkpoint" in m]
    return Outcome(result.exit_code, said[0] if said else "", result.output + "\n".join(log))


def _resume_with_other_steps(project: Project, folder: Path) -> Outcome:
    # The project's prompts ran 4 steps of a cosine schedule; resume them for 30.
    return in_process("tune-prompts", "-c", project.config, "--resume", "--set", "prompts.steps=30")


def _used_run_folder(project: Project, folder: Path) -> Outcome:
    return in_process("train-teacher", "-c", project.config)


def _missing_coco_image(project: Project, folder: Path) -> Outcome:
    root = coco(folder, [IMAGE, {**IMAGE, "id": 2, "file_name": "b.png"}])
    (root / "images" / "b.png").unlink()
    data = {"image_dir": str(root / "images"), "annotation_file": str(root / "instances.json")}
    config = folder / "detection.yaml"
    config.write_text(
        "task: detection\n"
        f"run_dir: {folder / 'run'}\n"
        f"data: {{name: coco, train_args: {json.dumps(data)}, val_args: {json.dumps(data)}, "
        "batch_size: 1}\n"
        "teacher: {arch: retinanet, backbone: resnet18, args: {min_size: 32, max_size: 32}}\n"
        "student: {arch: retinanet, backbone: resnet18, args: {min_size: 32, max_size: 32}}\n"
    )
    outcome = in_process("train-teacher", "-c", config)
    if (folder / "run" / "teacher" / "checkpoints").exists():
        outcome.output += "\ntraining started"
    return outcome


CLI_CASES = [
    CliCase(
        "1",
        "a GPU recipe's devices (8, ddp) on a machine without GPU",
        _recipe_devices,
        (
            r"train.devices=8 but this machine has no GPU",
            r"--set train.devices=1",
            r"--device cpu to start 8 CPU processes on purpose",
        ),
        gpu_free=True,
    ),
    CliCase(
        "3",
        "evaluate -m student with the teacher's weights (ResNet-34 into ResNet-18)",
        _evaluate_other_weights(lambda p: p.teacher),
        (
            r"teacher.safetensors \(it holds the teacher pspnet/resnet34\)",
            r"holds 96 entries the model lacks \(more than 1% of its 148\)",
            r"pass this model's own weights",
        ),
    ),
    CliCase(
        "3",
        "evaluate -m student with a tune-prompts checkpoint",
        _evaluate_other_weights(lambda p: p.prompts_ckpt),
        # The checkpoint holds the prompts, not the frozen teacher: nothing of the student.
        (r"last.ckpt \(it holds a tune-prompts checkpoint\)", r"misses \d+ of the model's \d+"),
    ),
    CliCase(
        "4",
        "SIGTERM during tune-prompts (a subprocess)",
        _sigterm_during_tune_prompts,
        (
            r"^freekd: stopped by SIGTERM at step \d+; resume with --resume "
            r"\(checkpoint .*last.ckpt\)",
        ),
        exit_code=143,
        absent=("Traceback", "resume='last'", "prompts.safetensors written"),
    ),
    CliCase(
        "5",
        "distill --resume-from a train-teacher checkpoint",
        _resume_other_job,
        (
            r"this is a train-teacher checkpoint, not a distill one",
            r"resume from a checkpoint of the distill run",
        ),
    ),
    CliCase(
        "6",
        "a truncated .safetensors as teacher.checkpoint (tune-prompts)",
        _broken_teacher_checkpoint,
        (
            r"truncated-teacher.safetensors' is not a readable safetensors file",
            r"truncated or damaged; copy or export it again",
        ),
    ),
    CliCase(
        "6",
        "a truncated .safetensors to evaluate --checkpoint",
        _evaluate_broken,
        (
            r"truncated-teacher.safetensors' is not a readable safetensors file",
            r"copy or export it again",
        ),
    ),
    CliCase(
        "6",
        "a truncated .ckpt to --resume-from",
        _resume_from_broken,
        (
            r"truncated-last.ckpt' is truncated or damaged \(PytorchStreamReader",
            r"resume from another checkpoint of the run",
            r"--force",
        ),
    ),
    CliCase(
        "6",
        "a text file named .pt",
        _text_file_as_weights,
        (
            r"teacher.pt' is not a file written by torch.save \(it starts with b'these a",
            r"pass a .pt / .pth / .ckpt written by torch.save, or a .safetensors file",
        ),
    ),
    CliCase(
        "6",
        "a garbled image read by a DataLoader worker (data.num_workers: 1)",
        _corrupt_image_in_a_worker,
        (
            r"^freekd: error: cannot read image .*data/images/0.png: cannot identify image",
            r"re-export it as PNG or JPEG\)$",
        ),
        absent=("Traceback", "DataLoader worker"),
    ),
    CliCase(
        "7",
        "student.args.weights_backbone=IMAGENET1K_V1 offline",
        _offline_backbone,
        (
            r"student.args.weights_backbone='IMAGENET1K_V1': the pretrained weights could not be "
            r"downloaded \(<urlopen error",
            r"copy resnet18-.*\.pth into .*torch-home/hub/checkpoints",
            r"or set student.args.weights_backbone to null",
        ),
    ),
    CliCase(
        "8",
        "--resume after a run killed before its first checkpoint",
        _resume_before_first_checkpoint,
        (r"no checkpoint in .*teacher/checkpoints yet: starting this job fresh",),
        exit_code=0,
    ),
    CliCase(
        "10",
        "--resume with another step count (cosine over 4 steps -> 30)",
        _resume_with_other_steps,
        (
            r"another optimizer or schedule \(schedule.total_steps 4 -> 30\)",
            r"the learning rate would jump",
            r"its config.yaml\), or start afresh with --force",
        ),
    ),
    CliCase(
        "11",
        "a used run folder, in the command line's words",
        _used_run_folder,
        (
            r"already holds a run",
            r"resume it with --resume, overwrite it with --force, or "
            r"choose another --run-dir",
        ),
    ),
    CliCase(
        "13",
        "a COCO image missing from its folder (before training starts)",
        _missing_coco_image,
        (
            r"1 of 2 images listed in .*instances.json are missing",
            r"b.png \(image id 2\)",
            r"check image_dir or remove their entries",
        ),
        absent=("Traceback", "training started"),
    ),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=[f"row{c.row}-{c.name}" for c in CLI_CASES])
def test_the_command_line_says_what_it_did_in_one_line(case: CliCase, project, tmp_path):
    if case.gpu_free and torch.cuda.is_available():
        pytest.skip("assumes a machine without GPU")
    outcome = case.run(project, tmp_path)
    assert outcome.exit_code == case.exit_code, outcome.output
    assert outcome.line and "\n" not in outcome.line, outcome.output
    if case.exit_code == 2:
        assert outcome.line.startswith("freekd: error: "), outcome.line
    for pattern in case.patterns:
        assert re.search(pattern, outcome.line), f"{pattern!r} not in {outcome.line!r}"
    for text in case.absent:
        assert text not in outcome.output, f"{text!r} in {outcome.output!r}"


def test_a_shipped_gpu_recipe_refuses_on_this_machine_before_any_rank_starts(tmp_path):
    """The real command in its own process group: one line within seconds, nothing left."""
    if torch.cuda.device_count() >= 8:
        pytest.skip("this machine can run the recipe")
    recipe = REPO / "configs" / "coco_retinanet_r101_r50_paper.yaml"
    start = time.monotonic()
    process = subprocess.Popen(
        [*FREEKD, "distill", "-c", str(recipe), "--run-dir", str(tmp_path / "run")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    stdout, stderr = process.communicate(timeout=120)
    seconds = time.monotonic() - start
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert process.returncode == 2 and len(lines) == 1, stderr
    gpus = torch.cuda.device_count()
    found = "has no GPU" if gpus == 0 else f"has {gpus} GPU"
    assert lines[0].startswith("freekd: error: train.devices=8 but this machine " + found)
    assert "--set train.devices=" in lines[0] and not stdout
    assert seconds < 60, seconds  # the refusal comes before any data or model
    with pytest.raises(ProcessLookupError):  # no process of its group is left
        os.killpg(process.pid, 0)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("recipe", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_recipe_is_checked_for_devices_before_it_starts(recipe, monkeypatch):
    from freekd.pipeline.builders import check_devices
    from freekd.pipeline.config import load_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    config = load_config(recipe)
    devices = config.train.devices
    if not isinstance(devices, int) or devices <= 1:
        check_devices(config)  # one process: nothing to refuse
        return
    with pytest.raises(ValueError, match=rf"train.devices={devices} but this machine has no GPU"):
        check_devices(config)
    check_devices(load_config(recipe, ["device=cpu"]))  # asked for on purpose: allowed


def test_other_ranks_exit_when_the_process_that_started_them_dies(tmp_path):
    """A process of rank 1 whose parent (rank 0) is killed stops within seconds."""
    log = tmp_path / "rank1.txt"
    child = (
        "import time\n"
        "from freekd.train.runner import _exit_with_launcher\n"
        "_exit_with_launcher()\n"
        "print('watching', flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = (
        "import os, subprocess, sys\n"
        f"env = {{**os.environ, 'LOCAL_RANK': '1'}}\n"
        f"log = open({str(log)!r}, 'w')\n"
        f"child = subprocess.Popen([sys.executable, '-c', {child!r}], env=env,\n"
        "                         stdout=subprocess.PIPE, stderr=log, text=True)\n"
        "print(child.pid, child.stdout.readline().strip(), flush=True)\n"
        "os._exit(0)  # as if rank 0 were killed\n"
    )
    started = subprocess.run(
        [sys.executable, "-c", parent], capture_output=True, text=True, timeout=120
    )
    pid, state = started.stdout.split()
    assert state == "watching", started.stderr
    deadline = time.monotonic() + 20
    while _running(int(pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _running(int(pid)), "rank 1 kept running after its parent died"
    assert "the process that started this one" in log.read_text()


def _running(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\tZ" not in status.split("State:")[1].splitlines()[0]


def test_only_rank_zero_prints_results(monkeypatch, capsys):
    from freekd.cli import _rank_tag, _report
    from freekd.pipeline.jobs import JobResult

    result = JobResult("teacher", Path("run/teacher"), {"weights": Path("run/t.safetensors")})
    monkeypatch.setenv("LOCAL_RANK", "1")
    _report(result)
    assert capsys.readouterr().out == "" and _rank_tag() == " (rank 1)"
    monkeypatch.delenv("LOCAL_RANK")
    _report(result)
    assert "teacher finished" in capsys.readouterr().out and _rank_tag() == ""


def test_every_schedule_follows_its_jobs_steps(project, tmp_path):
    """Row 2: the default schedules' length is the job's steps (unless set), for the three
    jobs; a written config.yaml keeps following them; the tiny project's prompts ran a cosine
    over their 4 steps."""
    from freekd.pipeline.config import dump_config, load_config

    path = config_file(tmp_path, "data: {crop_size: 32}\nprompts: {steps: 3}\n")
    config = load_config(path, ["teacher.train.steps=7", "student.train.steps=5"])
    assert config.prompts.schedule.total_steps == 3
    assert config.teacher.train.schedule.total_steps == 7
    assert config.student.train.schedule.total_steps == 5
    assert load_config(path, ["prompts.steps=50"]).prompts.schedule.total_steps == 50
    explicit = load_config(path, ["prompts.schedule.total_steps=9", "prompts.steps=50"])
    assert explicit.prompts.schedule.total_steps == 9  # set explicitly: kept
    written = dump_config(config, tmp_path / "config.yaml")
    again = load_config(written, ["prompts.steps=11"])
    assert again.prompts.schedule.total_steps == 11
    recorded = torch.load(project.prompts_ckpt, weights_only=True)["freekd"]
    assert recorded["job"] == "tune-prompts"
    assert recorded["schedule"]["kind"] == "cosine" and recorded["schedule"]["total_steps"] == 4


def test_a_constant_schedule_still_resumes_for_more_steps(project, tmp_path):
    """Row 10's check refuses what changes the learning rate, not a longer run: the teacher's
    constant schedule (2 steps done) continues to 3."""
    import shutil

    shutil.copytree(project.run_dir / "teacher", tmp_path / "run" / "teacher")
    config = project.config_with(tmp_path)
    result = invoke("train-teacher", "-c", config, "--resume", "--set", "teacher.train.steps=3")
    assert result.exit_code == 0, result.output
    last = torch.load(tmp_path / "run" / "teacher" / "checkpoints" / "last.ckpt", mmap=True)
    assert last["global_step"] == 3 and last["freekd"]["job"] == "train-teacher"


def test_a_batch_of_per_image_dicts_reaches_the_models_whole():
    """Row 12: a detectron2-style batch (a list of dicts) without ``teacher_input``."""
    from freekd.distill import default_teacher_input

    class PerImage(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, items: list[dict]) -> torch.Tensor:
            return self.a(torch.stack([item["image"] for item in items]))

    batch = [{"image": torch.randn(3, 8, 8), "label": 1} for _ in range(2)]
    assert default_teacher_input(batch) is batch
    assert default_teacher_input((BATCH[0], BATCH[1])) is BATCH[0]  # pairs: the inputs
    distiller = Distiller(
        PerImage(),
        PerImage(),
        ["a"],
        ["a"],
        {"freekd": FreeKDLoss([4])},
        lambda model, items: model(items).mean(),
        batch,
    )
    terms = distiller(batch)
    assert set(terms) == {"task/task", "distill/freekd"} or "distill/freekd" in terms
    assert all(torch.isfinite(v) for v in terms.values())


def test_nan_on_one_rank_of_a_bare_ddp_loop_raises_on_every_rank(tmp_path):
    """``all_ranks_finite`` in a plain 2-process DDP loop (no Lightning): process 0 alone
    sees NaN at step 2; both raise NonFiniteError there, neither waits for the other."""
    from tests.ddp_check import run_ddp_check

    start = time.monotonic()
    report, _ = run_ddp_check(tmp_path, "--bare-poison-step", "2", "--steps", "4")
    assert report["raised_at_step"] == [2, 2] and report["ok"], report
    assert "NaN or Inf in the teacher feature" in report["messages"][0]
    assert time.monotonic() - start < 200


def test_nan_on_one_rank_of_a_lightning_ddp_run_raises_on_every_rank(tmp_path):
    """``nonfinite="raise"`` under Lightning's DDP: both processes raise at step 2."""
    from tests.ddp_check import run_ddp_check

    report, _ = run_ddp_check(tmp_path, "--poison-step", "2", "--raise")
    assert report["raised_at_step"] == [2, 2] and report["ok"], report
    assert "another process saw NaN or Inf at step 2" in report["messages"][1]


def test_cli_words_translate_the_python_apis(tmp_path):
    """Row 11 at the boundary: the Python API keeps its words, the CLI prints its own."""
    from freekd.cli import cli_words

    assert cli_words("resume it with resume='last', overwrite it with force=True") == (
        "resume it with --resume, overwrite it with --force"
    )
    assert cli_words("TrainConfig.devices=8 but") == "train.devices=8 but"
    assert "max_missing" not in cli_words("another model, or pass max_missing= to accept it")
    assert "--set distill.nonfinite=skip" in cli_words("or pass nonfinite='skip' to skip")
    with pytest.raises(FileExistsError, match=r"resume='last'.*force=True"):
        used_run_folder(tmp_path)  # the Python API's own words stay


# ---------------------------------------------------------------------------- corrupt files


@dataclass
class Reader:
    """A subcommand that reads a file of some kind: ``args(project, folder, file)`` -> argv."""

    command: str
    args: Callable[[Project, Path, Path], list]


def _with(extra: Callable[[Project, Path], str], *rest: str, command: str = ""):
    def args(project: Project, folder: Path, file: Path) -> list:
        config = project.config_with(folder, extra(project, file))
        return [command, "-c", config, *rest]

    return args


def _common(project: Project, file: Path) -> str:
    return f"teacher: {{checkpoint: {project.teacher}}}\nprompts: {{file: {project.prompts}}}\n"


def _data_folder(project: Project, file: Path) -> str:
    return _common(project, file) + (
        f"data: {{name: segmentation-folder, args: {{root: {file.parent.parent}, "
        "num_classes: 11}, train_args: {}, val_args: {}}\n"
    )


def _coco_data(project: Project, file: Path) -> str:
    data = {"image_dir": str(file.parent / "images"), "annotation_file": str(file)}
    return _common(project, file) + (
        f"task: detection\ndata: {{name: coco, args: {{}}, train_args: {json.dumps(data)}, "
        f"val_args: {json.dumps(data)}}}\n"
        "teacher: {arch: retinanet, backbone: resnet18, args: {min_size: 32, max_size: 32}}\n"
        "student: {arch: retinanet, backbone: resnet18, args: {min_size: 32, max_size: 32}}\n"
    )


def _data_readers(extra: Callable[[Project, Path], str]) -> list[Reader]:
    """The subcommands that read the training / validation data."""
    teacher_off = ["--set", "teacher.checkpoint=null"]
    return [
        Reader("train-teacher", _with(extra, *teacher_off, command="train-teacher")),
        Reader("tune-prompts", _with(extra, command="tune-prompts")),
        Reader("distill", _with(extra, command="distill")),
        Reader("evaluate", _with(extra, "-m", "teacher", command="evaluate")),
        Reader("visualize", _with(extra, command="visualize")),
    ]


def _export_with(extra: Callable[[Project, Path], str]) -> Reader:
    def args(project: Project, folder: Path, file: Path) -> list:
        config = project.config_with(folder, extra(project, file))
        return ["export", "-c", config, "--checkpoint", project.prompts_ckpt]

    return Reader("export", args)


def _yaml_reader(command: str, *rest: str) -> Reader:
    def args(project: Project, folder: Path, file: Path) -> list:
        if command == "demo":
            return ["demo", "--config", file, "--run-dir", folder / "demo", *rest]
        return [command, "-c", file, *rest]

    return Reader(command, args)


def _option(command: str, option: str, *rest: str) -> Reader:
    def args(project: Project, folder: Path, file: Path) -> list:
        config = project.config_with(folder, _common(project, file))
        return [command, "-c", config, *rest, option, file]

    return Reader(command, args)


def _setting(command: str, key: str, *rest: str) -> Reader:
    def args(project: Project, folder: Path, file: Path) -> list:
        config = project.config_with(folder, _common(project, file))
        return [command, "-c", config, *rest, "--set", f"{key}={file}"]

    return Reader(command, args)


@dataclass
class FileKind:
    """A kind of file the command line reads: ``make(project, folder)`` writes a good one
    (which ``truncate`` cuts), ``readers`` are the subcommands that read it."""

    name: str
    make: Callable[[Project, Path], Path]
    readers: list[Reader]
    truncate: Callable[[Path], Path] = truncated
    slow: bool = False


def _yaml(project: Project, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.yaml"
    path.write_text(TINY.format(run_dir=folder / "run"))
    return path


def _yaml_cut_inside_a_mapping(path: Path) -> Path:
    """Cut in the middle of the last line's ``{...}``: never valid YAML (a cut between lines
    could leave a valid, shorter file that the demo would run)."""
    text = path.read_text()
    target = path.with_name(f"truncated-{path.name}")
    target.write_text(text[: text.index("train: {checkpoint_every_steps") + 15])
    return target


def _coco_json(project: Project, folder: Path) -> Path:
    coco(folder, [IMAGE, {**IMAGE, "id": 2, "file_name": "b.png"}])
    return folder / "instances.json"


def _segmentation_folder(folder: Path) -> tuple[Path, Path]:
    from PIL import Image

    for name in ("images", "masks"):
        (folder / "data" / name).mkdir(parents=True, exist_ok=True)
    for index in range(2):
        Image.new("RGB", (32, 32), (40 * index, 80, 120)).save(
            folder / "data" / "images" / f"{index}.png"
        )
        Image.new("L", (32, 32), 1).save(folder / "data" / "masks" / f"{index}.png")
    return folder / "data" / "images" / "0.png", folder / "data" / "masks" / "0.png"


def _image(project: Project, folder: Path) -> Path:
    return _segmentation_folder(folder)[0]


def _mask(project: Project, folder: Path) -> Path:
    return _segmentation_folder(folder)[1]


def _in_place(damage: Callable[[Path], Path]) -> Callable[[Path], Path]:
    """Damage a data file where the data set looks for it (same name)."""

    def apply(path: Path) -> Path:
        damaged = damage(path)
        damaged.replace(path)
        return path

    return apply


FILE_KINDS = [
    FileKind(
        "YAML config",
        _yaml,
        [
            _yaml_reader("train-teacher"),
            _yaml_reader("tune-prompts"),
            _yaml_reader("distill"),
            _yaml_reader("evaluate"),
            _yaml_reader("export"),
            _yaml_reader("visualize"),
            _yaml_reader("demo"),
        ],
        truncate=_yaml_cut_inside_a_mapping,
    ),
    FileKind("COCO JSON", _coco_json, [*_data_readers(_coco_data), _export_with(_coco_data)]),
    FileKind("image", _image, _data_readers(_data_folder), truncate=_in_place(truncated)),
    FileKind("mask", _mask, _data_readers(_data_folder), truncate=_in_place(truncated)),
    FileKind(
        ".safetensors weights",
        lambda project, folder: _copy(project.teacher, folder),
        [
            _setting("tune-prompts", "teacher.checkpoint"),
            _setting("distill", "teacher.checkpoint"),
            _setting("visualize", "teacher.checkpoint"),
            _option("evaluate", "--checkpoint", "-m", "teacher"),
            _option("visualize", "--checkpoint"),
        ],
    ),
    FileKind(
        ".ckpt checkpoint",
        lambda project, folder: _copy(project.prompts_ckpt, folder),
        [
            _option("train-teacher", "--resume-from", "--set", "teacher.checkpoint=null"),
            _option("tune-prompts", "--resume-from"),
            _option("distill", "--resume-from"),
            _option("export", "--checkpoint"),
            _option("evaluate", "--checkpoint", "-m", "teacher"),
        ],
    ),
    FileKind(
        "prompt file",
        lambda project, folder: _copy(project.prompts, folder),
        [_setting("distill", "prompts.file"), _option("visualize", "--prompts")],
    ),
]

_DAMAGES = ("truncated", "garbled")
SWEEP = [
    pytest.param(kind, reader, damage, id=f"{kind.name}-{damage}-{reader.command}")
    for kind in FILE_KINDS
    for reader in kind.readers
    for damage in _DAMAGES
]


def damaged_file(kind: FileKind, damage: str, folder: Path, project: Project) -> Path:
    good = kind.make(project, folder)
    if damage == "truncated":
        return kind.truncate(good)
    if kind.truncate.__name__ == "apply":  # data files are damaged where the data set reads them
        return _in_place(garbled)(good)
    return garbled(good)


@pytest.mark.parametrize(("kind", "reader", "damage"), SWEEP)
def test_a_corrupt_file_gets_one_line_and_status_2(kind, reader, damage, project, tmp_path):
    file = damaged_file(kind, damage, tmp_path, project)
    outcome = in_process(*reader.args(project, tmp_path, file))
    assert outcome.exit_code == 2, outcome.output
    assert "\n" not in outcome.line and outcome.line.startswith("freekd: error: "), outcome.output
    assert "Traceback" not in outcome.output
    named = {file.name, file.parent.name, str(file)}  # the file (or its folder, for data)
    assert (
        any(name in outcome.line for name in named)
        or kind.name == "YAML config"
        and ("run.yaml" in outcome.line or file.name in outcome.line)
    ), outcome.line


def _table_row(*cells: object) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


if __name__ == "__main__":  # the tables of messages, for the docs and reports
    import tempfile

    logging.getLogger().addHandler(logging.NullHandler())  # freekd's log stays out of the table
    print("| bad input | error | message |\n|---|---|---|")
    for case in CASES:
        with tempfile.TemporaryDirectory() as folder:
            try:
                case.make(Path(folder))
            except BaseException as error:  # noqa: BLE001 - reporting what each case raises
                text = str(error).replace(folder, "<tmp>")
                print(_table_row(case.name, type(error).__name__, text))
            else:
                print(_table_row(case.name, "(no error)", ""))
    print("\n| row | command line | exit | what it printed |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        tiny = make_project(Path(folder) / "project")
        for index, cli_case in enumerate(CLI_CASES):
            if cli_case.gpu_free and torch.cuda.is_available():
                continue
            (Path(folder) / f"case{index}").mkdir()
            outcome = cli_case.run(tiny, Path(folder) / f"case{index}")
            line = outcome.line.replace(folder, "<tmp>")
            print(_table_row(cli_case.row, cli_case.name, outcome.exit_code, line))
    sys.exit(0)
