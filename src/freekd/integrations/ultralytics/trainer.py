"""Stage 2 for YOLO students: an Ultralytics trainer that adds ``mu * FreeKDLoss``.

    from ultralytics import YOLO
    from freekd.integrations.ultralytics import FreeKDTrainer

    YOLO("yolov8n.yaml").train(trainer=FreeKDTrainer, teacher="teacher.pt",
                               prompts="prompts.safetensors", data="data.yaml")

:class:`FreeKDTrainer` is Ultralytics' ``DetectionTrainer`` with three keyword arguments of its
own, taken out of the arguments before Ultralytics checks them: ``teacher`` (required),
``prompts`` (the stage-1 file) and ``mu`` (``"auto"``: calibrated, or a number), plus
``mu_factor`` and ``calibration_batches``. During training the student is wrapped in a
:class:`FreeKDDetectionModel`, which runs a :class:`freekd.Distiller` (the frozen teacher, the
taps on both ``Detect.f`` layer lists, 1x1-conv projections where the channels differ, the
FreeKD loss): its loss is the student's detection loss with the distillation term appended
(the ``kd_loss`` column of the progress bar and of ``results.csv``).

The wrapper exposes the student as ``.module``, the attribute through which Ultralytics'
``unwrap_model`` sees through DDP wrappers, so everything Ultralytics does to "the model"
besides computing the training loss (the EMA, validation, the checkpoints, the criterion's
schedule) is done to the plain student: ``best.pt`` and ``last.pt`` hold the student alone
(no teacher, no projections, no freekd class: they load without freekd installed).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils import DEFAULT_CFG, LOGGER, RANK
from ultralytics.utils.torch_utils import ModelEMA

from ..._io import atomic_write
from ..._version import __version__
from ...distill import Distiller
from ...losses.freekd import FreeKDLoss
from ...wavelets import auto_levels
from .models import ModelSource, detect_taps, load_detection_model, tap_shapes
from .prompt_files import build_loss_from_file

__all__ = ["DISTILLATION_COLUMN", "FreeKDDetectionModel", "FreeKDSettings", "FreeKDTrainer"]

logger = logging.getLogger("freekd")

DISTILLATION_COLUMN = "kd_loss"
"""The name of the distillation term among the loss items (progress bar, ``results.csv``)."""


def _images(batch: Mapping[str, Any]) -> Tensor:
    """The model input of an Ultralytics batch: ``batch["img"]``, ``[N, 3, H, W]`` in [0, 1]."""
    return batch["img"]


class FreeKDDetectionModel(nn.Module):
    """The student with FreeKD attached, for training only.

    Args:
        student: the Ultralytics detection model being trained (``.module``).
        teacher: the trained teacher (frozen here, in place; ``teacher_model``).
        loss: the FreeKD loss over the teacher's ``Detect.f`` layers, with its prompts.
        example_batch: ``{"img": [N, 3, H, W]}`` for the dry run that sizes the projections.
        mu: the weight of the distillation term.

    ``loss(batch)`` returns ``(terms, items)`` like an Ultralytics model: ``terms`` is the
    student's ``[box, cls, dfl] * N`` with ``mu * L_FreeKD * N`` appended (the trainer sums
    it), ``items`` the student's named terms plus ``kd_loss`` (``mu * L_FreeKD``, detached).
    In eval mode it is the student's loss alone. Trained: the student and the projections;
    never the teacher or the prompts.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        loss: FreeKDLoss,
        example_batch: Mapping[str, Tensor],
        mu: float = 1.0,
    ) -> None:
        super().__init__()
        self.module = student
        self._task_output: tuple[Tensor, dict[str, Tensor]] | None = None
        before = {id(m): set(m._forward_hooks) for m in student.modules()}
        self.distiller = Distiller(
            teacher,
            student,
            detect_taps(teacher),
            detect_taps(student),
            {"freekd": loss},
            self._task_loss,
            example_batch=example_batch,
            loss_weights={"freekd": mu},
            projection="auto",
            teacher_input=_images,
        )
        self._tap_hooks = [
            (m, set(m._forward_hooks) - before[id(m)])
            for m in student.modules()
            if set(m._forward_hooks) - before[id(m)]
        ]

    @property
    def teacher_model(self) -> nn.Module:
        """The frozen teacher."""
        return self.distiller.teacher

    @property
    def mu(self) -> float:
        """The weight of the distillation term."""
        return self.distiller.loss_weights["freekd"]

    def _task_loss(self, student: nn.Module, batch: Mapping[str, Any]) -> Tensor:
        """The student's detection loss per image (the Distiller's task loss); keeps the
        criterion's own output for :meth:`loss`."""
        self._task_output = student.loss(batch)
        return self._task_output[0].sum() / batch["img"].shape[0]

    def loss(self, batch: dict[str, Any], preds: Any = None) -> tuple[Tensor, dict[str, Tensor]]:
        """``(terms [K + 1], items)``: see the class docstring. ``batch["img"]``:
        ``[N, 3, H, W]`` in [0, 1]."""
        if not self.training:
            terms, items = self.module.loss(batch, preds)
            return terms, {**items, DISTILLATION_COLUMN: torch.zeros_like(terms[0]).detach()}
        distilled = self.distiller(batch)["distill/freekd"]
        assert self._task_output is not None  # set by _task_loss inside the Distiller
        terms, items = self._task_output
        self._task_output = None
        appended = (distilled * batch["img"].shape[0]).reshape(1).to(terms.dtype)
        return torch.cat([terms, appended]), {**items, DISTILLATION_COLUMN: distilled.detach()}

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        """A batch dict -> :meth:`loss`; images -> the student's predictions."""
        if isinstance(x, dict):
            return self.loss(x, *args, **kwargs)
        return self.module(x, *args, **kwargs)

    def train(self, mode: bool = True) -> FreeKDDetectionModel:
        super().train(mode)  # the Distiller keeps the teacher in eval mode
        return self

    def distillation_parameters(self) -> list[nn.Parameter]:
        """What is trained besides the student: the projections (and a learned gate)."""
        student = {id(p) for p in self.module.parameters()}
        return [p for p in self.distiller.trainable_parameters() if id(p) not in student]

    @contextlib.contextmanager
    def taps_detached(self) -> Iterator[None]:
        """Take the distiller's hooks off the student for a while (e.g. to copy it)."""
        saved = [(m, OrderedDict(m._forward_hooks)) for m, _ in self._tap_hooks]
        for module, keys in self._tap_hooks:
            for key in keys:
                module._forward_hooks.pop(key, None)
        try:
            yield
        finally:
            for module, hooks in saved:
                module._forward_hooks.clear()
                module._forward_hooks.update(hooks)

    def remove_hooks(self) -> None:
        """Detach the distiller from teacher and student for good (idempotent)."""
        self.distiller.remove_hooks()


