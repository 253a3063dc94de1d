"""Build, distil and score the pipeline's models: docs/models.md (run as it is: small images,
random weights, a few validation scenes)."""

from torch.utils.data import DataLoader

from freekd import FreeKDLoss
from freekd.checkpoints import export_student
from freekd.data import DigitScenes, detection_collate
from freekd.distill import Distiller
from freekd.evaluation import evaluate
from freekd.models import build_model

small = {"num_classes": 10, "min_size": 128, "max_size": 128, "weights_backbone": None}
trained = build_model("detection", "retinanet", "resnet34", **small).model  # stands in for yours
export_student(trained, "teacher.safetensors")
teacher = build_model("detection", "retinanet", "resnet34", weights="teacher.safetensors", **small)
student = build_model("detection", "retinanet", "resnet18", **small)  # "DEFAULT": ImageNet init
val_loader = DataLoader(DigitScenes("val", length=8), batch_size=4, collate_fn=detection_collate)
batch = next(iter(val_loader))  # (list of images [3, H, W], list of targets)

loss = FreeKDLoss.preset("recommended", teacher.tap_channels)  # [256] * 5
distiller = Distiller(
    teacher.model,
    student.model,
    teacher.taps,
    student.taps,
    {"freekd": loss},
    student.task_loss,
    example_batch=batch,
)
print(distiller.train()(batch))  # {"task/classification": ..., "distill/freekd": ...}
scores = evaluate("detection", student.model, val_loader)  # {"AP": ..., "AP50": ..., ...}
print(scores["AP"])
