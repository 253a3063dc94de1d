"""Semantic segmenters (segmentation_models_pytorch): PSPNet and DeepLabV3 on dilated ResNets, and
FPN on ResNets or light timm encoders.

Both use the full ResNet (``encoder_depth=5``: ``layer1..layer4``) with the strides of the last
stages replaced by dilation: with ``output_stride=8`` (default, the PSPNet / DeepLabV3 papers and
the Cityscapes distillation protocol) ``layer3`` is dilated by 2 and ``layer4`` by 4, so the
default distillation tap ``"encoder.layer4"`` gives ``[N, C, H/8, W/8]`` with ``C = 512``
(ResNet-18/34) or ``2048`` (ResNet-50/101). smp dilates every 3x3 conv of a stage by the same rate
(BasicBlock included, which torchvision's ``replace_stride_with_dilation`` refuses), so ResNet-18
works at stride 8 too.

- PSPNet: pyramid pooling (bins 1, 2, 3, 6) on ``layer4``, 512 channels, 3x3 classifier,
  logits upsampled by ``output_stride`` to the input size.
- DeepLabV3: ASPP (rates 12, 24, 36 and image pooling) on ``layer4``, 256 channels, 1x1
  classifier, logits upsampled to the input size.
- FPN: the feature pyramid ``decoder.p2 .. p5`` (strides 4, 8, 16, 32, ``pyramid_channels``
  each, default 128) merged into a stride-4 map; the encoder is a ResNet or a timm
  MobileNetV3 (:data:`FPN_BACKBONES`), never dilated (``output_stride`` 32). The default taps are
  the pyramid ``decoder.p2 / p3 / p4`` (``[N, pyramid_channels, H/4, W/4]`` to ``H/16``): several
  distilled levels, fine to coarse, as FreeKD distills a detector's FPN.

Images: ``[N, 3, H, W]`` float, normalized with the ImageNet mean / std (the segmenters do not
normalize), ``H`` and ``W`` divisible by ``output_stride`` (smp checks this; crops such as 512x1024
are). :func:`segmentation_predict` pads other sizes itself. Masks: ``[N, H, W]`` int64 class ids
``0..K-1``, 255 = ignore.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from segmentation_models_pytorch.encoders import encoders as smp_encoders
from torch import Tensor, nn
from torchvision.models import (
    ResNet18_Weights,
    ResNet34_Weights,
    ResNet50_Weights,
    ResNet101_Weights,
    WeightsEnum,
)

from .._checks import check_choice, check_positive_int
from ._common import (
    downloads,
    eval_mode,
    is_checkpoint_path,
    load_checkpoint,
)

__all__ = [
    "FPN_BACKBONES",
    "FPN_TAPS",
    "IGNORE_INDEX",
    "LAYER4_CHANNELS",
    "SEGMENTATION_ARCHS",
    "SEGMENTATION_BACKBONES",
    "SEGMENTATION_TAPS",
    "build_segmenter",
    "segmentation_loss",
    "segmentation_predict",
    "split_segmentation_batch",
]

SEGMENTATION_ARCHS = ("pspnet", "deeplabv3", "fpn")
SEGMENTATION_BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")
SEGMENTATION_TAPS = ("encoder.layer4",)
"""Default distillation tap of PSPNet / DeepLabV3: the last ResNet stage,
``[N, 512 or 2048, H/8, W/8]``."""

FPN_BACKBONES = (
    *SEGMENTATION_BACKBONES,
    "mobilenetv3_small_050",
    "mobilenetv3_small_100",
    "mobilenetv3_large_100",
)
"""FPN encoders: the ResNets and timm MobileNetV3s (built through smp's ``tu-`` timm encoders)."""
FPN_TAPS = ("decoder.p2", "decoder.p3", "decoder.p4")
"""Default distillation taps of FPN: the pyramid at strides 4, 8, 16 (fine to coarse)."""
FPN_PYRAMID_CHANNELS = 256
"""smp's default ``decoder_pyramid_channels`` (the channels of every FPN tap)."""

LAYER4_CHANNELS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}
IGNORE_INDEX = 255

_OUTPUT_STRIDES = {"pspnet": (8, 16, 32), "deeplabv3": (8, 16), "fpn": (32,)}
_TORCHVISION_WEIGHTS: dict[str, type[WeightsEnum]] = {
    "resnet18": ResNet18_Weights,
    "resnet34": ResNet34_Weights,
    "resnet50": ResNet50_Weights,
    "resnet101": ResNet101_Weights,
}


