"""Stage 1 (PromptTuner), stage 2 (Distiller), prompt files, teacher loading and student export."""

from __future__ import annotations

import logging

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from freekd import FreeKDLoss
from freekd.checkpoints import export_student, load_weights
from freekd.distill import Distiller, OutputLoss
from freekd.tuning import PromptTuner
from tests.conftest import TAPS, TinySegmenter, fixed_batch, segmentation_loss, trained_teacher

# ---------------------------------------------------------------------- stage 1


def test_prompt_tuning_trains_only_prompts_and_lowers_its_loss(tmp_path):
    teacher = trained_teacher()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    loss = FreeKDLoss.preset("paper", [16, 16])
    tuner = PromptTuner(teacher, TAPS, loss, segmentation_loss).train()
    assert all(not p.requires_grad for p in teacher.parameters())
    assert not teacher.stage1[1].training and not teacher.stage3[1].training  # BN, dropout
    trainable = [p for p in tuner.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p.tokens) for p in loss.prompts}
    tokens_before = [p.tokens.detach().clone() for p in loss.prompts]
    optimiser = torch.optim.Adam(trainable, lr=0.05)
    batch = fixed_batch()
    first = tuner(batch)["loss"].item()
    for _ in range(25):
        terms = tuner(batch)
        optimiser.zero_grad()
        terms["loss"].backward()
        optimiser.step()
    assert terms["loss"].item() < first
    assert set(terms) >= {"loss", "task", "dissimilarity"}
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert any(
        not torch.equal(a, p.tokens) for a, p in zip(tokens_before, loss.prompts, strict=True)
    )
    tuner.mark_tuned()
    path = loss.save_prompts(tmp_path / "prompts.safetensors")
    fresh = FreeKDLoss.preset("paper", [16, 16])
    fresh.load_prompts(path)
    assert all(bool(p.tuned) for p in fresh.prompts)
    for a, b in zip(fresh.prompts, loss.prompts, strict=True):
        torch.testing.assert_close(a.tokens, b.tokens)


def test_resynthesis_with_open_masks_reproduces_the_teacher():
    # Zero tokens: every mask is sigmoid(0) = 1/2, so re-synthesis halves each tapped feature
    # exactly, and the rest of the teacher runs on the halved maps.
    teacher = trained_teacher().eval()
    batch = fixed_batch()
    reference = teacher(batch[0])
    loss = FreeKDLoss([16, 16], num_prompts=1, granularity="level", include_low=True)
    with torch.no_grad():
        for prompt in loss.prompts:
            prompt.tokens.zero_()
    captured = {}
    tuner = PromptTuner(
        teacher, TAPS, loss, lambda model, b: captured.setdefault("out", model(b[0])).sum() * 0
    )
    tuner(batch)
    tuner.taps.remove()
    with torch.no_grad():
        stage2 = teacher.stage2(teacher.stage1(batch[0])) * 0.5
        expected = teacher.classifier(teacher.stage3(stage2) * 0.5)
        expected = F.interpolate(expected, size=batch[0].shape[-2:], mode="bilinear")
    torch.testing.assert_close(captured["out"], expected)
    assert not torch.allclose(reference, expected)


def test_prompt_file_refuses_another_configuration_and_foreign_files(tmp_path):
    loss = FreeKDLoss.preset("paper", [16, 16])
    path = tmp_path / "p.safetensors"
    loss.save_prompts(path)
    with pytest.raises(ValueError, match=r"num_prompts: file 2, loss 6"):
        FreeKDLoss.preset("official", [16, 16]).load_prompts(path)
    with pytest.raises(ValueError, match=r"channels: file \[16, 16\], loss \[8, 16\]"):
        FreeKDLoss.preset("paper", [8, 16]).load_prompts(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        loss.load_prompts(tmp_path / "missing.safetensors")
    other = tmp_path / "other.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="not a freekd prompt file"):
        loss.load_prompts(other)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable"):
        loss.load_prompts(garbage)


def test_an_interrupted_save_leaves_the_previous_prompt_file_intact(tmp_path, monkeypatch):
    loss = FreeKDLoss.preset("paper", [16, 16])
    path = tmp_path / "p.safetensors"
    loss.save_prompts(path)
    saved = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with torch.no_grad():
        loss.prompts[0].tokens.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        loss.save_prompts(path)
    assert path.read_bytes() == saved
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]


# ---------------------------------------------------------------------- stage 2


def make_distiller(student=None, projection="auto", **kwargs):
    teacher = trained_teacher()
    loss = FreeKDLoss.preset("paper", [16, 16])
    for prompt in loss.prompts:
        prompt.mark_tuned()
    student = student if student is not None else TinySegmenter(8)
    distiller = Distiller(
        teacher,
        student,
        TAPS,
        TAPS,
        {"freekd": loss},
        segmentation_loss,
        fixed_batch(),
        projection=projection,
        **kwargs,
    )
    return distiller, teacher, student, loss


