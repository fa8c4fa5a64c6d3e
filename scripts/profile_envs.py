"""Where an ego env's step goes: milliseconds per env step by component, and what a reset builds.

  python scripts/profile_envs.py [--env ego|vector] [--steps 1000] [--compile]
  python scripts/profile_envs.py --env waymax [--batch 8] [--compile]

Steps one ``EgoEnv`` (or ``ego_vector_env`` at B = 16) on 8 synthetic grid scenarios of
60-90 agents with the SDC accelerating gently (the workload of ``bench_sim.py --only ego``),
timing each component by wrapping it (the wrappers add a little; components nest, so the
rows do not sum to the total). First it times what a reset of 16 scenarios builds
(collating them, the road-edge index, the roadgraph-point index, the stop lines; all four
for scenarios prepared anew, and stacked from prepared scenarios as ``BatchedEnv`` does
once it has drawn them: see ``closedloop.envs.prepared``) and an ``EgoEnv`` reset with
and without the drawn scenario's kept batch and indexes. One thread.

``--env waymax`` instead splits a step of ``bench_sim.py --waymax``'s workload with the
checks on (the real ``motion_data_one_example.tfrecord``, 128 objects of which 73 driven by
the Expert with the bicycle dynamics, ``--batch`` copies, two episodes of 80 steps after a
warm-up one): the Expert, the simulator step, collisions, and off-road (of the objects
present at the step, as in the benchmark) with its
neighbourhood rebuilds and how many agents they rebuild per step. Unlike the benchmark, each
episode starts a new road-edge index, so its first build of every neighbourhood counts.
"""

from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path

import numpy as np
import torch

from closedloop.agents import baselines
from closedloop.data.batch import collate_scenarios
from closedloop.data.synthetic import generate_scenarios
from closedloop.envs import core, env, events, faces, gym_vector, map_index, observation, prepared, rewards, vector
from closedloop.envs.compiled import set_compile
from closedloop.envs.dynamics import make_dynamics

SPENT: collections.Counter[str] = collections.Counter()


def timed_attribute(owner, name: str, label: str) -> None:
    """Replace ``owner.name`` with a wrapper adding its wall time to ``SPENT[label]``."""
    function = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            SPENT[label] += time.perf_counter() - start

    setattr(owner, name, wrapper)


COMPONENTS = [
    (env.EnvCore, "step", "env core step (all below but observe)"),
    (env, "step", "  simulator step"),
    (env, "check_actions", "  action checks"),
    (rewards.RewardConfig, "__call__", "  rewards"),
    (events.EventTracker, "__call__", "  events"),
    (map_index.RoadEdges, "box_signed_distance", "    off-road (box corners included)"),
    (events, "collisions", "    collisions"),
    (events.EventTracker, "_red_light", "    red light"),
    (events, "distance_to_log", "    distance to log"),
    (observation.Observer, "__call__", "observe"),
    (map_index.NearestPoints, "__call__", "  roadgraph points search"),
    (faces.EgoEnv, "reset", "resets (EgoEnv)"),
    (gym_vector.AgentVectorEnv, "reset", "resets (vector env)"),
    (vector.BatchedEnv, "restart", "  new batch and core"),
]


def instrument() -> None:
    for owner, name, label in COMPONENTS:
        timed_attribute(owner, name, label)


def profile_steps(kind: str, steps: int) -> None:
    scenarios = list(generate_scenarios(8, seed=0, town="grid", agents=(60, 90)))
    action = np.array([0.5, 0.0], np.float32)
    if kind == "ego":
        ego = faces.EgoEnv(scenarios)
        ego.reset(seed=0)

        def step() -> None:
            *_, terminated, truncated, _ = ego.step(action)
            if terminated or truncated:
                ego.reset()

        per_step = 1
    else:
        envs = gym_vector.ego_vector_env(scenarios, 16)
        envs.reset(seed=0)
        actions = np.tile(action, (16, 1))

        def step() -> None:
            envs.step(actions)

        per_step = 16
    start = time.perf_counter()
    for _ in range(100):  # warm-up (and compiling, with --compile)
        step()
    print(f"{kind} env: 100 warm-up steps in {time.perf_counter() - start:.1f} s (compiling included with --compile)")
    SPENT.clear()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    total = time.perf_counter() - start
    print(f"{kind} env: {total / steps * 1e3:.3f} ms per call ({per_step * steps / total:,.0f} env-steps/s)")
    for *_, label in COMPONENTS:
        if label in SPENT:
            print(f"  {label:<40}{SPENT[label] / steps * 1e3:8.3f} ms")


