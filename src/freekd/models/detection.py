"""torchvision detectors (RetinaNet, FCOS, Faster R-CNN) on ResNet-FPN backbones.

Each architecture is built the way torchvision's own ``retinanet_resnet50_fpn``,
``fcos_resnet50_fpn`` and ``fasterrcnn_resnet50_fpn`` build it, with the ResNet depth as a
parameter: with ``backbone="resnet50"`` the model has exactly torchvision's parameter names and
shapes, so torchvision's checkpoints load into it.

- RetinaNet, FCOS: FPN on ``layer2..layer4`` (C3-C5) plus ``LastLevelP6P7(256, 256)`` (P6 from
  P5): five levels P3-P7, strides 8-128, outputs ``'0', '1', '2', 'p6', 'p7'``.
- Faster R-CNN: FPN on ``layer1..layer4`` (C2-C5) plus ``LastLevelMaxPool``: five levels P2-P6,
  strides 4-64, outputs ``'0', '1', '2', '3', 'pool'``.

Every FPN output has 256 channels; the default distillation tap ``"backbone.fpn"`` captures all
five, fine to coarse.

Classes: ``num_classes`` is the number of object classes ``K``; targets carry labels ``1..K``
and the torchvision model is built with ``K + 1`` outputs (torchvision's ``num_classes``), index
0 being the background. Faster R-CNN needs that background class. RetinaNet and FCOS index their
per-class sigmoid logits by the label directly (one-hot of the label over ``num_classes``), so
with labels ``1..K`` they need ``K + 1`` logits as well; the logit of class 0 is only ever trained
towards "absent" -- exactly the layout of torchvision's COCO models (91 outputs for COCO's
category ids 1..90). :func:`detection_predict` drops the (rare) class-0 detections.

Images: a list of ``[3, H, W]`` float tensors in ``[0, 1]``, any sizes; the model normalizes
them (ImageNet mean / std) and resizes them to ``min_size`` / ``max_size`` itself. Boxes are
``[M, 4]`` ``(x1, y1, x2, y2)`` in pixels of the input image.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models import (
    ResNet18_Weights,
    ResNet34_Weights,
    ResNet50_Weights,
    ResNet101_Weights,
    WeightsEnum,
)
from torchvision.models.detection import (
    FCOS,
    FasterRCNN,
    FasterRCNN_ResNet50_FPN_Weights,
    FCOS_ResNet50_FPN_Weights,
    RetinaNet,
    RetinaNet_ResNet50_FPN_Weights,
)
from torchvision.models.detection.backbone_utils import BackboneWithFPN, resnet_fpn_backbone
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from .._checks import check_choice, check_positive_int
from ._common import (
    downloads,
    eval_mode,
    is_checkpoint_path,
    load_checkpoint,
)

__all__ = [
    "DETECTION_ARCHS",
    "DETECTION_BACKBONES",
    "DETECTION_TAPS",
    "FPN_CHANNELS",
    "build_detector",
    "detection_loss",
    "detection_predict",
    "split_detection_batch",
]

logger = logging.getLogger("freekd")

DETECTION_ARCHS = ("retinanet", "fcos", "faster_rcnn")
DETECTION_BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")
DETECTION_TAPS = ("backbone.fpn",)
"""Default distillation taps: all five FPN outputs, ``[N, 256, H/s, W/s]`` fine to coarse."""

FPN_CHANNELS = 256

_ARCH_CLASSES: dict[str, type[nn.Module]] = {
    "retinanet": RetinaNet,
    "fcos": FCOS,
    "faster_rcnn": FasterRCNN,
}
_MODEL_WEIGHTS: dict[str, type[WeightsEnum]] = {
    "retinanet": RetinaNet_ResNet50_FPN_Weights,
    "fcos": FCOS_ResNet50_FPN_Weights,
    "faster_rcnn": FasterRCNN_ResNet50_FPN_Weights,
}
_BACKBONE_WEIGHTS: dict[str, type[WeightsEnum]] = {
    "resnet18": ResNet18_Weights,
    "resnet34": ResNet34_Weights,
    "resnet50": ResNet50_Weights,
    "resnet101": ResNet101_Weights,
}
# Checkpoint entries whose shapes depend on the number of classes (re-initialized when a COCO
# checkpoint is loaded into a model with another num_classes).
_CLASS_DEPENDENT = {
    "retinanet": ("head.classification_head.cls_logits.",),
    "fcos": ("head.classification_head.cls_logits.",),
    "faster_rcnn": ("roi_heads.box_predictor.",),
}
# torchvision loads these COCO checkpoints with FrozenBatchNorm2d eps = 0 (how they were trained).
_ZERO_EPS_WEIGHTS = {
    RetinaNet_ResNet50_FPN_Weights.COCO_V1,
    FasterRCNN_ResNet50_FPN_Weights.COCO_V1,
}


def _resolve_enum(enum_type: type[WeightsEnum], value: str | WeightsEnum, what: str) -> WeightsEnum:
    """``value`` (a member or its name, ``"DEFAULT"`` included) as a member of ``enum_type``."""
    if isinstance(value, WeightsEnum):
        if not isinstance(value, enum_type):
            raise ValueError(
                f"{what}={value} does not fit this model: it takes {enum_type.__name__} members"
            )
        return value
    try:
        return enum_type.verify(value)
    except (KeyError, TypeError, ValueError):
        names = ["DEFAULT", *(member.name for member in enum_type)]
        raise ValueError(
            f"{what}={value!r} is neither a local checkpoint file nor one of torchvision's "
            f"{enum_type.__name__} names {names}"
        ) from None


def _model_weights(
    arch: str, backbone: str, weights: str | os.PathLike | WeightsEnum | None
) -> WeightsEnum | str | os.PathLike | None:
    """``weights`` as a torchvision enum member, a checkpoint path, or ``None``."""
    if weights is None or is_checkpoint_path(weights):
        return weights
    if not isinstance(weights, str | WeightsEnum):
        raise TypeError(
            f"weights must be None, a torchvision weights name such as 'DEFAULT', or a checkpoint "
            f"path, got {type(weights).__name__}"
        )
    enum_type = _MODEL_WEIGHTS[arch]
    if backbone != "resnet50":
        raise ValueError(
            f"weights={str(weights)!r}: torchvision publishes {arch} COCO weights "
            f"({enum_type.__name__}) for resnet50 only, not {backbone}; pass weights=None with "
            f"weights_backbone='DEFAULT' (ImageNet backbone) or a local checkpoint path"
        )
    return _resolve_enum(enum_type, weights, "weights")


def _num_outputs(model: nn.Module) -> int | None:
    """Class outputs of a torchvision detector (``K + 1``), ``None`` for other models."""
    if isinstance(model, RetinaNet | FCOS):
        return int(model.head.classification_head.num_classes)
    if isinstance(model, FasterRCNN):
        return int(model.roi_heads.box_predictor.cls_score.out_features)
    return None


def _load_torchvision_weights(
    model: nn.Module, arch: str, weights: WeightsEnum, progress: bool
) -> None:
    """Load a torchvision COCO checkpoint (downloaded to the torch hub cache on first use)."""
    with downloads("weights", weights.name, weights):
        state = weights.get_state_dict(progress=progress, check_hash=True)
    expected = model.state_dict()
    skipped = sorted(k for k, v in state.items() if k in expected and v.shape != expected[k].shape)
    stray = [k for k in skipped if not k.startswith(_CLASS_DEPENDENT[arch])]
    if stray:
        raise ValueError(f"{weights} does not fit the model: shapes differ for {stray[:3]}")
    state = {k: v for k, v in state.items() if k not in skipped}
    result = model.load_state_dict(state, strict=False)
    missing = sorted(  # BatchNorm2d's step counters (frozen_bn=False) are not weights
        k for k in set(result.missing_keys) - set(skipped) if not k.endswith("num_batches_tracked")
    )
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{weights} does not fit the model: missing {missing[:3]}, unexpected "
            f"{result.unexpected_keys[:3]}"
        )
    if skipped:
        outputs = len(weights.meta["categories"])
        logger.info(
            "%s has %d class outputs, the model %d: re-initialized %s",
            weights,
            outputs,
            _num_outputs(model),
            skipped,
        )
    if weights in _ZERO_EPS_WEIGHTS:
        for module in model.modules():
            if isinstance(module, FrozenBatchNorm2d):
                module.eps = 0.0


def build_fpn_backbone(
    arch: str,
    backbone: str,
    weights_backbone: WeightsEnum | None,
    frozen_bn: bool,
    trainable_layers: int,
) -> BackboneWithFPN:
    """The ResNet-FPN of ``arch`` as torchvision's ResNet-50 builders make it (see module doc)."""
    norm_layer = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
    if arch in ("retinanet", "fcos"):
        returned_layers, extra_blocks = [2, 3, 4], LastLevelP6P7(FPN_CHANNELS, FPN_CHANNELS)
    else:
        returned_layers, extra_blocks = None, None  # layer1..layer4, LastLevelMaxPool
    return resnet_fpn_backbone(
        backbone_name=backbone,
        weights=weights_backbone,
        norm_layer=norm_layer,
        trainable_layers=trainable_layers,
        returned_layers=returned_layers,
        extra_blocks=extra_blocks,
    )


