"""The recipes for a user's own data (``own_masks_fpn_cpu``, ``own_coco_retinanet_cpu``) run the
whole CLI workflow on folders in their layout (written from digit scenes), at a tiny size."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from freekd.cli import app
from freekd.data import DigitScenes, write_coco, write_segmentation_folder

TINY = [
    "teacher.train.steps=2",
    "student.train.steps=2",
    "prompts.steps=2",
    "train.checkpoint_every_steps=1",
    "device=cpu",
]


def run(*args: str) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("task", ["segmentation", "detection"])
def test_own_data_recipe_runs_the_workflow(tmp_path, monkeypatch, task):
    monkeypatch.chdir(tmp_path)  # the recipes name data/... relative to where freekd runs
    if task == "segmentation":
        recipe, metric = "recipe:own_masks_fpn_cpu", "mIoU"
        for split in ("train", "val"):
            scenes = DigitScenes(split, task="segmentation", size=64, length=4)
            write_segmentation_folder(scenes, f"data/{split}")
        extra = ["data.batch_size=2", "data.val_batch_size=2", "data.crop_size=64"]
        extra += ["teacher.backbone=resnet18"]
    else:
        recipe, metric = "recipe:own_coco_retinanet_cpu", "AP"
        for split in ("train", "val"):
            write_coco(DigitScenes(split, size=96, length=4), f"data/coco_{split}")
        extra = ["data.batch_size=2", "data.val_batch_size=2", "teacher.backbone=resnet18"]
        extra += ["teacher.args={min_size: 96, max_size: 96}"]
        extra += ["student.args={min_size: 96, max_size: 96}"]
    options = [item for s in [*TINY, *extra] for item in ("--set", s)]
    for command in (["train-teacher"], ["distill", "--baseline"], ["tune-prompts"], ["distill"]):
        run(*command, "-c", recipe, *options)
    run("evaluate", "-c", recipe, "--model", "student", *options)
    scores = json.loads(
        (
            tmp_path
            / f"runs/own_{'masks' if task == 'segmentation' else 'coco'}"
            / "student_freekd"
            / "metrics.json"
        ).read_text()
    )
    assert metric in scores["scores"]
    calibration = tmp_path.glob("runs/*/student_freekd/calibration.json")
    assert json.loads(next(calibration).read_text())["mu"] > 0
