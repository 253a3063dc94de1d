"""Training on Lightning: the three jobs (train a teacher, tune prompts, distill a student).

    from freekd.train import DistillModule, TrainConfig, fit, make_train_loader
    optim, schedule = detection_2x_recipe(steps_per_epoch=len(loader))
    module = DistillModule(distiller, optim, schedule)
    fit(module, make_train_loader(dataset, batch_size=2, seed=0), config=TrainConfig(...))

This subpackage needs ``lightning``; the rest of ``freekd`` needs only ``torch``.
See ``docs/training.md``.
"""

from .callbacks import AtomicCheckpointIO, RNGState, StepCheckpoint
from .config import (
    DETECTION_GRAD_CLIP,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
    detection_2x_recipe,
    prompt_tuning_recipe,
    segmentation_poly_recipe,
)
from .data import (
    ResumableDataLoader,
    ResumableSampler,
    ShardSampler,
    make_train_loader,
    make_val_loader,
)
from .modules import DistillModule, PromptTuningModule, TeacherModule
from .progress import RichStepProgressBar, StepLog, StepProgressBar
from .runner import FitResult, build_trainer, fit, resolve_resume
from .schedules import build_optimizer, build_scheduler, lr_factor

__all__ = [
    "DETECTION_GRAD_CLIP",
    "AtomicCheckpointIO",
    "DistillModule",
    "FitResult",
    "OptimConfig",
    "PromptTuningModule",
    "RNGState",
    "ResumableDataLoader",
    "ResumableSampler",
    "RichStepProgressBar",
    "ScheduleConfig",
    "ShardSampler",
    "StepCheckpoint",
    "StepLog",
    "StepProgressBar",
    "TeacherModule",
    "TrainConfig",
    "build_optimizer",
    "build_scheduler",
    "build_trainer",
    "detection_2x_recipe",
    "fit",
    "lr_factor",
    "make_train_loader",
    "make_val_loader",
    "prompt_tuning_recipe",
    "resolve_resume",
    "segmentation_poly_recipe",
]