def test_distillation_lowers_the_distillation_term_and_never_trains_the_teacher():
    torch.manual_seed(1)
    distiller, teacher, student, loss = make_distiller(loss_weights={"freekd": 3.0})
    distiller.train()
    assert not teacher.training
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    params = distiller.trainable_parameters()
    teacher_ids = {id(p) for p in teacher.parameters()} | {id(p.tokens) for p in loss.prompts}
    assert params and not teacher_ids & {id(p) for p in params}
    optimiser = torch.optim.Adam(params, lr=0.01)
    batch = fixed_batch()
    first = distiller(batch)
    assert set(first) == {"task", "distill/freekd"}
    torch.testing.assert_close(
        first["distill/freekd"].detach(), 3.0 * sum(loss.last_terms.values())
    )
    for _ in range(30):
        terms = distiller(batch)
        optimiser.zero_grad()
        sum(terms.values()).backward()
        optimiser.step()
    assert distiller(batch)["distill/freekd"].item() < 0.7 * first["distill/freekd"].item()
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())


def test_projections_appear_exactly_where_shapes_differ():
    same, *_ = make_distiller(student=TinySegmenter(16))
    assert all(p.conv is None and p.size is None for p in same.projections)
    narrow, *_ = make_distiller(student=TinySegmenter(8))
    assert all(p.conv is not None and p.size is None for p in narrow.projections)
    coarse, *_ = make_distiller(student=TinySegmenter(16, last_stride=4))
    assert coarse.projections[0].conv is None and coarse.projections[0].size is None
    assert coarse.projections[1].conv is None and coarse.projections[1].size == (8, 8)
    always, *_ = make_distiller(student=TinySegmenter(16), projection="always")
    assert all(p.conv is not None for p in always.projections)
    with pytest.raises(ValueError, match="projection='auto'"):
        make_distiller(student=TinySegmenter(8), projection="none")


def test_mismatched_tap_counts_and_unknown_layers_are_refused():
    teacher, student = trained_teacher(), TinySegmenter(8)
    loss = FreeKDLoss.preset("paper", [16, 16])
    with pytest.raises(ValueError, match="yield 1 features"):
        Distiller(teacher, student, TAPS, ["stage3"], {"f": loss}, segmentation_loss, fixed_batch())
    with pytest.raises(ValueError, match="closest"):
        Distiller(
            teacher,
            student,
            TAPS,
            ["stage4", "stage3"],
            {"f": loss},
            segmentation_loss,
            fixed_batch(),
        )
    with pytest.raises(ValueError, match="not feature losses"):
        Distiller(
            teacher,
            student,
            TAPS,
            TAPS,
            {"f": loss},
            segmentation_loss,
            fixed_batch(),
            loss_weights={"freekd": 1.0},
        )


def test_untuned_prompts_warn_when_distilling(caplog):
    teacher, student = trained_teacher(), TinySegmenter(8)
    loss = FreeKDLoss.preset("paper", [16, 16])
    distiller = Distiller(
        teacher, student, TAPS, TAPS, {"f": loss}, segmentation_loss, fixed_batch()
    )
    with caplog.at_level(logging.WARNING, logger="freekd"):
        distiller(fixed_batch())
    assert any("never tuned" in r.message for r in caplog.records)


def test_init_from_teacher_copies_matching_modules():
    teacher = trained_teacher(width=16)
    student = TinySegmenter(16)
    loss = FreeKDLoss.preset("paper", [16, 16])
    Distiller(
        teacher,
        student,
        TAPS,
        TAPS,
        {"f": loss},
        segmentation_loss,
        fixed_batch(),
        init_from_teacher=["stage3", "classifier"],
    )
    for a, b in zip(teacher.stage3.parameters(), student.stage3.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="differs between the models"):
        Distiller(
            teacher,
            TinySegmenter(8),
            TAPS,
            TAPS,
            {"f": loss},
            segmentation_loss,
            fixed_batch(),
            init_from_teacher=["stage3"],
        )


# ---------------------------------------------------------------------- export and loading


def test_exported_student_loads_strictly_into_a_fresh_model_with_identical_outputs(tmp_path):
    distiller, _, student, _ = make_distiller()
    optimiser = torch.optim.SGD(distiller.trainable_parameters(), lr=0.1)
    terms = distiller(fixed_batch())
    sum(terms.values()).backward()
    optimiser.step()
    path = export_student(distiller.student, tmp_path / "student.safetensors")
    fresh = TinySegmenter(8)
    fresh.load_state_dict(safetensors.torch.load_file(str(path)), strict=True)
    distiller.remove_hooks()
    x = fixed_batch(seed=5)[0]
    student.eval()
    fresh.eval()
    torch.testing.assert_close(fresh(x), student(x), rtol=0, atol=0)


