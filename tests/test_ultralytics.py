"""The Ultralytics adapter end to end, offline, on generated YOLO-format digit scenes.

A YOLOv8s teacher is trained 1 epoch at 128 px, its prompts are tuned 3 steps, a YOLOv8n and a
YOLO11n student are distilled 1 epoch each with ``FreeKDTrainer``; the checks: the distillation
term is finite and logged, the loaded prompts are the tuned ones, the saved student is a plain
Ultralytics model that reloads (without freekd) and predicts. A guard test pins the Ultralytics
internals the adapter relies on. Skipped when Ultralytics is not installed.
"""

from __future__ import annotations

import csv
import inspect
import math
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

os.environ.setdefault("YOLO_OFFLINE", "1")  # no update checks, no downloads
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="yolo-settings-"))
pytest.importorskip("ultralytics")

from safetensors import safe_open  # noqa: E402
from ultralytics import YOLO  # noqa: E402
from ultralytics.nn.tasks import DetectionModel, load_checkpoint  # noqa: E402

from freekd.integrations.ultralytics import (  # noqa: E402
    DISTILLATION_COLUMN,
    ULTRALYTICS_REQUIREMENT,
    FreeKDDetectionModel,
    FreeKDTrainer,
    build_loss_from_file,
    check_ultralytics,
    detect_taps,
    load_detection_model,
    tune_prompts,
    write_yolo_digits,
)
from freekd.integrations.ultralytics.data import write_yolo_dataset  # noqa: E402
from freekd.integrations.ultralytics.trainer import FreeKDSettings  # noqa: E402

SIZE = 128


def _train_args(data: Path, project: Path, name: str) -> dict:
    return dict(
        data=str(data),
        epochs=1,
        imgsz=SIZE,
        batch=4,
        workers=0,
        device="cpu",
        project=str(project),
        name=name,
        exist_ok=True,
        plots=False,
        amp=False,
        verbose=False,
        seed=0,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_yolo_digits(tmp_path_factory.mktemp("digits"), SIZE, train_length=8, val_length=4)


@pytest.fixture(scope="module")
def teacher(data, runs) -> Path:
    YOLO("yolov8s.yaml").train(**_train_args(data, runs, "teacher"))
    return runs / "teacher" / "weights" / "best.pt"


@pytest.fixture(scope="module")
def tuned(teacher, data, runs):
    return tune_prompts(
        teacher, data, runs / "prompts.safetensors", steps=3, imgsz=SIZE, batch=4, device="cpu"
    )


@pytest.fixture(scope="module")
def distilled(teacher, tuned, data, runs):
    student = YOLO("yolov8n.yaml")
    args = _train_args(data, runs, "student")
    student.train(trainer=FreeKDTrainer, teacher=str(teacher), prompts=str(tuned.path), **args)
    return student


def _results(run: Path) -> dict[str, float]:
    with open(run / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {key.strip(): float(value) for key, value in rows[-1].items()}


# ---------------------------------------------------------------------------- end to end


def test_the_distillation_term_is_finite_and_logged(distilled, runs):
    trainer = distilled.trainer
    assert trainer.loss_names[-1] == DISTILLATION_COLUMN == "kd_loss"
    row = _results(runs / "student")
    term = row[f"train/{DISTILLATION_COLUMN}"]
    assert math.isfinite(term) and term > 0
    assert all(math.isfinite(row[f"train/{n}"]) for n in ("box_loss", "cls_loss", "dfl_loss"))
    wrapper = trainer.model
    assert isinstance(wrapper, FreeKDDetectionModel)
    # mu auto: calibrated on the training images, recorded next to the run
    assert trainer.calibration["mu"] == pytest.approx(wrapper.mu) and wrapper.mu > 0
    record = (runs / "student" / "freekd.json").read_text()
    assert '"mu0"' in record and '"model.15"' in record
    # 1x1 convs 64/128/256 -> 128/256/512 (v8n -> v8s), read from the models; trained
    convs = [p.conv for p in wrapper.distiller.projections]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(64, 128), (128, 256), (256, 512)]
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in optimized for p in wrapper.distillation_parameters())
    assert not any(p.requires_grad for p in wrapper.teacher_model.parameters())


