"""Model builders for the pipeline: torchvision detectors, smp segmenters and timm ViT segmenters
(``arch="vit_seg"``, backbone = a timm ViT name), with their default distillation taps, task
losses and predictors.

    spec = build_model("detection", "retinanet", "resnet50", num_classes=80)
    spec.model          # the nn.Module (plain torchvision / smp model)
    spec.taps           # ["backbone.fpn"]: the layers FreeKD distills
    spec.tap_channels   # [256] * 5: channels of the tapped features, fine to coarse
    spec.task_loss(spec.model, batch)   # the model's own loss (dict or scalar)
    spec.predict(spec.model, images)    # detections / class-id maps

Registry: :data:`REGISTRY` ``{task: {arch: backbones}}``; :func:`available_models` lists it.
This package needs torchvision and segmentation_models_pytorch (``freekd``'s core does not).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .._checks import check_choice
from .._choices import TASKS
from ..frozen import TaskLoss
from ._common import WeightsUnavailableError, eval_mode, model_device
from .detection import (
    DETECTION_ARCHS,
    DETECTION_BACKBONES,
    DETECTION_TAPS,
    FPN_CHANNELS,
    build_detector,
    detection_loss,
    detection_predict,
)
from .segmentation import (
    FPN_BACKBONES,
    FPN_PYRAMID_CHANNELS,
    FPN_TAPS,
    LAYER4_CHANNELS,
    SEGMENTATION_ARCHS,
    SEGMENTATION_BACKBONES,
    SEGMENTATION_TAPS,
    build_segmenter,
    segmentation_loss,
    segmentation_predict,
)
from .vit import (
    VIT_BACKBONES,
    VIT_TAPS,
    ViTSegmenter,
    build_vit_segmenter,
    check_vit_name,
    vit_embed_dim,
)

__all__ = [
    "REGISTRY",
    "TASKS",
    "ModelSpec",
    "ViTSegmenter",
    "WeightsUnavailableError",
    "available_models",
    "build_detector",
    "build_model",
    "build_segmenter",
    "build_vit_segmenter",
    "count_parameters",
    "default_taps",
    "detection_loss",
    "detection_predict",
    "eval_mode",
    "model_device",
    "segmentation_loss",
    "segmentation_predict",
]

REGISTRY: dict[str, dict[str, tuple[str, ...]]] = {
    "detection": dict.fromkeys(DETECTION_ARCHS, DETECTION_BACKBONES),
    "segmentation": {
        **dict.fromkeys(SEGMENTATION_ARCHS, SEGMENTATION_BACKBONES),
        "fpn": FPN_BACKBONES,
        "vit_seg": VIT_BACKBONES,
    },
}
"""``{task: {arch: valid backbones}}`` (``vit_seg`` also takes any other timm ViT name)."""


@dataclass
class ModelSpec:
    """A built model and what the pipeline needs to train, distill and evaluate it.

    Attributes:
        model: the ``nn.Module`` (a plain torchvision / smp model: its ``state_dict`` loads into
            the same architecture built without freekd).
        taps: default distillation taps (module paths, see :mod:`freekd.taps`), fine to coarse.
        tap_channels: channels of each tapped feature, in order (``FreeKDLoss``'s ``channels``).
        task_loss: ``task_loss(model, batch)`` -> scalar or dict of scalars (train mode).
        predict: ``predict(model, images)`` -> detections (list of dicts) or class ids
            ``[N, H, W]``.
        task, arch, backbone, num_classes: what was built.
    """

    model: nn.Module
    taps: list[str]
    tap_channels: list[int]
    task_loss: TaskLoss
    predict: Callable[[nn.Module, Any], Any]
    task: str
    arch: str
    backbone: str
    num_classes: int
    options: dict[str, Any] = field(default_factory=dict)


def _check(task: str, arch: str, backbone: str) -> None:
    check_choice("task", task, TASKS)
    check_choice(f"{task} arch", arch, tuple(REGISTRY[task]))
    if arch == "vit_seg":
        check_vit_name(backbone)
        return
    check_choice(f"{task} backbone for {arch}", backbone, REGISTRY[task][arch])


def default_taps(
    task: str,
    arch: str,
    backbone: str,
    embed_dim: int | None = None,
    pyramid_channels: int | None = None,
) -> tuple[list[str], list[int]]:
    """``(taps, tap_channels)`` that :func:`build_model` would attach, without building
    (``embed_dim``: a ViT's width when its builder args override the name's;
    ``pyramid_channels``: an FPN segmenter's ``decoder_pyramid_channels``, default 256)."""
    _check(task, arch, backbone)
    if task == "detection":
        return list(DETECTION_TAPS), [FPN_CHANNELS] * 5
    if arch == "vit_seg":
        return list(VIT_TAPS), [vit_embed_dim(backbone, embed_dim)]
    if arch == "fpn":
        return list(FPN_TAPS), [pyramid_channels or FPN_PYRAMID_CHANNELS] * len(FPN_TAPS)
    return list(SEGMENTATION_TAPS), [LAYER4_CHANNELS[backbone]]


def build_model(task: str, arch: str, backbone: str, num_classes: int, **kwargs: Any) -> ModelSpec:
    """Build ``arch`` on ``backbone`` for ``task`` and wrap it in a :class:`ModelSpec`.

    ``task="detection"``: :func:`~freekd.models.detection.build_detector` (``num_classes`` =
    object classes ``K``, labels ``1..K``). ``task="segmentation"``:
    :func:`~freekd.models.segmentation.build_segmenter` (``num_classes`` = mask classes).
    ``arch="vit_seg"``: :func:`~freekd.models.vit.build_vit_segmenter` on the timm ViT named by
    ``backbone`` (``img_size``, ``patch_size``, ``depth``, ``decoder``, ``encoder_weights``...).
    ``kwargs`` go to the builder (``weights``, ``weights_backbone``, ``min_size``,
    ``output_stride``, ...); for smp segmenters ``weights_backbone`` is accepted as another name of
    ``encoder_weights`` (``"DEFAULT"``: torchvision's ImageNet weights in both tasks).
    """
    _check(task, arch, backbone)
    taps, channels = default_taps(
        task, arch, backbone, kwargs.get("embed_dim"), kwargs.get("decoder_pyramid_channels")
    )
    if arch == "vit_seg":
        model = build_vit_segmenter(backbone, num_classes, **kwargs)
        task_loss, predict = segmentation_loss, segmentation_predict
    elif task == "detection":
        model = build_detector(arch, backbone, num_classes, **kwargs)
        task_loss, predict = detection_loss, detection_predict
    else:
        renamed = "weights_backbone" in kwargs
        if renamed:  # one name for the ImageNet backbone in both tasks
            if "encoder_weights" in kwargs:
                raise ValueError("pass weights_backbone or encoder_weights, not both")
            kwargs["encoder_weights"] = kwargs.pop("weights_backbone")
        try:
            model = build_segmenter(arch, backbone, num_classes, **kwargs)
        except WeightsUnavailableError as error:
            raise (error.named("weights_backbone") if renamed else error) from None
        task_loss, predict = segmentation_loss, segmentation_predict
    return ModelSpec(
        model=model,
        taps=taps,
        tap_channels=channels,
        task_loss=task_loss,
        predict=predict,
        task=task,
        arch=arch,
        backbone=backbone,
        num_classes=num_classes,
        options=dict(kwargs),
    )


def available_models() -> dict[str, dict[str, tuple[str, ...]]]:
    """``{task: {arch: backbones}}`` accepted by :func:`build_model`."""
    return {task: dict(archs) for task, archs in REGISTRY.items()}


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements of ``model`` (only those with ``requires_grad`` if asked)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
