"""A semantic segmenter on a vision transformer (timm): patch tokens -> map -> simple head.

``ViTSegmenter(encoder, num_classes)`` runs a timm ``VisionTransformer`` (any ViT whose
``forward_features`` returns tokens ``[N, L, C]``: ViT, DeiT, DINO / DINOv2 with or without
registers, EVA...), drops the prefix (class / register) tokens, lays the patch tokens out on the
patch grid ``[N, C, h, w]`` (:func:`freekd.tokens.tokens_to_map`), applies a head and upsamples
the logits bilinearly to the image size:

- ``decoder="linear"``: batch norm + 1x1 convolution (the "linear" head of Segmenter and the
  DINOv2 segmentation probes);
- ``decoder="conv"`` (default): 3x3 conv + BN + ReLU with ``decoder_channels``, then a 1x1
  classifier (a little spatial context for models trained from scratch).

The default distillation tap is ``"encoder.norm@tokens"``: the encoder's final normalized tokens,
as the ``[N, C, h, w]`` map the head sees (``C = embed_dim``). Any block can be tapped the same
way (``"encoder.blocks.7@tokens"``).

:func:`build_vit_segmenter` builds the encoder with ``timm.create_model(name, pretrained=False,
num_classes=0, global_pool="", img_size=..., patch_size=..., dynamic_img_size=True,
dynamic_img_pad=True, **timm_kwargs)``; the dynamic options let it run on any image size (the
grid is ``ceil(H / patch)`` x ``ceil(W / patch)``, position embeddings interpolated). Encoder
weights come from a local file (``encoder_weights=path``: a timm / DINO state dict, loaded by
timm's own checkpoint filter, which resizes position embeddings and patch kernels); nothing is
downloaded.
"""

from __future__ import annotations

import os
from typing import Any

import timm
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_choice, check_positive_int
from ..tokens import tokens_to_map
from ._common import is_checkpoint_path, load_checkpoint

__all__ = [
    "VIT_BACKBONES",
    "VIT_DECODERS",
    "VIT_TAPS",
    "ViTSegmenter",
    "build_vit_segmenter",
    "check_vit_name",
    "vit_embed_dim",
]

VIT_BACKBONES = (
    "vit_tiny_patch16_224",
    "vit_small_patch16_224",
    "vit_base_patch16_224",
    "vit_large_patch16_224",
    "vit_small_patch14_dinov2",
    "vit_base_patch14_dinov2",
    "vit_large_patch14_dinov2",
    "vit_small_patch14_reg4_dinov2",
    "vit_base_patch14_reg4_dinov2",
    "vit_large_patch14_reg4_dinov2",
    "deit_tiny_patch16_224",
    "deit_small_patch16_224",
    "deit_base_patch16_224",
)
"""timm encoders listed in the registry; any other timm ViT name works too."""

VIT_TAPS = ("encoder.norm@tokens",)
"""Default distillation tap: the encoder's final tokens as a map ``[N, embed_dim, h, w]``."""

VIT_DECODERS = ("linear", "conv")

_EMBED_DIMS = {"tiny": 192, "small": 384, "base": 768, "large": 1024, "huge": 1280, "giant": 1536}


def vit_embed_dim(name: str, embed_dim: int | None = None) -> int:
    """Channels of a timm ViT's tokens: ``embed_dim`` when given, else from the size in the
    name (``tiny`` 192, ``small`` 384, ``base`` 768, ``large`` 1024, ...), else by building the
    model on the ``meta`` device."""
    if embed_dim is not None:
        return int(embed_dim)
    for part in name.split("_"):
        if part in _EMBED_DIMS:
            return _EMBED_DIMS[part]
    import torch

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=0)
    return int(model.embed_dim)


def check_vit_name(name: object) -> str:
    """``name`` if timm knows it, else a ``ValueError`` with the closest timm names."""
    if isinstance(name, str) and timm.is_model(name):
        return name
    candidates = sorted(set(timm.list_models("*vit*")) | set(timm.list_models("deit*")))
    return check_choice("timm ViT", name, candidates)


