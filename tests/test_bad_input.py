"""Every input a user can get wrong raises one clear line: what is wrong, where, and the fix.

Each case in ``CASES`` builds the bad input (files under ``tmp_path``), asserts the exception
type and that the message names the offending thing and the fix (regular expressions on its key
words), and that it is one line. ``python tests/test_bad_input.py`` prints the table of messages.
The last tests run a few of the cases through the ``freekd`` command line: exit status 2, one
line on stderr, no traceback.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from freekd import FreeKDLoss
from freekd.distill import Distiller
from freekd.pipeline.schema import ConfigError
from freekd.taps import TapError
from freekd.wavelets import dwt2, idwt2

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


def task_loss(model: nn.Module, batch) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


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
        (r"distils 2 layers", r"2 student and 1 teacher features"),
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
        (r"run.yaml: distill.mu: expected a number, got 'lots'",),
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


if __name__ == "__main__":  # the table of messages, for the docs and reports
    import tempfile

    print("| bad input | error | message |\n|---|---|---|")
    for case in CASES:
        with tempfile.TemporaryDirectory() as folder:
            try:
                case.make(Path(folder))
            except BaseException as error:  # noqa: BLE001 - reporting what each case raises
                text = str(error).replace(folder, "<tmp>").replace("|", "\\|")
                print(f"| {case.name} | {type(error).__name__} | {text} |")
            else:
                print(f"| {case.name} | (no error) | |")
    sys.exit(0)
