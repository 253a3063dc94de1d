"""The pipeline's jobs from Python: docs/cli.md, "From Python" (run as it is: the demo's recipe
cut to a few steps and images)."""

from freekd.pipeline import (
    distill,
    evaluate_model,
    load_config,
    recipe_path,
    train_teacher,
    tune_prompts,
)

tiny = ["teacher.train.steps=6", "student.train.steps=4", "prompts.steps=2", "distill.mu=1"]
tiny += ["data.train_args.length=32", "data.val_args.length=8", "train.log_every_steps=2"]
config = load_config(recipe_path("digits_demo_segmentation"), ["run_dir=runs/py", *tiny])
train_teacher(config)
tune_prompts(config)
distill(config)
print(evaluate_model(config, "student")["value"])  # mIoU of the FreeKD student, in %
