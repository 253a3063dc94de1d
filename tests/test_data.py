"""freekd.data: digit scenes, COCO / segmentation / Cityscapes loaders, transforms, collate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from freekd.data import (
    Cityscapes,
    CocoDetection,
    Compose,
    DigitScenes,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    RandomResizedScale,
    Resize,
    SegmentationFolder,
    TorchvisionTransform,
    build_dataset,
    default_detection_transforms,
    default_segmentation_transforms,
    detection_collate,
    digit_sample_indices,
    segmentation_collate,
    write_coco,
    write_segmentation_folder,
)

# --------------------------------------------------------------------------------- helpers


def save_rgb(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)


def save_gray(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    bunch = load_digits()
    return bunch.images, bunch.target


# --------------------------------------------------------------------------------- digits


def test_digits_deterministic_per_seed_and_access_order() -> None:
    first = DigitScenes(size=64, length=6, seed=3)
    again = DigitScenes(size=64, length=6, seed=3)
    other = DigitScenes(size=64, length=6, seed=4)
    forward = [first[i] for i in range(6)]
    backward = {i: again[i] for i in reversed(range(6))}
    for i in range(6):
        torch.testing.assert_close(forward[i][0], backward[i][0], rtol=0, atol=0)
        torch.testing.assert_close(forward[i][1]["boxes"], backward[i][1]["boxes"])
        assert torch.equal(forward[i][1]["labels"], backward[i][1]["labels"])
    # Global RNG state has no influence.
    torch.manual_seed(123)
    np.random.seed(123)
    torch.testing.assert_close(DigitScenes(size=64, length=6, seed=3)[2][0], forward[2][0])
    assert all(not torch.equal(forward[i][0], other[i][0]) for i in range(6))
    # Different indices give different scenes.
    assert not torch.equal(forward[0][0], forward[1][0])


@pytest.mark.parametrize("task", ["segmentation", "detection"])
def test_cached_digits_equal_the_rendered_ones_and_survive_in_place_transforms(task) -> None:
    def scribble(image, target):  # writes into its inputs
        image.mul_(0)
        if task == "detection":
            target["boxes"].add_(1)
        else:
            target.fill_(7)
        return image, target

    plain = DigitScenes(task=task, size=64, length=3, seed=2)
    cached = DigitScenes(task=task, size=64, length=3, seed=2, cache=True)
    scribbled = DigitScenes(task=task, size=64, length=3, seed=2, cache=True, transforms=scribble)
    for _ in range(2):  # the second pass reads the cache
        for i in range(3):
            (image, target), (again, cached_target) = plain[i], cached[i]
            assert torch.equal(image, again)
            if task == "detection":
                assert torch.equal(target["boxes"], cached_target["boxes"])
            else:
                assert torch.equal(target, cached_target)
            scribbled[i]
    # the cache kept the scenes as rendered, not as the transform left them
    assert torch.equal(scribbled._cache[1][0], plain[1][0])
    if task == "segmentation":
        assert torch.equal(scribbled._cache[1][1], plain[1][1])


def test_digit_splits_are_disjoint_and_scenes_use_their_split(sklearn_digits) -> None:
    _, targets = sklearn_digits
    train, val = digit_sample_indices("train"), digit_sample_indices("val")
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(len(targets)))
    assert 0.15 < len(val) / len(targets) < 0.25
    # Every class is present in both splits.
    assert set(targets[val].tolist()) == set(range(10)) == set(targets[train].tolist())
    for split, allowed in (("train", set(train.tolist())), ("val", set(val.tolist()))):
        scenes = DigitScenes(split=split, size=64, length=8)
        np.testing.assert_array_equal(scenes.sample_indices, digit_sample_indices(split))
        used = set()
        for i in range(8):
            scene = scenes.scene(i)
            used.update(scene.sample_ids.tolist())
            # The digit of each instance is sklearn's target of the sample drawn.
            np.testing.assert_array_equal(scene.digits, targets[scene.sample_ids])
        assert used <= allowed


@pytest.mark.parametrize("size", [64, 128, 256])
def test_digit_boxes_are_tight_around_the_mask_pixels(size: int) -> None:
    detection = DigitScenes(task="detection", size=size, length=4, seed=size)
    segmentation = DigitScenes(task="segmentation", size=size, length=4, seed=size)
    for i in range(4):
        image, target = detection[i]
        seg_image, mask = segmentation[i]
        torch.testing.assert_close(image, seg_image)
        assert image.shape == (3, size, size) and image.dtype == torch.float32
        assert float(image.min()) >= 0 and float(image.max()) <= 1
        assert mask.shape == (size, size) and mask.dtype == torch.int64
        boxes, labels = target["boxes"], target["labels"]
        assert boxes.dtype == torch.float32 and labels.dtype == torch.int64
        assert 1 <= len(boxes) <= 6 and boxes.shape == (len(labels), 4)
        assert target["image_id"] == i
        assert ((labels >= 1) & (labels <= 10)).all()
        assert set(torch.unique(mask).tolist()) <= set(range(11))
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= size).all()
        assert (boxes[:, 2:] > boxes[:, :2]).all()
        covered = torch.zeros(size, size, dtype=torch.bool)
        for box, label in zip(boxes.round().long().tolist(), labels.tolist(), strict=True):
            x0, y0, x1, y1 = box
            inside = mask[y0:y1, x0:x1] == label
            # Tight: the digit's pixels reach every side of its box (within a pixel).
            assert inside[:2].any() and inside[-2:].any()
            assert inside[:, :2].any() and inside[:, -2:].any()
            # Visible: the digit differs in brightness from the background around it.
            crop = image[:, y0:y1, x0:x1].mean(0)
            background = mask[y0:y1, x0:x1] == 0
            if background.sum() > 10:
                assert abs(crop[inside].mean() - crop[background].mean()) > 0.1
            grown = torch.zeros_like(covered)
            grown[max(0, y0 - 1) : y1 + 1, max(0, x0 - 1) : x1 + 1] = True
            covered |= grown & (mask == label)
        # Every digit pixel lies in a box of its class.
        assert torch.equal(covered, mask > 0)
        # Areas are the numbers of visible pixels.
        assert float(target["area"].sum()) >= float((mask > 0).sum()) - 1e-3


def test_digit_counts_and_knobs() -> None:
    counts = [len(DigitScenes(size=128, length=30, seed=1)[i][1]["labels"]) for i in range(30)]
    assert min(counts) >= 1 and max(counts) <= 6 and len(set(counts)) >= 3
    single = DigitScenes(size=64, length=5, min_digits=1, max_digits=1)
    assert all(len(single[i][1]["boxes"]) == 1 for i in range(5))
    # Larger digit_scale gives larger boxes.
    small = DigitScenes(size=128, length=5, max_digits=1, digit_scale=(0.15, 0.15))
    large = DigitScenes(size=128, length=5, max_digits=1, digit_scale=(0.5, 0.5))
    heights_small = [
        float(small[i][1]["boxes"][0, 3] - small[i][1]["boxes"][0, 1]) for i in range(5)
    ]
    heights_large = [
        float(large[i][1]["boxes"][0, 3] - large[i][1]["boxes"][0, 1]) for i in range(5)
    ]
    assert max(heights_small) < 0.25 * 128 < 0.35 * 128 < min(heights_large)
    # No clutter, no noise: a smooth background (small pixel-to-pixel differences).
    smooth = DigitScenes(size=64, length=1, noise=0.0, clutter=0.0, max_digits=1)
    noisy = DigitScenes(size=64, length=1, noise=0.1, clutter=2.0, max_digits=1)
    for scenes, expect_small in ((smooth, True), (noisy, False)):
        image, mask = scenes[0][0], DigitScenes(
            task="segmentation", size=64, length=1, noise=scenes.noise, clutter=scenes.clutter,
            max_digits=1,
        )[0][1]  # fmt: skip
        background = (mask == 0)[1:, :] & (mask == 0)[:-1, :]
        step = (image[:, 1:, :] - image[:, :-1, :]).abs().mean(0)[background].mean()
        assert (step < 0.02) == expect_small
    with pytest.raises(ValueError, match="split"):
        DigitScenes(split="test")
    with pytest.raises(ValueError, match="digit_scale"):
        DigitScenes(size=64, digit_scale=(0.01, 0.2))
    with pytest.raises(IndexError):
        DigitScenes(length=2)[2]


# --------------------------------------------------------------------------------- COCO


def test_write_coco_round_trip_and_pycocotools(tmp_path: Path) -> None:
    scenes = DigitScenes(size=64, length=5, seed=7)
    paths = write_coco(scenes, tmp_path / "coco")
    assert paths.annotation_file.is_file() and len(list(paths.image_dir.glob("*.png"))) == 5
    loaded = CocoDetection(paths.image_dir, paths.annotation_file, check_files=True)
    assert len(loaded) == 5 and loaded.num_classes == 10
    assert loaded.class_names == tuple(str(d) for d in range(10))
    assert loaded.label_to_category_id == {label: label for label in range(1, 11)}
    assert loaded.annotation_file == paths.annotation_file and loaded.image_ids == list(range(5))
    for i in range(5):
        image, target = loaded[i]
        original_image, original = scenes[i]
        assert target["image_id"] == original["image_id"] == i
        torch.testing.assert_close(image, original_image, rtol=0, atol=0.5 / 255 + 1e-6)
        torch.testing.assert_close(target["boxes"], original["boxes"])
        assert torch.equal(target["labels"], original["labels"])
        torch.testing.assert_close(target["area"], original["area"])
    from pycocotools.coco import COCO

    coco = COCO(str(paths.annotation_file))
    assert sorted(coco.getImgIds()) == list(range(5))
    assert sorted(coco.getCatIds()) == list(range(1, 11))
    annotations = coco.loadAnns(coco.getAnnIds(imgIds=[2]))
    x0, y0, x1, y1 = scenes[2][1]["boxes"][0].tolist()
    assert annotations[0]["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0])
    with pytest.raises(FileExistsError):
        write_coco(scenes, tmp_path / "coco")
    with pytest.raises(TypeError, match="detection"):
        write_coco(DigitScenes(task="segmentation", size=64, length=1), tmp_path / "seg")


def make_coco(tmp_path: Path, document: object | None = None, images: dict | None = None) -> Path:
    """A COCO folder with two 20x30 images (ids 10, 20) and the given JSON document."""
    (tmp_path / "images").mkdir(exist_ok=True)
    for name in images or {"a.png": None, "b.png": None}:
        save_rgb(tmp_path / "images" / name, np.full((20, 30, 3), 128))
    if document is None:
        document = coco_document()
    (tmp_path / "ann.json").write_text(
        document if isinstance(document, str) else json.dumps(document)
    )
    return tmp_path / "ann.json"


def coco_document() -> dict:
    return {
        "images": [
            {"id": 20, "file_name": "b.png", "width": 30, "height": 20},
            {"id": 10, "file_name": "a.png", "width": 30, "height": 20},
        ],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 90, "bbox": [2, 3, 10, 5], "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 3, "bbox": [25, 0, 10, 4], "area": 7.0},
            {"id": 3, "image_id": 20, "category_id": 7, "bbox": [1, 1, 0.5, 8]},  # degenerate
            {"id": 4, "image_id": 20, "category_id": 7, "bbox": [4, 4, 6, 6], "iscrowd": 1},
        ],
        "categories": [
            {"id": 7, "name": "cat"},
            {"id": 90, "name": "toothbrush"},
            {"id": 3, "name": "car"},
        ],
    }


def test_coco_label_mapping_box_conversion_and_filters(tmp_path: Path) -> None:
    annotation_file = make_coco(tmp_path)
    dataset = CocoDetection(tmp_path / "images", annotation_file)
    assert dataset.image_ids == [10, 20]
    assert dataset.class_names == ("car", "cat", "toothbrush")
    assert dataset.label_to_category_id == {1: 3, 2: 7, 3: 90}
    assert dataset.num_degenerate == 1 and dataset.num_crowd_skipped == 1
    image, target = dataset[0]
    assert image.shape == (3, 20, 30) and target["image_id"] == 10
    # xywh -> xyxy; the second box is clipped to the 30 px wide image.
    torch.testing.assert_close(target["boxes"], torch.tensor([[2.0, 3, 12, 8], [25, 0, 30, 4]]))
    assert target["labels"].tolist() == [3, 1]
    assert target["area"].tolist() == [50.0, 7.0]
    assert dataset[1][1]["boxes"].shape == (0, 4)
    # Crowd kept on request; empty images skipped on request; a subset of categories.
    assert CocoDetection(tmp_path / "images", annotation_file, skip_crowd=False)[1][1][
        "iscrowd"
    ].tolist() == [1]
    only_cars = CocoDetection(
        tmp_path / "images", annotation_file, category_ids=[3], skip_empty=True
    )
    assert only_cars.image_ids == [10] and only_cars.num_classes == 1
    assert only_cars[0][1]["labels"].tolist() == [1]
    with pytest.raises(ValueError, match=r"category_ids \[5\]"):
        CocoDetection(tmp_path / "images", annotation_file, category_ids=[5])


def broken(document_change):
    document = coco_document()
    document_change(document)
    return document


@pytest.mark.parametrize(
    ("document", "error", "pattern"),
    [
        ("{not json", ValueError, r"ann\.json: not valid JSON \(line 1"),
        ([1, 2], ValueError, "top level is a JSON list"),
        (broken(lambda d: d.pop("categories")), ValueError, r"missing top-level key.*categories"),
        (
            broken(lambda d: d["annotations"][0].update(image_id=99)),
            ValueError,
            r"annotations\[0\] \(id 1\) -> image_id 99.*add the image entries",
        ),
        (
            broken(lambda d: d["annotations"][1].update(category_id=42)),
            ValueError,
            r"category ids that are not in 'categories'.*category_id 42",
        ),
        (
            broken(lambda d: d["annotations"][1].pop("bbox")),
            ValueError,
            r"annotations\[1\] \(id 2\) has no 'bbox'",
        ),
        (
            broken(lambda d: d["annotations"][1].update(bbox=[1, 2, 3])),
            ValueError,
            r"invalid bbox",
        ),
        (
            broken(lambda d: d["images"].append({"id": 10, "file_name": "c.png"})),
            ValueError,
            "image id 10 is listed twice",
        ),
        (
            broken(lambda d: d.update(images=[], annotations=[])),
            ValueError,
            "the data set is empty",
        ),
    ],
)
def test_coco_rejects_broken_annotation_files(tmp_path, document, error, pattern) -> None:
    annotation_file = make_coco(tmp_path, document)
    with pytest.raises(error, match=pattern):
        CocoDetection(tmp_path / "images", annotation_file)


def test_coco_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothere.json"):
        CocoDetection(tmp_path, tmp_path / "nothere.json")
    annotation_file = make_coco(tmp_path, images={"a.png": None})  # b.png is missing
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        CocoDetection(tmp_path / "imgs", annotation_file)
    with pytest.raises(FileNotFoundError, match=r"b\.png \(image id 20\)"):
        CocoDetection(tmp_path / "images", annotation_file, check_files=True)
    lazy = CocoDetection(tmp_path / "images", annotation_file)
    lazy[0]  # a.png is there
    with pytest.raises(FileNotFoundError, match=r"'b\.png' \(image id 20\).*images/b\.png"):
        lazy[1]
    # An image whose size differs from its JSON entry, and one that is not an image at all.
    save_rgb(tmp_path / "images" / "b.png", np.zeros((21, 30, 3)))
    with pytest.raises(ValueError, match=r"30x21 pixels but ann\.json says 30x20"):
        lazy[1]
    (tmp_path / "images" / "b.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"cannot read image .*b\.png"):
        lazy[1]


# --------------------------------------------------------------------------------- segmentation


def test_segmentation_folder_round_trip(tmp_path: Path) -> None:
    scenes = DigitScenes(task="segmentation", size=64, length=3, seed=2)
    paths = write_segmentation_folder(scenes, tmp_path / "seg")
    folder = SegmentationFolder(tmp_path / "seg", num_classes=11, class_names=scenes.class_names)
    assert len(folder) == 3 and folder.num_classes == 11 and folder.class_names[0] == "background"
    assert folder.names == ["000000", "000001", "000002"]
    assert Image.open(paths.mask_dir / "000001.png").mode == "L"
    for i in range(3):
        image, mask = folder[i]
        original_image, original_mask = scenes[i]
        assert torch.equal(mask, original_mask) and mask.dtype == torch.int64
        torch.testing.assert_close(image, original_image, rtol=0, atol=0.5 / 255 + 1e-6)
    subset = SegmentationFolder(tmp_path / "seg", num_classes=11, names=["000002"])
    assert torch.equal(subset[0][1], scenes[2][1])


def test_segmentation_folder_errors(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    with pytest.raises(FileNotFoundError, match="mask folder not found"):
        SegmentationFolder(tmp_path, num_classes=3)
    (tmp_path / "masks").mkdir()
    with pytest.raises(ValueError, match="no images"):
        SegmentationFolder(tmp_path, num_classes=3)
    save_rgb(tmp_path / "images" / "one.jpg", np.zeros((4, 5, 3)))
    save_rgb(tmp_path / "images" / "two.png", np.zeros((4, 5, 3)))
    save_gray(tmp_path / "masks" / "one.png", np.array([[0, 1, 2, 255, 0]] * 4))
    save_gray(tmp_path / "masks" / "three.png", np.zeros((4, 5)))
    with pytest.raises(
        ValueError, match=r"without a mask .*two\.png.*without an image.*three\.png"
    ):
        SegmentationFolder(tmp_path, num_classes=3)
    (tmp_path / "masks" / "three.png").unlink()
    save_gray(tmp_path / "masks" / "two.png", np.array([[0, 1, 7, 3, 255]] * 4))
    dataset = SegmentationFolder(tmp_path, num_classes=3)
    image, mask = dataset[0]
    assert image.shape == (3, 4, 5) and mask[0].tolist() == [0, 1, 2, 255, 0]
    with pytest.raises(
        ValueError, match=r"two\.png has values \[3, 7\] outside the class ids 0\.\.2"
    ):
        dataset[1]
    (tmp_path / "images" / "two.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"cannot read image .*two\.png"):
        dataset[1]
    save_rgb(tmp_path / "masks" / "two.png", np.zeros((4, 5, 3)))  # colour mask
    save_rgb(tmp_path / "images" / "two.png", np.zeros((4, 5, 3)))
    with pytest.raises(ValueError, match="mode 'RGB'"):
        dataset[1]
    with pytest.raises(ValueError, match="lack an image.*four"):
        SegmentationFolder(tmp_path, num_classes=3, names=["one", "four"])


def write_fake_cityscapes(root: Path) -> np.ndarray:
    """Two train images (aachen, bochum) and one val image; returns the label ids used."""
    label_ids = np.array(
        [
            [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28],
            [31, 32, 33, 0, 1, 4, 6, 9, 10, 14, 16, 18, 29, 30, 34, 255],
        ]
    )
    image = np.random.default_rng(0).integers(0, 256, size=(2, 16, 3))
    for split, city, name in (
        ("train", "aachen", "aachen_000000_000019"),
        ("train", "bochum", "bochum_000000_000313"),
        ("val", "lindau", "lindau_000000_000019"),
    ):
        save_rgb(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png", image)
        save_gray(root / "gtFine" / split / city / f"{name}_gtFine_labelIds.png", label_ids)
        save_gray(root / "gtFine" / split / city / f"{name}_gtFine_color.png", label_ids * 0)
    # bochum also has a labelTrainIds file: it is used as is.
    save_gray(
        root / "gtFine/train/bochum/bochum_000000_000313_gtFine_labelTrainIds.png",
        np.full((2, 16), 5),
    )
    return label_ids


def test_cityscapes_train_ids(tmp_path: Path) -> None:
    write_fake_cityscapes(tmp_path)
    dataset = Cityscapes(tmp_path, split="train")
    assert len(dataset) == 2 and dataset.num_classes == 19 and len(dataset.class_names) == 19
    assert dataset.class_names[13] == "car"
    image, mask = dataset[0]
    assert image.shape == (3, 2, 16) and mask.dtype == torch.int64
    ignore = 255
    expected = [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
                [16, 17, 18] + [ignore] * 13]  # fmt: skip
    assert mask.tolist() == expected
    assert dataset[1][1].unique().tolist() == [5]
    assert len(Cityscapes(tmp_path, split="val")) == 1
    with pytest.raises(FileNotFoundError, match=r"splits present: \['train', 'val'\]"):
        Cityscapes(tmp_path, split="test")
    (tmp_path / "gtFine/val/lindau/lindau_000000_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(FileNotFoundError, match="lindau_000000_000019_gtFine_labelIds.png"):
        Cityscapes(tmp_path, split="val")
    with pytest.raises(FileNotFoundError, match="leftImg8bit"):
        Cityscapes(tmp_path / "nowhere")


# --------------------------------------------------------------------------------- transforms


def boxed_image() -> tuple[torch.Tensor, dict]:
    """A 4x6 black image with a white 1x2 rectangle at rows 1, cols 1..2 -> box [1, 1, 3, 2]."""
    image = torch.zeros(3, 4, 6)
    image[:, 1, 1:3] = 1.0
    target = {
        "boxes": torch.tensor([[1.0, 1.0, 3.0, 2.0]]),
        "labels": torch.tensor([4]),
        "image_id": 0,
        "area": torch.tensor([2.0]),
        "iscrowd": torch.tensor([0]),
    }
    return image, target


def bright_box(image: torch.Tensor) -> list[float]:
    rows, cols = torch.nonzero(image.mean(0) > 0.5, as_tuple=True)
    return [float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1)]


def test_detection_flip_and_resize_hand_computed() -> None:
    image, target = boxed_image()
    flipped, flipped_target = RandomHorizontalFlip(p=1.0)(image, target)
    assert flipped_target["boxes"].tolist() == [[3.0, 1.0, 5.0, 2.0]]  # x -> 6 - x
    assert bright_box(flipped) == [3.0, 1.0, 5.0, 2.0]
    assert torch.equal(flipped, image.flip(-1))
    assert flipped_target["labels"].tolist() == [4] and target["boxes"].tolist() == [[1, 1, 3, 2]]
    assert RandomHorizontalFlip(p=0.0)(image, target)[1] is target

    resized, resized_target = Resize((8, 12))(image, target)
    assert resized.shape == (3, 8, 12)
    assert resized_target["boxes"].tolist() == [[2.0, 2.0, 6.0, 4.0]]
    assert resized_target["area"].tolist() == [8.0]
    assert bright_box(resized) == [2.0, 2.0, 6.0, 4.0]
    # Shorter side to 8 (x2), or capped by max_size on the longer side (x1.5: 6x9).
    assert Resize(8)(image, target)[1]["boxes"].tolist() == [[2.0, 2.0, 6.0, 4.0]]
    capped, capped_target = Resize(8, max_size=9)(image, target)
    assert capped.shape == (3, 6, 9)
    assert capped_target["boxes"].tolist() == [[1.5, 1.5, 4.5, 3.0]]


def test_segmentation_transforms_keep_masks_aligned() -> None:
    # A mask that encodes each pixel's position: crops and flips must move image and mask alike.
    height, width = 10, 12
    mask = torch.arange(height * width).reshape(height, width) % 200
    image = (mask.float() / 200).expand(3, height, width).clone()
    torch.manual_seed(0)
    for transform in (RandomCrop((6, 7)), RandomHorizontalFlip(1.0), Resize((20, 24))):
        out_image, out_mask = transform(image, mask)
        assert out_image.shape[-2:] == out_mask.shape
        assert out_mask.dtype == torch.int64
        torch.testing.assert_close(out_image[0], out_mask.float() / 200, atol=0.03, rtol=0)
    # Resize of masks is nearest: no new values.
    assert set(Resize((7, 5))(image, mask)[1].unique().tolist()) <= set(mask.unique().tolist())
    # Crop larger than the image: padded bottom/right with ignore_index (mask) and 0 (image).
    small_mask = torch.ones(4, 5, dtype=torch.int64)
    padded_image, padded_mask = RandomCrop((6, 7))(torch.ones(3, 4, 5), small_mask)
    assert padded_mask[:4, :5].eq(1).all() and padded_mask[4:].eq(255).all()
    assert padded_mask[:, 5:].eq(255).all() and padded_image[:, 4:].eq(0).all()
    with pytest.raises(TypeError, match="segmentation pairs"):
        RandomCrop(4)(*boxed_image())
    normalized, _ = Normalize()(
        torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1).expand(3, 2, 2), mask
    )
    torch.testing.assert_close(normalized, torch.zeros(3, 2, 2))


def test_random_transforms_follow_torch_global_rng() -> None:
    image, target = boxed_image()
    pipeline = Compose([RandomResizedScale((0.5, 2.0)), RandomHorizontalFlip(0.5)])
    torch.manual_seed(5)
    state = torch.get_rng_state()
    first = [pipeline(image, target) for _ in range(6)]
    torch.set_rng_state(state)
    second = [pipeline(image, target) for _ in range(6)]
    sizes = set()
    for (a_image, a_target), (b_image, b_target) in zip(first, second, strict=True):
        assert torch.equal(a_image, b_image) and torch.equal(a_target["boxes"], b_target["boxes"])
        height = a_image.shape[-2]
        sizes.add(height)
        assert 2 <= height <= 8
        # Boxes scale with the image (aspect kept): width of the box = 2 * scale.
        scale = a_image.shape[-1] / 6
        box = a_target["boxes"][0]
        assert float(box[2] - box[0]) == pytest.approx(2 * scale, rel=0.01)
    assert len(sizes) > 1


def test_torchvision_v2_transforms_are_wrapped() -> None:
    from torchvision.transforms import v2

    image, target = boxed_image()
    out_image, out_target = TorchvisionTransform(v2.RandomHorizontalFlip(p=1.0))(image, target)
    assert type(out_image) is torch.Tensor and type(out_target["boxes"]) is torch.Tensor
    assert out_target["boxes"].tolist() == [[3.0, 1.0, 5.0, 2.0]]
    assert out_target["labels"].tolist() == [4]


# --------------------------------------------------------------------------------- pipelines


def test_default_pipelines_and_collate() -> None:
    seg = DigitScenes(
        task="segmentation",
        size=64,
        length=3,
        transforms=default_segmentation_transforms(train=True, crop_size=48),
    )
    torch.manual_seed(0)
    images, masks = segmentation_collate([seg[i] for i in range(3)])
    assert images.shape == (3, 3, 48, 48) and images.dtype == torch.float32
    assert masks.shape == (3, 48, 48) and masks.dtype == torch.int64
    assert float(images.min()) < 0  # normalised
    assert set(masks.unique().tolist()) <= set(range(11)) | {255}
    val = default_segmentation_transforms(train=False, normalize=False)
    raw = DigitScenes(task="segmentation", size=64, length=1)
    torch.testing.assert_close(val(*raw[0])[0], raw[0][0])
    with pytest.raises(ValueError, match="crop_size"):
        default_segmentation_transforms(train=True)
    with pytest.raises(ValueError, match=r"different sizes.*\(3, 32, 32\), \(3, 64, 64\)"):
        segmentation_collate([raw[0], (torch.zeros(3, 32, 32), torch.zeros(32, 32).long())])

    detection = DigitScenes(
        size=64, length=4, transforms=default_detection_transforms(train=True, size=96)
    )
    loader = torch.utils.data.DataLoader(detection, batch_size=2, collate_fn=detection_collate)
    batch_images, batch_targets = next(iter(loader))
    assert isinstance(batch_images, list) and len(batch_images) == 2 == len(batch_targets)
    assert batch_images[0].shape == (3, 96, 96)
    assert float(batch_targets[0]["boxes"].max()) <= 96
    assert len(default_detection_transforms(train=True, hflip_prob=0).transforms) == 0


def test_build_dataset(tmp_path: Path) -> None:
    dataset = build_dataset("digits", size=64, length=2, task="segmentation")
    assert isinstance(dataset, DigitScenes) and dataset.num_classes == 11
    with pytest.raises(ValueError, match=r"did you mean 'coco'.*'cityscapes', 'coco', 'digits'"):
        build_dataset("cocoo")
    with pytest.raises(TypeError, match="'sise'.*'size'"):
        build_dataset("digits", sise=64)
    write_fake_cityscapes(tmp_path)
    assert len(build_dataset("cityscapes", root=tmp_path, split="val")) == 1


def test_core_import_stays_torch_only() -> None:
    code = (
        "import sys\n"
        "def loaded(names):\n"
        "    return [m for m in sys.modules if m.split('.')[0] in names]\n"
        "import freekd\n"
        "assert not loaded(('sklearn', 'pycocotools', 'PIL')), loaded(('sklearn', 'PIL'))\n"
        "import freekd.data\n"
        "assert not loaded(('sklearn', 'pycocotools')), loaded(('sklearn', 'pycocotools'))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
