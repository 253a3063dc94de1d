"""What a person sees of a run: a log line every ``log_every_steps`` steps without a terminal
(checked against the values the CSV logger wrote), a progress bar counted in steps on one (rich
when installed), the command line's information on stdout only, and an end-of-job summary
naming the files."""

from __future__ import annotations

import csv
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from freekd.train import (
    RichStepProgressBar,
    StepLog,
    StepProgressBar,
    fit,
    make_train_loader,
    progress,
)
from freekd.train.progress import format_duration, format_terms, progress_callback
from tests.test_train import Images, config, make_distill_module

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning"
)

REPO = Path(__file__).resolve().parents[1]
LINE = re.compile(
    r"^distill step (\d+)/6 \((\d+)%\): loss (\S+) \(task (\S+), distill/freekd (\S+)\), "
    r"lr (\S+), elapsed \d+:\d\d, ETA \d+:\d\d$"
)


def test_durations_and_terms_read_as_a_person_writes_them():
    assert [format_duration(s) for s in (0, 75.3, 3725)] == ["0:00", "1:15", "1:02:05"]
    terms = {"train/loss": 1.5, "train/task": 1.0, "train/distill/freekd": 0.5}
    terms |= {"train/distill/freekd/layer0": 0.2, "train/nonfinite_skipped": 0.0, "val/x": 3}
    assert format_terms(terms) == "loss 1.5 (task 1, distill/freekd 0.5)"
    assert format_terms({"val/loss": 0.25}, "val/") == "loss 0.25"
    assert format_terms({}) == ""
    with pytest.raises(ValueError, match="every must be an integer >= 1"):
        StepLog(0)


def test_without_a_progress_bar_a_line_every_n_steps_matches_the_logged_values(tmp_path, caplog):
    run_dir = tmp_path / "run"
    settings = config(run_dir, 6, log_every_steps=2, logger="csv", checkpoint_every_steps=3)
    with caplog.at_level(logging.INFO, logger="freekd"):
        fit(make_distill_module(total=6), make_train_loader(Images(8), 2, seed=0), config=settings)
    messages = [r.getMessage() for r in caplog.records if r.name == "freekd"]
    assert messages[0] == "distill: 6 steps, a line every 2"
    lines = [m for m in messages if m.startswith("distill step")]
    matches = [LINE.match(line) for line in lines]
    assert all(matches), lines
    assert [int(m.group(1)) for m in matches] == [2, 4, 6]
    assert [int(m.group(2)) for m in matches] == [33, 67, 100]
    # The printed values are those the CSV logger wrote at the same step.
    with open(next(run_dir.glob("logs/version_0/metrics.csv")), newline="") as handle:
        rows: dict[int, dict[str, str]] = {}
        for row in csv.DictReader(handle):  # a step's values may span rows: merge them
            rows.setdefault(int(row["step"]), {}).update({k: v for k, v in row.items() if v})
    for match in matches:
        row = rows[int(match.group(1)) - 1]  # Lightning's "step" column counts from 0
        # 4 significant digits for the terms, 3 for the learning rate of the step
        for column, printed, rel in (("train/loss", 3, 1e-3), ("train/task", 4, 1e-3)):
            assert float(match.group(printed)) == pytest.approx(float(row[column]), rel=rel)
        assert float(match.group(6)) == pytest.approx(float(row["lr-SGD"]), rel=5e-3)
    resumed = config(run_dir, 8, log_every_steps=2, checkpoint_every_steps=3)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="freekd"):
        fit(
            make_distill_module(total=6),
            make_train_loader(Images(8), 2, seed=0),
            config=resumed,
            resume="last",
        )
    assert "distill: resuming at step 6 of 8" in caplog.messages