def _torchvision_encoder_weights(encoder: str, name: str | WeightsEnum) -> WeightsEnum:
    """``name`` as a member of torchvision's ``ResNet*_Weights`` for ``encoder``."""
    enum_type = _TORCHVISION_WEIGHTS[encoder]
    if isinstance(name, WeightsEnum):
        if isinstance(name, enum_type):
            return name
        raise ValueError(f"encoder_weights={name} does not fit {encoder}: use {enum_type.__name__}")
    try:
        return enum_type.verify(name)
    except (KeyError, TypeError, ValueError):
        smp_names = list(smp_encoders[encoder]["pretrained_settings"])
        tv_names = ["DEFAULT", *(member.name for member in enum_type)]
        raise ValueError(
            f"encoder_weights={name!r} is unknown for {encoder}: use None, one of smp's "
            f"{smp_names} (Hugging Face hub) or one of torchvision's {enum_type.__name__} "
            f"{tv_names}"
        ) from None


def build_segmenter(
    arch: str,
    encoder: str,
    num_classes: int,
    *,
    weights: str | os.PathLike | None = None,
    encoder_weights: str | WeightsEnum | None = None,
    output_stride: int | None = None,
    weights_prefix: str | None = None,
    progress: bool = True,
    **kwargs: Any,
) -> nn.Module:
    """A PSPNet or DeepLabV3 (``smp.PSPNet`` / ``smp.DeepLabV3``) on a dilated ResNet, or an
    FPN (``smp.FPN``) on a ResNet or a timm MobileNetV3.

    Args:
        arch: ``"pspnet"``, ``"deeplabv3"`` or ``"fpn"``.
        encoder: ``"resnet18"``, ``"resnet34"``, ``"resnet50"`` or ``"resnet101"``; FPN also
            takes the timm encoders of :data:`FPN_BACKBONES` (e.g. ``"mobilenetv3_small_050"``).
        num_classes: classes ``K`` of the masks (ids ``0..K-1``; 255 is ignored).
        weights: ``None`` or a local checkpoint of the whole model (``.safetensors`` or a torch
            file, read without running code by :func:`freekd.checkpoints.load_weights`).
        encoder_weights: ImageNet weights for the ResNet: ``"imagenet"`` (smp's copy, from the
            Hugging Face hub) or a torchvision ``ResNet*_Weights`` name (``"DEFAULT"``,
            ``"IMAGENET1K_V1"``, ...; torch hub cache). Ignored when ``weights`` is given.
        output_stride: PSPNet / DeepLabV3: 8 (default; ``layer3``/``layer4`` dilated), 16, or
            32 (PSPNet only: no dilation). FPN: 32 (its encoder is never dilated).
        weights_prefix: key prefix to strip from the checkpoint; found automatically when ``None``.
        progress: show download progress for torchvision encoder weights.
        **kwargs: passed to the smp model (``psp_dropout``, ``decoder_channels``; for FPN
            ``decoder_pyramid_channels`` (the taps' channels, default 256),
            ``decoder_segmentation_channels`` (a multiple of 32), ``decoder_dropout``, ...).

    ``model(images)`` returns logits ``[N, K, H, W]`` (input size). Everything is trainable.
    """
    check_choice("segmentation arch", arch, SEGMENTATION_ARCHS)
    check_choice(
        f"segmentation encoder for {arch}",
        encoder,
        FPN_BACKBONES if arch == "fpn" else SEGMENTATION_BACKBONES,
    )
    check_positive_int("num_classes", num_classes)
    if output_stride is None:
        output_stride = _OUTPUT_STRIDES[arch][-1] if arch == "fpn" else 8
    if output_stride not in _OUTPUT_STRIDES[arch]:
        raise ValueError(
            f"output_stride={output_stride!r} is not supported by {arch}; choose one of "
            f"{_OUTPUT_STRIDES[arch]}"
        )
    if weights is not None:
        if not is_checkpoint_path(weights):
            raise ValueError(
                f"weights={weights!r}: segmenters take a local checkpoint path; there are no "
                f"registered whole-model weights (use encoder_weights= for ImageNet backbones)"
            )
        encoder_weights = None
    smp_weights, torchvision_weights = None, None
    timm_encoder = encoder not in SEGMENTATION_BACKBONES
    if encoder_weights is not None and timm_encoder:
        if encoder_weights != "imagenet":
            raise ValueError(
                f"encoder_weights={encoder_weights!r} is unknown for {encoder}: use None or "
                f"'imagenet' (timm's weights, from the Hugging Face hub)"
            )
        smp_weights = encoder_weights
    elif encoder_weights is not None:
        smp_names = smp_encoders[encoder]["pretrained_settings"]
        if isinstance(encoder_weights, str) and encoder_weights in smp_names:
            smp_weights = encoder_weights
        else:
            torchvision_weights = _torchvision_encoder_weights(encoder, encoder_weights)
    common = dict(
        encoder_name=f"tu-{encoder}" if timm_encoder else encoder,
        encoder_weights=smp_weights,
        encoder_depth=5,
        classes=num_classes,
    )
    with downloads("encoder_weights", encoder_weights):  # smp's weights: the Hugging Face hub
        if arch == "pspnet":
            model = smp.PSPNet(
                **common, upsampling=output_stride, output_stride=output_stride, **kwargs
            )
        elif arch == "fpn":
            model = smp.FPN(**common, **kwargs)
        else:
            model = smp.DeepLabV3(**common, encoder_output_stride=output_stride, **kwargs)
    if torchvision_weights is not None:
        with downloads("encoder_weights", encoder_weights, torchvision_weights):
            state = torchvision_weights.get_state_dict(progress=progress, check_hash=True)
        model.encoder.load_state_dict(state)  # smp's ResNetEncoder drops fc.*
    if weights is not None:
        load_checkpoint(model, weights, prefix=weights_prefix)
    return model