class ViTSegmenter(nn.Module):
    """A timm ViT encoder with a simple decoder: ``forward(images [N, 3, H, W])`` -> logits
    ``[N, K, H, W]``.

    Args:
        encoder: a timm vision transformer (``forward_features`` -> ``[N, L, C]``, attributes
            ``num_prefix_tokens``, ``patch_embed``, ``embed_dim``).
        num_classes: ``K``.
        decoder: ``"conv"`` or ``"linear"`` (module docstring).
        decoder_channels: width of the conv decoder.

    Everything is trainable. Images normalized with the ImageNet mean / std, like the CNNs.
    """

    def __init__(
        self,
        encoder: nn.Module,
        num_classes: int,
        decoder: str = "conv",
        decoder_channels: int = 256,
    ) -> None:
        super().__init__()
        check_choice("ViT decoder", decoder, VIT_DECODERS)
        self.encoder = encoder
        channels = int(encoder.embed_dim)
        if decoder == "linear":
            self.decoder = nn.BatchNorm2d(channels)
            self.classifier = nn.Conv2d(channels, num_classes, 1)
        else:
            self.decoder = nn.Sequential(
                nn.Conv2d(channels, decoder_channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(decoder_channels),
                nn.ReLU(inplace=True),
            )
            self.classifier = nn.Conv2d(decoder_channels, num_classes, 1)

    def grid(self, size: tuple[int, int]) -> tuple[int, int]:
        """The patch grid ``(h, w)`` of an input of ``size = (H, W)``."""
        height, width = self.encoder.patch_embed.dynamic_feat_size(size)
        return int(height), int(width)

    def feature_map(self, images: Tensor) -> Tensor:
        """The encoder's final patch tokens as a map ``[N, C, h, w]``."""
        tokens = self.encoder.forward_features(images)
        grid = self.grid((int(images.shape[-2]), int(images.shape[-1])))
        return tokens_to_map(tokens, grid, int(self.encoder.num_prefix_tokens))

    def forward(self, images: Tensor) -> Tensor:
        logits = self.classifier(self.decoder(self.feature_map(images)))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def build_vit_segmenter(
    backbone: str,
    num_classes: int,
    *,
    img_size: int | tuple[int, int] = 224,
    patch_size: int | None = None,
    decoder: str = "conv",
    decoder_channels: int = 256,
    weights: str | os.PathLike | None = None,
    encoder_weights: str | os.PathLike | None = None,
    weights_prefix: str | None = None,
    **timm_kwargs: Any,
) -> ViTSegmenter:
    """A :class:`ViTSegmenter` on the timm model ``backbone`` (randomly initialized).

    Args:
        backbone: a timm ViT name (``"vit_small_patch16_224"``, ``"vit_base_patch14_dinov2"``,
            ``"vit_small_patch14_reg4_dinov2"``, ...).
        num_classes: mask classes ``K``.
        img_size: the training size (position embeddings are made for it and interpolated for
            other sizes).
        patch_size: override the name's patch size (e.g. 8 for 64-pixel images).
        decoder, decoder_channels: the head (:class:`ViTSegmenter`).
        weights: a local checkpoint of the whole segmenter.
        encoder_weights: a local checkpoint of the encoder alone (timm / DINO / DeiT format),
            loaded through timm's ``pretrained_cfg_overlay=dict(file=...)`` so its filter adapts
            position embeddings to ``img_size``. Ignored when ``weights`` is given.
        weights_prefix: key prefix to strip from ``weights`` (found automatically when ``None``).
        **timm_kwargs: to ``timm.create_model`` (``depth``, ``embed_dim``, ``num_heads``,
            ``drop_path_rate``, ``reg_tokens``, ...).
    """
    check_vit_name(backbone)
    check_positive_int("num_classes", num_classes)
    for name, value in (("weights", weights), ("encoder_weights", encoder_weights)):
        if value is not None and not is_checkpoint_path(value):
            raise ValueError(
                f"{name}={value!r}: ViT segmenters take local checkpoint files only (nothing is "
                f"downloaded); give the path of a .safetensors / .pth file"
            )
    options: dict[str, Any] = dict(
        num_classes=0,
        global_pool="",
        img_size=img_size,
        dynamic_img_size=True,
        dynamic_img_pad=True,
        **timm_kwargs,
    )
    if patch_size is not None:
        options["patch_size"] = patch_size
    if encoder_weights is not None and weights is None:
        if not os.path.isfile(encoder_weights):
            raise FileNotFoundError(f"encoder_weights file not found: {encoder_weights}")
        options["pretrained_cfg_overlay"] = {"file": os.fspath(encoder_weights)}
        encoder = timm.create_model(backbone, pretrained=True, **options)
    else:
        encoder = timm.create_model(backbone, pretrained=False, **options)
    if not hasattr(encoder, "patch_embed") or not hasattr(encoder, "num_prefix_tokens"):
        raise ValueError(
            f"timm model {backbone!r} is not a plain vision transformer (no patch_embed / "
            f"num_prefix_tokens): use a ViT / DeiT / DINOv2 name"
        )
    model = ViTSegmenter(encoder, num_classes, decoder, decoder_channels)
    if weights is not None:
        load_checkpoint(model, weights, prefix=weights_prefix)
    return model
