"""WOSAC metric speed: scenarios/s for 32 rollouts, against the reference implementation.

  python scripts/bench_metrics.py [--repeats 5] [--synthetic 4] [--device cpu|cuda]
                                  [--reference-venv PATH]

Scores the real WOMD scenario 637f20cafde22ff8 (noisy-log rollouts) and a few synthetic
scenarios. The baseline is the reference implementation timed on the same scenario and
rollouts: in this run when ``--reference-venv`` points at a side environment with
TensorFlow and the reference installed (see ../shared/docs/wosac.md), else the time
recorded in tests/fixtures/wosac_reference.json. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from closedloop.agents.open_loop import noisy_log
from closedloop.data import read_scenarios
from closedloop.data.synthetic import generate_scenarios
from closedloop.metrics.rollouts import save_rollouts
from closedloop.metrics.wosac import score_scenario

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "womd" / "motion_data_one_scenario.tfrecord"
FIXTURE = ROOT / "tests" / "fixtures" / "wosac_reference.json"


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def _reference_seconds(venv: str | None, scenario, ids, traj) -> tuple[float, str]:
    if venv is None:
        recorded = json.loads(FIXTURE.read_text())["noisy_log/2025"]["seconds"]
        return recorded, "recorded in tests/fixtures/wosac_reference.json"
    with tempfile.TemporaryDirectory() as tmp:
        save_rollouts(Path(tmp) / f"{scenario.scenario_id}.noisy_log.npz", scenario.scenario_id, ids, traj)
        site = next(Path(venv).glob("lib/python*/site-packages"))
        out = Path(tmp) / "ref.json"
        subprocess.run(
            [
                str(Path(venv) / "bin" / "python"),
                str(ROOT / "scripts" / "wosac_crosscheck.py"),
                "reference",
                "--data",
                str(REAL),
                "--rollouts",
                tmp,
                "--out",
                str(out),
            ],
            cwd=site,
            check=True,
            capture_output=True,
        )
        return json.loads(out.read_text())["noisy_log/2025"]["seconds"], "measured in this run"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--synthetic", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reference-venv", default=None)
    args = parser.parse_args()

    rows = []
    scenario = next(read_scenarios(REAL))
    ids, traj = noisy_log(scenario, 32)
    devices = ["cpu"] + (["cuda"] if args.device == "cuda" else [])
    for device in devices:
        seconds = _time(lambda device=device: score_scenario(scenario, ids, traj, device=device), args.repeats)
        rows.append(("real 637f20cafde22ff8", device, int(scenario.valid_at_current().sum()), seconds))
        synthetic = list(generate_scenarios(args.synthetic, seed=1))
        sets = [(s, *noisy_log(s, 32)) for s in synthetic]
        seconds = _time(
            lambda device=device, sets=sets: [score_scenario(s, i, t, device=device) for s, i, t in sets],
            max(1, args.repeats // 2),
        )
        agents = sum(int(s.valid_at_current().sum()) for s in synthetic) // len(synthetic)
        rows.append((f"synthetic x{len(sets)}", device, agents, seconds / len(sets)))
    reference, how = _reference_seconds(args.reference_venv, scenario, ids, traj)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"reference (TensorFlow) on the real scenario: {reference:.1f} s per scenario ({how})")
    print(f"{'scenarios':<24}{'device':>8}{'agents':>8}{'s/scenario':>12}{'scen/s':>9}{'speed-up':>10}")
    for name, device, agents, seconds in rows:
        print(f"{name:<24}{device:>8}{agents:>8}{seconds:>12.3f}{1 / seconds:>9.2f}{reference / seconds:>9.0f}x")
    print(
        json.dumps(
            {
                "reference_seconds": reference,
                "reference_source": how,
                "rows": [dict(zip(("scenarios", "device", "agents", "seconds"), r)) for r in rows],
            }
        )
    )


if __name__ == "__main__":
    sys.exit(main())
