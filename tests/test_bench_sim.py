"""scripts/bench_sim.py runs end to end in each of its modes (cut-down settings): the
performance claims in the README come from it, so it must not rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_sim.py"
PROFILE = SCRIPT.with_name("profile_envs.py")


def _run(*args: str) -> dict:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--threads", "1", "--repeats", "1", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_bench_sim_default_rows():
    result = _run("--steps", "2")
    assert {(row["B"], row["N"]) for row in result["rows"]} == {(b, n) for b in (1, 8, 64) for n in (32, 128)}
    assert all(row["agent_steps_per_s"] > 0 for row in result["rows"] + result["batched_env"])
    assert result["pettingzoo_agent_steps_per_s"] > 0


@pytest.mark.slow
def test_bench_sim_waymax_and_ego_rows(example_file):
    waymax = _run("--waymax")
    assert [(row["checks"], row["B"]) for row in waymax["waymax_workload"]] == [
        (checks, b) for checks in (True, False) for b in (1, 8, 64)
    ]
    assert all(row["object_steps_per_s"] > 0 for row in waymax["waymax_workload"])
    ego = _run("--only", "ego", "--ego-steps", "10")
    assert set(ego["ego_env_steps_per_s"]) == {"ego_env", "vector_b16", "dummy_vec_env_16"}
    assert ego["compile"] is False


@pytest.mark.slow
def test_profile_envs_reports_every_component():
    done = subprocess.run(
        [sys.executable, str(PROFILE), "--env", "vector", "--steps", "100"], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for label in ("collate 16 scenarios", "vector env:", "off-road", "collisions", "observe", "resets (vector env)"):
        assert label in done.stdout


def test_profile_envs_splits_the_waymax_workload(example_file):
    done = subprocess.run(
        [sys.executable, str(PROFILE), "--env", "waymax", "--batch", "1"], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for label in ("waymax workload, B = 1 (128 objects)", "Expert", "collisions", "off-road", "rebuilds", "rebuilt"):
        assert label in done.stdout
