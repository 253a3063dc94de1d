"""The core of freekd at work without the pipeline's packages: run by ``tests/test_install.py``.

``python tests/core_only_check.py OUTPUT_DIR`` builds a tiny teacher and student (two conv
stages, 8 and 4 channels), then runs what a user of the core alone does: a FreeKD loss from a
preset and from an official-format prompt checkpoint, one step of prompt tuning
(:class:`freekd.PromptTuner`), the prompts saved and loaded back, one step of distillation
(:class:`freekd.Distiller` with 1x1 projections), the student exported and loaded strictly, and
:func:`freekd.calibrate_weight`. It prints one JSON line: the numbers of each step, and which of
the pipeline's packages (:data:`PIPELINE`) are installed and which got imported.

The tests run it in an environment without those packages (a fresh venv holding torch,
torchvision and safetensors only, or ``python -S`` on a copy of the site-packages without them)
and compare its numbers with a run in the full environment.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

PIPELINE = (
    "lightning",
    "lightning_fabric",
    "pytorch_lightning",
    "timm",
    "segmentation_models_pytorch",
    "pycocotools",
    "sklearn",
    "scipy",
    "typer",
    "yaml",
    "pywt",
    "matplotlib",
)
"""Top-level modules of the ``pipeline`` and ``dev`` extras that the core must not need
(numpy and Pillow come with torchvision, a core dependency)."""


def run(output_dir: Path) -> dict:
    """Run the core's steps (see the module docstring); returns their numbers."""
    import torch
    from torch import nn

    import freekd
    from freekd import Distiller, FreeKDLoss, PromptTuner, calibrate_weight
    from freekd.checkpoints import export_student, load_weights

    torch.manual_seed(0)

    def net(width: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1),  # "0": [N, width, 16, 16]
            nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1),  # "2": [N, width, 8, 8]
            nn.ReLU(),
            nn.Conv2d(width, 3, 1),
            nn.Upsample(scale_factor=4.0),
        )

    def task_loss(model: nn.Module, batch) -> torch.Tensor:
        images, labels = batch
        return nn.functional.cross_entropy(model(images), labels)

    teacher, student = net(8), net(4)
    batch = (torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32)))
    numbers: dict[str, object] = {"version": freekd.__version__}

    # stage 1: one Adam step on the prompts of the frozen teacher
    loss = FreeKDLoss.preset("paper", channels=[8, 8])
    tuner = PromptTuner(teacher, ["0", "2"], loss, task_loss)
    optimizer = torch.optim.Adam(tuner.trainable_parameters(), lr=0.01)
    terms = tuner(batch)
    terms["loss"].backward()
    optimizer.step()
    tuner.mark_tuned()
    tuner.remove_hooks()
    numbers["tuning_loss"] = terms["loss"].item()
    path = tuner.save_prompts(output_dir / "prompts.safetensors")
    reloaded = FreeKDLoss.preset("paper", channels=[8, 8])
    reloaded.load_prompts(path)
    numbers["prompts_reloaded_equal"] = all(
        torch.equal(a.tokens, b.tokens) for a, b in zip(loss.prompts, reloaded.prompts, strict=True)
    )

    # an official-format prompt checkpoint ([4, T, C] per layer), saved and loaded back
    official = {f"distiller.mask_modules.{i}.mask_token": torch.randn(4, 6, 8) for i in range(2)}
    torch.save(official, output_dir / "official_prompt.pth")
    state = torch.load(output_dir / "official_prompt.pth", weights_only=True)
    numbers["official"] = [FreeKDLoss.from_official(state).num_prompts, len(state)]

    # stage 2: one SGD step of the student with 1x1 projections 4 -> 8
    distiller = Distiller(
        teacher,
        student,
        ["0", "2"],
        ["0", "2"],
        {"freekd": reloaded},
        task_loss,
        example_batch=batch,
        projection="always",
    )
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.01)
    terms = distiller.train()(batch)
    sum(terms.values()).backward()
    optimizer.step()
    numbers["distill_terms"] = {name: value.item() for name, value in terms.items()}
    distiller.remove_hooks()

    exported = export_student(student, output_dir / "student.safetensors")
    fresh = net(4)
    load_weights(fresh, exported)
    numbers["student_reloaded_equal"] = all(
        torch.equal(a, b)
        for a, b in zip(student.state_dict().values(), fresh.state_dict().values(), strict=True)
    )

    # the weight that balances the two gradients on the student's features
    features = [torch.randn(2, 8, s, s, requires_grad=True) for s in (16, 8)]
    teacher_features = [torch.randn(2, 8, s, s) for s in (16, 8)]
    task = sum(feature.square().mean() for feature in features)
    weight = calibrate_weight(task, reloaded(features, teacher_features), features)
    numbers["calibrated_weight"] = weight
    numbers["pipeline_modules_imported"] = sorted(
        {name.split(".")[0] for name in sys.modules if name.split(".")[0] in PIPELINE}
    )
    return numbers


def main() -> None:
    output_dir = Path(sys.argv[1])
    output_dir.mkdir(parents=True, exist_ok=True)
    installed = [name for name in PIPELINE if importlib.util.find_spec(name) is not None]
    numbers = run(output_dir)
    print(json.dumps({**numbers, "pipeline_modules_installed": installed}, sort_keys=True))


if __name__ == "__main__":
    main()