def split_segmentation_batch(batch: Any) -> tuple[Tensor, Tensor | None]:
    """``(images [N, 3, H, W], masks [N, H, W] or None)`` of a batch: a pair, a dict with
    ``image(s)``/``mask(s)``, or images alone."""
    if isinstance(batch, Mapping):
        images = next((batch[k] for k in ("images", "image") if k in batch), None)
        masks = next((batch[k] for k in ("masks", "mask", "labels", "target") if k in batch), None)
    elif isinstance(batch, list | tuple) and len(batch) == 2:
        images, masks = batch
    else:
        images, masks = batch, None
    if not isinstance(images, Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"segmentation images must be one [N, 3, H, W] tensor, got {shape}")
    if masks is not None and masks.dim() == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks is not None and (masks.dim() != 3 or masks.shape[0] != images.shape[0]):
        raise ValueError(
            f"segmentation masks must be [N, H, W] class ids for images {tuple(images.shape)}, "
            f"got {tuple(masks.shape)}"
        )
    return images, masks


def _logits(output: Any) -> Tensor:
    """The logits of a segmenter's output (smp returns ``(masks, labels)`` with an aux head)."""
    if isinstance(output, Mapping):  # torchvision segmenters: {"out": ..., "aux": ...}
        return output["out"]
    if isinstance(output, list | tuple):
        return output[0]
    return output


def _resize(logits: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def segmentation_loss(model: nn.Module, batch: Any, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Pixel-wise cross-entropy of ``model(images)`` against the masks, ``ignore_index`` skipped.

    Logits ``[N, K, h, w]`` are bilinearly resized to the mask size ``[H, W]`` when they differ.
    The mean is over the non-ignored pixels of the batch (0, not NaN, when there are none).
    """
    images, masks = split_segmentation_batch(batch)
    if masks is None:
        raise ValueError("segmentation_loss needs masks: batch = (images, masks)")
    logits = _resize(_logits(model(images)), masks.shape[-2:])
    masks = masks.long()
    total = F.cross_entropy(logits, masks, ignore_index=ignore_index, reduction="sum")
    return total / (masks != ignore_index).sum().clamp(min=1)


def _input_divisor(model: nn.Module) -> int:
    """Sizes the model needs its input divisible by (smp's encoder output stride; else 1)."""
    if not getattr(model, "requires_divisible_input_shape", False):
        return 1
    return int(getattr(getattr(model, "encoder", None), "output_stride", 1))


def segmentation_predict(
    model: nn.Module, images: Tensor, size: tuple[int, int] | None = None
) -> Tensor:
    """Class ids ``[N, H, W]`` (int64) for ``images [N, 3, H, W]``, under ``no_grad``.

    Images whose size is not a multiple of the model's output stride are zero-padded at the
    bottom / right and the logits cropped back. ``size``: resize the logits to ``(H', W')``
    (e.g. masks stored at another resolution) before the arg-max. The model runs in eval mode
    for the call (each submodule's mode is restored afterwards).
    """
    images, _ = split_segmentation_batch(images)
    height, width = images.shape[-2:]
    divisor = _input_divisor(model)
    pad_h, pad_w = (-height) % divisor, (-width) % divisor
    if pad_h or pad_w:
        images = F.pad(images, (0, pad_w, 0, pad_h))
    with eval_mode(model), torch.no_grad():
        logits = _logits(model(images))
    if pad_h or pad_w:
        logits = _resize(logits, images.shape[-2:])[..., :height, :width]
    logits = _resize(logits, size if size is not None else (height, width))
    return logits.argmax(dim=1)
