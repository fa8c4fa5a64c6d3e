"""``closedloop demo``: the pipeline end to end on the default data, saying what it did."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

from closedloop.paths import scenario_path


def _say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def run_demo(data: Sequence[str] | None, out: Path, seed: int = 0, num_scenarios: int = 8) -> None:
    """Generate (or read) scenarios, summarise them, batch them and cache them under ``out``."""
    from closedloop.data.batch import collate_scenarios
    from closedloop.data.cache import ScenarioCache, prepare_cache
    from closedloop.data.womd import read_scenarios
    from closedloop.inspect import summarize, summary_line

    out.mkdir(parents=True, exist_ok=True)
    if data is None:
        from closedloop.data.synthetic import generate_dataset

        start = time.perf_counter()
        data_dir = out / "synthetic"
        files = generate_dataset(data_dir, num_scenarios=num_scenarios, seed=seed, shards=2, progress=False)
        _say(
            f"generated {num_scenarios} synthetic WOMD scenarios (seed {seed}) in "
            f"{time.perf_counter() - start:.1f} s: {', '.join(str(f) for f in files)}"
        )
        data = [str(data_dir)]

    scenarios = list(read_scenarios(data))
    _say(f"read {len(scenarios)} scenarios from {', '.join(map(str, data))}")
    for scenario in scenarios[:5]:
        _say("  " + summary_line(summarize(scenario)))

    picture = scenario_path(out, scenarios[0].scenario_id, ".png")
    _plot(scenarios[0], picture)
    _say(f"drew the map and logged trajectories of {scenarios[0].scenario_id}: {picture}")

    batch = collate_scenarios(scenarios, max_agents=128)
    _say(
        f"batched into ScenarioBatch: {batch.batch_size} scenarios x {batch.agent_xyz.shape[1]} "
        f"agents x {batch.agent_xyz.shape[2]} steps, {batch.road_xyz.shape[1]} roadgraph points, "
        f"{batch.light_lane_id.shape[1]} traffic-light lanes"
    )

    cache_dir = out / "cache"
    result = prepare_cache(data, cache_dir, progress=False)
    cache = ScenarioCache(cache_dir)
    same = all(cache[i].equals(s) for i, s in enumerate(scenarios))
    _say(f"cached {result['scenarios']} scenarios in {cache_dir} (pickle-free npz); read back identical: {same}")

    from closedloop.agents.baselines import Expert
    from closedloop.envs.dynamics import make_dynamics
    from closedloop.envs.render import render_state, state_from_rollout, write_animation
    from closedloop.envs.rollout import rollout_scenarios, write_rollouts
    from closedloop.metrics import aggregate, score_scenarios

    start = time.perf_counter()
    results = list(rollout_scenarios(scenarios, Expert(), make_dynamics("bicycle"), num_rollouts=4))
    rollout_dir = out / "rollouts"
    write_rollouts(results, rollout_dir)
    _say(
        f"simulated {len(results)} scenarios x 4 rollouts with the expert policy and bicycle "
        f"dynamics in {time.perf_counter() - start:.1f} s: {rollout_dir}"
    )
    by_id = {s.scenario_id: s for s in scenarios}
    start = time.perf_counter()
    scores = score_scenarios([(by_id[sid], ids, traj) for sid, ids, traj in results])
    total = aggregate(scores)
    _say(
        f"WOSAC 2025 metrics in {time.perf_counter() - start:.1f} s: realism meta-metric "
        f"{total['metametric']:.4f}, minADE {total['min_average_displacement_error']:.3f} m, "
        f"collision rate {total['simulated_collision_rate']:.3f}, off-road rate "
        f"{total['simulated_offroad_rate']:.3f}"
    )
    sid, ids, traj = results[0]
    final = state_from_rollout(by_id[sid], ids, traj[0])
    frames = [
        render_state(dataclasses.replace(final, t=t), size=256)
        for t in range(final.batch.current_time_index, final.num_steps, 2)
    ]
    movie = scenario_path(out, sid, ".gif")
    write_animation(frames, movie, fps=5)
    _say(f"animated the first rollout of {sid}: {movie}")
    _say(f"outputs are in {out.resolve()}")


def _plot(scenario, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from closedloop.viz import plot_scenario

    fig, ax = plt.subplots(figsize=(9, 9))
    plot_scenario(scenario, ax)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
