"""Faults: a SIGKILL in the middle of a checkpoint write, or of moving the ``last.ckpt`` link,
leaves the previous checkpoint intact (and the next run removes the half-written temporary
file); ``benchmarks/kill_resume.py`` (slow) kills a real ``freekd train-teacher`` run and checks
that ``--resume`` ends with the same weights as an uninterrupted run."""

from __future__ import annotations

import json
import os
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


def test_sigkill_while_moving_the_last_link_leaves_last_ckpt_loadable(tmp_path):
    torch.save({"global_step": 2}, tmp_path / "step=000002.ckpt")
    torch.save({"global_step": 4}, tmp_path / "step=000004.ckpt")
    (tmp_path / "last.ckpt").symlink_to("step=000002.ckpt")
    code = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from freekd.train.callbacks import StepCheckpoint

        class Strategy:
            def barrier(self):
                pass

        class Trainer:
            is_global_zero, strategy = True, Strategy()

        # Killed after the new link is made, before it replaces the old one.
        os.replace = lambda source, target: os.kill(os.getpid(), signal.SIGKILL)
        folder = Path({str(tmp_path)!r})
        StepCheckpoint._link_checkpoint(
            Trainer(), str(folder / "step=000004.ckpt"), str(folder / "last.ckpt")
        )
        """
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert completed.returncode == -9, completed.stderr
    assert torch.load(tmp_path / "last.ckpt", weights_only=True) == {"global_step": 2}
    left = list(tmp_path.glob(".last.ckpt.*.tmp"))  # removed by the next run's set-up
    assert len(left) == 1 and os.readlink(left[0]) == "step=000004.ckpt"
    # Not killed: last.ckpt now points at step 4, as a relative link.
    script = code.replace("os.replace = lambda", "_ = lambda")
    assert subprocess.run([sys.executable, "-c", script], timeout=120).returncode == 0
    assert os.readlink(tmp_path / "last.ckpt") == "step=000004.ckpt"
    assert torch.load(tmp_path / "last.ckpt", weights_only=True) == {"global_step": 4}


def test_a_resumed_run_removes_temporary_files_of_a_killed_write(tmp_path):
    from freekd.train import fit, make_train_loader
    from tests.test_numerics import Batches, skip_module, train_config

    def loader():
        return make_train_loader(Batches(3, poisoned=()), batch_size=2, shuffle=False)

    fit(skip_module(), loader(), config=train_config(tmp_path / "run", 2))
    stale = tmp_path / "run" / "checkpoints" / ".last.ckpt.x1y2z3.tmp"
    stale.write_bytes(b"half a checkpoint")
    stale_link = tmp_path / "run" / "checkpoints" / ".last.ckpt.123.link.tmp"
    stale_link.symlink_to("step=000002.ckpt")
    result = fit(skip_module(), loader(), config=train_config(tmp_path / "run", 3), resume="last")
    assert result.global_step == 3 and not stale.exists() and not stale_link.is_symlink()


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