def test_the_prompts_loaded_are_the_tuned_ones(distilled, tuned):
    loss = distilled.trainer.model.distiller.feature_losses["freekd"]
    with safe_open(str(tuned.path), framework="pt") as handle:
        metadata = handle.metadata()
        saved = [handle.get_tensor(f"prompts.{i}.tokens") for i in range(len(loss.prompts))]
    assert metadata["taps"] == '["model.15", "model.18", "model.21"]'
    assert metadata["preset"] == '"recommended"' and metadata["resynthesis"] == '"centered"'
    assert loss.layer_levels == tuned.levels == [3, 2, 1]  # 16, 8, 4 px maps at 128 px
    for prompt, tokens in zip(loss.prompts, saved, strict=True):
        assert bool(prompt.tuned)
        assert torch.equal(prompt.tokens.detach().cpu(), tokens)
    assert tuned.steps == 3 and all(math.isfinite(v) for v in tuned.last_terms.values())


def test_the_saved_student_is_a_plain_ultralytics_model(distilled, runs, data):
    best = runs / "student" / "weights" / "best.pt"
    with zipfile.ZipFile(best) as archive:  # the pickle names no freekd class
        pickles = [archive.read(n) for n in archive.namelist() if n.endswith(".pkl")]
    assert pickles and not any(b"freekd" in p for p in pickles)
    model, _ = load_checkpoint(best)
    plain = DetectionModel("yolov8n.yaml", nc=10, verbose=False)
    assert type(model) is DetectionModel
    assert set(model.state_dict()) == set(plain.state_dict())  # no teacher, no projections
    assert not any(m._forward_hooks for m in model.modules())
    image = next((data.parent / "images" / "val").glob("*.png"))
    code = (
        "import sys; sys.modules['freekd'] = None\n"  # reloads with freekd unimportable
        "from ultralytics import YOLO\n"
        f"results = YOLO({str(best)!r}).predict({str(image)!r}, imgsz={SIZE}, device='cpu', "
        "verbose=False)\n"
        "print(type(results[0].boxes).__name__)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=os.environ
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("Boxes")


def test_another_student_size_works_unchanged(teacher, tuned, data, runs):
    student = YOLO("yolo11n.yaml")  # Detect.f [16, 19, 22], channels 64/128/256
    args = _train_args(data, runs, "student11")
    student.train(
        trainer=FreeKDTrainer, teacher=str(teacher), prompts=str(tuned.path), mu=0.5, **args
    )
    wrapper = student.trainer.model
    assert detect_taps(wrapper.module) == ["model.16", "model.19", "model.22"]
    assert wrapper.mu == 0.5 and student.trainer.calibration is None
    row = _results(runs / "student11")
    assert math.isfinite(row[f"train/{DISTILLATION_COLUMN}"])
    model, _ = load_checkpoint(runs / "student11" / "weights" / "best.pt")
    assert type(model) is DetectionModel and detect_taps(model) == detect_taps(wrapper.module)


def test_the_wrapper_alone_untuned_prompts_and_a_hook_free_copy(caplog):
    import copy

    from ultralytics.cfg import get_cfg

    from freekd import FreeKDLoss

    teacher = DetectionModel("yolov8s.yaml", nc=10, verbose=False)
    student = DetectionModel("yolo11n.yaml", nc=10, verbose=False)
    student.args = get_cfg()
    loss = FreeKDLoss.preset("recommended", [128, 256, 512], levels=[2, 1, 1])  # never tuned
    wrapper = FreeKDDetectionModel(student, teacher, loss, {"img": torch.zeros(2, 3, 64, 64)}, 2.0)
    batch = {
        "img": torch.rand(2, 3, 64, 64),
        "cls": torch.tensor([[1.0], [2.0]]),
        "bboxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.2]]),
        "batch_idx": torch.tensor([0.0, 1.0]),
    }
    wrapper.train()
    with caplog.at_level("WARNING", logger="freekd"):
        terms, items = wrapper(batch)
    assert "never tuned" in caplog.text
    assert terms.shape == (4,) and list(items)[-1] == DISTILLATION_COLUMN
    assert float(terms[-1].detach()) == pytest.approx(2 * float(items[DISTILLATION_COLUMN]))  # x N
    terms.sum().backward()
    assert all(p.grad is not None for p in wrapper.distillation_parameters())
    wrapper.distiller.loss_weights["freekd"] = 1.0
    _, unweighted = wrapper(batch)
    assert float(items[DISTILLATION_COLUMN]) == pytest.approx(
        2.0 * float(unweighted[DISTILLATION_COLUMN]), rel=1e-5
    )
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    with wrapper.taps_detached():
        copied = copy.deepcopy(student)
    assert not any(m._forward_hooks for m in copied.modules())
    assert any(m._forward_hooks for m in student.modules())  # back on the student
    wrapper.eval()
    _, items = wrapper(batch)
    assert float(items[DISTILLATION_COLUMN]) == 0  # eval: the student's loss alone
    wrapper.remove_hooks()
    assert not any(m._forward_hooks for m in student.modules())


# ---------------------------------------------------------------------------- data, input


def test_yolo_labels_round_trip(tmp_path):
    from freekd.data import DigitScenes

    scenes = DigitScenes("val", "detection", size=64, length=2)
    write_yolo_dataset(scenes, tmp_path, "val")
    for index in range(2):
        _, target = scenes[index]
        lines = (tmp_path / "labels" / "val" / f"{index:06d}.txt").read_text().splitlines()
        values = torch.tensor([[float(v) for v in line.split()] for line in lines])
        assert values[:, 0].long().tolist() == (target["labels"] - 1).tolist()
        cx, cy, w, h = (values[:, k] * 64 for k in range(1, 5))
        boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=1)
        assert torch.allclose(boxes, target["boxes"], atol=1e-3)


