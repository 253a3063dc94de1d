"""``freekd export --format hf|onnx``: the Hugging Face style folder reloads offline with the
same outputs, the ONNX files give onnxruntime outputs within tolerance of PyTorch's (one
segmenter, one detector), and bad input gives one line.

The run folders are made by hand, tiny and fast: a student built from the run's config with
seeded random weights, saved as a distill job's Lightning checkpoint (``distiller.student.*``
entries beside a projection the export must leave out). The detector's classification layer
gets spread-out weights so that it gives detections with distinct scores (a fresh RetinaNet
scores every anchor about 0.01, below its 0.05 threshold). Real checkpoints of the jobs are
exported in ``tests/test_pipeline_e2e.py``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from freekd.models import build_model
from freekd.pipeline import export, from_pretrained, load_config
from freekd.pipeline.builders import build_data
from freekd.pipeline.jobs import onnx_record
from freekd.pipeline.onnx_export import detection_difference, onnxruntime_session
from tests.test_bad_input import invoke

SEGMENTATION = {
    "task": "segmentation",
    "description": "export test",
    "data": {
        "name": "digits",
        "args": {"size": 64},
        "train_args": {"length": 4},
        "val_args": {"length": 2},
        "crop_size": 64,
        "hflip_prob": 0.0,
    },
    "teacher": {"arch": "fpn", "backbone": "resnet18"},
    "student": {
        "arch": "fpn",
        "backbone": "mobilenetv3_small_050",
        "args": {"decoder_pyramid_channels": 32, "decoder_segmentation_channels": 32},
    },
    "distill": {"mu": 2.5, "preset": "paper"},
}
DETECTION = {
    "task": "detection",
    "data": {
        "name": "digits",
        "args": {"size": 64},
        "train_args": {"length": 4},
        "val_args": {"length": 2},
        "hflip_prob": 0.0,
    },
    "teacher": {"arch": "retinanet", "backbone": "resnet34", "args": {"min_size": 64}},
    "student": {
        "arch": "retinanet",
        "backbone": "resnet18",
        "args": {"min_size": 64, "max_size": 64},
    },
}


@dataclass
class Run:
    """A run folder with a distill checkpoint of ``model`` (the student, eval mode)."""

    config_path: Path
    checkpoint: Path
    model: torch.nn.Module
    num_classes: int

    @property
    def config(self):
        return load_config(self.config_path)


def make_run(folder: Path, settings: dict) -> Run:
    """``settings`` as ``run.yaml`` into ``folder/run`` and a checkpoint of a seeded student."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump({**settings, "run_dir": str(folder / "run")}))
    config = load_config(path)
    num_classes = build_data(config, "val").num_classes
    torch.manual_seed(0)
    student = config.student
    model = build_model(config.task, student.arch, student.backbone, num_classes, **student.args)
    model = model.model.eval()
    if config.task == "detection":
        with torch.no_grad():
            model.head.classification_head.cls_logits.weight.normal_(0.0, 0.3)
    state = {f"distiller.student.{k}": v for k, v in model.state_dict().items()}
    state["distiller.projections.0.weight"] = torch.ones(4, 4, 1, 1)  # not the student's
    checkpoint = folder / "run" / "student_freekd" / "checkpoints" / "last.ckpt"
    checkpoint.parent.mkdir(parents=True)
    torch.save({"state_dict": state, "global_step": 3}, checkpoint)
    return Run(path, checkpoint, model, num_classes)


@pytest.fixture(scope="module")
def segmentation_run(tmp_path_factory) -> Run:
    return make_run(tmp_path_factory.mktemp("segmentation"), SEGMENTATION)


@pytest.fixture(scope="module")
def detection_run(tmp_path_factory) -> Run:
    return make_run(tmp_path_factory.mktemp("detection"), DETECTION)


