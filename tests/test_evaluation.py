"""Metrics against hand-computed cases: COCO box mAP (pycocotools) and mIoU / pixel accuracy."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from torch import nn

from freekd.evaluation import (
    COCOEvaluator,
    ConfusionMatrix,
    evaluate,
    evaluate_detection,
    evaluate_segmentation,
    segmentation_scores,
)
from freekd.evaluation.segmentation import format_class_table
from freekd.models import build_detector, build_segmenter

# ---------------------------------------------------------------------------------- detection

# Image 0: a small (20x20), a medium (50x50) and a large (200x200) box; image 1: one large box.
GT_BOXES = [
    torch.tensor([[0.0, 0.0, 20.0, 20.0], [30.0, 30.0, 80.0, 80.0], [0.0, 0.0, 200.0, 200.0]]),
    torch.tensor([[10.0, 10.0, 110.0, 110.0]]),
]
GT_LABELS = [torch.tensor([1, 2, 1]), torch.tensor([2])]


def targets():
    return [{"boxes": b, "labels": lab} for b, lab in zip(GT_BOXES, GT_LABELS, strict=True)]


def detections(boxes, labels, score=0.9):
    return {"boxes": boxes, "labels": labels, "scores": torch.full((len(boxes),), score)}


def coco_scores(predictions, gt=None, **kwargs):
    evaluator = COCOEvaluator(**kwargs)
    evaluator.update(predictions, gt if gt is not None else targets())
    return evaluator.compute()


def test_perfect_detections_score_100_everywhere():
    scores = coco_scores([detections(b, lab) for b, lab in zip(GT_BOXES, GT_LABELS, strict=True)])
    for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"):
        assert scores[name] == pytest.approx(100.0), name


def test_a_detection_with_iou_062_counts_for_ap50_but_not_ap75():
    gt = [{"boxes": torch.tensor([[0.0, 0.0, 100.0, 100.0]]), "labels": torch.tensor([1])}]
    shifted = detections(torch.tensor([[0.0, 0.0, 100.0, 62.0]]), torch.tensor([1]))  # IoU 0.62
    scores = coco_scores([shifted], gt)
    assert scores["AP50"] == pytest.approx(100.0)
    assert scores["AP75"] == pytest.approx(0.0)
    assert scores["AP"] == pytest.approx(30.0)  # matched at IoU 0.50, 0.55, 0.60 of ten
    assert math.isnan(scores["APs"])  # no small ground truth: undefined, not -1


def test_empty_predictions_score_zero_and_no_ground_truth_is_nan(caplog):
    empty = detections(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    scores = coco_scores([empty, empty])
    assert scores["AP"] == 0.0 and scores["AP50"] == 0.0 and scores["AR100"] == 0.0
    no_gt = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    with caplog.at_level(logging.WARNING, logger="freekd"):
        scores = coco_scores([detections(GT_BOXES[1], GT_LABELS[1])], no_gt)
    assert math.isnan(scores["AP"]) and "no ground-truth" in caplog.text


def test_false_positives_and_ranking_lower_ap():
    # Image 1 gets a confident false positive (wrong class) before its true detection.
    predictions = [
        detections(GT_BOXES[0], GT_LABELS[0]),
        {
            "boxes": torch.cat([GT_BOXES[1], GT_BOXES[1]]),
            "labels": torch.tensor([1, 2]),
            "scores": torch.tensor([0.95, 0.5]),
        },
    ]
    scores = coco_scores(predictions)
    # Class 2: perfect. Class 1 ranks FP (0.95), TP, TP: precision 1/2 at recall 1/2 and 2/3 at
    # recall 1, interpolated to 2/3 everywhere -> AP 2/3 at every IoU. Mean over classes.
    assert scores["AP"] == pytest.approx(100.0 * (1 + 2 / 3) / 2, abs=1e-6)


def test_crowd_regions_are_ignored_not_counted_as_false_positives():
    gt = [
        {
            "boxes": torch.tensor([[0.0, 0.0, 50.0, 50.0], [100.0, 100.0, 200.0, 200.0]]),
            "labels": torch.tensor([1, 1]),
            "iscrowd": torch.tensor([0, 1]),
        }
    ]
    predictions = [
        {
            "boxes": torch.tensor([[100.0, 100.0, 200.0, 200.0], [0.0, 0.0, 50.0, 50.0]]),
            "labels": torch.tensor([1, 1]),
            "scores": torch.tensor([0.9, 0.8]),  # the crowd match ranks first
        }
    ]
    assert coco_scores(predictions, gt)["AP"] == pytest.approx(100.0)
    del gt[0]["iscrowd"]  # now it is a real object and both detections are true positives
    assert coco_scores(predictions, gt)["AP"] == pytest.approx(100.0)
    gt[0]["iscrowd"] = torch.tensor([1, 0])  # the other way round: the 0.8 detection is ignored
    predictions[0]["scores"] = torch.tensor([0.8, 0.9])
    assert coco_scores(predictions, gt)["AP"] == pytest.approx(100.0)


def test_annotation_file_with_category_ids_and_image_ids(tmp_path):
    annotation = {
        "images": [{"id": 42, "width": 300, "height": 300}, {"id": 7, "width": 64, "height": 64}],
        "categories": [{"id": 18, "name": "dog"}, {"id": 3, "name": "car"}],
        "annotations": [
            {"id": 5, "image_id": 42, "category_id": 18, "bbox": [0, 0, 20, 20], "area": 300.0},
            {"id": 6, "image_id": 42, "category_id": 3, "bbox": [30, 30, 50, 50], "area": 2500.0},
        ],
    }
    for entry in annotation["annotations"]:
        entry["iscrowd"] = 0
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(annotation))
    evaluator = COCOEvaluator(path, label_to_category_id={1: 18, 2: 3})
    boxes = torch.tensor([[0.0, 0.0, 20.0, 20.0], [30.0, 30.0, 80.0, 80.0]])
    evaluator.update([detections(boxes, torch.tensor([1, 2]))], [{"image_id": 42}])
    scores = evaluator.compute()
    assert scores["AP"] == pytest.approx(100.0) and scores["APs"] == pytest.approx(100.0)
    assert {r["category_id"] for r in evaluator.results()} == {18, 3}
    assert evaluator.results()[0]["bbox"] == [0.0, 0.0, 20.0, 20.0]  # x, y, w, h

    evaluator = COCOEvaluator(path, label_to_category_id={1: 18, 2: 3})
    evaluator.update([detections(boxes, torch.tensor([1, 2]))], [{"image_id": 99}])
    with pytest.raises(ValueError, match="not in the annotation file"):
        evaluator.compute()
    with pytest.raises(ValueError, match="no entry for label 2"):
        COCOEvaluator(label_to_category_id={1: 18})._category(2)


class ReplayDetector(nn.Module):
    """Returns stored detections for the image whose pixel [0, 0, 0] holds its index; also a
    background (label 0) detection, which ``detection_predict`` must drop."""

    def __init__(self, outputs) -> None:
        super().__init__()
        self.outputs = outputs
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, images):
        assert not self.training
        results = []
        for image in images:
            output = dict(self.outputs[int(image[0, 0, 0])])
            output["boxes"] = torch.cat([output["boxes"], torch.tensor([[0.0, 0, 9, 9]])])
            output["labels"] = torch.cat([output["labels"], torch.tensor([0])])
            output["scores"] = torch.cat([output["scores"], torch.tensor([0.99])])
            results.append(output)
        return results


def test_evaluate_detection_runs_the_model_on_a_loader_and_writes_results(tmp_path):
    outputs = [detections(b, lab) for b, lab in zip(GT_BOXES, GT_LABELS, strict=True)]
    model = ReplayDetector(outputs).train()
    images = [torch.full((3, 16, 16), float(i)) for i in range(2)]
    loader = [([images[0]], [targets()[0]]), ([images[1]], [targets()[1]])]
    scores = evaluate_detection(model, loader, results_path=tmp_path / "dets.json")
    assert scores["AP"] == pytest.approx(100.0)
    assert model.training
    written = json.loads((tmp_path / "dets.json").read_text())
    assert len(written) == 4 and {d["category_id"] for d in written} == {1, 2}
    assert evaluate("detection", model, loader)["AP50"] == pytest.approx(100.0)


def test_evaluate_detection_on_a_real_detector():
    torch.manual_seed(0)
    model = build_detector("retinanet", "resnet18", 2, min_size=64, max_size=96, score_thresh=0.0)
    loader = [([torch.rand(3, 64, 64)], [targets()[1]])]
    scores = evaluate_detection(model, loader)
    assert 0.0 <= scores["AP50"] <= 100.0 and 0.0 <= scores["AR100"] <= 100.0


# ---------------------------------------------------------------------------------- segmentation

# Ground truth and prediction of a 2x3 image, 2 classes, one ignored pixel:
#   target [[0, 0, 1], [1, 1, 255]]   prediction [[0, 1, 1], [1, 0, 0]]
# Valid (truth, prediction) pairs: (0,0) (0,1) (1,1) (1,1) (1,0): confusion [[1, 1], [1, 2]].
# IoU_0 = 1 / (2 + 2 - 1) = 1/3, IoU_1 = 2 / (3 + 3 - 2) = 1/2, mIoU = 5/12;
# pixel accuracy = 3/5; class accuracy 1/2 and 2/3, mean 7/12.
TARGET = torch.tensor([[0, 0, 1], [1, 1, 255]])
PREDICTION = torch.tensor([[0, 1, 1], [1, 0, 0]])


def test_hand_computed_miou_and_pixel_accuracy():
    matrix = ConfusionMatrix(2)
    matrix.update(PREDICTION, TARGET)
    assert matrix.matrix.tolist() == [[1, 1], [1, 2]]
    scores = matrix.compute()
    assert scores["mIoU"] == pytest.approx(100 * 5 / 12)
    assert scores["pixel_accuracy"] == pytest.approx(60.0)
    assert scores["mAcc"] == pytest.approx(100 * 7 / 12)
    assert scores["per_class_IoU"] == pytest.approx({"class_0": 100 / 3, "class_1": 50.0})


def test_absent_classes_are_skipped_and_predicted_only_classes_count():
    matrix = ConfusionMatrix(3)  # class 2 appears nowhere: NaN, left out of the mean
    matrix.update(PREDICTION[None], TARGET[None])
    scores = matrix.compute()
    assert math.isnan(scores["per_class_IoU"]["class_2"])
    assert scores["mIoU"] == pytest.approx(100 * 5 / 12)
    # A class predicted but absent from the ground truth has IoU 0 and counts.
    scores = segmentation_scores(torch.tensor([[3, 1], [0, 0]]), ["road", "car"])
    assert scores["per_class_IoU"] == pytest.approx({"road": 75.0, "car": 0.0})
    assert scores["mIoU"] == pytest.approx(37.5) and math.isnan(scores["per_class_accuracy"]["car"])


def test_per_class_scores_are_named_and_printed_with_a_header():
    matrix = ConfusionMatrix(3, class_names=["background", "cat", "dog"])
    matrix.update(PREDICTION, TARGET)
    scores = matrix.compute()
    assert list(scores["per_class_IoU"]) == ["background", "cat", "dog"]
    assert scores["per_class_IoU"]["cat"] == pytest.approx(50.0)
    table = format_class_table(scores).splitlines()
    assert table[0].split() == ["class", "IoU", "accuracy"]
    assert table[1].split() == ["background", "33.33", "50.00"]
    assert table[3].split() == ["dog", "n/a", "n/a"]  # absent everywhere: undefined
    with pytest.raises(ValueError, match="holds 2 names for 3 classes"):
        ConfusionMatrix(3, class_names=["a", "b"])
    with pytest.raises(ValueError, match="repeats"):
        ConfusionMatrix(2, class_names=["a", "a"])


def test_accumulation_over_batches_equals_one_pass_and_bad_ids_are_refused():
    torch.manual_seed(0)
    prediction = torch.randint(0, 4, (4, 8, 8))
    target = torch.randint(0, 4, (4, 8, 8))
    target[0, 0] = 255
    whole, parts = ConfusionMatrix(4), ConfusionMatrix(4)
    whole.update(prediction, target)
    parts.update(prediction[:1], target[:1])
    parts.update(prediction[1:], target[1:])
    assert torch.equal(whole.matrix, parts.matrix)
    assert int(whole.matrix.sum()) == 4 * 64 - 8
    with pytest.raises(ValueError, match="outside 0..3"):
        whole.update(torch.full((2, 2), 4), torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="class ids"):
        whole.update(torch.rand(2, 2), torch.zeros(2, 2, dtype=torch.int64))


class SignSegmenter(nn.Module):
    """Predicts class 1 where channel 0 is positive, else 0."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return torch.stack([-x[:, 0], x[:, 0]], dim=1) + self.dummy


def test_evaluate_segmentation_matches_the_hand_computed_case():
    images = (PREDICTION.float() * 2 - 1)[None, None].expand(1, 3, 2, 3)
    loader = [(images, TARGET[None]), {"image": images, "mask": TARGET[None]}]  # seen twice
    scores = evaluate_segmentation(SignSegmenter(), loader, num_classes=2)
    assert scores["mIoU"] == pytest.approx(100 * 5 / 12)
    assert scores["pixel_accuracy"] == pytest.approx(60.0)
    assert evaluate("segmentation", SignSegmenter(), loader, num_classes=2) == scores
    with pytest.raises(ValueError, match="no labelled pixels"):
        evaluate_segmentation(SignSegmenter(), [(images, torch.full((1, 2, 3), 255))], 2)


def test_evaluate_segmentation_on_a_real_segmenter_with_an_odd_image_size():
    torch.manual_seed(0)
    model = build_segmenter("deeplabv3", "resnet18", 3)
    loader = [(torch.randn(1, 3, 60, 70), torch.randint(0, 3, (1, 60, 70)))]
    scores = evaluate_segmentation(model, loader, num_classes=3)
    assert 0.0 <= scores["mIoU"] <= 100.0 and len(scores["per_class_IoU"]) == 3