WAYMAX_COMPONENTS = [
    (baselines.Expert, "act", "Expert (inverse bicycle to the log)"),
    (core, "step", "simulator step (bicycle)"),
    (core, "collisions", "collisions"),
    (map_index.RoadEdges, "box_signed_distance", "off-road (box corners included)"),
    (map_index.RoadEdges, "_rebuild", "  neighbourhood rebuilds"),
]


def profile_waymax(B: int, episodes: int = 2) -> None:
    """Milliseconds per step of the Waymax comparison's workload with the checks on, by part."""
    from closedloop.data import read_scenarios

    example = Path(__file__).resolve().parents[1].parent / "shared" / "womd" / "motion_data_one_example.tfrecord"
    if not example.exists():
        raise SystemExit(f"{example}: the real WOMD example is needed for --env waymax")
    for owner, name, label in WAYMAX_COMPONENTS:
        timed_attribute(owner, name, label)
    (scenario,) = read_scenarios([example])
    batch = collate_scenarios([scenario] * B)
    dynamics = make_dynamics("bicycle")
    start = core.reset(batch)
    expert = baselines.Expert()
    expert.reset(start, dynamics)

    def episode() -> map_index.RoadEdges:
        edges, state = map_index.RoadEdges(batch), start
        while not state.done:
            state = core.step(state, expert.act(state), dynamics)
            core.collisions(state)
            pose, dims = state.current, state.dims
            heading = pose[..., 2]
            edges.box_signed_distance(
                pose[..., 0], pose[..., 1], heading.cos(), heading.sin(), dims[..., 0], dims[..., 1], state.valid_now
            )
        return edges

    began = time.perf_counter()
    episode()  # warm-up (and compiling, with --compile)
    print(
        f"waymax workload: a warm-up episode in {time.perf_counter() - began:.1f} s (compiling included with --compile)"
    )
    SPENT.clear()
    began, rebuilt = time.perf_counter(), 0
    for _ in range(episodes):
        edges = episode()
        rebuilt += edges.refreshed - edges.candidates.shape[0] * edges.candidates.shape[1]  # less the first build
    steps = episodes * (start.num_steps - 1 - start.t)
    total = time.perf_counter() - began
    objects = int(batch.agent_mask.sum())
    print(
        f"waymax workload, B = {B} ({objects} objects): {total / steps * 1e3:.3f} ms per step "
        f"({objects * steps / total:,.0f} object-steps/s with the timing wrappers)"
    )
    for *_, label in WAYMAX_COMPONENTS:
        print(f"  {label:<40}{SPENT[label] / steps * 1e3:8.3f} ms")
    print(f"  ({rebuilt / steps:.1f} neighbourhoods rebuilt per step)")


def profile_reset_builders(repeats: int = 5) -> None:
    scenarios = list(generate_scenarios(8, seed=0, town="grid", agents=(60, 90)))
    chosen = [scenarios[i % 8] for i in range(16)]
    batch = collate_scenarios(chosen, max_agents=128, pad_agents=True)
    keep = observation.ObservationConfig().road_candidates
    warm = prepared.PreparedScenarios(max_agents=128, keep=keep)
    warm.batch(chosen)
    builders = {
        "collate 16 scenarios": lambda: collate_scenarios(chosen, max_agents=128, pad_agents=True),
        "road-edge index (RoadEdges)": lambda: map_index.RoadEdges(batch),
        "roadgraph-point index (NearestPoints)": lambda: map_index.NearestPoints(
            batch.road_xyz[..., :2],
            batch.road_mask,
            keep,
            polyline_id=batch.road_id,
        ),
        "stop lines (StopLines)": lambda: events.StopLines(batch),
        "all four, prepared anew (cache empty)": lambda: prepared.PreparedScenarios(128, keep).batch(chosen),
        "all four, stacked from prepared scenarios": lambda: warm.batch(chosen),
    }
    print("a reset of 16 scenarios builds:")
    for label, build in builders.items():
        build()
        start = time.perf_counter()
        for _ in range(repeats):
            build()
        print(f"  {label:<40}{(time.perf_counter() - start) / repeats * 1e3:8.1f} ms")
    stacked = tensor_bytes(warm.batch(chosen), set())
    print(f"  (a stacked batch of 16 and its indexes: {stacked / 2**20:.0f} MB of tensors)")
    # An EgoEnv reset when the drawn scenario's batch and indexes are kept, and when not.
    for label, kept in (("EgoEnv reset, indexes kept", faces.CACHED_CORES), ("EgoEnv reset, built anew", 0)):
        saved, faces.CACHED_CORES = faces.CACHED_CORES, kept
        try:
            ego = faces.EgoEnv(scenarios)
            ego.reset(seed=0)
            for _ in range(30):
                ego.reset()
            start = time.perf_counter()
            for _ in range(100):
                ego.reset()
            print(f"{label:<42}{(time.perf_counter() - start) / 100 * 1e3:8.2f} ms")
        finally:
            faces.CACHED_CORES = saved