def one_error_line(result, *parts: str) -> str:
    """The single stderr line of a failed command (exit status 2), holding ``parts``."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("freekd: error: "), result.stderr
    for part in parts:
        assert part in lines[0], (part, lines[0])
    return lines[0]


# ---------------------------------------------------------------------------- hf


def test_hf_folder_of_a_segmenter_reloads_with_the_same_logits(segmentation_run, tmp_path):
    job = segmentation_run.checkpoint.parents[1]
    metrics = {"metric": "mIoU", "value": 12.345, "images": 2, "checkpoint": "x/last.ckpt"}
    (job / "metrics.json").write_text(json.dumps({**metrics, "scores": {"mIoU": 12.345}}))
    folder = tmp_path / "hf"
    config = segmentation_run.config_path
    result = invoke("export", "-c", config, "--format", "hf", "--output", folder)
    assert result.exit_code == 0, result.output
    assert f"student folder: {folder} " in result.stdout
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "run_config.yaml",
    ]
    info = json.loads((folder / "config.json").read_text())
    assert (info["task"], info["arch"], info["backbone"]) == (
        "segmentation",
        "fpn",
        "mobilenetv3_small_050",
    )
    assert info["num_classes"] == segmentation_run.num_classes == 11
    assert info["model_args"] == SEGMENTATION["student"]["args"]
    assert info["input"]["image_size"] == [64, 64] and info["source"]["step"] == 3
    card = (folder / "README.md").read_text()
    for text in ("fpn/resnet18", "paper", "| weight mu | 2.5 |", "mIoU = 12.35", "from_pretrained"):
        assert text in card, text
    images = torch.randn(2, 3, 64, 64)
    reloaded = from_pretrained(folder)
    assert not reloaded.training
    with torch.no_grad():
        assert torch.equal(reloaded(images), segmentation_run.model(images))


def test_hf_folder_of_a_detector_reloads_with_the_same_detections(detection_run, tmp_path):
    folder = export(detection_run.config, output=tmp_path / "hf", format="hf")
    card = (folder / "README.md").read_text()
    assert "retinanet/resnet34" in card and "Not evaluated" in card
    image = torch.rand(3, 64, 64)
    reloaded = from_pretrained(folder)
    with torch.no_grad():
        expected, found = detection_run.model([image])[0], reloaded([image])[0]
    assert len(expected["scores"]) > 0
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(found[key], expected[key]), key


def test_hf_folder_from_imagenet_initialized_detector_rebuilds_its_frozen_norm_layers():
    from freekd.pipeline.hub import rebuild_args

    args = {"min_size": 64, "weights_backbone": "DEFAULT", "progress": False}
    model_args, initialization = rebuild_args("detection", args)
    assert model_args == {"min_size": 64, "frozen_bn": True, "trainable_backbone_layers": 3}
    assert initialization == {"weights_backbone": "DEFAULT", "progress": False}
    assert rebuild_args("segmentation", {"encoder_weights": "imagenet"})[0] == {}


# ---------------------------------------------------------------------------- onnx


def test_onnx_segmenter_from_the_command_line_matches_pytorch(segmentation_run, tmp_path):
    target = tmp_path / "student.onnx"
    config = segmentation_run.config_path
    result = invoke("export", "-c", config, "--format", "onnx", "--output", target)
    assert result.exit_code == 0, result.output
    assert "dynamo exporter" in result.stdout and "max abs difference" in result.stdout
    record = json.loads(onnx_record(target).read_text())
    assert record["exporter"] == "dynamo" and record["max_abs_diff"] < 1e-4
    assert "student.onnx" in record["files"]  # with its weights file, if the exporter wrote one
    assert sorted(p.name for p in tmp_path.iterdir()) == [*record["files"], "student.onnx.json"]
    images = torch.randn(3, 3, 64, 64)  # another batch size than the export's sample
    (logits,) = onnxruntime_session(target).run(None, {"images": images.numpy()})
    with torch.no_grad():
        expected = segmentation_run.model(images)
    difference = (torch.from_numpy(logits) - expected).abs().max().item()
    print(f"segmenter onnxruntime max abs difference: {difference:.3g}")
    assert logits.shape == (3, 11, 64, 64) and difference < 1e-4


def test_onnx_detector_matches_pytorch(detection_run, tmp_path):
    target = export(detection_run.config, output=tmp_path / "student.onnx", format="onnx")
    record = json.loads(onnx_record(target).read_text())
    assert record["exporter"] == "torchscript" and record["opset"] >= 11
    assert record["outputs"] == ["boxes", "scores", "labels"]
    session = onnxruntime_session(target)
    for image in (torch.rand(3, 64, 64), torch.rand(3, 80, 56)):
        with torch.no_grad():
            expected = detection_run.model([image])[0]
        found = session.run(None, {"image": image.numpy()})
        reference = [expected[key] for key in ("boxes", "scores", "labels")]
        difference, count = detection_difference(reference, [torch.from_numpy(a) for a in found])
        print(f"detector onnxruntime max abs difference: {difference:.3g} ({count} detections)")
        assert count > 0 and difference < 1e-3


def test_detection_difference_pairs_reordered_detections_and_refuses_other_ones():
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0], [1.0, 1.0, 5.0, 5.0]])
    scores, labels = torch.tensor([0.5, 0.5]), torch.tensor([1, 2])
    swapped = [boxes.flip(0) + 0.01, scores.flip(0), labels.flip(0)]
    difference, count = detection_difference([boxes, scores, labels], swapped)
    assert count == 2 and difference == pytest.approx(0.01, abs=1e-6)
    with pytest.raises(ValueError, match="1 detections, PyTorch 2"):
        detection_difference([boxes, scores, labels], [boxes[:1], scores[:1], labels[:1]])
    with pytest.raises(ValueError, match="different labels"):
        detection_difference([boxes, scores, labels], [boxes, scores, torch.tensor([1, 1])])


# ---------------------------------------------------------------------------- bad input


def test_unknown_format_and_tolerance_without_onnx_give_one_line(segmentation_run):
    config = segmentation_run.config_path
    result = invoke("export", "-c", config, "--format", "onx")
    one_error_line(result, "'onx'", "did you mean 'onnx'?", "'safetensors', 'hf', 'onnx'")
    result = invoke("export", "-c", config, "--format", "hf", "--tolerance", "0.1")
    one_error_line(result, "--tolerance", "--format onnx")


def test_a_failed_onnx_check_writes_nothing(detection_run, tmp_path):
    target = tmp_path / "student.onnx"
    config = detection_run.config_path
    arguments = ["--format", "onnx", "--output", target, "--tolerance", "1e-30"]
    result = invoke("export", "-c", config, *arguments)
    one_error_line(result, "ONNX check failed", "detections", "pass a larger --tolerance")
    assert list(tmp_path.iterdir()) == []


def test_missing_onnx_packages_name_the_extra(segmentation_run, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as when missing
    result = invoke("export", "-c", segmentation_run.config_path, "--format", "onnx")
    one_error_line(result, "onnxruntime (not installed)", "pip install 'freekd[onnx]'")


def test_folders_that_are_no_export_give_one_clear_error(tmp_path, segmentation_run):
    with pytest.raises(FileNotFoundError, match=r"it has no config.json\): export one with"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match=r"it has no 'format', expected 'freekd-hf/1'"):
        from_pretrained(tmp_path)
    folder = export(segmentation_run.config, output=tmp_path / "hf", format="hf")
    info = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**info, "num_classes": 5}))
    with pytest.raises(ValueError, match=r"does not fit .* with 5 classes .*shape 2 "):
        from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**info, "arch": "unet"}))
    with pytest.raises(ValueError, match=r"config.json: unknown segmentation arch 'unet'"):
        from_pretrained(folder)
    with pytest.raises(FileExistsError, match="holds other files"):
        export(segmentation_run.config, output=tmp_path, format="hf")
