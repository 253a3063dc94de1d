"""The examples in the docstrings of the core modules run (``doctest``), in ``make test``."""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch

CORE_MODULES = (
    "freekd",
    "freekd._checks",
    "freekd.calibration",
    "freekd.checkpoints",
    "freekd.distill",
    "freekd.losses.base",
    "freekd.losses.baselines",
    "freekd.losses.freekd",
    "freekd.prompts",
    "freekd.relation",
    "freekd.taps",
    "freekd.tokens",
    "freekd.tuning",
    "freekd.wavelets",
)


@pytest.mark.parametrize("name", CORE_MODULES)
def test_the_docstring_examples_run(name):
    module = importlib.import_module(name)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        result = doctest.testmod(
            module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
        )
    assert result.attempted > 0, f"{name} has no docstring example"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {name} failed"
