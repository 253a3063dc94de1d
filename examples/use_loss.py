"""The loss alone: README.md, "Use" (run as it is; nothing is downloaded)."""

import torch

from freekd import FreeKDLoss, dwt2

# Distilled features of 3 layers, fine to coarse, [N, C, H, W]; the student's already projected
# to the teacher's shape (e.g. by a 1x1 conv).
teacher = [torch.randn(2, 256, s, s) for s in (64, 32, 16)]
student = [torch.randn(2, 256, s, s, requires_grad=True) for s in (64, 32, 16)]

loss_fn = FreeKDLoss.preset("paper", channels=[256, 256, 256])  # T=2, Jaccard, relational weight
loss = loss_fn(student, teacher)  # scalar (logs a warning: these prompts were never tuned)
loss.backward()  # gradients reach the student's features only
print(loss.item(), {name: term.item() for name, term in loss_fn.last_terms.items()})

# The pieces: wavelet bands of the teacher, and the prompt masks computed from them.
low, highs = dwt2(teacher[0], levels=3)  # [2, 256, 8, 8]; highs[j]: [2, 256, 3, h_j, w_j]
low_masks, high_masks = loss_fn.prompts[0].masks((low, highs))  # high_masks[j]: [2, 2, 3, h_j, w_j]

# Prompts tuned by the official code: its checkpoints hold mask_modules.{i}.mask_token, [4, T, C]
# per layer (FreeKD_retinanet_r101_prompt.pth: 5 FPN levels, T=6). Here we write one to read it.
official_format = {f"mask_modules.{i}.mask_token": torch.randn(4, 6, 256) for i in range(5)}
torch.save({"state_dict": official_format}, "official_prompt.pth")
checkpoint = torch.load("official_prompt.pth", weights_only=True)
official = FreeKDLoss.from_official(checkpoint)  # T=6, Dice, one prompt per level, no relational
print(official.num_prompts, official.channels)  # 6 [256, 256, 256, 256, 256]
