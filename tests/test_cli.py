"""The ``freekd`` command line: help texts, configuration errors (one line, exit status 2),
``--set`` overrides, and every recipe in ``configs/`` (validated, never trained)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from freekd.cli import app
from freekd.losses import FreeKDLoss
from freekd.models import REGISTRY, default_taps
from freekd.pipeline.config import RunConfig, apply_overrides, load_config, parse_override
from freekd.pipeline.demo import DEMO_CONFIGS, QUICK_OVERRIDES, demo_config
from freekd.pipeline.schema import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))

COMMANDS = {
    "train-teacher": ["--config", "--set", "--run-dir", "--device", "--resume", "--force"],
    "tune-prompts": ["--config", "--set", "--run-dir", "--resume", "--force"],
    "distill": ["--config", "--set", "--baseline", "--resume", "--force"],
    "evaluate": ["--config", "--model", "--checkpoint", "--output"],
    "export": ["--config", "--checkpoint", "--output"],
    "visualize": ["--config", "--checkpoint", "--prompts", "--index", "--output"],
    "demo": ["--task", "--quick", "--run-dir", "--set", "--device", "--resume", "--force"],
}

MINIMAL = """\
task: segmentation
teacher: {arch: pspnet, backbone: resnet50}
student: {arch: pspnet, backbone: resnet18}
data: {crop_size: 64}
"""


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------- help


def test_root_help_lists_every_command():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.output


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_command_help(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    for option in COMMANDS[command]:
        assert option in result.output, f"{command} --help does not mention {option}"


# ---------------------------------------------------------------------------- user errors


def assert_user_error(result, *fragments: str) -> str:
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert message.count("\n") == 0, f"expected one line, got:\n{message}"
    assert message.startswith("freekd: error: ")
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path, MINIMAL + "distill: {mue: 2}\n")
    message = assert_user_error(invoke("distill", "-c", str(path)), "distill.mue", str(path))
    assert "did you mean 'mu'" in message


def test_wrong_type_names_key_and_file(tmp_path):
    text = MINIMAL.replace("backbone: resnet18}", "backbone: resnet18, train: {steps: many}}")
    path = write(tmp_path, text)
    assert_user_error(
        invoke("train-teacher", "-c", str(path)), "student.train.steps", str(path), "integer"
    )


def test_missing_value_names_key_and_file(tmp_path):
    path = write(tmp_path, MINIMAL.replace("{arch: pspnet, backbone: resnet50}", "{arch: pspnet}"))
    assert_user_error(
        invoke("tune-prompts", "-c", str(path)), "teacher.backbone", "missing", str(path)
    )


def test_invalid_yaml(tmp_path):
    path = write(tmp_path, "task: [\n")
    assert_user_error(invoke("evaluate", "-c", str(path)), str(path), "YAML")


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert_user_error(invoke("export", "-c", str(missing)), str(missing), "does not exist")


def test_bad_override_names_the_option(tmp_path):
    path = write(tmp_path, MINIMAL)
    assert_user_error(
        invoke("distill", "-c", str(path), "--set", "distill.preset=offical"),
        "--set distill.preset=offical",
        "did you mean 'official'",
    )
    assert_user_error(invoke("distill", "-c", str(path), "--set", "nonsense"), "key.sub=value")


def test_value_checked_by_the_training_config(tmp_path):
    path = write(tmp_path, MINIMAL)
    assert_user_error(
        invoke("distill", "-c", str(path), "--set", "student.train.optimizer.lr=-1"),
        "student.train.optimizer",
        "lr",
    )


def test_missing_teacher_weights_is_a_user_error(tmp_path):
    path = write(tmp_path, MINIMAL)
    assert_user_error(
        invoke("tune-prompts", "-c", str(path), "--run-dir", str(tmp_path / "r")),
        "no teacher weights",
        "train-teacher",
    )


def test_script_exit_status_and_single_line(tmp_path):
    """The real script (a subprocess): exit status 2, one line on stderr, no traceback."""
    path = write(tmp_path, MINIMAL + "distill: {mue: 2}\n")
    process = subprocess.run(
        [sys.executable, "-m", "freekd.cli", "distill", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.returncode == 2
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("freekd: error: "), process.stderr
    assert "distill.mue" in lines[0] and str(path) in lines[0]


# ---------------------------------------------------------------------------- config and --set


def test_overrides_are_yaml_scalars(tmp_path):
    path = write(tmp_path, MINIMAL)
    config = load_config(
        path,
        [
            "student.train.steps=7",
            "student.train.optimizer.lr=1e-4",  # YAML 1.1 reads this as a string: still a number
            "distill.teacher_taps=[encoder.layer3, encoder.layer4]",
            "teacher.checkpoint=null",
            "data.args.size=48",
            "run_dir=elsewhere",
        ],
    )
    assert config.student.train.steps == 7
    assert config.student.train.schedule.total_steps == 7  # follows steps unless given
    assert config.student.train.optimizer.lr == pytest.approx(1e-4)
    assert config.distill.teacher_taps == ["encoder.layer3", "encoder.layer4"]
    assert config.teacher.checkpoint is None
    assert config.data.args == {"size": 48}
    assert config.run_dir == "elsewhere"


def test_parse_override():
    assert parse_override("a.b=1") == (["a", "b"], 1)
    assert parse_override("a=x=y") == (["a"], "x=y")
    with pytest.raises(ConfigError):
        parse_override("=1")
    data, sources = apply_overrides({"a": {"b": 1}}, ["a.c=2"])
    assert data == {"a": {"b": 1, "c": 2}} and sources == {"a.c": "--set a.c=2"}


def test_run_dir_and_device_flags(tmp_path):
    """--run-dir and --device are overrides too: a bad device is a user error."""
    path = write(tmp_path, MINIMAL)
    assert_user_error(
        invoke("train-teacher", "-c", str(path), "--device", "tpu"), "device", "--set device=tpu"
    )


def test_config_round_trip(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    again = load_config(write(tmp_path, yaml.safe_dump(config.to_dict()), "again.yaml"))
    assert again == config


# ---------------------------------------------------------------------------- recipes


def test_every_recipe_is_present():
    names = {path.stem for path in CONFIGS}
    for model in ("retinanet", "fcos", "faster_rcnn"):
        for preset in ("paper", "official"):
            assert f"coco_{model}_r101_r50_{preset}" in names
    for model in ("pspnet", "deeplabv3"):
        for preset in ("paper", "official"):
            assert f"cityscapes_{model}_r101_r18_{preset}" in names
    assert {"digits_demo_segmentation", "digits_demo_detection"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_recipe_validates(path):
    """Schema, model names, taps and loss settings of each recipe (nothing is built or run)."""
    config = load_config(path)
    assert isinstance(config, RunConfig)
    for section in (config.teacher, config.student):
        assert section.backbone in REGISTRY[config.task][section.arch]
    taps, channels = default_taps(config.task, config.teacher.arch, config.teacher.backbone)
    loss = FreeKDLoss.preset(config.distill.preset, channels, **config.distill.loss)
    assert loss.num_prompts == (6 if config.distill.preset == "official" else 2)
    assert config.student.train.schedule.total_steps == config.student.train.steps


def test_paper_settings_of_the_recipes():
    retina = load_config(ROOT / "configs/coco_retinanet_r101_r50_official.yaml")
    optim, schedule = retina.student.train.optimizer, retina.student.train.schedule
    assert (optim.name, optim.lr, optim.momentum, optim.weight_decay) == ("sgd", 0.02, 0.9, 1e-4)
    assert (schedule.kind, schedule.warmup_steps, schedule.warmup_ratio) == ("step", 1000, 0.001)
    steps_per_epoch = retina.student.train.steps // 24
    assert schedule.milestones == (16 * steps_per_epoch, 22 * steps_per_epoch)
    assert retina.train.grad_clip_norm == 35 and retina.data.batch_size * retina.train.devices == 16
    assert (retina.distill.mu, retina.distill.mse_weight, retina.distill.head_weight) == (1, 5, 1)
    fcos = load_config(ROOT / "configs/coco_fcos_r101_r50_official.yaml")
    assert (fcos.distill.mu, fcos.distill.mse_weight) == (5, 10)
    rcnn = load_config(ROOT / "configs/coco_faster_rcnn_r101_r50_official.yaml")
    assert (rcnn.distill.mu, rcnn.distill.mse_weight) == (0.8, 1)
    psp = load_config(ROOT / "configs/cityscapes_pspnet_r101_r18_paper.yaml")
    assert psp.student.train.steps == 80000 and psp.data.crop_size == [512, 1024]
    assert (psp.student.train.schedule.kind, psp.student.train.schedule.min_lr) == ("poly", 1e-4)
    deeplab = load_config(ROOT / "configs/cityscapes_deeplabv3_r101_r18_paper.yaml")
    assert deeplab.student.train.steps == 40000 and deeplab.student.arch == "deeplabv3"


@pytest.mark.parametrize("task", sorted(DEMO_CONFIGS))
def test_the_demo_runs_the_shipped_recipe(task):
    from_file = load_config(ROOT / f"configs/digits_demo_{task}.yaml")
    assert demo_config(task, run_dir=from_file.run_dir) == from_file
    assert from_file.task == task and from_file.distill.preset == "recommended"
    quick = demo_config(task, quick=True)  # the quick profile validates too
    assert quick.student.train.steps < from_file.student.train.steps
    assert QUICK_OVERRIDES[task]