def test_teacher_loading_reports_and_refuses(tmp_path, caplog):
    teacher = trained_teacher()
    wrapped = {"state_dict": {f"module.{k}": v for k, v in teacher.state_dict().items()}}
    torch.save(wrapped, tmp_path / "teacher.pt")
    fresh = TinySegmenter(16)
    report = load_weights(fresh, tmp_path / "teacher.pt")
    assert report.prefix == "module." and not report.missing
    for a, b in zip(fresh.state_dict().values(), teacher.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    partial = {k: v for k, v in teacher.state_dict().items() if not k.startswith("classifier")}
    with pytest.raises(ValueError, match=r"misses 2 of the model's .* classifier"):
        load_weights(TinySegmenter(16), partial)
    with caplog.at_level(logging.WARNING, logger="freekd"):
        report = load_weights(TinySegmenter(16), partial, max_missing=0.5)
    assert report.missing == ["classifier.bias", "classifier.weight"]
    assert any("missing" in r.message for r in caplog.records)
    with pytest.raises(ValueError, match="shapes differ"):
        load_weights(TinySegmenter(8), teacher.state_dict())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_weights(fresh, tmp_path / "nothing.pt")


def test_pickled_code_is_never_loaded(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must not run",))

    torch.save({"state_dict": {"w": torch.zeros(1)}, "evil": Payload()}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="weights-only"):
        load_weights(TinySegmenter(16), tmp_path / "x.pt")


# ---------------------------------------------------------------------- torchvision detector


def tiny_retinanet(width: int):
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    backbone = resnet_fpn_backbone(
        backbone_name="resnet18",
        weights=None,
        trainable_layers=5,
        returned_layers=[2, 3, 4],
        extra_blocks=LastLevelP6P7(width, width),
    )
    if width != 256:  # narrower FPN for the student
        from torchvision.ops import FeaturePyramidNetwork

        backbone.fpn = FeaturePyramidNetwork([128, 256, 512], width, LastLevelP6P7(width, width))
        backbone.out_channels = width
    return RetinaNet(backbone, num_classes=3, min_size=96, max_size=96)


def detection_batch():
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 96, 96, generator=generator) for _ in range(2)]
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[30.0, 20.0, 80.0, 90.0]]), "labels": torch.tensor([2])},
    ]
    return images, targets


def test_retinanet_distillation_step_with_fpn_taps_and_head_output_loss():
    torch.manual_seed(0)
    teacher, student = tiny_retinanet(256), tiny_retinanet(64)
    head_calls = []
    teacher.head.classification_head.register_forward_hook(lambda *a: head_calls.append(1))
    loss = FreeKDLoss.preset("official", [256] * 5)
    for prompt in loss.prompts:
        prompt.mark_tuned()
    distiller = Distiller(
        teacher,
        student,
        ["backbone.fpn"],
        ["backbone.fpn"],
        {"freekd": loss},
        task_loss=lambda model, batch: model(*batch),
        example_batch=detection_batch(),
        projection="always",
    )
    assert len(distiller.projections) == 5 and all(
        p.conv is not None for p in distiller.projections
    )
    head_calls.clear()
    terms = distiller.train()(detection_batch())
    assert set(terms) == {"task/classification", "task/bbox_regression", "distill/freekd"}
    assert head_calls == []  # the teacher stopped after its FPN
    sum(terms.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.backbone.fpn.inner_blocks[0][0].weight.grad is not None

    with_head = Distiller(
        teacher,
        tiny_retinanet(256),
        ["backbone.fpn"],
        ["backbone.fpn"],
        {"freekd": loss},
        task_loss=lambda model, batch: model(*batch),
        example_batch=detection_batch(),
        output_losses={
            "bbox": OutputLoss("head.regression_head", "head.regression_head", nn.SmoothL1Loss())
        },
    )
    terms = with_head.train()(detection_batch())
    assert terms["output/bbox"].item() > 0 and terms["output/bbox"].requires_grad


def test_a_checkpoint_holding_teacher_and_student_of_one_architecture_needs_a_prefix():
    student, teacher = TinySegmenter(16), trained_teacher()
    both = {f"distiller.student.{k}": v for k, v in student.state_dict().items()}
    both.update({f"distiller.teacher.{k}": v for k, v in teacher.state_dict().items()})
    with pytest.raises(ValueError, match="pass prefix="):
        load_weights(TinySegmenter(16), both)
    fresh = TinySegmenter(16)
    load_weights(fresh, both, prefix="distiller.teacher.")
    assert all(
        torch.equal(a, b)
        for a, b in zip(fresh.state_dict().values(), teacher.state_dict().values(), strict=True)
    )
    narrow = {f"distiller.student.{k}": v for k, v in TinySegmenter(8).state_dict().items()}
    narrow.update({f"distiller.teacher.{k}": v for k, v in teacher.state_dict().items()})
    assert load_weights(TinySegmenter(8), narrow).prefix == "distiller.student."


def test_distiller_and_prompt_tuner_remove_their_hooks_when_used_as_context_managers():
    distiller, teacher, student, loss = make_distiller()
    with distiller as same:
        assert same is distiller
        distiller(fixed_batch())
        assert any(m._forward_hooks for m in student.modules())
    assert not any(m._forward_hooks for m in [*teacher.modules(), *student.modules()])
    with PromptTuner(teacher, TAPS, loss, segmentation_loss) as tuner:
        assert any(m._forward_hooks for m in teacher.modules())
        tuner(fixed_batch())
    assert not any(m._forward_hooks for m in teacher.modules())
    tuner.remove_hooks()  # idempotent
