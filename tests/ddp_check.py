"""Shared by the tests: ``scripts/ddp_distill_check.py``'s model, and running the script."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "ddp_distill_check.py"

_spec = importlib.util.spec_from_file_location("ddp_distill_check", SCRIPT)
_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_script)

TinyNet = _script.TinyNet


def run_ddp_check(tmp_path: Path, *args: str) -> tuple[dict, str]:
    """Run the 2-process gloo check (the second process re-runs the script) -> its report and
    its stderr; fails unless it exits with status 0."""
    environment = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK")}
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=240,
        env=environment,
        cwd=tmp_path,
    )
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no report; stderr:\n{completed.stderr[-3000:]}"
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(lines[-1]), completed.stderr
