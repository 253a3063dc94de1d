"""Faults: a SIGKILL in the middle of a checkpoint write leaves the previous checkpoint intact
(and the next run removes the half-written temporary file); ``benchmarks/kill_resume.py``
(slow) kills a real ``freekd train-teacher`` run and checks that ``--resume`` ends with the same
weights as an uninterrupted run."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def test_sigkill_during_an_atomic_write_leaves_the_previous_file(tmp_path):
    target = tmp_path / "last.ckpt"
    torch.save({"step": 1}, target)
    code = textwrap.dedent(
        f"""
        import os, signal
        from freekd._io import atomic_write

        def write(temporary):
            with open(temporary, "wb") as handle:
                handle.write(b"half a checkpoint")
                handle.flush()
                os.kill(os.getpid(), signal.SIGKILL)

        atomic_write({str(target)!r}, write)
        """
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert completed.returncode == -9  # killed, no clean-up ran
    assert torch.load(target, weights_only=True) == {"step": 1}
    left = list(tmp_path.glob(".last.ckpt.*.tmp"))
    assert len(left) == 1 and left[0].read_bytes() == b"half a checkpoint"


def test_a_resumed_run_removes_temporary_files_of_a_killed_write(tmp_path):
    from freekd.train import fit, make_train_loader
    from tests.test_numerics import Batches, skip_module, train_config

    def loader():
        return make_train_loader(Batches(3, poisoned=()), batch_size=2, shuffle=False)

    fit(skip_module(), loader(), config=train_config(tmp_path / "run", 2))
    stale = tmp_path / "run" / "checkpoints" / ".last.ckpt.x1y2z3.tmp"
    stale.write_bytes(b"half a checkpoint")
    result = fit(skip_module(), loader(), config=train_config(tmp_path / "run", 3), resume="last")
    assert result.global_step == 3 and not stale.exists()


@pytest.mark.slow
def test_kill_and_resume_a_real_run_ends_with_the_same_weights(tmp_path):
    completed = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "kill_resume.py"),
            *("--kills", "1", "--steps", "6", "--every", "2", "--seed", "3"),
            *("--out", str(tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    report = json.loads(completed.stdout[completed.stdout.index("{\n") :])
    assert report["equal"] and report["weights"]["tensors"] > 100, report
    assert report["kills"][0]["killed"] and report["every_kill_left_a_loadable_checkpoint"]
