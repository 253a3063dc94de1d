"""Kill a real training run with SIGKILL at random steps, resume it, and compare the final weights.

    python benchmarks/kill_resume.py [--kills 3] [--steps 12] [--seed 0] [--out DIR]

Runs ``freekd train-teacher`` (PSPNet-R18 on 32 px built-in digit scenes, a checkpoint every 2
steps) once without interruption, then again in another folder where the process is killed
``--kills`` times (SIGKILL, no clean-up possible) at random steps and random moments within them
(also during a checkpoint write, or before the first checkpoint exists), each time continued
with ``--resume`` (or started afresh with ``--force`` when no checkpoint was written yet). After
each kill it checks that ``last.ckpt``, if any, still loads. At the end it compares the exported
``teacher.safetensors`` of both runs tensor by tensor and prints a JSON report; exit status 0
when they are equal.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

CONFIG = """\
task: segmentation
seed: 0
device: cpu
data:
  name: digits
  args: {{size: 32, max_digits: 2, digit_scale: [0.4, 0.7]}}
  train_args: {{length: 64}}
  val_args: {{length: 4}}
  batch_size: 2
  crop_size: 32
  scale_range: [0.8, 1.25]
teacher:
  arch: pspnet
  backbone: resnet18
  train:
    steps: {steps}
    optimizer: {{name: adamw, lr: 0.001, weight_decay: 0.0001}}
    schedule: {{kind: cosine, min_lr: 1.0e-05}}
student: {{arch: pspnet, backbone: resnet18}}
train:
  checkpoint_every_steps: {every}
  keep_checkpoints: 2
  log_every_steps: 1
  progress_bar: false
"""

_STEP_FILE = re.compile(r"^step=(\d+)\.ckpt$")


def command(config: Path, run_dir: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "freekd.cli", "train-teacher", "-c", str(config)] + [
        "--run-dir",
        str(run_dir),
        *flags,
    ]


def checkpointed_step(run_dir: Path) -> int:
    """The highest step with a complete checkpoint file (0: none yet)."""
    folder = run_dir / "teacher" / "checkpoints"
    steps = [int(m.group(1)) for p in folder.glob("step=*.ckpt") if (m := _STEP_FILE.match(p.name))]
    return max(steps, default=0)


def last_checkpoint_loads(run_dir: Path) -> bool | None:
    """Whether ``last.ckpt`` loads (``None``: there is none)."""
    import torch

    path = run_dir / "teacher" / "checkpoints" / "last.ckpt"
    if not path.is_file():
        return None
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any failure means a broken file
        return False
    return True


def run_to_end(args: list[str], log: Path) -> float:
    start = time.perf_counter()
    with log.open("a") as output:
        completed = subprocess.run(args, stdout=output, stderr=subprocess.STDOUT)
    if completed.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({completed.returncode}); see {log}")
    return time.perf_counter() - start


def start_args(config: Path, run_dir: Path) -> tuple[list[str], str]:
    """Continue from ``last.ckpt`` when there is one, else start afresh (clearing the folder
    that a run killed before its first checkpoint left)."""
    if (run_dir / "teacher" / "checkpoints" / "last.ckpt").is_file():
        return command(config, run_dir, "--resume"), "resume"
    if (run_dir / "teacher").exists():
        return command(config, run_dir, "--force"), "fresh (--force: no checkpoint yet)"
    return command(config, run_dir), "fresh"


def kill_at(
    args: list[str], run_dir: Path, step: int, delay: float, log: Path, timeout: float
) -> dict:
    """Start ``args``; once the checkpoint of ``step`` exists (at once for ``step=0``) wait
    ``delay`` seconds more and SIGKILL the process."""
    start = time.perf_counter()
    with log.open("a") as output:
        process = subprocess.Popen(args, stdout=output, stderr=subprocess.STDOUT)
        while process.poll() is None and checkpointed_step(run_dir) < step:
            if time.perf_counter() - start > timeout:
                break
            time.sleep(0.05)
        time.sleep(delay)
        finished = process.poll() is not None
        if not finished:
            os.kill(process.pid, signal.SIGKILL)
        process.wait()
    return {
        "target_step": step,
        "delay_s": round(delay, 2),
        "killed": not finished,
        "checkpointed_step_at_kill": checkpointed_step(run_dir),
        "last_ckpt_loads": last_checkpoint_loads(run_dir),
        "temporary_files_left": sorted(
            p.name for p in (run_dir / "teacher" / "checkpoints").glob(".*.tmp")
        )
        if (run_dir / "teacher" / "checkpoints").is_dir()
        else [],
        "seconds": round(time.perf_counter() - start, 1),
    }


def compare_weights(a: Path, b: Path) -> dict:
    import safetensors.torch
    import torch

    first, second = safetensors.torch.load_file(a), safetensors.torch.load_file(b)
    different = [k for k in first if k not in second or not torch.equal(first[k], second[k])]
    return {
        "tensors": len(first),
        "same_keys": first.keys() == second.keys(),
        "different_tensors": different[:10],
        "equal": first.keys() == second.keys() and not different,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=2, help="checkpoint every N steps")
    parser.add_argument("--seed", type=int, default=0, help="for the kill steps and moments")
    parser.add_argument("--out", type=Path, default=Path("runs/kill_resume"))
    parser.add_argument("--timeout", type=float, default=600, help="seconds per attempt")
    args = parser.parse_args(argv)
    if args.kills >= args.steps:
        parser.error("--kills must be smaller than --steps")
    args.out.mkdir(parents=True, exist_ok=True)
    config = args.out / "config.yaml"
    config.write_text(CONFIG.format(steps=args.steps, every=args.every))
    reference, killed = args.out / "reference", args.out / "killed"
    log = args.out / "log.txt"
    rng = random.Random(args.seed)
    # Distinct steps in 0 .. steps - 2 (0: before the first checkpoint), in order.
    targets = sorted(rng.sample(range(0, args.steps - 1), args.kills))

    reference_args = command(config, reference, "--force")
    reference_seconds = run_to_end(reference_args, log)
    events = []
    for target in targets:
        attempt, how = start_args(config, killed)
        event = kill_at(attempt, killed, target, rng.uniform(0.0, 1.5), log, args.timeout)
        event["started_as"] = how
        events.append(event)
        print(json.dumps(event), flush=True)
    final, how = start_args(config, killed)
    final_seconds = run_to_end(final, log)
    comparison = compare_weights(
        reference / "teacher" / "teacher.safetensors", killed / "teacher" / "teacher.safetensors"
    )
    report = {
        "steps": args.steps,
        "checkpoint_every_steps": args.every,
        "kills": events,
        "final_run_started_as": how,
        "uninterrupted_seconds": round(reference_seconds, 1),
        "final_resume_seconds": round(final_seconds, 1),
        "weights": comparison,
        "every_kill_left_a_loadable_checkpoint": all(
            e["last_ckpt_loads"] in (True, None) for e in events
        ),
        "equal": comparison["equal"],
    }
    print(json.dumps(report, indent=2))
    return 0 if report["equal"] and report["every_kill_left_a_loadable_checkpoint"] else 1


if __name__ == "__main__":
    sys.exit(main())
