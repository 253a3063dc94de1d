"""Distil a random feature pyramid with the FreeKD loss: the smallest end-to-end use of `freekd`.

What this shows, in a few seconds on a CPU:

* a frozen "teacher" that turns images into a 3-level, FPN-like pyramid (64 channels at 1/2, 1/4
  and 1/8 of the input: 64x64, 32x32, 16x16 for 128x128 images);
* a much thinner "student" (16 channels per level) plus one 1x1 convolution per level, the
  projection ``phi`` that maps the student's features to the teacher's shape;
* ``FreeKDLoss.preset("paper", ...)`` computing the wavelet-domain, prompt-masked, channel-weighted
  L1 between the two pyramids, and Adam training the student and projections on it alone;
* the per-layer terms (``loss.last_terms``) before and after training.

The teacher here has random weights and the frequency prompts are not tuned (stage 1 of FreeKD,
:class:`freekd.PromptTuner`, is in ``examples/own_models.py``), so the numbers say nothing about
accuracy: the script only shows the API and that the loss goes down. Run it with
``.venv/bin/python examples/distil_random_pyramid.py``.
"""

from __future__ import annotations

import torch
from torch import nn

from freekd import FreeKDLoss

SEED = 0
STEPS = 20
IMAGES, IMAGE_SIZE = 2, 128
TEACHER_CHANNELS, STUDENT_CHANNELS, LEVELS = 64, 16, 3


def pyramid_net(channels: int) -> nn.ModuleList:
    """Three stride-2 conv stages; the output of each is one pyramid level (fine to coarse)."""
    stages, in_channels = [], 3
    for _ in range(LEVELS):
        stages.append(
            nn.Sequential(
                nn.Conv2d(in_channels, channels, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(channels, channels, 3, padding=1),
            )
        )
        in_channels = channels
    return nn.ModuleList(stages)


def run_pyramid(stages: nn.ModuleList, images: torch.Tensor) -> list[torch.Tensor]:
    """``images: [N, 3, H, W]`` -> list of ``[N, C, H / 2^l, W / 2^l]``, ``l = 1..LEVELS``."""
    features, x = [], images
    for stage in stages:
        x = stage(x)
        features.append(x)
    return features


def main() -> None:
    torch.manual_seed(SEED)
    images = torch.randn(IMAGES, 3, IMAGE_SIZE, IMAGE_SIZE)

    # Teacher: frozen, run once (its features are constants of the distillation).
    teacher = pyramid_net(TEACHER_CHANNELS).eval().requires_grad_(False)
    with torch.no_grad():
        teacher_feats = run_pyramid(teacher, images)

    # Student and its projections phi (1x1 convs, 16 -> 64 channels): what the optimizer trains.
    student = pyramid_net(STUDENT_CHANNELS)
    projections = nn.ModuleList(
        nn.Conv2d(STUDENT_CHANNELS, TEACHER_CHANNELS, 1) for _ in range(LEVELS)
    )

    # The paper's settings: T = 2 prompts per band, relational channel weight on, 3 Haar levels.
    loss_fn = FreeKDLoss.preset("paper", channels=[f.shape[1] for f in teacher_feats])
    # The prompts are frozen inside the loss. In real use they come from stage 1 (prompt tuning on
    # the frozen teacher) or from an official checkpoint (FreeKDLoss.from_official), and a loss
    # with untuned prompts logs a warning. Here they keep their random initialisation on purpose;
    # mark_tuned() only silences that warning for this demo. Do not do this with real models.
    for prompt in loss_fn.prompts:
        prompt.mark_tuned()

    optimizer = torch.optim.Adam([*student.parameters(), *projections.parameters()], lr=1e-2)

    history = []
    for step in range(STEPS + 1):
        raw_feats = run_pyramid(student, images)  # [N, 16, h, w] per level
        student_feats = [phi(f) for phi, f in zip(projections, raw_feats, strict=True)]
        loss = loss_fn(student_feats, teacher_feats)  # scalar; last_terms holds each layer's term
        history.append((step, loss.item(), {k: v.item() for k, v in loss_fn.last_terms.items()}))
        if step == STEPS:  # the last pass only measures
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    layers = [f"layer{i}" for i in range(LEVELS)]
    sizes = ["x".join(str(s) for s in f.shape[-2:]) for f in teacher_feats]
    print(f"FreeKD loss ('paper' preset), {STEPS} Adam steps on a random {LEVELS}-level pyramid")
    header = "".join(f"{f'{name} {size}':>18}" for name, size in zip(layers, sizes, strict=True))
    print(f"{'step':<8}{header}{'total':>10}")
    for step, total, terms in (history[0], history[-1]):
        row = "".join(f"{terms[name]:>18.4f}" for name in layers)
        print(f"{step:<8}{row}{total:>10.4f}")
    first, last = history[0][1], history[-1][1]
    print(f"total loss {first:.4f} -> {last:.4f} ({100 * (last - first) / first:+.1f}%)")


if __name__ == "__main__":
    main()