def real_offroad_fallbacks() -> None:
    """How often the off-road index measures a box against every edge (its neighbourhood
    cannot vouch for the answer), replaying the logs of the real WOMD test scenarios."""
    from pathlib import Path

    from closedloop.data import read_scenarios

    files = sorted((Path(__file__).resolve().parents[2] / "shared" / "womd").glob("*.tfrecord*"))
    if not files:
        return
    batch = collate_scenarios(list(read_scenarios(files)))
    state = core.log_state(batch)
    edges = map_index.RoadEdges(batch)
    agent_steps = 0
    for t in range(batch.current_time_index, state.num_steps):
        present = state.valid[:, :, t] & batch.agent_mask  # as the event tracker measures them
        edges.signed_distance(events.agent_corners(state, t), active=present)
        agent_steps += int(present.sum())
    print(
        f"off-road on the {batch.batch_size} real WOMD scenarios' logs: {edges.exhaustive} of {agent_steps} "
        f"agent-steps (of the agents present) measured against every edge, {edges.refreshed} neighbourhood rebuilds"
    )


def tensor_bytes(value, seen: set[int]) -> int:
    """Bytes of the tensors reachable from ``value`` (dataclasses, objects, containers),
    each counted once."""
    if isinstance(value, torch.Tensor):
        if id(value) in seen:
            return 0
        seen.add(id(value))
        return value.untyped_storage().nbytes()
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(item, seen) for item in value)
    if isinstance(value, dict):
        return sum(tensor_bytes(item, seen) for item in value.values())
    if hasattr(value, "__dict__") and not isinstance(value, type):
        return sum(tensor_bytes(item, seen) for item in vars(value).values())
    return 0


def prepared_memory() -> None:
    """What a prepared scenario (its batch of one and its indexes) holds in memory."""
    from pathlib import Path

    from closedloop.data import read_scenarios

    keep = observation.ObservationConfig().road_candidates
    files = sorted((Path(__file__).resolve().parents[2] / "shared" / "womd").glob("*.tfrecord*"))
    sets = {"synthetic grid": list(generate_scenarios(8, seed=0, town="grid", agents=(60, 90)))}
    if files:
        sets["real WOMD"] = list(read_scenarios(files))
    for label, scenarios in sets.items():
        sizes = []
        for scenario in scenarios:
            batch = collate_scenarios([scenario], max_agents=128, pad_agents=True, allow_drop_scored=True)
            part = prepared.PreparedScenario(scenario, batch, prepared.MapIndexes.build(batch, keep))
            sizes.append(tensor_bytes(part.batch, set()) + tensor_bytes(part.maps, set()))
        print(
            f"a prepared {label} scenario holds {np.mean(sizes) / 2**20:.1f} MB on average "
            f"({min(sizes) / 2**20:.1f}-{max(sizes) / 2**20:.1f} MB over {len(sizes)}, 128 agent slots)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", choices=("ego", "vector", "waymax"), default="ego")
    parser.add_argument("--batch", type=int, default=8, help="copies of the scenario (--env waymax)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--compile", action="store_true", help="compiled kernels (closedloop.envs.compiled)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    set_compile(args.compile)
    if args.env == "waymax":
        profile_waymax(args.batch)
        return
    profile_reset_builders()
    prepared_memory()
    real_offroad_fallbacks()
    instrument()
    profile_steps(args.env, args.steps)


if __name__ == "__main__":
    main()
