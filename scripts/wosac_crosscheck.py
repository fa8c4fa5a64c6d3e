"""Cross-check closedloop's WOSAC metrics against the reference implementation.

Two steps, in two environments (the reference needs TensorFlow, which closedloop never
depends on):

1. In the project environment, write rollout sets for a scenario file::

       python scripts/wosac_crosscheck.py make --data SCENARIO.tfrecord --out DIR

2. In a side environment with the reference (see ../shared/docs/wosac.md), run from that
   environment's site-packages directory (the reference opens its config by a relative
   path)::

       cd $SIDE_VENV/lib/python3.11/site-packages && \\
       $SIDE_VENV/bin/python /path/to/scripts/wosac_crosscheck.py reference \\
           --data SCENARIO.tfrecord --rollouts DIR --out tests/fixtures/wosac_reference.json

The JSON maps ``"<rollout set>/<config>"`` to the reference's metric fields; the tests
recompute the same rollout sets and compare.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROLLOUT_SETS = ("log_replay", "constant_velocity", "noisy_log", "random_motion")
FIELDS = (
    "metametric",
    "average_displacement_error",
    "min_average_displacement_error",
    "linear_speed_likelihood",
    "linear_acceleration_likelihood",
    "angular_speed_likelihood",
    "angular_acceleration_likelihood",
    "distance_to_nearest_object_likelihood",
    "collision_indication_likelihood",
    "time_to_collision_likelihood",
    "distance_to_road_edge_likelihood",
    "offroad_indication_likelihood",
    "traffic_light_violation_likelihood",
    "simulated_collision_rate",
    "simulated_offroad_rate",
    "simulated_traffic_light_violation_rate",
)


def make(args: argparse.Namespace) -> None:
    from closedloop.agents.open_loop import BASELINES
    from closedloop.data import read_scenarios
    from closedloop.paths import scenario_path

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for scenario in read_scenarios(args.data):
        for name in ROLLOUT_SETS:
            ids, traj = BASELINES[name](scenario, 32)
            path = scenario_path(out, scenario.scenario_id, f".{name}.npz")
            np.savez(path, scenario_id=scenario.scenario_id, object_ids=ids, trajectories=traj)
            print(path)


def reference(args: argparse.Namespace) -> None:
    import tensorflow as tf
    from google.protobuf import text_format
    from waymo_open_dataset.protos import scenario_pb2, sim_agents_metrics_pb2, sim_agents_submission_pb2
    from waymo_open_dataset.wdl_limited.sim_agents_metrics import metrics

    configs = {}
    for name, path in (
        ("2025", "challenge_2025_sim_agents_config.textproto"),
        ("2024", "challenge_2024_config.textproto"),
    ):
        config = sim_agents_metrics_pb2.SimAgentMetricsConfig()
        folder = Path("waymo_open_dataset/wdl_limited/sim_agents_metrics")
        text_format.Parse((folder / path).read_text(), config)
        configs[name] = config
    scenarios = {}
    for record in tf.data.TFRecordDataset(args.data):
        scenario = scenario_pb2.Scenario.FromString(record.numpy())
        scenarios[scenario.scenario_id] = scenario
    results = {}
    for path in sorted(Path(args.rollouts).glob("*.npz")):
        data = np.load(path)
        sid = str(data["scenario_id"])
        rollout_set = path.name.split(".")[1]
        traj, ids = data["trajectories"], data["object_ids"]
        joint_scenes = []
        for r in range(traj.shape[0]):
            joint_scenes.append(
                sim_agents_submission_pb2.JointScene(
                    simulated_trajectories=[
                        sim_agents_submission_pb2.SimulatedTrajectory(
                            center_x=traj[r, a, :, 0],
                            center_y=traj[r, a, :, 1],
                            center_z=traj[r, a, :, 2],
                            heading=traj[r, a, :, 3],
                            object_id=int(ids[a]),
                        )
                        for a in range(len(ids))
                    ]
                )
            )
        rollouts = sim_agents_submission_pb2.ScenarioRollouts(scenario_id=sid, joint_scenes=joint_scenes)
        for name, config in configs.items():
            start = time.perf_counter()
            m = metrics.compute_scenario_metrics_for_bundle(config, scenarios[sid], rollouts)
            seconds = time.perf_counter() - start
            results[f"{rollout_set}/{name}"] = {
                "scenario_id": sid,
                "seconds": round(seconds, 2),
                **{field: float(getattr(m, field)) for field in FIELDS},
            }
            print(rollout_set, name, f"{seconds:.1f} s", results[f"{rollout_set}/{name}"]["metametric"], flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=make)
    p = sub.add_parser("reference")
    p.add_argument("--data", required=True)
    p.add_argument("--rollouts", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=reference)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
