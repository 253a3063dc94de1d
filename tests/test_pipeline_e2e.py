"""End to end on the built-in digits: ``freekd demo`` at a tiny size (a few steps at 32 px),
then ``export``, ``evaluate``, ``visualize`` and a resumed demo on its run folder; the separate
subcommands on a tiny detection run with the official preset's extra terms."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from typer.testing import CliRunner

from freekd.cli import app
from freekd.models import build_model

TINY_SEGMENTATION = [
    "teacher.backbone=resnet18",
    "teacher.train.steps=2",
    "student.train.steps=2",
    "prompts.steps=2",
    "data.args.size=32",
    "data.crop_size=32",
    "data.train_args.length=8",
    "data.val_args.length=4",
    "data.batch_size=2",
    "data.val_batch_size=4",
    "train.checkpoint_every_steps=1",
    "train.log_every_steps=1",
]


def invoke(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def sets(overrides: list[str]) -> list[str]:
    return [item for override in overrides for item in ("--set", override)]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("demo") / "run"
    result = invoke(
        "demo", "--quick", "--run-dir", run_dir, "--device", "cpu", *sets(TINY_SEGMENTATION)
    )
    assert result.exit_code == 0, result.output
    for row in ("teacher", "no distillation", "MSE (FitNet)", "MGD", "FreeKD"):
        assert row in result.output
    for reference in ("over no distillation", "over MSE", "over MGD"):
        assert reference in result.output
    return run_dir


def student_model():
    return build_model(
        "segmentation",
        "fpn",
        "mobilenetv3_small_050",
        num_classes=11,
        decoder_pyramid_channels=64,
        decoder_segmentation_channels=32,
    ).model


def test_demo_run_folder(demo_run):
    for name in ("config.yaml", "metrics.json", "masks.png", "results.png"):
        assert (demo_run / name).is_file(), name
    for folder, output in (
        ("teacher", "teacher.safetensors"),
        ("student_baseline", "student.safetensors"),
        ("student_mse", "student.safetensors"),
        ("student_mgd", "student.safetensors"),
        ("prompts", "prompts.safetensors"),
        ("student_freekd", "student.safetensors"),
    ):
        assert (demo_run / folder / output).is_file()
        assert (demo_run / folder / "checkpoints" / "last.ckpt").is_file()
        assert list((demo_run / folder / "logs").glob("version_*/metrics.csv"))
    summary = json.loads((demo_run / "metrics.json").read_text())
    roles = [row["role"] for row in summary["rows"]]
    assert roles == ["teacher", "baseline", "mse", "mgd", "student"]
    assert summary["metric"] == "mIoU"
    assert all(0 <= row["value"] <= 100 for row in summary["rows"])
    assert len({row["parameters"] for row in summary["rows"][1:]}) == 1  # the same student
    # mu: auto calibrated every distillation weight at initialization; MGD's is a third of it
    calibrations = {
        folder: json.loads((demo_run / folder / "calibration.json").read_text())
        for folder in ("student_mse", "student_mgd", "student_freekd")
    }
    assert all(calibration["mu"] > 0 for calibration in calibrations.values())
    mgd = calibrations["student_mgd"]
    assert mgd["mu_factor"] == pytest.approx(1 / 3) and mgd["mu"] == pytest.approx(mgd["mu0"] / 3)


def test_student_loads_strictly_into_the_plain_model(demo_run):
    model = student_model()
    state = safetensors.torch.load_file(str(demo_run / "student_freekd" / "student.safetensors"))
    model.load_state_dict(state, strict=True)


def test_export_from_the_distillation_checkpoint(demo_run, tmp_path):
    output = tmp_path / "student.safetensors"
    config = demo_run / "config.yaml"
    result = invoke("export", "-c", config, "--output", output)
    assert result.exit_code == 0, result.output
    model = student_model()
    model.load_state_dict(safetensors.torch.load_file(str(output)), strict=True)
    exported = safetensors.torch.load_file(str(demo_run / "student_freekd" / "student.safetensors"))
    assert all((model.state_dict()[k] == v).all() for k, v in exported.items())


def test_export_reuses_the_student_file_that_distill_wrote(demo_run):
    folder = demo_run / "student_freekd"
    before = (folder / "student.safetensors").stat().st_mtime_ns
    result = invoke("export", "-c", demo_run / "config.yaml")
    assert result.exit_code == 0, result.output
    assert f"student weights: {folder / 'student.safetensors'} " in result.output
    assert not (folder / "exported").exists()  # nothing written again
    assert (folder / "student.safetensors").stat().st_mtime_ns == before


def test_checkpoints_hold_no_frozen_teacher_and_last_is_a_link(demo_run):
    for folder, prefix in (("prompts", "tuner.teacher."), ("student_freekd", "distiller.teacher.")):
        checkpoints = demo_run / folder / "checkpoints"
        last = checkpoints / "last.ckpt"
        assert last.is_symlink() and last.resolve().parent == checkpoints.resolve()
        saved = torch.load(last, weights_only=True)
        keys = list(saved["state_dict"])
        assert keys and not [k for k in keys if k.startswith(prefix)], folder
        assert len(saved["freekd"]["frozen_sha256"]) == 64
        assert saved["freekd"]["frozen_source"].endswith("teacher.safetensors")


def test_resume_with_a_changed_teacher_file_is_refused_in_one_line(demo_run, tmp_path):
    import shutil

    from freekd.checkpoints import read_safetensors_file

    copy = tmp_path / "run"
    shutil.copytree(demo_run, copy, symlinks=True)
    teacher_file = copy / "teacher" / "teacher.safetensors"
    tensors, metadata = read_safetensors_file(teacher_file)
    name = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name] = tensors[name] + 1e-3  # another teacher under the same name
    safetensors.torch.save_file(tensors, str(teacher_file), metadata)
    result = invoke("distill", "-c", copy / "config.yaml", "-o", copy, "--resume")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "the teacher differs from the one the run was trained" in lines[0]
    assert str(teacher_file) in lines[0] and "--force" in lines[0]


def test_evaluate_and_visualize(demo_run, tmp_path):
    config = demo_run / "config.yaml"
    output = tmp_path / "baseline.json"
    result = invoke("evaluate", "-c", config, "--model", "baseline", "--output", output)
    assert result.exit_code == 0, result.output
    scores = json.loads(output.read_text())
    assert scores["role"] == "baseline" and "mIoU" in scores["scores"]
    picture = tmp_path / "masks.png"
    result = invoke("visualize", "-c", config, "--index", "1", "--output", picture)
    assert result.exit_code == 0, result.output
    from PIL import Image

    with Image.open(picture) as png:  # the labelled layout: titles, rows, tiles >= 128 px
        text = dict(png.text)
    columns, rows = json.loads(text["freekd:columns"]), json.loads(text["freekd:rows"])
    assert columns[:2] == ["image", "teacher |level 1|"] and columns[-1] == "overlay: level 1"
    assert "mask: level 1" in columns and "level 1, token 1" in columns
    assert len(rows) == 3 and rows[0].startswith("decoder.")  # the three distilled levels
    assert min(int(side) for side in text["freekd:tile"].split("x")) >= 128
    assert "val image 1" in text["Title"] and text["freekd:colorbar"] == "mask value"


@pytest.mark.parametrize("method", ["cwd", "frequency"])  # mse and mgd: the demo
def test_distill_with_a_baseline_method(demo_run, method):
    config = demo_run / "config.yaml"
    result = invoke("distill", "-c", config, *sets([f"distill.method={method}"]))
    assert result.exit_code == 0, result.output
    weights = demo_run / f"student_{method}" / "student.safetensors"
    distilled = safetensors.torch.load_file(str(weights))
    baseline = safetensors.torch.load_file(
        str(demo_run / "student_baseline" / "student.safetensors")
    )
    # Same initial weights and batches as the baseline: only the distillation term differs.
    assert distilled.keys() == baseline.keys()
    assert any(not torch.equal(distilled[k], baseline[k]) for k in baseline)
    bad = invoke(
        "distill",
        "-c",
        config,
        *sets([f"distill.method={method}", "distill.method_args={nope: 1}"]),
    )
    assert bad.exit_code == 2 and "distill.method_args" in bad.stderr and "nope" in bad.stderr


def test_demo_refuses_a_used_folder_and_resumes(demo_run):
    again = invoke("demo", "--quick", "--run-dir", demo_run, *sets(TINY_SEGMENTATION))
    assert again.exit_code == 2 and "--resume" in again.stderr
    resumed = invoke("demo", "--quick", "--run-dir", demo_run, "--resume", *sets(TINY_SEGMENTATION))
    assert resumed.exit_code == 0, resumed.output
    assert resumed.output.count("already done") == 6  # teacher, baseline, MSE, MGD, prompts, FreeKD


def test_subcommands_on_tiny_detection(tmp_path):
    """train-teacher, distill --baseline, tune-prompts, distill (official preset with the MSE
    and head terms), evaluate, export on RetinaNet-R18 at 64 px."""
    overrides = sets(
        [
            "teacher.backbone=resnet18",
            "teacher.args={min_size: 64, max_size: 64}",
            "student.args={min_size: 64, max_size: 64}",
            "teacher.train.steps=2",
            "student.train.steps=2",
            "prompts.steps=2",
            "data.args.size=64",
            "data.train_args.length=4",
            "data.val_args.length=4",
            "data.batch_size=2",
            "distill.preset=official",
            "distill.mse_weight=5",
            "distill.head_weight=1",
            "distill.projection=always",
        ]
    )
    config = Path(__file__).resolve().parents[1] / "configs" / "digits_demo_detection.yaml"
    common = ["-c", config, "--run-dir", tmp_path / "run", "--device", "cpu", *overrides]
    for command in (["train-teacher"], ["distill", "--baseline"], ["tune-prompts"], ["distill"]):
        result = invoke(*command, *common)
        assert result.exit_code == 0, (command, result.output)
    result = invoke("evaluate", *common, "--model", "student")
    assert result.exit_code == 0 and "AP =" in result.output
    result = invoke("export", *common[:4], *overrides)
    assert result.exit_code == 0, result.output
    # A second run into the same folder is refused, --force clears it.
    assert invoke("train-teacher", *common).exit_code == 2
    assert invoke("train-teacher", *common, "--force").exit_code == 0
