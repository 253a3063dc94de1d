"""Distil your own models, named by their layers: README.md, "Distil your own model" (run as it
is: random images stand in for your data, two steps for the ~2000 of each stage)."""

import torch
from torchvision.models.detection import retinanet_resnet50_fpn

from freekd import Distiller, FreeKDLoss, PromptTuner, auto_levels, export_student, probe_features

# Your trained teacher and your student: any nn.Module (here torchvision's RetinaNet, no download).
sizes = {"num_classes": 3, "min_size": 128, "max_size": 128, "weights_backbone": None}
teacher, student = retinanet_resnet50_fpn(**sizes), retinanet_resnet50_fpn(**sizes)
target = {"boxes": torch.tensor([[20.0, 30.0, 90.0, 100.0]]), "labels": torch.tensor([1])}
batches = [([torch.rand(3, 128, 128)] * 2, [target] * 2)] * 2  # your (images, targets) batches
task_loss = lambda model, batch: model(*batch)  # noqa: E731 - the model's own loss (a dict)
taps = ["backbone.fpn"]  # the layers to distil: the 5 FPN outputs, fine to coarse
shapes = probe_features(teacher, taps, batches[0][0])  # [N, C, H, W] of each tapped feature
levels = auto_levels([shape[-2:] for shape in shapes])  # wavelet levels per layer: [3, 2, 1, 1, 1]
loss = FreeKDLoss.preset("recommended", [shape[1] for shape in shapes], levels=levels)

# Stage 1: tune the prompts on the frozen teacher (Adam lr 0.01, ~2000 steps).
with PromptTuner(teacher, taps, loss, task_loss, resynthesis="centered") as tuner:
    optimizer = torch.optim.Adam(tuner.trainable_parameters(), lr=0.01, weight_decay=1e-3)
    for batch in batches:
        optimizer.zero_grad()
        tuner(batch)["loss"].backward()
        optimizer.step()
    tuner.mark_tuned()
# Stage 2: the student's task loss + mu * FreeKD, mu calibrated on the untrained student.
distiller = Distiller(teacher, student, taps, taps, {"freekd": loss}, task_loss, batches[0])
distiller.loss_weights["freekd"] = distiller.calibrate(batches[:4])["freekd"]
optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.01, momentum=0.9)
for batch in batches:
    optimizer.zero_grad()
    sum(distiller.train()(batch).values()).backward()
    optimizer.step()
export_student(student, "student.safetensors")  # loads with strict=True into a plain model