def build_detector(
    arch: str,
    backbone: str,
    num_classes: int,
    *,
    min_size: int = 800,
    max_size: int = 1333,
    weights: str | os.PathLike | WeightsEnum | None = None,
    weights_backbone: str | WeightsEnum | None = None,
    trainable_backbone_layers: int | None = None,
    frozen_bn: bool | None = None,
    weights_prefix: str | None = None,
    progress: bool = True,
    **kwargs: Any,
) -> nn.Module:
    """A torchvision RetinaNet / FCOS / Faster R-CNN with a ResNet-FPN backbone.

    Args:
        arch: ``"retinanet"``, ``"fcos"`` or ``"faster_rcnn"``.
        backbone: ``"resnet18"``, ``"resnet34"``, ``"resnet50"`` or ``"resnet101"``.
        num_classes: object classes ``K`` (labels ``1..K``); the model gets ``K + 1`` class
            outputs (module docstring). torchvision's COCO checkpoints: ``num_classes=90``.
        min_size, max_size: the model's internal resize (``GeneralizedRCNNTransform``).
        weights: ``None``; a torchvision weights name or member for the whole detector
            (``"DEFAULT"``/``"COCO_V1"``, only for ``backbone="resnet50"``; downloaded to the torch
            hub cache; with another ``num_classes`` than 90 the class-specific layers are
            re-initialized); or a local checkpoint path (``.safetensors`` or a torch file, read
            without running code by :func:`freekd.checkpoints.load_weights`, which checks the fit).
        weights_backbone: ImageNet weights for the ResNet (``"DEFAULT"``, ``"IMAGENET1K_V1"``,
            ... of ``ResNet{18,34,50,101}_Weights``; torchvision's detection builders use
            ``IMAGENET1K_V1``). Ignored when ``weights`` is given.
        trainable_backbone_layers: ResNet stages left trainable, counted from ``layer4`` (0-5,
            5 = all, conv1 included). Default: 3 when any pretrained weights are given, else 5.
        frozen_bn: ``FrozenBatchNorm2d`` in the ResNet instead of ``BatchNorm2d``. Default: frozen
            when any pretrained weights (``weights`` or ``weights_backbone``) are given, as
            torchvision does.
        weights_prefix: key prefix to strip from a local checkpoint (``"student."``); found
            automatically when ``None``.
        progress: show download progress for torchvision weights.
        **kwargs: passed to the torchvision model (``score_thresh``, ``detections_per_img``, ...).

    Returns the ``nn.Module``: in train mode ``model(images, targets)`` returns the loss dict; in
    eval mode ``model(images)`` returns one ``{"boxes", "scores", "labels"}`` dict per image.
    Trainable: everything except the frozen ResNet stages and frozen norm layers.
    """
    check_choice("detection arch", arch, DETECTION_ARCHS)
    check_choice("detection backbone", backbone, DETECTION_BACKBONES)
    check_positive_int("num_classes", num_classes)
    weights = _model_weights(arch, backbone, weights)
    if weights is not None:
        if weights_backbone is not None:
            logger.info("weights given: weights_backbone=%s is not used", weights_backbone)
        weights_backbone = None
    elif weights_backbone is not None:
        weights_backbone = _resolve_enum(
            _BACKBONE_WEIGHTS[backbone], weights_backbone, "weights_backbone"
        )
    pretrained = weights is not None or weights_backbone is not None
    if trainable_backbone_layers is None:
        trainable_backbone_layers = 3 if pretrained else 5
    if not isinstance(trainable_backbone_layers, int) or not 0 <= trainable_backbone_layers <= 5:
        raise ValueError(
            f"trainable_backbone_layers must be an integer in 0..5, got "
            f"{trainable_backbone_layers!r}"
        )
    name = getattr(weights_backbone, "name", None)
    with downloads("weights_backbone", name, weights_backbone):
        body = build_fpn_backbone(
            arch,
            backbone,
            weights_backbone,
            frozen_bn=pretrained if frozen_bn is None else frozen_bn,
            trainable_layers=trainable_backbone_layers,
        )
    model = _ARCH_CLASSES[arch](
        body, num_classes=num_classes + 1, min_size=min_size, max_size=max_size, **kwargs
    )
    if isinstance(weights, WeightsEnum):
        _load_torchvision_weights(model, arch, weights, progress)
    elif weights is not None:
        load_checkpoint(model, weights, prefix=weights_prefix)
    return model


