"""A training loader on the built-in digit scenes: docs/data.md (run as it is)."""

from torch.utils.data import DataLoader

from freekd.data import DigitScenes, default_segmentation_transforms, segmentation_collate

train = DigitScenes(
    "train",
    task="segmentation",
    size=128,
    length=2000,
    transforms=default_segmentation_transforms(train=True, crop_size=96),
)
loader = DataLoader(train, batch_size=8, collate_fn=segmentation_collate)
images, masks = next(iter(loader))  # [8, 3, 96, 96] normalized images, [8, 96, 96] class indices
print(images.shape, masks.shape, masks.unique().tolist())
