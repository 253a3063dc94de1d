"""Model builders: torchvision detectors and smp segmenters, taps, task losses, weights.

Tiny inputs (64 px) and ResNet-18 for the step tests; ResNet-50/101 where the test is about them.
Nothing is downloaded: torchvision's weight files are replaced by local state dicts.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18
from torchvision.models.detection import (
    RetinaNet_ResNet50_FPN_Weights,
    fasterrcnn_resnet50_fpn,
    fcos_resnet50_fpn,
    retinanet_resnet50_fpn,
)
from torchvision.ops import FrozenBatchNorm2d

from freekd.checkpoints import export_student
from freekd.models import (
    ModelSpec,
    available_models,
    build_detector,
    build_model,
    build_segmenter,
    count_parameters,
    default_taps,
    detection_loss,
    segmentation_loss,
    segmentation_predict,
)
from freekd.taps import FeatureTaps
from freekd.tuning import freeze

SMALL = {"min_size": 64, "max_size": 96}
# Fewer proposals / sampled RoIs keep Faster R-CNN's step fast on a CPU.
FEW_ROIS = {
    "rpn_post_nms_top_n_train": 100,
    "rpn_post_nms_top_n_test": 100,
    "box_batch_size_per_image": 64,
}
# FPN strides of the five tapped levels: P3-P7 (RetinaNet, FCOS), P2-P6 (Faster R-CNN).
FPN_STRIDES = {
    "retinanet": [8, 16, 32, 64, 128],
    "fcos": [8, 16, 32, 64, 128],
    "faster_rcnn": [4, 8, 16, 32, 64],
}


def detection_batch(num_classes: int = 3):
    """Two 64x64 images (the model keeps 64x64: min_size 64) with boxes labelled 1..K."""
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=generator) for _ in range(2)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([num_classes])},
        {
            "boxes": torch.tensor([[10.0, 10.0, 30.0, 60.0], [0.0, 0.0, 20.0, 20.0]]),
            "labels": torch.tensor([1, 2]),
        },
    ]
    return images, targets


def fpn_shapes(arch: str, size: int = 64, batch: int = 2) -> list[tuple[int, ...]]:
    return [(batch, 256, max(size // s, 1), max(size // s, 1)) for s in FPN_STRIDES[arch]]


def has_grad(model: nn.Module) -> bool:
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


# ---------------------------------------------------------------------------------- detection


@pytest.mark.parametrize("arch", ["retinanet", "fcos", "faster_rcnn"])
def test_detector_trains_predicts_and_exposes_fpn_taps(arch):
    torch.manual_seed(0)
    extra = FEW_ROIS if arch == "faster_rcnn" else {}
    spec = build_model("detection", arch, "resnet18", num_classes=3, **SMALL, **extra)
    assert isinstance(spec, ModelSpec) and spec.taps == ["backbone.fpn"]
    assert spec.tap_channels == [256] * 5
    model = spec.model.train()
    batch = detection_batch()
    with FeatureTaps(model, spec.taps) as taps:
        losses = spec.task_loss(model, batch)
        assert [tuple(f.shape) for f in taps.features] == fpn_shapes(arch)
    assert losses and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert has_grad(model)

    predictions = spec.predict(model, batch[0])
    assert model.training  # restored after the eval-mode call
    assert len(predictions) == 2
    for p in predictions:
        assert p["boxes"].shape[1:] == (4,) and len(p["scores"]) == len(p["labels"])
        assert (p["labels"] >= 1).all() and (p["labels"] <= 3).all()


def test_torchvision_classes_layout_is_k_plus_one():
    model = build_detector("faster_rcnn", "resnet18", 3, **SMALL)
    assert model.roi_heads.box_predictor.cls_score.out_features == 4
    model = build_detector("fcos", "resnet18", 3, **SMALL)
    assert model.head.classification_head.num_classes == 4


def test_detection_loss_refuses_eval_mode_and_labels_out_of_range():
    model = build_detector("retinanet", "resnet18", 3, **SMALL)
    images, targets = detection_batch()
    with pytest.raises(ValueError, match="train mode"):
        detection_loss(model.eval(), (images, targets))
    model.train()
    targets[0]["labels"] = torch.tensor([4])
    with pytest.raises(ValueError, match="num_classes >= 4"):
        detection_loss(model, (images, targets))
    targets[0]["labels"] = torch.tensor([0])
    with pytest.raises(ValueError, match="label 0 is the background"):
        detection_loss(model, {"images": images, "targets": targets})
    targets[0]["iscrowd"] = torch.tensor([1])  # a crowd region is not trained on: no error
    losses = detection_loss(model, (images, targets))
    assert all(torch.isfinite(v) for v in losses.values())


def test_prediction_keeps_the_frozen_norm_layers_of_a_training_teacher_in_eval_mode():
    spec = build_model("detection", "retinanet", "resnet18", 3, **SMALL)
    teacher = freeze(spec.model.train())
    spec.predict(teacher, torch.rand(1, 3, 64, 64))
    assert teacher.training
    assert not any(m.training for m in teacher.modules() if isinstance(m, nn.BatchNorm2d))


def test_resnet101_teacher_step():
    torch.manual_seed(0)
    spec = build_model("detection", "retinanet", "resnet101", 3, **SMALL)
    with FeatureTaps(spec.model.train(), spec.taps) as taps:
        losses = spec.task_loss(spec.model, detection_batch())
        assert [tuple(f.shape) for f in taps.features] == fpn_shapes("retinanet")
    assert all(torch.isfinite(v) for v in losses.values())


REFERENCE_BUILDERS = {
    "retinanet": retinanet_resnet50_fpn,
    "fcos": fcos_resnet50_fpn,
    "faster_rcnn": fasterrcnn_resnet50_fpn,
}


@pytest.mark.parametrize("arch", list(REFERENCE_BUILDERS))
def test_resnet50_detector_equals_torchvision(arch):
    with torch.device("meta"):  # shapes only: nothing is initialised
        ours = build_detector(arch, "resnet50", num_classes=7)
        reference = REFERENCE_BUILDERS[arch](weights=None, weights_backbone=None, num_classes=8)
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert [(n, p.requires_grad) for n, p in ours.named_parameters()] == [
        (n, p.requires_grad) for n, p in reference.named_parameters()
    ]
    assert str(ours) == str(reference)  # same modules, strides, extra blocks, transform


def coco_checkpoint(num_outputs: int = 91) -> dict[str, torch.Tensor]:
    """A stand-in for torchvision's RetinaNet COCO file: its keys (FrozenBatchNorm2d: no
    num_batches_tracked) and shapes, random values."""
    torch.manual_seed(1)
    model = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_outputs)
    return {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def test_torchvision_coco_weights_load_like_torchvision(monkeypatch):
    state = coco_checkpoint()
    calls = []

    def fake_get_state_dict(self, *args, **kwargs):
        calls.append(self)
        return state

    monkeypatch.setattr(RetinaNet_ResNet50_FPN_Weights, "get_state_dict", fake_get_state_dict)
    model = build_detector("retinanet", "resnet50", num_classes=90, weights="DEFAULT", **SMALL)
    assert calls == [RetinaNet_ResNet50_FPN_Weights.COCO_V1]
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    frozen = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert frozen and all(m.eps == 0.0 for m in frozen)  # as torchvision loads COCO_V1
    assert not model.backbone.body.layer1[0].conv1.weight.requires_grad  # 3 trainable stages
    assert model.backbone.body.layer2[0].conv1.weight.requires_grad

    # BatchNorm2d instead of the frozen kind: the step counters are not in the file, that's fine.
    model = build_detector("retinanet", "resnet50", 90, weights="DEFAULT", frozen_bn=False)
    assert torch.equal(
        model.backbone.body.bn1.running_mean, state["backbone.body.bn1.running_mean"]
    )

    # Another number of classes: everything but the class logits comes from the checkpoint.
    model = build_detector("retinanet", "resnet50", num_classes=3, weights="COCO_V1", **SMALL)
    loaded = model.state_dict()
    logits = "head.classification_head.cls_logits."
    assert loaded[logits + "weight"].shape[0] == 9 * 4
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if not k.startswith(logits))


def test_model_weights_are_refused_for_other_backbones_without_downloading(monkeypatch):
    def no_download(self, *args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(RetinaNet_ResNet50_FPN_Weights, "get_state_dict", no_download)
    with pytest.raises(ValueError, match="resnet50 only, not resnet18"):
        build_detector("retinanet", "resnet18", 3, weights="DEFAULT")
    with pytest.raises(ValueError, match="COCO_V1"):
        build_detector("retinanet", "resnet50", 3, weights="COCO_V9")
    with pytest.raises(ValueError, match="it takes FCOS_ResNet50_FPN_Weights members"):
        build_detector("fcos", "resnet50", 3, weights=RetinaNet_ResNet50_FPN_Weights.COCO_V1)
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        build_detector("fcos", "resnet18", 3, weights_backbone="IMAGENET9")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_detector("fcos", "resnet18", 3, weights="missing/teacher.pth")


def imagenet_resnet18(monkeypatch) -> dict[str, torch.Tensor]:
    """Serve a random ResNet-18 state dict as torchvision's ImageNet file (no download)."""
    torch.manual_seed(2)
    state = resnet18().state_dict()
    monkeypatch.setattr(ResNet18_Weights, "get_state_dict", lambda self, *a, **k: dict(state))
    return state


