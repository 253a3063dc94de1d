"""The benchmark scripts run end to end (at smoke sizes) and report what they measured."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def quality():
    return _load("quality")


def test_verdict_compares_the_difference_with_the_seed_spread(quality):
    high = {"mean": 12.0, "std": 0.5, "values": [11.5, 12.5]}
    low = {"mean": 10.0, "std": 1.0, "values": [9.0, 11.0]}
    close = {"mean": 11.5, "std": 1.0, "values": [10.5, 12.5]}
    assert quality.verdict(high, low, "mse") == (
        "beats mse: +2.00 (larger than the seed spread, std 1.00)"
    )
    assert quality.verdict(low, close, "cwd").startswith("does not beat cwd: -1.50 (larger")
    assert "not larger" in quality.verdict(close, high, "mgd")
    one = {"mean": 1.0, "std": 0.0, "values": [1.0]}
    assert "one seed" in quality.verdict(one, one, "none")


def test_method_settings_become_valid_configs(quality, tmp_path):
    settings = quality.task_settings("segmentation", "full", "cpu")
    assert settings["teacher"]["backbone"] == "resnet50"
    assert (
        quality.task_settings("segmentation", "small", "cpu")["teacher"]["backbone"] == "resnet34"
    )
    for method in quality.METHODS:
        config = quality.method_config(settings, method, 1, tmp_path / method, tmp_path / "t")
        assert config.seed == 1 and config.teacher.checkpoint == str(tmp_path / "t")
    config = quality.method_config(settings, "paper-T1", 0, tmp_path, tmp_path / "t")
    assert config.distill.method == "freekd" and config.distill.loss == {"num_prompts": 1}
    config = quality.method_config(settings, "mgd", 0, tmp_path, tmp_path / "t")
    assert config.distill.method_args == {"alpha": 2e-5, "mask_ratio": 0.75}
    config = quality.method_config(settings, "paper-no-masks", 0, tmp_path, tmp_path / "t")
    assert config.distill.method == "frequency"
    assert config.distill.method_args == {"relational": True, "include_low": False}


def test_quality_smoke_run_writes_tables_and_reuses_finished_runs(quality, tmp_path, capsys):
    args = ["--preset", "smoke", "--out", str(tmp_path), "--methods", "none,mgd,freekd-paper"]
    args.append("--robustness")
    summary = quality.main(args)
    rows = summary["segmentation"]["methods"]
    assert list(rows) == ["none", "mgd", "freekd-paper"]
    assert all(0 <= row["mean"] <= 100 and len(row["values"]) == 1 for row in rows.values())
    table = (tmp_path / "results.md").read_text()
    for name in ("| teacher |", "| none |", "| mgd |", "| freekd-paper |", "freekd-paper"):
        assert name in table
    assert (
        "| none |" in table.split("Robustness")[1] and "| mgd |" not in table.split("Robustness")[1]
    )
    results = json.loads((tmp_path / "results.json").read_text())
    robust = results["robustness"]["segmentation"]
    assert set(robust) == {"none", "freekd-paper"}
    for scores in robust.values():
        assert 0 <= scores["mPC"][0] <= 100 and scores["clean"][0] == pytest.approx(
            rows["freekd-paper" if scores is robust["freekd-paper"] else "none"]["values"][0]
        )
    records = results["records"]
    assert {r["method"] for r in records} == {"none", "mgd", "freekd-paper"}
    assert (tmp_path / "segmentation" / "freekd-paper" / "seed0" / "prompts").is_dir()
    assert not (tmp_path / "segmentation" / "mgd" / "seed0" / "prompts").exists()
    # A second run trains nothing: every result is read back unchanged.
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.safetensors")}
    again = quality.main(args)
    assert again == summary
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.safetensors")} == stamps


def test_quality_refuses_a_teacher_trained_with_other_settings(quality, tmp_path):
    quality.main(["--preset", "smoke", "--out", str(tmp_path), "--methods", "none"])
    record = tmp_path / "segmentation" / "teacher" / "benchmark_teacher.json"
    data = json.loads(record.read_text())
    data["settings"]["teacher"]["backbone"] = "resnet34"
    record.write_text(json.dumps(data))
    with pytest.raises(SystemExit, match="other teacher or data settings"):
        quality.main(["--preset", "smoke", "--out", str(tmp_path), "--methods", "none"])


@pytest.mark.slow
def test_step_speed_quick_rows(tmp_path):
    step_speed = _load("step_speed")
    rows = step_speed.main(
        ["--quick", "--repeats", "1", "--tasks", "segmentation", "--out", str(tmp_path / "s.md")]
    )
    assert [r["method"] for r in rows] == list(step_speed.METHODS)
    assert all("error" not in r and r["step_ms"] > 0 for r in rows)
    assert all(0 < r["loss_share"] < 1 for r in rows if r["method"] != "none")
    assert "| segmentation | freekd-paper |" in (tmp_path / "s.md").read_text()
