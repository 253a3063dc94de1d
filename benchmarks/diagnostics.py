"""What FreeKD's weights and masks look like on the quality benchmark's features.

Loads the quality benchmark's teacher and one student (``runs/quality`` by default), taps their
distilled layer on validation scenes and reports:

- the relational weight ``omega``: per image, its effective number of channels
  (``1 / sum p_c^2`` with ``p = omega / sum omega``; ``C`` when uniform), the share of the total
  weight held by the top 5 channels, and how many channels get a weight above 0.01 (mean 1);
- the tuned prompt masks of that run's FreeKD students (``freekd-official``, ``freekd-paper``):
  per band, the mean mask, the fraction above 0.5, and the fraction saturated (below 1e-3 or
  above 1 - 1e-3, where the sigmoid passes almost no gradient to the prompt tokens).

    .venv/bin/python benchmarks/diagnostics.py
    .venv/bin/python benchmarks/diagnostics.py --student runs/quality/segmentation/mse/seed0
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import quality
import torch

from freekd import FreeKDLoss, dwt2
from freekd.checkpoints import load_weights
from freekd.models import build_model
from freekd.pipeline.builders import build_data
from freekd.relation import RelationalGate
from freekd.taps import FeatureTaps


def tapped(model: torch.nn.Module, tap: str, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), FeatureTaps(model, [tap]) as taps:
        taps.run(model, images)
        return taps.features[0]


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/quality"))
    parser.add_argument("--preset", default="small", choices=sorted(quality.PRESETS))
    parser.add_argument("--student", type=Path, help="a run folder (default: none/seed0)")
    parser.add_argument("--images", type=int, default=8)
    args = parser.parse_args(argv)
    settings = quality.task_settings("segmentation", args.preset, "cpu")
    teacher_path = args.out / "segmentation" / "teacher" / "teacher.safetensors"
    student_dir = args.student or args.out / "segmentation" / "none" / "seed0"
    student_path = next(student_dir.glob("student_*/student.safetensors"))
    config = quality.method_config(settings, "none", 0, student_dir, teacher_path)
    val = build_data(config, "val")
    images = torch.stack([val[i][0] for i in range(args.images)])
    features = []
    for section, path in ((config.teacher, teacher_path), (config.student, student_path)):
        spec = build_model("segmentation", section.arch, section.backbone, 11)
        load_weights(spec.model, path)
        features.append(tapped(spec.model.eval(), spec.taps[0], images))
    teacher, student = features
    if student.shape != teacher.shape:
        raise SystemExit(f"shapes differ ({student.shape} vs {teacher.shape}): no projection here")
    omega = RelationalGate(teacher.shape[1])(teacher, student, None, None)  # [N, C], mean 1
    share = omega / omega.sum(dim=1, keepdim=True)
    report = {
        "effective_channels": (1 / share.pow(2).sum(dim=1)).tolist(),
        "top5_share": share.sort(dim=1, descending=True).values[:, :5].sum(dim=1).tolist(),
        "channels_above_0.01": (omega > 0.01).sum(dim=1).float().tolist(),
    }
    print(f"{teacher_path} vs {student_path}: layer {tuple(teacher.shape)}")
    for name, values in report.items():
        listed = ", ".join(f"{v:.2f}" for v in values)
        print(f"omega {name}: median {statistics.median(values):.2f} (per image: {listed})")
    for method in ("freekd-official", "freekd-paper"):
        prompts = args.out / "segmentation" / method / "seed0" / "prompts" / "prompts.safetensors"
        if prompts.is_file():
            print(f"{method} masks: {mask_report(method, prompts, teacher)}")
    return report


def mask_report(method: str, prompts: Path, teacher: torch.Tensor) -> str:
    """Mean, fraction > 0.5 and fraction saturated of the tuned masks, per band."""
    loss = FreeKDLoss.preset(method.removeprefix("freekd-"), [teacher.shape[1]])
    loss.load_prompts(prompts)
    with torch.no_grad():
        low, highs = loss.prompts[0].masks(dwt2(teacher, loss.levels, loss.wavelet), True)
    parts = []
    for name, masks in (("low", low), *((f"level {j}", m) for j, m in enumerate(highs, 1))):
        saturated = ((masks < 1e-3) | (masks > 1 - 1e-3)).float().mean()
        parts.append(
            f"{name}: mean {masks.mean():.3f}, >0.5 {(masks > 0.5).float().mean():.2f}, "
            f"saturated {saturated:.2f}"
        )
    return "; ".join(parts)


if __name__ == "__main__":
    main()
