"""Baseline sim agents in closed loop: expert-replay error and event counts per policy.

  python scripts/eval_baselines.py [--dynamics bicycle]

Two measurements, the figures quoted in the README and the closing notes:
1. expert replay of the real WOMD scenario 637f20cafde22ff8 with every continuous dynamics
   model: max and mean position error against the log over the logged-valid steps 11..90;
2. vehicle collision, off-road and red-light step counts of each baseline policy on four
   synthetic 'cross' scenarios (seed 9) with ``--dynamics``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from closedloop.agents.baselines import POLICIES, Expert
from closedloop.data import collate_scenarios, read_scenarios
from closedloop.data.synthetic import generate_scenarios
from closedloop.envs import make_dynamics, reset
from closedloop.envs.rollout import count_events, run_episode

REAL = Path(__file__).resolve().parents[2] / "shared" / "womd" / "motion_data_one_scenario.tfrecord"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dynamics", default="bicycle")
    args = parser.parse_args()
    results = {"expert_replay": {}, "events": {}}
    batch = collate_scenarios(list(read_scenarios(REAL)))
    print("expert replay of 637f20cafde22ff8 (metres from the log)")
    for name in ("delta_global", "delta_local", "bicycle", "state", "trajectory"):
        final = run_episode(reset(batch), Expert(), make_dynamics(name))
        error = torch.linalg.norm(final.pose[:, :, 11:, :2] - batch.agent_xyz[:, :, 11:, :2], dim=-1)
        mask = batch.agent_valid[:, :, 11:] & final.controlled[..., None]
        row = {"max": float(error[mask].max()), "mean": float(error[mask].mean())}
        results["expert_replay"][name] = row
        print(f"  {name:<14} max {row['max']:.3g}  mean {row['mean']:.3g}")
    synthetic = collate_scenarios(list(generate_scenarios(4, seed=9, town="cross")))
    print(f"vehicle event steps on 4 synthetic cross scenarios ({args.dynamics})")
    for name, policy_type in POLICIES.items():
        state = reset(synthetic)
        vehicles = (synthetic.agent_type == 1) & state.controlled
        _, counts = count_events(state, policy_type(), make_dynamics(args.dynamics), vehicles)
        counts["vehicle_steps"] = int(vehicles.sum()) * 80
        results["events"][name] = counts
        print(f"  {name:<18} " + "  ".join(f"{k} {v}" for k, v in counts.items()))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
