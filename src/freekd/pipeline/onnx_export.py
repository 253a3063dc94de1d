"""The student as ONNX, checked against PyTorch with onnxruntime (extra ``freekd[onnx]``).

- Segmenters (``[N, 3, H, W]`` -> logits ``[N, K, H, W]``) go through the ``torch.export``
  exporter (``torch.onnx.export(..., dynamo=True)``), the batch size ``N`` dynamic and ``H x W``
  fixed at the sample's size (a dynamic size exported, but gave wrong logits at other sizes for
  the ViT segmenter and failed in onnxruntime for PSPNet).
- torchvision detectors (one image ``[3, H, W]`` in ``[0, 1]``, any ``H x W`` -> ``boxes [D, 4]``,
  ``scores [D]``, ``labels [D]``, the model's own resize and normalization inside) go through the
  TorchScript exporter (``dynamo=False``, opset :data:`DETECTION_OPSET`): ``torch.export`` stops
  at the data-dependent sizes of their box NMS (``torchvision.ops.batched_nms``) for RetinaNet,
  FCOS and Faster R-CNN alike. The detections include label 0 (background) when the model gives
  it; :func:`freekd.models.detection_predict` drops those.

:func:`export_onnx` writes the file only once onnxruntime's outputs on the sample (and on a second
input: a batch of two for segmenters, another image size for detectors) are within ``tolerance``
of PyTorch's, and returns the measured difference (:class:`OnnxExport`).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._extras import require_extra

__all__ = [
    "DEFAULT_TOLERANCE",
    "DETECTION_OPSET",
    "ONNX_MODULES",
    "DetectorOutputs",
    "OnnxExport",
    "detection_difference",
    "export_onnx",
    "onnxruntime_session",
    "require_onnx",
]

ONNX_MODULES = ("onnx", "onnxruntime", "onnxscript")
"""The top-level modules of the ``onnx`` extra (``pyproject.toml``)."""

DEFAULT_TOLERANCE = 1e-3
"""Largest accepted absolute difference between onnxruntime's and PyTorch's outputs (logits;
boxes in pixels and scores)."""

DETECTION_OPSET = 17
"""ONNX opset of the TorchScript exporter for detectors (torchvision needs >= 11)."""

DETECTION_OUTPUTS = ("boxes", "scores", "labels")


@dataclass(frozen=True)
class OnnxExport:
    """An ONNX file and its check against PyTorch.

    Attributes:
        path: the ``.onnx`` file.
        files: the names of the files written in its folder (the graph, external weights).
        exporter: ``"dynamo"`` (``torch.export``) or ``"torchscript"``.
        opset: the ONNX opset of the file.
        inputs, outputs: the graph's input and output names.
        compared: what the check compared, e.g. ``"logits [2, 11, 64, 64]"``.
        max_abs_diff: the largest absolute difference onnxruntime vs PyTorch.
        tolerance: the largest accepted one.
    """

    path: Path
    files: list[str]
    exporter: str
    opset: int
    inputs: list[str]
    outputs: list[str]
    compared: str
    max_abs_diff: float
    tolerance: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (``path`` as text)."""
        return {**asdict(self), "path": str(self.path)}


def require_onnx() -> None:
    """Raise :class:`freekd._extras.MissingExtraError` naming ``pip install 'freekd[onnx]'``
    when onnx, onnxruntime or onnxscript cannot be imported."""
    require_extra("onnx", ONNX_MODULES, "ONNX export")


class DetectorOutputs(nn.Module):
    """A torchvision detector as ONNX sees it: ``forward(image [3, H, W])`` -> ``(boxes [D, 4],
    scores [D], labels [D])`` of that one image (eval mode; the detector is not copied)."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        detections = self.detector([image])[0]
        return tuple(detections[name] for name in DETECTION_OUTPUTS)  # type: ignore[return-value]


def onnxruntime_session(path: str | os.PathLike) -> Any:
    """An onnxruntime CPU session of ``path``, using as many threads as torch does."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(
        os.fspath(path), options, providers=["CPUExecutionProvider"]
    )


