"""The three jobs on Lightning with your own models: docs/training.md, "From Python" (run as it
is: small models and a few steps on the built-in digit scenes; the comments give the paper's
numbers)."""

import torch
from torch import nn

from freekd import FreeKDLoss
from freekd.data import DigitScenes, default_segmentation_transforms
from freekd.distill import Distiller
from freekd.train import (
    DistillModule,
    OptimConfig,
    PromptTuningModule,
    ScheduleConfig,
    TeacherModule,
    TrainConfig,
    fit,
    make_train_loader,
    make_val_loader,
    prompt_tuning_recipe,
)
from freekd.tuning import PromptTuner

STEPS = 8  # per job; the paper: 40k / 80k (Cityscapes) or COCO "2x" (detection_2x_recipe)


def segmenter(width: int) -> nn.Module:  # any nn.Module: [N, 3, H, W] -> [N, 11, H, W]
    return nn.Sequential(
        nn.Conv2d(3, width, 3, stride=2, padding=1),  # "0": [N, width, H/2, W/2]
        nn.ReLU(),
        nn.Conv2d(width, width, 3, stride=2, padding=1),  # "2": [N, width, H/4, W/4]
        nn.ReLU(),
        nn.Conv2d(width, 11, 1),
        nn.Upsample(scale_factor=4.0, mode="bilinear"),
    )


def task_loss(model, batch):  # model(batch) -> scalar, or a dict of scalars (summed)
    images, masks = batch
    return nn.functional.cross_entropy(model(images), masks, ignore_index=255)


transforms = default_segmentation_transforms(train=True, crop_size=64)
train_set = DigitScenes("train", task="segmentation", size=64, length=64, transforms=transforms)
val_set = DigitScenes("val", task="segmentation", size=64, length=16)
train = make_train_loader(train_set, batch_size=4, seed=0)  # resumable, sharded under DDP
val = make_val_loader(val_set, batch_size=4)

# 0. a teacher (skip when you have one)
torch.manual_seed(0)  # fit() seeds the run, but the weights are built before it
teacher, student = segmenter(32), segmenter(8)
teacher_job = TeacherModule(
    teacher,
    task_loss,
    OptimConfig("sgd", lr=0.01, weight_decay=5e-4),
    ScheduleConfig("poly", total_steps=STEPS, min_lr=1e-4),
)
fit(teacher_job, train, val, TrainConfig(max_steps=STEPS, run_dir="runs/teacher"))

# 1. prompts (paper recipe: Adam 0.01, wd 1e-3, cosine to 1e-6, 2000 steps)
loss = FreeKDLoss.preset("recommended", channels=[32, 32])
tuner = PromptTuner(teacher, taps=["0", "2"], loss=loss, task_loss=task_loss)
tuning = PromptTuningModule(tuner, *prompt_tuning_recipe(total_steps=STEPS))
fit(tuning, train, config=TrainConfig(max_steps=STEPS, run_dir="runs/prompts"))
# -> runs/prompts/prompts.safetensors (marked tuned); loss.prompts are tuned in place too

# 2. distillation (1x1 projections 8 -> 32 channels, made because the shapes differ)
distiller = Distiller(
    teacher, student, ["0", "2"], ["0", "2"], {"freekd": loss}, task_loss, next(iter(train))
)
optim = OptimConfig("sgd", lr=0.01, momentum=0.9, weight_decay=5e-4)
schedule = ScheduleConfig("poly", total_steps=STEPS, min_lr=1e-4)
config = TrainConfig(max_steps=STEPS, run_dir="runs/student", grad_clip_norm=35)
fit(DistillModule(distiller, optim, schedule), train, val, config)  # precision="bf16-mixed" on GPUs
# -> runs/student/student.safetensors: the student's plain state_dict
