"""Export a student and reload it: docs/cli.md, "Export" (run as it is: a baseline student of
the demo's recipe trained for two steps stands for your distilled one)."""

import json

import torch

from freekd.pipeline import export, from_pretrained, load_config, recipe_path, train_baseline
from freekd.pipeline.jobs import onnx_record

tiny = ["student.train.steps=2", "data.train_args.length=16", "data.val_args.length=4"]
config = load_config(recipe_path("digits_demo_segmentation"), ["run_dir=runs/export", *tiny])
train_baseline(config)  # stands for distill(config): export reads the job's last.ckpt
folder = export(config, role="baseline", format="hf")  # student_baseline/exported/last_hf
model = from_pretrained(folder)  # offline, in eval mode: the plain smp model
images = torch.randn(2, 3, 64, 64)  # normalized images as in training
with torch.no_grad():
    print(model(images).shape)  # logits [2, 11, 64, 64]
onnx_file = export(config, role="baseline", format="onnx")  # checked with onnxruntime
record = json.loads(onnx_record(onnx_file).read_text())  # the check: exporter, difference, ...
print(onnx_file, record["exporter"], record["max_abs_diff"])