def _check_inputs(model: nn.Module, task: str, sample: Tensor) -> None:
    if task not in ("segmentation", "detection"):
        raise ValueError(f"unknown task {task!r}; choose one of 'segmentation', 'detection'")
    expected = 4 if task == "segmentation" else 3
    if sample.dim() != expected or sample.shape[-3] != 3:
        shape = "[N, 3, H, W]" if task == "segmentation" else "[3, H, W] (one image)"
        raise ValueError(
            f"the {task} sample must be {shape}, got {tuple(sample.shape)}: pass one image of "
            f"the configured size"
        )
    devices = {parameter.device.type for parameter in model.parameters()}
    if devices - {"cpu"}:
        raise ValueError("export_onnx exports a CPU model: call model.cpu() first")


# ---------------------------------------------------------------------------- segmenters


_SINGLE_FILE_BYTES = 1 << 30
"""Weights up to this size stay inside the ``.onnx`` file (protobuf caps a file at 2 GiB); a
larger model's go to ``<file>.data`` beside it."""


def _weight_bytes(model: nn.Module) -> int:
    """The bytes of ``model``'s parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _export_segmenter(model: nn.Module, sample: Tensor, path: str) -> tuple[str, int]:
    """``model`` ``[N, 3, H, W]`` -> ``[N, K, H, W]`` with ``torch.export``, ``N`` dynamic."""
    program = torch.onnx.export(
        model,
        (sample,),
        path,
        dynamo=True,
        external_data=_weight_bytes(model) > _SINGLE_FILE_BYTES,
        verbose=False,
        input_names=["images"],
        output_names=["logits"],
        dynamic_shapes=({0: "batch"},),
    )
    opset = next(
        (entry.version for entry in program.model_proto.opset_import if entry.domain == ""),
        0,
    )
    return "dynamo", int(opset)


def _segmenter_difference(model: nn.Module, sample: Tensor, session: Any) -> tuple[float, str]:
    """Max ``|onnxruntime - PyTorch|`` of the logits of ``sample`` and its mirror image stacked
    (``[2N, 3, H, W]``, which also exercises the dynamic batch size)."""
    batch = torch.cat([sample, sample.flip(-1)])
    with torch.no_grad():
        reference = model(batch)
    (logits,) = session.run(None, {"images": batch.numpy()})
    difference = (torch.from_numpy(logits) - reference).abs().max().item()
    return difference, f"logits {list(reference.shape)}"


# ---------------------------------------------------------------------------- detectors


def _export_detector(model: nn.Module, sample: Tensor, path: str) -> tuple[str, int]:
    """``DetectorOutputs(model)`` with the TorchScript exporter, ``H`` and ``W`` dynamic."""
    axes = {"image": {1: "height", 2: "width"}}
    axes.update({name: {0: "detections"} for name in DETECTION_OUTPUTS})
    with warnings.catch_warnings():  # tracer notes about torchvision internals, not actionable
        for category in (torch.jit.TracerWarning, UserWarning, DeprecationWarning, FutureWarning):
            warnings.simplefilter("ignore", category)
        torch.onnx.export(  # the exporter restores the mode it found: eval, as the detector
            DetectorOutputs(model).eval(),
            (sample,),
            path,
            dynamo=False,
            opset_version=DETECTION_OPSET,
            input_names=["image"],
            output_names=list(DETECTION_OUTPUTS),
            dynamic_axes=axes,
        )
    return "torchscript", DETECTION_OPSET


def detection_difference(
    reference: Sequence[Tensor], candidate: Sequence[Tensor]
) -> tuple[float, int]:
    """``(max abs difference, detections)`` between two detection lists ``(boxes [D, 4],
    scores [D], labels [D])`` whose order may differ where scores nearly tie.

    Each reference detection is paired with a candidate of the same label (greedily, closest
    first; the distance of a pair is the largest absolute difference of its box coordinates and
    score); the result is the largest distance of a pair. Raises ``ValueError`` when the counts
    differ or a detection has no partner of its label.
    """
    boxes, scores, labels = reference
    other_boxes, other_scores, other_labels = (torch.as_tensor(t) for t in candidate)
    if len(scores) != len(other_scores):
        raise ValueError(f"onnxruntime gives {len(other_scores)} detections, PyTorch {len(scores)}")
    if len(scores) == 0:
        return 0.0, 0
    distance = torch.maximum(
        (boxes[:, None, :] - other_boxes[None, :, :].to(boxes.dtype)).abs().amax(-1),
        (scores[:, None] - other_scores[None, :].to(scores.dtype)).abs(),
    )
    distance[labels[:, None] != other_labels[None, :].to(labels.dtype)] = float("inf")
    order = torch.argsort(distance.reshape(-1))
    count = len(scores)
    paired, taken = torch.zeros(count, dtype=torch.bool), torch.zeros(count, dtype=torch.bool)
    largest = 0.0
    for flat in order.tolist():
        row, column = divmod(flat, count)
        if paired[row] or taken[column]:
            continue
        value = float(distance[row, column])
        if value == float("inf"):
            raise ValueError("onnxruntime and PyTorch give detections of different labels")
        paired[row], taken[column] = True, True
        largest = max(largest, value)
        if bool(paired.all()):
            break
    return largest, count


def _detector_difference(model: nn.Module, sample: Tensor, session: Any) -> tuple[float, str]:
    """Max difference of the detections of ``sample`` and of its top three quarters (another
    image size, which exercises the dynamic ``H`` and ``W``)."""
    height = sample.shape[-2]
    largest, counts = 0.0, []
    for image in (sample, sample[:, : max(1, height * 3 // 4)].contiguous()):
        with torch.no_grad():
            detections = model([image])[0]
        outputs = session.run(None, {"image": image.numpy()})
        reference = [detections[name] for name in DETECTION_OUTPUTS]
        difference, count = detection_difference(reference, [torch.from_numpy(o) for o in outputs])
        largest, counts = max(largest, difference), [*counts, count]
    sizes = f"{list(sample.shape)} and {[3, max(1, height * 3 // 4), sample.shape[-1]]}"
    return largest, f"{' + '.join(map(str, counts))} detections of images {sizes}"


# ---------------------------------------------------------------------------- both


def export_onnx(
    model: nn.Module,
    task: str,
    sample: Tensor,
    path: str | os.PathLike,
    tolerance: float = DEFAULT_TOLERANCE,
) -> OnnxExport:
    """Export ``model`` (a CPU segmenter or torchvision detector, put in eval mode) to ONNX at
    ``path`` and check onnxruntime's outputs against PyTorch's (module docstring).

    Args:
        model: the ``nn.Module``; not trained, its mode is left at eval.
        task: ``"segmentation"`` or ``"detection"``.
        sample: segmentation: images ``[N, 3, H, W]`` as the model takes them (normalized);
            detection: one image ``[3, H, W]`` in ``[0, 1]``.
        path: the ``.onnx`` file (and, for a large model, its weights ``<path>.data`` beside
            it), each moved into place only when the check passes.
        tolerance: the largest accepted max abs difference.

    Raises:
        MissingExtraError: onnx, onnxruntime or onnxscript is missing (``pip install
            'freekd[onnx]'``).
        ValueError: the outputs differ by more than ``tolerance`` (nothing written).
    """
    require_onnx()
    _check_inputs(model, task, sample)
    model.eval()
    sample = sample.detach().float()
    export, measure = (
        (_export_segmenter, _segmenter_difference)
        if task == "segmentation"
        else (_export_detector, _detector_difference)
    )
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Staged in a folder of its own: the exporter may write the weights beside the graph
    # (``<name>.onnx.data``, named after the file), and nothing is left when the check fails.
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=target.parent) as work:
        staged = Path(work) / target.name
        exporter, opset = export(model, sample, str(staged))
        session = onnxruntime_session(staged)
        difference, compared = measure(model, sample, session)
        if not difference <= tolerance:
            raise ValueError(
                f"ONNX check failed: onnxruntime's {compared} differ from PyTorch's by up to "
                f"{difference:.3g} (tolerance {tolerance:g}); nothing was written to {target}: "
                f"pass a larger tolerance= if that difference is acceptable"
            )
        files = sorted(entry.name for entry in Path(work).iterdir())
        for name in files:
            os.replace(Path(work) / name, target.parent / name)
    return OnnxExport(
        path=target,
        files=files,
        exporter=exporter,
        opset=opset,
        inputs=[entry.name for entry in session.get_inputs()],
        outputs=[entry.name for entry in session.get_outputs()],
        compared=compared,
        max_abs_diff=difference,
        tolerance=tolerance,
    )
