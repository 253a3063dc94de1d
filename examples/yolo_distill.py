"""Distil a YOLO model with Ultralytics: docs/ultralytics.md, "Distil a YOLO model" (run as it
is, offline: generated digit scenes at 128 px, one epoch per model and three prompt-tuning
steps stand in for your data and schedule)."""

import os

os.environ.setdefault("YOLO_OFFLINE", "1")  # Ultralytics: no update checks, no downloads

from pathlib import Path

from ultralytics import YOLO

from freekd.integrations.ultralytics import FreeKDTrainer, tune_prompts, write_yolo_digits

# YOLO-format data: images/{train,val}, labels/{train,val} and data.yaml (use your own YAML).
data = write_yolo_digits("digits_yolo", size=128, train_length=16, val_length=8)
runs = Path("runs").resolve()
settings = dict(data=str(data), imgsz=128, epochs=1, batch=8, workers=0, plots=False)

# The teacher: any trained Ultralytics detector (here a YOLOv8s trained for one epoch).
YOLO("yolov8s.yaml").train(project=str(runs), name="teacher", **settings)
teacher = runs / "teacher" / "weights" / "best.pt"

# Stage 1: tune the prompts on the frozen teacher (the layers its Detect head reads).
prompts = tune_prompts(teacher, data, "prompts.safetensors", steps=3, imgsz=128, batch=8)
print("prompts tuned on", prompts.taps, "with levels", prompts.levels)

# Stage 2: train the student with mu * FreeKD added to its detection loss (column kd_loss).
student = YOLO("yolov8n.yaml")
student.train(
    trainer=FreeKDTrainer,
    teacher=str(teacher),
    prompts=str(prompts.path),
    project=str(runs),
    name="student",
    **settings,
)

# The student's checkpoint is a plain Ultralytics model: no teacher, projections or freekd.
distilled = YOLO(runs / "student" / "weights" / "best.pt")
metrics = distilled.val(data=str(data), imgsz=128, batch=8, plots=False, project=str(runs))
print(f"student mAP50-95 {metrics.box.map:.3f}")
