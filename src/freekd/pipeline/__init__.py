"""The batteries-included pipeline behind the ``freekd`` command: one YAML configuration
(:mod:`freekd.pipeline.config`), the jobs it drives (:mod:`freekd.pipeline.jobs`: train a
teacher, tune prompts, distill, evaluate, export, visualize) and the demo
(:mod:`freekd.pipeline.demo`).

    from freekd.pipeline import load_config, train_teacher, tune_prompts, distill
    config = load_config("configs/digits_demo_segmentation.yaml", ["student.train.steps=50"])
    train_teacher(config); tune_prompts(config); distill(config)

Needs the pipeline's dependencies (Lightning, torchvision, smp, pycocotools, PyYAML).
"""

from ..losses import FeatureMSE
from .config import RunConfig, dump_config, load_config
from .jobs import (
    JobResult,
    distill,
    evaluate_model,
    export,
    train_baseline,
    train_teacher,
    tune_prompts,
    visualize,
)
from .schema import ConfigError

__all__ = [
    "ConfigError",
    "FeatureMSE",
    "JobResult",
    "RunConfig",
    "distill",
    "dump_config",
    "evaluate_model",
    "export",
    "load_config",
    "train_baseline",
    "train_teacher",
    "tune_prompts",
    "visualize",
]
