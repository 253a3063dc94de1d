"""Distil your own models, named by their layers: README.md, "Use your own models" (run as it is:
random images stand in for your data, two steps for the ~2000 of each stage)."""

import torch
from torchvision.models.detection import retinanet_resnet50_fpn

from freekd import Distiller, FreeKDLoss, PromptTuner, export_student, load_weights

# Any torchvision detector; weights_backbone=None: no ImageNet download (pass yours instead).
sizes = {"num_classes": 3, "min_size": 128, "max_size": 128, "weights_backbone": None}
teacher = retinanet_resnet50_fpn(weights=None, **sizes)
torch.save(teacher.state_dict(), "teacher.pth")  # stands in for your trained teacher's file
load_weights(teacher, "teacher.pth")  # refuses a checkpoint that leaves the model half-empty
student = retinanet_resnet50_fpn(weights=None, **sizes)
targets = [{"boxes": torch.tensor([[20.0, 30.0, 90.0, 100.0]]), "labels": torch.tensor([1])}] * 2
batches = [([torch.rand(3, 128, 128)] * 2, targets)] * 2  # your data: (images, targets) batches


def detection_loss(model, batch):  # (images, targets) -> dict of losses
    return model(*batch)


# Stage 1: tune the prompts on the frozen teacher (Adam lr 0.01, ~2000 steps).
loss = FreeKDLoss.preset("recommended", channels=[256] * 5)  # the 5 FPN outputs, fine to coarse
tuner = PromptTuner(teacher, ["backbone.fpn"], loss, detection_loss, resynthesis="centered")
optimizer = torch.optim.Adam(tuner.trainable_parameters(), lr=0.01, weight_decay=1e-3)
for batch in batches:
    optimizer.zero_grad()
    tuner(batch)["loss"].backward()
    optimizer.step()
tuner.mark_tuned()
tuner.remove_hooks()

# Stage 2: distil the student on its task loss + the FreeKD term.
taps = ["backbone.fpn"]
distiller = Distiller(teacher, student, taps, taps, {"freekd": loss}, detection_loss, batches[0])
optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.01, momentum=0.9)
for batch in batches:
    optimizer.zero_grad()
    sum(distiller.train()(batch).values()).backward()
    optimizer.step()
export_student(student, "student.safetensors")  # loads with strict=True into a plain model
