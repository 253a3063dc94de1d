"""How many channels does FreeKD's relational weight actually distil?

Loads the quality benchmark's teacher and one student (``runs/quality`` by default), taps their
distilled layer on validation scenes and reports, per image, the effective number of channels
of the relational weight ``omega`` (``1 / sum p_c^2`` with ``p = omega / sum omega``; ``C`` when
uniform), the share of the total weight held by the top 5 channels, and how many channels get a
weight above 0.01 (the mean weight is 1).

    .venv/bin/python benchmarks/relational_concentration.py
    .venv/bin/python benchmarks/relational_concentration.py \
        --student runs/quality/segmentation/mse/seed0
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality  # noqa: E402

from freekd.checkpoints import load_weights  # noqa: E402
from freekd.models import build_model  # noqa: E402
from freekd.pipeline.builders import build_data  # noqa: E402
from freekd.relation import RelationalGate  # noqa: E402
from freekd.taps import FeatureTaps  # noqa: E402


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
        print(f"{name}: median {statistics.median(values):.2f} (per image: {listed})")
    return report


if __name__ == "__main__":
    main()