def test_a_teacher_loads_from_a_file_a_yolo_object_or_a_model(teacher):
    from_file = load_detection_model(teacher)
    yolo = YOLO(teacher)
    from_yolo, from_model = load_detection_model(yolo), load_detection_model(yolo.model)
    assert type(from_file) is type(from_yolo) is type(from_model) is DetectionModel
    assert from_yolo is not yolo.model and from_model is not yolo.model  # copies
    reference = from_file.state_dict()
    for loaded in (from_yolo, from_model):
        state = loaded.state_dict()
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[k].float(), reference[k].float()) for k in reference)
    with pytest.raises(ValueError, match="got Sequential: pass a YOLO detection model"):
        load_detection_model(nn.Sequential(nn.Conv2d(3, 3, 1)))


def test_bad_input_fails_in_one_line(tmp_path, tuned, teacher):
    with pytest.raises(ValueError, match="needs a teacher: pass teacher="):
        FreeKDSettings.pop_from({"data": "x.yaml"})
    with pytest.raises(ValueError, match="mu must be 'auto' or a number"):
        FreeKDSettings.pop_from({"teacher": "t.pt", "mu": "strong"})
    with pytest.raises(ImportError, match=r"supports ultralytics>=8.4.190,<8.5, found .* 8.3.0"):
        check_ultralytics("8.3.0")
    assert check_ultralytics("8.4.190") == "8.4.190" and ULTRALYTICS_REQUIREMENT.endswith("<8.5")
    with pytest.raises(ValueError, match="is a model YAML, i.e. an untrained model"):
        load_detection_model("yolov8s.yaml")
    with pytest.raises(FileNotFoundError, match="does not exist: train the teacher first"):
        load_detection_model(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match=r"tuned on the layers \['model.15'"):
        build_loss_from_file(tuned.path, ["model.16", "model.19", "model.22"], tuned.channels)
    with pytest.raises(ValueError, match="tuned for channels"):
        build_loss_from_file(tuned.path, tuned.taps, [64, 128, 256])
    with pytest.raises(ValueError, match="cannot resume a run"):
        FreeKDTrainer(overrides={"model": "yolov8n.yaml", "teacher": str(teacher), "resume": True})
    with pytest.raises(ValueError, match="teacher=... to FreeKDTrainer, or distill_model"):
        FreeKDTrainer(overrides={"teacher": str(teacher), "distill_model": str(teacher)})


