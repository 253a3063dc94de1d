"""``distill.mu: auto``: the distillation weight calibrated at initialization in the pipeline."""

from __future__ import annotations

import json

import pytest

from freekd.pipeline import jobs
from freekd.pipeline.demo import demo_config
from freekd.pipeline.schema import ConfigError
from tests.test_pipeline_e2e import TINY_SEGMENTATION

TINY = [*TINY_SEGMENTATION, "device=cpu"]


def config(run_dir, *overrides):
    return demo_config("segmentation", quick=True, overrides=[*TINY, *overrides], run_dir=run_dir)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mu_auto")
    base = config(folder)
    jobs.train_teacher(base)
    jobs.tune_prompts(base)
    return folder


@pytest.mark.parametrize("method", ["freekd", "mse"])
def test_auto_weight_is_calibrated_recorded_and_scaled_by_the_factor(run_dir, method):
    one = jobs.distill(config(run_dir, f"distill.method={method}", "distill.mu=auto"), force=True)
    record = json.loads((one.directory / "calibration.json").read_text())
    assert record["method"] == method and record["mu"] == pytest.approx(record["mu0"])
    assert record["mu0"] > 0 and one.metrics["distill/mu"] == pytest.approx(record["mu"])
    # the same initial student (same seed) gives the same mu0; the factor scales it
    three = jobs.distill(
        config(run_dir, f"distill.method={method}", "distill.mu=auto", "distill.mu_factor=3"),
        force=True,
    )
    again = json.loads((three.directory / "calibration.json").read_text())
    assert again["mu0"] == pytest.approx(record["mu0"], rel=1e-6)
    assert again["mu"] == pytest.approx(3 * record["mu0"], rel=1e-6)


def test_a_fixed_weight_writes_no_calibration(run_dir):
    result = jobs.distill(config(run_dir, "distill.mu=0.5"), force=True)
    assert not (result.directory / "calibration.json").exists()
    assert "distill/mu" not in result.metrics


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["distill.mu=-1"], "distill.mu: must be >= 0"),
        (["distill.mu=0.5", "distill.mu_factor=3"], "distill.mu_factor: scales the calibrated"),
        (["distill.mu_factor=0"], "distill.mu_factor: must be > 0"),
        (["distill.calibration_batches=0"], "distill.calibration_batches: must be >= 1"),
        (["distill.mu=often"], "distill.mu"),
    ],
)
def test_bad_settings_are_refused_with_the_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        config(tmp_path, *overrides)
