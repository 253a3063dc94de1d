"""Allowed values that several subpackages share (the data sets, the model builders, the pipeline
and the command line), each written once: a ``Literal`` type and its tuple (``typing.get_args``).

The values that belong to one core module stay with it (``freekd.prompts.GRANULARITIES``,
``freekd.relation.GATES``, ``freekd.distill.PROJECTIONS``, ...).
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = ["EXPORT_FORMATS", "ROLES", "SPLITS", "TASKS", "ExportFormat", "Role", "Split", "Task"]

Task = Literal["detection", "segmentation"]
"""A dense-prediction task."""
TASKS: tuple[str, ...] = get_args(Task)

Split = Literal["train", "val"]
"""A data split (the order also seeds the built-in scenes: do not reorder)."""
SPLITS: tuple[str, ...] = get_args(Split)

Role = Literal["teacher", "student", "baseline"]
"""A model of a run: the teacher, the distilled student, or the student trained alone."""
ROLES: tuple[str, ...] = get_args(Role)

ExportFormat = Literal["safetensors", "hf", "onnx"]
"""What ``freekd export`` writes: the student's state dict as safetensors, a Hugging Face style
folder (config.json, model.safetensors, README.md), or an ONNX file checked with onnxruntime."""
EXPORT_FORMATS: tuple[str, ...] = get_args(ExportFormat)
