"""What the experiment scripts (``exp_bc.py``, ``exp_catk.py``) share: running
``closedloop`` as a user would, and evaluations that are kept and not redone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

COLUMNS = ("metametric", "min_average_displacement_error", "collision_rate", "offroad_rate", "red_light_rate")


def closedloop(*args) -> str:
    """Run ``closedloop ARGS`` (printing the command); return its stdout."""
    command = [sys.executable, "-m", "closedloop.cli", *map(str, args)]
    print("$", " ".join(command[2:]), flush=True)
    return subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout


def evaluate(policy: str, data: Path, out: Path, rollouts: int) -> dict:
    """``closedloop evaluate --json``'s ALL object for ``policy``, kept in ``out`` (an
    existing file is read instead of evaluating again)."""
    if not out.exists():
        lines = closedloop(
            "evaluate", "--policy", policy, "--data", data, "--num-rollouts", rollouts, "--json", "--quiet"
        ).splitlines()
        out.write_text(lines[-1] + "\n")
    return json.loads(out.read_text())
