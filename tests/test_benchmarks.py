"""The benchmark scripts run end to end (at smoke sizes) and report what they measured."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
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


@pytest.fixture(scope="module")
def quality_v2():
    return _load("quality_v2")


def test_v2_splits_keep_test_digits_out_of_train_and_selection(quality_v2):
    protocol = quality_v2.PRESETS["smoke"]
    splits = quality_v2.build_splits(protocol)
    used = {
        name: {int(i) for k in range(len(s)) for i in s.scene(k).sample_ids}
        for name, s in splits.items()
    }
    assert used["test"] and used["train"] and used["selection"]
    assert not used["test"] & (used["train"] | used["selection"])
    # selection scenes are new scenes of the train digit pool, not copies of training scenes
    train, selection = splits["train"], splits["selection"]
    assert train.split == selection.split == "train" and train.seed != selection.seed
    assert not torch.equal(train[0][0], selection[0][0])


def test_v2_plateau_rule_on_a_constructed_curve(quality_v2):
    # gains per further 20% of steps: 100 -> 120: +4.0; 200 -> 240: +0.12; 300 -> 360: +0.18
    curve = [[100, 10.0], [200, 30.0], [300, 30.3], [400, 30.6], [500, 30.7]]
    rule = quality_v2.plateau_steps(curve)
    assert rule["reached"] and rule["student_steps"] == 200
    gains = dict(rule["gains"])
    assert gains[100] == pytest.approx(4.0) and gains[200] == pytest.approx(0.12)
    rising = [[100, 1.0], [200, 5.0], [300, 9.0], [400, 13.0]]  # +0.8, +1.6, +2.4 per 20%
    rule = quality_v2.plateau_steps(rising)
    assert not rule["reached"] and rule["student_steps"] == 400
    assert [step for step, _ in rule["gains"]] == [100, 200, 300]
    assert [g for _, g in rule["gains"]] == pytest.approx([0.8, 1.6, 2.4])


def test_v2_paired_differences_and_verdicts(quality_v2):
    runs = [
        {"method": "mse", "seed": 0, "test": 10.0},
        {"method": "mse", "seed": 1, "test": 12.0},
        {"method": "a", "seed": 0, "test": 11.0},
        {"method": "a", "seed": 1, "test": 12.5},
        {"method": "b", "seed": 0, "test": 11.0},
        {"method": "b", "seed": 1, "test": 11.0},
    ]
    assert quality_v2.paired(runs, "a", "mse") == [1.0, 0.5]
    assert quality_v2.verdict([1.0, 0.5]) == "beats"
    assert quality_v2.verdict(quality_v2.paired(runs, "b", "mse")) == "within noise"
    assert quality_v2.verdict([-0.1, -2.0]) == "loses"


def test_v2_smoke_run_writes_the_results_and_reuses_the_cache(quality_v2, tmp_path):
    result = quality_v2.main(["--preset", "smoke", "--out", str(tmp_path)])
    methods = result["methods"]
    assert list(methods) == list(quality_v2.PRESETS["smoke"].methods)
    for name, entry in methods.items():
        assert len(entry["test"]) == 2 and all(0 <= v <= 100 for v in entry["test"])
        if name != "none":
            assert entry["mu0"] > 0 and len(entry["mu_sweep"]) == 2
    assert set(result["paired"]["freekd-stable"]) == {"vs_mse", "vs_cwd"}
    assert len(result["paired"]["freekd-stable"]["vs_mse"]) == 2
    assert result["protocol"]["distilled_maps"] == [[16, 16], [8, 8], [4, 4]]
    assert result["protocol"]["wavelet_levels"] == [3, 2, 1]
    assert "stable-no-masks" in result["ablations"]
    saved = json.loads((tmp_path / "quality_v2.json").read_text())
    assert saved["methods"]["mse"]["test"] == methods["mse"]["test"]
    assert "| freekd-stable |" in (tmp_path / "results.md").read_text()
    # everything is cached: a second invocation trains nothing and reports the same
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.json")}
    again = quality_v2.main(["--preset", "smoke", "--out", str(tmp_path)])
    assert again["methods"] == methods
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*seed*.json")} == {
        p: t for p, t in stamps.items() if "seed" in p.name
    }


def test_v2_runs_table_pairs_each_row_with_the_references_on_shared_seeds(quality_v2):
    def run(method, factor, seed, test):
        return {
            "method": method,
            "factor": factor,
            "mu": factor,
            "seed": seed,
            "selection": 0.0,
            "test": test,
        }

    results = [
        run("mse", 1.0, 0, 50.0),
        run("mse", 1.0, 1, 40.0),
        run("mse", 3.0, 0, 45.0),  # one seed: not the reference row
        run("mgd", 1 / 3, 0, 52.0),
        run("mgd", 1 / 3, 1, 39.0),
        run("freekd-stable", 1.0, 1, 41.5),
        run("none", None, 0, 30.0),
    ]
    table = quality_v2.runs_table(results)
    assert set(table) == {"mse x1", "mse x3", "mgd x0.333", "freekd-stable x1", "none"}
    assert table["mgd x0.333"]["paired"]["mse"] == {"seeds": [0, 1], "test": [2.0, -1.0]}
    assert table["mse x3"]["paired"]["mse"] == {"seeds": [0], "test": [-5.0]}
    assert "mse" not in table["mse x1"]["paired"]
    assert table["freekd-stable x1"]["paired"]["mgd"] == {"seeds": [1], "test": [2.5]}
    assert table["none"]["paired"]["freekd-stable"] == {"seeds": [], "test": []}
    assert table["mse x1"]["mean"] == 45.0 and table["none"]["std"] == 0.0
    text = quality_v2.runs_markdown(table)
    assert "| mgd x0.333 | 0.333 | s0: 52.00 (0.00), s1: 39.00 (0.00) | 45.50 ± 9.19 |" in text
    assert "within noise (+2.00, -1.00)" in text and "beats (+2.50)" in text