@dataclass
class FreeKDSettings:
    """The trainer's own arguments (the rest are Ultralytics').

    Attributes:
        teacher: the trained teacher: ``.pt`` path, ``YOLO`` object or ``DetectionModel``.
        prompts: the stage-1 prompt file; ``None``: untrained prompts (a warning is logged).
        mu: the weight of the distillation term, or ``"auto"``: ``mu_factor * mu0`` with
            ``mu0`` from :meth:`freekd.Distiller.calibrate` (the term pulls the student's
            features as hard as its detection loss at initialization).
        mu_factor: the factor on the calibrated weight.
        calibration_batches: training images batches (no augmentation) for the calibration.
        preset: the FreeKD preset when ``prompts`` is ``None`` (a prompt file names its own).
        loss_options: stage-2 settings of the loss to change (e.g. ``{"relational": "off"}``).
    """

    teacher: ModelSource = None
    prompts: str | None = None
    mu: float | str = "auto"
    mu_factor: float = 1.0
    calibration_batches: int = 2
    preset: str = "recommended"
    loss_options: dict[str, Any] | None = None

    @classmethod
    def pop_from(cls, overrides: dict[str, Any]) -> FreeKDSettings:
        """Take the trainer's own arguments out of ``overrides`` (in place) and check them."""
        names = [name for name in cls.__dataclass_fields__ if name in overrides]
        settings = cls(**{name: overrides.pop(name) for name in names})
        if settings.teacher is None:
            raise ValueError(
                "FreeKDTrainer needs a teacher: pass teacher='teacher.pt' (a trained "
                "Ultralytics detection checkpoint, a YOLO object or a DetectionModel)"
            )
        mu = settings.mu
        if not (mu == "auto" or (isinstance(mu, int | float) and not isinstance(mu, bool))):
            raise ValueError(f"mu must be 'auto' or a number >= 0, got {mu!r}")
        if mu != "auto" and not float(mu) >= 0:
            raise ValueError(f"mu must be 'auto' or a number >= 0, got {mu!r}")
        if not isinstance(settings.calibration_batches, int) or settings.calibration_batches < 1:
            raise ValueError(
                f"calibration_batches must be a positive integer, got "
                f"{settings.calibration_batches!r}"
            )
        return settings


