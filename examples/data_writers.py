"""Digit scenes written as a COCO folder and as a mask folder, read back: docs/data.md (run as
it is)."""

from freekd.data import CocoDetection, DigitScenes, write_coco, write_segmentation_folder

paths = write_coco(DigitScenes("val", length=50), "digits_coco")  # images/*.png + annotations.json
val = CocoDetection(paths.image_dir, paths.annotation_file)
write_segmentation_folder(DigitScenes("val", task="segmentation", length=50), "digits_seg")
image, target = val[0]  # [3, H, W] in [0, 1]; {"boxes": [K, 4] xyxy, "labels": [K], ...}
print(len(val), image.shape, target["boxes"].shape)
