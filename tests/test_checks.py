"""The shared argument checks, and that every set of allowed values is written once."""

from __future__ import annotations

import typing

import pytest

from freekd import _choices
from freekd._checks import check_choice, did_you_mean, preview, quoted
from freekd.distill import NONFINITE_POLICIES, PROJECTIONS, NonFinitePolicy, Projector
from freekd.prompts import RESYNTHESES, Resynthesis
from freekd.train.config import LOGGERS, Logger


def test_check_choice_returns_the_value_or_names_setting_value_choices_and_hint():
    assert check_choice("gate", "mlp", ("parameter-free", "mlp")) == "mlp"
    with pytest.raises(
        ValueError,
        match=r"^unknown gate 'mpl' \(did you mean 'mlp'\?\); choose one of 'parameter-free', "
        r"'mlp'$",
    ):
        check_choice("gate", "mpl", ("parameter-free", "mlp"))
    with pytest.raises(ValueError, match=r"^unknown gate 3; choose one of 'mlp'$"):
        check_choice("gate", 3, ("mlp",))
    assert did_you_mean("xyz", ("mlp",)) == "" and quoted(("a", 1)) == "'a', 1"


def test_preview_lists_a_few_and_counts_the_rest():
    assert preview(["a", "b"]) == "a, b"
    assert preview(list(range(8))) == "0, 1, 2, 3, 4 and 3 more"
    assert preview(list("abcd"), 3) == "a, b, c and 1 more"


def test_the_pipeline_schema_takes_its_choices_from_the_core():
    from freekd.pipeline import config

    hints = {
        cls: typing.get_type_hints(cls)
        for cls in (config.PromptsSection, config.DistillSection, config.TrainerSection)
    }
    assert hints[config.PromptsSection]["resynthesis"] is Resynthesis
    assert hints[config.DistillSection]["projection"] is Projector
    assert hints[config.DistillSection]["nonfinite"] is NonFinitePolicy
    assert Logger in typing.get_args(hints[config.TrainerSection]["logger"])
    assert typing.get_type_hints(config.RunConfig)["task"] is _choices.Task
    assert typing.get_args(Projector) == PROJECTIONS == ("auto", "always", "none")
    assert NONFINITE_POLICIES == ("raise", "skip", "off") and RESYNTHESES == ("sum", "centered")
    assert LOGGERS == ("csv", "tensorboard", "wandb", "mlflow")


def test_the_command_line_lists_the_same_choices():
    from freekd import cli
    from freekd.losses import BASELINES

    assert [member.value for member in cli.Split] == list(_choices.SPLITS)
    assert [member.value for member in cli.Role] == list(_choices.ROLES)
    assert f"({', '.join(BASELINES)}: no prompts needed)" in cli._distill_help()


def test_the_data_and_model_builders_share_the_task_and_split_names():
    from freekd.data import digits
    from freekd.models import TASKS

    assert TASKS == digits.TASKS == _choices.TASKS and digits.SPLITS == ("train", "val")
    with pytest.raises(ValueError, match=r"unknown DigitScenes split 'test'; choose one of"):
        digits.DigitScenes("test")