def test_import_freekd_leaves_ultralytics_alone():
    code = (
        "import sys, freekd, freekd.integrations; print('ultralytics' in sys.modules)\n"
        "sys.modules['ultralytics'] = None  # as if it were not installed\n"
        "try:\n"
        "    import freekd.integrations.ultralytics\n"
        "except ImportError as error:\n"
        "    print(error)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0 and lines[0] == "False", result.stderr
    assert lines[1:] == [
        "freekd.integrations.ultralytics needs Ultralytics (AGPL-3.0), which is not installed: "
        "pip install 'freekd[ultralytics]' (or 'ultralytics>=8.4.190,<8.5')"
    ]


@pytest.mark.parametrize("name", ["_compat", "data", "models"])
def test_the_docstring_examples_run(name):
    import doctest
    import importlib

    module = importlib.import_module(f"freekd.integrations.ultralytics.{name}")
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------------------- guard


def test_the_ultralytics_internals_the_adapter_relies_on():
    from ultralytics.cfg import get_cfg
    from ultralytics.engine.trainer import BaseTrainer
    from ultralytics.engine.validator import BaseValidator
    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.nn.modules.head import Detect
    from ultralytics.utils.torch_utils import ModelEMA, unwrap_model

    check_ultralytics()
    # the trainer: wrap in _build_train_pipeline (after the freeze loop, before the optimizer and
    # the EMA), then the EMA of unwrap_model(self.model); the loop sums model(batch)[0]
    setup = inspect.getsource(BaseTrainer._setup_train)
    order = ["requires_grad = True", "self._build_train_pipeline()", "ModelEMA(self.model)"]
    assert all(s in setup for s in order) and sorted(order, key=setup.index) == order
    pipeline = inspect.getsource(BaseTrainer._build_train_pipeline)
    assert "self.build_optimizer(" in pipeline and "self._setup_scheduler()" in pipeline
    loop = inspect.getsource(BaseTrainer._do_train)
    assert "loss, self.loss_items = self.model(batch)" in loop and "loss.sum()" in loop
    assert "self.loss_names = tuple(self.loss_items)" in loop
    assert list(inspect.signature(BaseTrainer.__init__).parameters)[1:] == [
        "cfg",
        "overrides",
        "_callbacks",
    ]
    assert list(inspect.signature(BaseTrainer.build_optimizer).parameters)[1:] == [
        "model",
        "name",
        "lr",
        "momentum",
        "decay",
        "iterations",
    ]
    assert "mode" in inspect.signature(DetectionTrainer.get_dataloader).parameters
    assert "trainer.ema.ema" in inspect.getsource(BaseValidator.get_model)
    with pytest.raises(SyntaxError):  # unknown arguments are refused: the trainer pops its own
        get_cfg(overrides={"teacher": "teacher.pt"})

    # unwrap_model sees through `.module`, the EMA copies the unwrapped model
    student = DetectionModel("yolov8n.yaml", nc=10, verbose=False)
    holder = nn.Module()
    holder.module = student
    assert unwrap_model(holder) is student
    assert type(ModelEMA(holder).ema) is DetectionModel

    # Detect.f names the neck layers; the loss returns (terms [3] * N, {name: term})
    head = student.model[-1]
    assert isinstance(head, Detect) and list(head.f) == [15, 18, 21]
    student.args = get_cfg()
    batch = {
        "img": torch.rand(2, 3, 64, 64),
        "cls": torch.tensor([[1.0], [2.0]]),
        "bboxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.2]]),
        "batch_idx": torch.tensor([0.0, 1.0]),
    }
    terms, items = student.loss(batch)
    assert terms.shape == (3,) and list(items) == ["box_loss", "cls_loss", "dfl_loss"]