def test_the_progress_bar_counts_steps_not_epochs(tmp_path, capsys):
    settings = config(tmp_path / "run", 5, progress_bar=True)
    fit(make_distill_module(total=5), make_train_loader(Images(4), 2, seed=0), config=settings)
    shown = capsys.readouterr()
    text = (shown.out + shown.err).replace("\r", "\n")
    assert "Epoch" not in text  # 5 steps over 3 epochs of 2 batches: one bar
    bars = [line for line in text.splitlines() if line.startswith("distill")]
    assert bars and "5/5" in bars[-1] and "lr=" in bars[-1] and "v_num" not in bars[-1]


def test_the_command_line_prints_once_on_stdout_with_a_summary(tmp_path):
    """A real ``freekd train-teacher`` whose output goes to pipes (a log file, CI): the step
    lines and the summary on stdout, nothing on stderr."""
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        f"""\
task: segmentation
run_dir: {tmp_path / "run"}
device: cpu
data:
  name: digits
  args: {{size: 32, max_digits: 1, digit_scale: [0.4, 0.7]}}
  train_args: {{length: 8}}
  val_args: {{length: 4}}
  batch_size: 2
  crop_size: 32
  hflip_prob: 0.0
teacher:
  arch: pspnet
  backbone: resnet18
  train: {{steps: 4, optimizer: {{name: adamw, lr: 0.001}}}}
student: {{arch: pspnet, backbone: resnet18}}
train: {{checkpoint_every_steps: 2, keep_checkpoints: 1, log_every_steps: 2}}
"""
    )
    command = [sys.executable, "-m", "freekd.cli", "train-teacher", "-c", str(recipe)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=environment
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    steps = [line for line in lines if line.startswith("freekd: train-teacher step")]
    assert [line.split()[3] for line in steps] == ["2/4", "4/4"]
    assert all("loss" in line and "lr" in line and "ETA" in line for line in steps)
    start = lines.index(next(line for line in lines if line.startswith("train-teacher finished")))
    assert lines[start].startswith("train-teacher finished: 4 steps in ")
    assert lines[start + 1].startswith("  last step: loss ")
    folder = tmp_path / "run" / "teacher"
    assert lines[start + 2] == f"files in {folder}:"
    files = [line.split()[0] for line in lines[start + 3 :]]
    assert files == [
        "teacher.safetensors",
        "config.yaml",
        "checkpoints/last.ckpt",
        "logs/version_0/metrics.csv",
    ]
    assert "checkpoints/last.ckpt -> step=000004.ckpt" in done.stdout
    assert all((folder / name).is_file() for name in files)


def test_a_terminal_with_rich_gets_the_rich_bar_else_tqdm_or_log_lines(monkeypatch):
    monkeypatch.setattr(progress, "output_is_terminal", lambda: True)
    assert type(progress_callback(True, 5)) is RichStepProgressBar
    assert type(progress_callback(False, 5)) is StepLog  # no bar asked: the log lines
    monkeypatch.setattr(progress, "rich_available", lambda: False)
    assert type(progress_callback(True, 5)) is StepProgressBar
    monkeypatch.setattr(progress, "rich_available", lambda: True)
    monkeypatch.setattr(progress, "output_is_terminal", lambda: False)
    assert type(progress_callback(True, 5)) is StepProgressBar  # a pipe or file: as before


def test_the_rich_bar_counts_steps_not_epochs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("rich")
    monkeypatch.setattr(progress, "output_is_terminal", lambda: True)
    settings = config(tmp_path / "run", 5, progress_bar=True)
    result = fit(
        make_distill_module(total=5), make_train_loader(Images(4), 2, seed=0), config=settings
    )
    bar = result.trainer.progress_bar_callback
    assert isinstance(bar, RichStepProgressBar)
    (task,) = bar.progress.tasks  # 5 steps over 3 epochs of 2 batches: one bar
    assert (task.description.endswith("distill"), task.total, task.completed) == (True, 5, 5)
    shown = capsys.readouterr().out
    assert "5/5" in shown and "lr: " in shown and "v_num" not in shown and "Epoch" not in shown