def _is_target_list(value: Any) -> bool:
    return isinstance(value, list | tuple) and all(isinstance(t, Mapping) for t in value)


def split_detection_batch(batch: Any) -> tuple[list[Tensor], list[dict[str, Tensor]] | None]:
    """``(images, targets)`` of a batch: a pair, or a dict with ``images``/``targets``.

    ``images``: a list of ``[3, H, W]`` tensors or one ``[N, 3, H, W]`` tensor; ``targets``: a list
    of dicts with ``boxes [M, 4]`` and ``labels [M]`` (``None`` when the batch has none).
    """
    if isinstance(batch, Mapping):
        images = batch.get("images", batch.get("image"))
        targets = batch.get("targets", batch.get("target"))
    elif (
        isinstance(batch, list | tuple)
        and len(batch) == 2
        and (batch[1] is None or _is_target_list(batch[1]))
    ):
        images, targets = batch
    else:
        images, targets = batch, None
    if images is None:
        raise ValueError(
            "a detection batch is (images, targets) or {'images': ..., 'targets': ...}"
        )
    if isinstance(images, Tensor):
        if images.dim() == 3:
            images = images.unsqueeze(0)
        if images.dim() != 4:
            raise ValueError(f"detection images must be [N, 3, H, W], got {tuple(images.shape)}")
    return list(images), (list(targets) if targets is not None else None)


