"""The batteries-included pipeline behind the ``freekd`` command: one YAML configuration
(:mod:`freekd.pipeline.config`), the jobs it drives (:mod:`freekd.pipeline.jobs`: train a
teacher, tune prompts, distill, evaluate, export, visualize) and the demo
(:mod:`freekd.pipeline.demo`).

    from freekd.pipeline import distill, load_config, recipe_path, train_teacher, tune_prompts
    config = load_config(recipe_path("digits_demo_segmentation"), ["student.train.steps=50"])
    train_teacher(config); tune_prompts(config); distill(config)

``from_pretrained(folder)`` rebuilds a student that ``export(config, format="hf")`` (``freekd
export --format hf``) wrote, offline (:mod:`freekd.pipeline.hub`).

``recipe_path(name)`` is the file of a recipe shipped with the package (``recipe_names()`` lists
them; the repository's ``configs/`` holds the same files).

Needs the pipeline's dependencies (Lightning, torchvision, smp, pycocotools, PyYAML).
"""

from .._recipes import recipe_names, recipe_path
from ..losses import FeatureMSE
from .config import RunConfig, dump_config, load_config
from .hub import from_pretrained
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
    "from_pretrained",
    "load_config",
    "recipe_names",
    "recipe_path",
    "train_baseline",
    "train_teacher",
    "tune_prompts",
    "visualize",
]