class FreeKDTrainer(DetectionTrainer):
    """Ultralytics' detection trainer with FreeKD distillation from a teacher.

    Use it through ``YOLO(student).train(trainer=FreeKDTrainer, teacher=..., prompts=...,
    data=..., ...)`` or directly as ``FreeKDTrainer(overrides={"model": "yolov8n.yaml",
    "data": ..., "teacher": ..., ...}).train()``. The trainer's own arguments are those of
    :class:`FreeKDSettings`; every other argument is Ultralytics'. The student trains on
    ``L_det + mu * L_FreeKD`` (the distillation term is the ``kd_loss`` column); the
    checkpoints hold the student alone and ``save_dir/freekd.json`` records the distillation
    settings.

    One device only (no DDP), no ``resume`` and no ``compile`` (the distiller runs eagerly),
    and not together with Ultralytics' own ``distill_model``.

    Raises:
        ValueError: a missing teacher, a bad ``mu``, a prompt file made for other layers or
            channels, or one of the unsupported combinations above.
    """

    def __init__(
        self,
        cfg: Any = DEFAULT_CFG,
        overrides: dict[str, Any] | None = None,
        _callbacks: dict | None = None,
    ) -> None:
        overrides = dict(overrides or {})
        self.freekd = FreeKDSettings.pop_from(overrides)
        if overrides.get("resume"):
            raise ValueError(
                "FreeKDTrainer cannot resume a run: start a new one (its best.pt is a plain "
                "student checkpoint to continue from with model=...)"
            )
        if overrides.get("distill_model"):
            raise ValueError(
                "FreeKDTrainer and Ultralytics' distill_model are two distillation methods: "
                "pass teacher=... to FreeKDTrainer, or distill_model=... without it"
            )
        super().__init__(cfg, overrides, _callbacks)
        if self.world_size > 1:
            raise ValueError(
                f"FreeKDTrainer runs on one device, got device={self.args.device!r}: pass one "
                f"device (e.g. device=0)"
            )
        if self.args.compile:
            LOGGER.warning("FreeKDTrainer: 'compile' is not supported and is disabled.")
            self.args.compile = False
        self.calibration: dict[str, Any] | None = None
        self.add_callback("teardown", _remove_hooks)

    # ------------------------------------------------------------------ set-up

    def _build_train_pipeline(self) -> None:
        """Wrap the student (first call only), then build the loaders and the optimizer, then
        calibrate ``mu`` (``"auto"``; first call only)."""
        if not isinstance(self.model, FreeKDDetectionModel):
            self.model = self._distillation_model(self.model)
        super()._build_train_pipeline()
        if self.freekd.mu == "auto" and self.calibration is None:
            self.calibration = self._calibrate()

    def _setup_train(self) -> None:
        """Ultralytics' set-up, then the EMA again: a copy of the student without the
        distiller's hooks (it is what validation runs and the checkpoints hold)."""
        super()._setup_train()
        with self.model.taps_detached():
            self.ema = ModelEMA(self.model)
        if RANK in {-1, 0}:
            self._write_record()

    def _distillation_model(self, student: nn.Module) -> FreeKDDetectionModel:
        teacher = load_detection_model(self.freekd.teacher, "teacher").to(self.device)
        if len(detect_taps(teacher)) != len(detect_taps(student)):
            raise ValueError(
                f"the teacher's Detect head reads {len(detect_taps(teacher))} layers "
                f"{detect_taps(teacher)}, the student's {len(detect_taps(student))} "
                f"{detect_taps(student)}: use models with the same number of detection levels"
            )
        teacher_nc, student_nc = getattr(teacher, "nc", None), getattr(student, "nc", None)
        if teacher_nc is not None and student_nc is not None and teacher_nc != student_nc:
            LOGGER.warning(
                f"FreeKDTrainer: the teacher detects {teacher_nc} classes, the student "
                f"{student_nc}; only the neck features are distilled"
            )
        imgsz = int(self.args.imgsz)
        channels_in = int(self.data.get("channels", 3))
        shapes = tap_shapes(teacher, imgsz, channels_in)
        channels = [int(shape[1]) for shape in shapes]
        options = dict(self.freekd.loss_options or {})
        if self.freekd.prompts is not None:
            loss = build_loss_from_file(
                self.freekd.prompts, detect_taps(teacher), channels, options
            )
        else:
            levels = auto_levels([(int(s[-2]), int(s[-1])) for s in shapes])
            loss = FreeKDLoss.preset(self.freekd.preset, channels, **{"levels": levels, **options})
        loss.to(self.device)
        example = {"img": torch.zeros(2, channels_in, imgsz, imgsz, device=self.device)}
        mu = 1.0 if self.freekd.mu == "auto" else float(self.freekd.mu)
        return FreeKDDetectionModel(student, teacher, loss, example, mu)

    def _calibrate(self) -> dict[str, Any]:
        """``mu = mu_factor * mu0`` from the first training batches without augmentation."""
        loader = self.get_dataloader(
            self.data["train"], batch_size=self.batch_size, rank=-1, mode="val"
        )
        count = self.freekd.calibration_batches
        batches = [self.preprocess_batch(b) for b in itertools.islice(loader, count)]
        if hasattr(loader, "close"):
            loader.close()
        mu0 = self.model.distiller.calibrate(batches)["freekd"]
        self.model.module.criterion = None  # rebuilt on the first step (with class weights)
        mu = self.freekd.mu_factor * mu0
        self.model.distiller.loss_weights["freekd"] = mu
        LOGGER.info(
            f"FreeKD: mu auto -> {mu:.4g} (mu0 {mu0:.4g} x mu_factor {self.freekd.mu_factor:g}: "
            f"the FreeKD term pulls the student's features as hard as its detection loss)"
        )
        return {"mu0": mu0, "mu_factor": self.freekd.mu_factor, "mu": mu, "batches": len(batches)}

    def build_optimizer(
        self,
        model: nn.Module,
        name: str = "auto",
        lr: float = 0.001,
        momentum: float = 0.9,
        decay: float = 1e-5,
        iterations: float = 1e5,
    ) -> torch.optim.Optimizer:
        """Ultralytics' optimizer for the student, plus the projections: their weights with the
        options of the decayed weight group, their biases with those of the bias group."""
        optimizer = super().build_optimizer(model, name, lr, momentum, decay, iterations)
        if isinstance(model, FreeKDDetectionModel):
            extra = model.distillation_parameters()
            for kind, chosen in (
                ("weight", [p for p in extra if p.ndim > 1]),
                ("bias", [p for p in extra if p.ndim <= 1]),
            ):
                template = next(
                    (g for g in optimizer.param_groups if g.get("param_group") == kind), None
                )
                if chosen and template is not None:
                    options = {k: v for k, v in template.items() if k != "params"}
                    optimizer.add_param_group({**options, "params": chosen})
                elif chosen:
                    optimizer.add_param_group({"params": chosen})
        return optimizer

    # ------------------------------------------------------------------ record

    def _write_record(self) -> None:
        """``save_dir/freekd.json``: teacher, prompts, taps, mu and the versions."""
        settings = asdict(self.freekd)
        teacher = settings["teacher"]
        settings["teacher"] = (
            str(teacher) if isinstance(teacher, str | Path) else type(teacher).__name__
        )
        wrapper = self.model
        record = {
            "method": "freekd",
            "settings": settings,
            "teacher_taps": detect_taps(wrapper.teacher_model),
            "student_taps": detect_taps(wrapper.module),
            "channels": list(wrapper.distiller.feature_losses["freekd"].channels),
            "levels": wrapper.distiller.feature_losses["freekd"].layer_levels,
            "projections": [str(p) for p in wrapper.distiller.projections],
            "mu": wrapper.mu,
            "calibration": self.calibration,
            "freekd_version": __version__,
        }
        text = json.dumps(record, indent=2, default=str) + "\n"
        atomic_write(Path(self.save_dir) / "freekd.json", lambda p: Path(p).write_text(text))


def _remove_hooks(trainer: FreeKDTrainer) -> None:
    """Teardown callback: the student works alone again after training."""
    if isinstance(trainer.model, FreeKDDetectionModel):
        trainer.model.remove_hooks()