def _check_labels(model: nn.Module, targets: Sequence[Mapping[str, Tensor]]) -> None:
    outputs = _num_outputs(model)
    if outputs is None:
        return
    labels = [t["labels"].reshape(-1) for t in targets if "labels" in t and t["labels"].numel()]
    if not labels:
        return
    low, high = (int(v) for v in torch.aminmax(torch.cat(labels)))
    if low < 1 or high > outputs - 1:
        raise ValueError(
            f"target labels range over {low}..{high}, the model predicts labels 1..{outputs - 1} "
            f"(built with num_classes={outputs - 1}; label 0 is the background): build it with "
            f"num_classes >= {high}, or shift the labels to start at 1"
        )


def _without_crowd(target: Mapping[str, Any]) -> Mapping[str, Any]:
    """``target`` without its ``iscrowd=1`` boxes (crowd regions are not trained on)."""
    crowd = target.get("iscrowd")
    if not isinstance(crowd, Tensor) or not bool(crowd.any()):
        return target
    keep = crowd == 0
    count = crowd.shape[0]
    return {
        key: value[keep]
        if isinstance(value, Tensor) and value.dim() and len(value) == count
        else value
        for key, value in target.items()
    }


def detection_loss(model: nn.Module, batch: Any) -> dict[str, Tensor]:
    """The detector's own training losses: ``model(images, targets)`` in train mode.

    ``batch``: see :func:`split_detection_batch`; boxes flagged ``iscrowd=1`` are left out (as
    torchvision's COCO recipe does). Returns torchvision's loss dict (RetinaNet:
    ``classification``, ``bbox_regression``; FCOS: ``+ bbox_ctrness``; Faster R-CNN:
    ``loss_classifier``, ``loss_box_reg``, ``loss_objectness``, ``loss_rpn_box_reg``).
    """
    images, targets = split_detection_batch(batch)
    if targets is None:
        raise ValueError("detection_loss needs targets: batch = (images, targets)")
    if not model.training:
        raise ValueError(
            "torchvision detectors return their losses only in train mode: call model.train() "
            "(freekd.frozen.freeze keeps norm layers of a frozen teacher in eval mode)"
        )
    targets = [_without_crowd(target) for target in targets]
    _check_labels(model, targets)
    return model(images, targets)


def detection_predict(model: nn.Module, images: Any) -> list[dict[str, Tensor]]:
    """Detections for ``images`` (list of ``[3, H, W]`` or ``[N, 3, H, W]``), under ``no_grad``.

    The model runs in eval mode for the call (each submodule's mode is restored afterwards).
    Returns one dict per image: ``boxes [M, 4]`` (x1, y1, x2, y2 in input pixels),
    ``scores [M]``, ``labels [M]`` in ``1..K`` (background detections dropped).
    """
    images, _ = split_detection_batch(images)
    with eval_mode(model), torch.no_grad():
        outputs = model(images)
    return [
        {key: value[output["labels"] > 0] for key, value in output.items()} for output in outputs
    ]