def test_imagenet_backbone_weights_for_detectors_and_segmenters(monkeypatch):
    state = imagenet_resnet18(monkeypatch)
    detector = build_detector("fcos", "resnet18", 3, weights_backbone="DEFAULT", **SMALL)
    body = detector.backbone.body
    assert isinstance(body.bn1, FrozenBatchNorm2d)  # pretrained backbone: torchvision's choice
    assert (
        not body.layer1[0].conv1.weight.requires_grad and body.layer2[0].conv1.weight.requires_grad
    )
    assert torch.equal(body.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    assert torch.equal(body.bn1.running_var, state["bn1.running_var"])

    spec = build_model("segmentation", "pspnet", "resnet18", 3, weights_backbone="IMAGENET1K_V1")
    encoder = spec.model.encoder.state_dict()
    assert all(torch.equal(encoder[k], v) for k, v in state.items() if not k.startswith("fc."))
    assert spec.model.encoder.layer4[0].conv2.dilation == (4, 4)  # dilation kept after loading
    with pytest.raises(ValueError, match="not both"):
        build_model(
            "segmentation",
            "pspnet",
            "resnet18",
            3,
            weights_backbone="DEFAULT",
            encoder_weights="DEFAULT",
        )


def test_trainable_backbone_layers_and_frozen_bn():
    with torch.device("meta"):
        model = build_detector("fcos", "resnet18", 3, trainable_backbone_layers=2, frozen_bn=True)
    body = model.backbone.body
    assert isinstance(body.bn1, FrozenBatchNorm2d)
    assert not body.layer2[0].conv1.weight.requires_grad
    assert body.layer3[0].conv1.weight.requires_grad and body.layer4[0].conv1.weight.requires_grad
    with pytest.raises(ValueError, match="0..5"):
        build_detector("fcos", "resnet18", 3, trainable_backbone_layers=6)


def test_local_detector_checkpoint_round_trips(tmp_path):
    torch.manual_seed(0)
    trained = build_detector("retinanet", "resnet18", 3, **SMALL).train()
    with torch.no_grad():  # move BN statistics away from their initial values
        trained.backbone(torch.rand(2, 3, 64, 64))
    trained.eval()
    path = export_student(trained, tmp_path / "student.safetensors")
    restored = build_detector("retinanet", "resnet18", 3, weights=path, **SMALL).eval()
    assert isinstance(restored.backbone.body.bn1, FrozenBatchNorm2d)  # pretrained: frozen BN
    source = trained.state_dict()
    assert all(torch.equal(v, source[k]) for k, v in restored.state_dict().items())
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected, actual = trained.backbone(x), restored.backbone(x)
    assert all(torch.allclose(expected[k], actual[k], atol=1e-5) for k in expected)

    # A Lightning-style torch checkpoint with prefixed keys, same architecture and BN kind.
    torch.save({"state_dict": {f"student.{k}": v for k, v in source.items()}}, tmp_path / "l.ckpt")
    again = build_detector("retinanet", "resnet18", 3, weights=tmp_path / "l.ckpt", frozen_bn=False)
    assert all(torch.equal(v, source[k]) for k, v in again.state_dict().items())


# ---------------------------------------------------------------------------------- segmentation


@pytest.mark.parametrize("arch", ["pspnet", "deeplabv3"])
def test_segmenter_trains_predicts_and_taps_layer4_at_stride_8(arch):
    torch.manual_seed(0)
    spec = build_model("segmentation", arch, "resnet18", num_classes=4)
    assert spec.taps == ["encoder.layer4"] and spec.tap_channels == [512]
    images = torch.randn(2, 3, 64, 96)
    masks = torch.randint(0, 4, (2, 64, 96))
    masks[0, :10] = 255
    model = spec.model.train()
    with FeatureTaps(model, spec.taps) as taps:
        loss = spec.task_loss(model, (images, masks))
        assert [tuple(f.shape) for f in taps.features] == [(2, 512, 8, 12)]
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert has_grad(model)

    prediction = spec.predict(model, torch.randn(1, 3, 61, 70))  # padded to 64x72 inside
    assert prediction.shape == (1, 61, 70) and prediction.dtype == torch.int64
    assert prediction.min() >= 0 and prediction.max() < 4
    assert model.training


@pytest.mark.parametrize(
    ("backbone", "smp_name"),
    [("resnet18", "resnet18"), ("mobilenetv3_small_050", "tu-mobilenetv3_small_050")],
)
def test_fpn_segmenter_taps_the_pyramid_and_is_a_plain_smp_fpn(backbone, smp_name):
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    spec = build_model("segmentation", "fpn", backbone, num_classes=4, decoder_pyramid_channels=64)
    assert spec.taps == ["decoder.p2", "decoder.p3", "decoder.p4"]
    assert spec.tap_channels == [64, 64, 64]
    images, masks = torch.randn(2, 3, 64, 96), torch.randint(0, 4, (2, 64, 96))
    with FeatureTaps(spec.model.train(), spec.taps) as taps:
        loss = spec.task_loss(spec.model, (images, masks))
        shapes = [tuple(f.shape) for f in taps.features]
    assert shapes == [(2, 64, 16, 24), (2, 64, 8, 12), (2, 64, 4, 6)]  # strides 4, 8, 16
    loss.backward()
    assert has_grad(spec.model)
    # the same architecture built by smp alone takes the weights as they are
    plain = smp.FPN(smp_name, encoder_weights=None, classes=4, decoder_pyramid_channels=64)
    plain.load_state_dict(spec.model.state_dict())
    assert spec.predict(spec.model, torch.randn(1, 3, 61, 70)).shape == (1, 61, 70)
    assert default_taps("segmentation", "fpn", backbone) == (spec.taps, [256, 256, 256])


def test_fpn_refuses_what_it_cannot_build():
    with pytest.raises(ValueError, match="backbone for pspnet 'mobilenetv3_small_050'"):
        build_model("segmentation", "pspnet", "mobilenetv3_small_050", 3)
    with pytest.raises(ValueError, match="output_stride=8 is not supported by fpn"):
        build_segmenter("fpn", "resnet18", 3, output_stride=8)
    with pytest.raises(ValueError, match="use None or 'imagenet'"):
        build_segmenter("fpn", "mobilenetv3_small_050", 3, encoder_weights="DEFAULT")


def test_resnet101_pspnet_teacher_taps_2048_channels_at_stride_8():
    spec = build_model("segmentation", "pspnet", "resnet101", num_classes=3)
    assert spec.tap_channels == [2048]
    with FeatureTaps(spec.model.eval(), spec.taps) as taps, torch.no_grad():
        logits = spec.model(torch.randn(1, 3, 64, 64))
        assert tuple(taps.features[0].shape) == (1, 2048, 8, 8)
    assert logits.shape == (1, 3, 64, 64)


def test_segmenter_output_stride_choices():
    model = build_segmenter("deeplabv3", "resnet18", 2, output_stride=16).eval()
    with FeatureTaps(model, ["encoder.layer4"]) as taps, torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2, 64, 64)
        assert tuple(taps.features[0].shape) == (1, 512, 4, 4)
    with pytest.raises(ValueError, match="output_stride=32 is not supported by deeplabv3"):
        build_segmenter("deeplabv3", "resnet18", 2, output_stride=32)
    with pytest.raises(ValueError, match="smp's .*'imagenet'.*ResNet18_Weights"):
        build_segmenter("pspnet", "resnet18", 2, encoder_weights="imagenet21k")
    with pytest.raises(ValueError, match="local checkpoint path"):
        build_segmenter("pspnet", "resnet18", 2, weights="DEFAULT")


def test_local_segmenter_checkpoint_round_trips(tmp_path):
    torch.manual_seed(0)
    model = build_segmenter("pspnet", "resnet18", 3)
    torch.save({"model": model.state_dict()}, tmp_path / "teacher.pth")
    restored = build_segmenter("pspnet", "resnet18", 3, weights=str(tmp_path / "teacher.pth"))
    source = model.state_dict()
    assert restored.state_dict().keys() == source.keys()
    assert all(torch.equal(v, source[k]) for k, v in restored.state_dict().items())
    # An exported student is a plain smp state dict: it loads strictly into a fresh model.
    path = export_student(model, tmp_path / "student.safetensors")
    build_segmenter("pspnet", "resnet18", 3).load_state_dict(safetensors.torch.load_file(path))


class ConstantLogits(nn.Module):
    """Logits ``[N, K, h, w]`` at a quarter of the input size, from a 1x1 conv."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, classes, 1)

    def forward(self, x):
        return self.conv(x[..., ::4, ::4])


def test_segmentation_loss_resizes_logits_and_skips_ignored_pixels():
    torch.manual_seed(0)
    model = ConstantLogits()
    images = torch.randn(2, 3, 16, 16)
    masks = torch.randint(0, 3, (2, 16, 16))
    masks[:, :4] = 255
    logits = F.interpolate(model(images), size=(16, 16), mode="bilinear", align_corners=False)
    expected = F.cross_entropy(logits, masks, ignore_index=255)
    assert torch.allclose(segmentation_loss(model, (images, masks)), expected)
    ignored = torch.full_like(masks, 255)
    loss = segmentation_loss(model, {"image": images, "mask": ignored[:, None]})
    assert loss.item() == 0.0
    loss.backward()  # still part of the graph
    with pytest.raises(ValueError, match="masks must be"):
        segmentation_loss(model, (images, masks[:1]))


def test_segmentation_predict_without_stride_uses_the_logits_size():
    prediction = segmentation_predict(ConstantLogits(), torch.randn(1, 3, 16, 16), size=(8, 8))
    assert prediction.shape == (1, 8, 8)


# ---------------------------------------------------------------------------------- registry


def test_registry_and_errors():
    models = available_models()
    assert set(models) == {"detection", "segmentation"}
    assert models["detection"]["faster_rcnn"] == ("resnet18", "resnet34", "resnet50", "resnet101")
    assert "pspnet" in models["segmentation"]
    assert default_taps("segmentation", "deeplabv3", "resnet50") == (["encoder.layer4"], [2048])
    with pytest.raises(ValueError, match="did you mean 'retinanet'"):
        build_model("detection", "retinannet", "resnet18", 3)
    with pytest.raises(ValueError, match="unknown task 'classification'"):
        build_model("classification", "retinanet", "resnet18", 3)
    with pytest.raises(ValueError, match="backbone for pspnet 'resnet152'"):
        build_model("segmentation", "pspnet", "resnet152", 3)
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1"):
        build_model("segmentation", "pspnet", "resnet18", 0)


def test_count_parameters():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    assert count_parameters(model) == 8 + 3
    model[0].requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 3


def test_importing_freekd_does_not_import_the_model_packages():
    code = (
        "import sys, freekd; "
        "print([m for m in ('torchvision', 'segmentation_models_pytorch', 'pycocotools') "
        "if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
