"""Policy evaluation: judge sim-agent models by how they rank and value a fixed set of
planners, and evaluate any planner against any sim-agent model (``closedloop policy-eval``).

Each planner drives the SDC of every scenario from step 10 to 90 while a sim-agent model
drives every other agent valid at step 10 (log playback: they follow the log). Its
return on a scenario is the planner-evaluation reward summed over the 80 steps
(:mod:`closedloop.agents.planners.scoring`: ``-10 * collision - offroad - offroute +
1e-4 * progress`` per step, the simulator's events for the executed motion), its **value**
under that sim-agent model the mean return over the scenarios. Then, for every pair of
sim-agent models, Spearman's rank correlation and the mean absolute error of the planner
values (:mod:`closedloop.metrics.policy_eval`); the row of the ground truth (log playback
by default) says how well each model stands in for reality.

The random-shooting planners run together: every (planner, scenario) pair is one row of a
simulated batch (``batch_size`` rows at a time), all candidates scored as tensors.
Third-party planners run one scenario at a time (they are called like an agent in a
Gymnasium loop). A planner that raises or returns something that is not a valid action
on a scenario is reported (``failed``: planner, scenario, sim agents, error) and left out
of the values and statistics; the others go on.

Result (also ``OUT/policy_eval.json``)::

    {"values": {planner: {sim_agent: value}}, "spearman": {a: {b: rho}}, "mae": {a: {b: error}},
     "failed": [{"planner", "scenario_id", "sim_agent", "error"}], "ground_truth": ..., "settings": {...}}
"""

from __future__ import annotations

import csv
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from closedloop.agents.planners import PlannerError, RandomShooting, UserPlanner, load_planners, scene_view
from closedloop.agents.planners.costmap import CostMaps
from closedloop.agents.planners.episode import LOG_PLAYBACK, PlannerEpisode, ego_dynamics, load_sim_agents
from closedloop.data.batch import collate_scenarios, select_scenarios
from closedloop.data.scenario import Scenario
from closedloop.metrics.policy_eval import agreement

RESULT_FILE = "policy_eval.json"
VALUES_FILE = "values.csv"
PLOT_FILE = "values.png"


def evaluate_planners(
    scenarios: Sequence[Scenario],
    planners: Sequence[str],
    sim_agents: Sequence[str] = (LOG_PLAYBACK, "constant_velocity", "idm"),
    ground_truth: str = LOG_PLAYBACK,
    ego: str = "bicycle",
    sim_dynamics: str = "delta_global",
    batch_size: int = 64,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = False,
    out: str | Path | None = None,
) -> dict:
    """Values of ``planners`` (specs, see :func:`closedloop.agents.planners.load_planners`)
    under each of ``sim_agents`` (``log`` or ``closedloop rollout --policy`` specs; baselines
    drive ``sim_dynamics``) on ``scenarios``, and their agreement; see the module docstring.
    ``ground_truth`` is added to ``sim_agents`` when missing. Nothing is printed; ``progress``
    shows a bar on stderr."""
    from tqdm import tqdm

    scenarios = list(scenarios)
    if not scenarios:
        raise ValueError("no scenarios to evaluate planners on")
    names = list(dict.fromkeys([ground_truth, *sim_agents]))
    shooting, others = load_planners(planners)
    ego_model = ego_dynamics(ego)
    scenes = collate_scenarios(scenarios).to(device)
    S = len(scenarios)
    per_batch = max(1, batch_size // S)
    chunks = [shooting[i : i + per_batch] for i in range(0, len(shooting), per_batch)]
    steps = scenes.agent_valid.shape[2] - 1 - scenes.current_time_index
    bar = tqdm(
        total=len(names) * (len(chunks) + len(others) * S) * steps,
        desc="policy-eval",
        unit="step",
        disable=not progress,
        file=sys.stderr,
    )
    returns: dict[str, dict[str, list[float]]] = {}
    failed: list[dict] = []
    costmaps = CostMaps()  # each scenario's grid, built once for every chunk and sim-agent model
    start = time.perf_counter()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        for sim_index, name in enumerate(names):
            sim = load_sim_agents(name, seed=seed, dynamics=sim_dynamics)
            bar.set_postfix_str(name)
            for chunk_index, chunk in enumerate(chunks):
                rows = [s for _ in chunk for s in range(S)]
                generator = _generator(device, seed, sim_index, chunk_index)
                episode = PlannerEpisode(select_scenarios(scenes, rows), sim, ego_model, generator)
                configs = torch.tensor([[j, d] for _, j, d in chunk for _ in range(S)])
                planner = RandomShooting(configs, costmaps)
                planner.reset(episode.state, episode.route, ego_model)
                while not episode.done:
                    episode.step(planner.act(episode.state))
                    bar.update(1)
                for (planner_name, _, _), row in zip(chunk, episode.returns.view(len(chunk), S).tolist()):
                    returns.setdefault(planner_name, {})[name] = row
            for planner in others:
                for s in range(S):
                    generator = _generator(device, seed, sim_index, len(chunks) + s)
                    episode = PlannerEpisode(select_scenarios(scenes, [s]), sim, ego_model, generator)
                    error = _run_user(planner, episode, seed + s, bar)
                    if error is not None:
                        failed.append(
                            {
                                "planner": planner.name,
                                "scenario_id": scenes.scenario_id[s],
                                "sim_agent": name,
                                "error": error,
                            }
                        )
                        continue
                    returns.setdefault(planner.name, {}).setdefault(name, []).append(float(episode.returns[0]))
    bar.close()
    broken = {f["planner"] for f in failed}
    values = {
        planner: {sim: sum(rets[sim]) / S for sim in names}
        for planner, rets in returns.items()
        if planner not in broken
    }
    rho, mae = agreement(values, names)
    result = {
        "values": values,
        "spearman": rho,
        "mae": mae,
        "failed": failed,
        "ground_truth": ground_truth,
        "settings": {
            "scenarios": [s.scenario_id for s in scenarios],
            "planners": list(planners),
            "sim_agents": names,
            "ego_dynamics": ego_model.name,
            "sim_dynamics": sim_dynamics,
            "seed": seed,
            "batch_size": batch_size,
            "device": str(device),
            "seconds": round(time.perf_counter() - start, 1),
        },
    }
    if out is not None:
        write_outputs(result, out)
    return result


def _generator(device: str, seed: int, *index: int) -> torch.Generator:
    """A generator for one episode, seeded from ``seed`` and the episode's place."""
    mixed = seed
    for i in index:
        mixed = mixed * 1_000_003 + i
    torch.manual_seed(mixed % 2**62)  # for sim agents that draw from the global RNG
    return torch.Generator(device=device).manual_seed(mixed % 2**62)


def _run_user(planner: UserPlanner, episode: PlannerEpisode, seed: int, bar) -> str | None:
    """Step ``planner`` through ``episode`` (one scenario); the error if it failed."""
    try:
        planner.reset(seed)
        while not episode.done:
            if planner.scene_view:
                inputs = scene_view(episode.state, episode.route)
            else:
                inputs = episode.observe()[0].cpu().numpy()
            action = planner.act(inputs, episode.ego)
            episode.step(torch.from_numpy(action)[None])
            if bar is not None:
                bar.update(1)
    except PlannerError as err:
        if bar is not None:
            bar.update(episode.state.num_steps - 1 - episode.state.t)
        return f"step {episode.state.t}: {err}"
    return None


def planner_rollouts(
    scenarios: Sequence[Scenario],
    planner: str,
    sim_agents: str,
    num_rollouts: int = 1,
    ego: str = "bicycle",
    sim_dynamics: str = "delta_global",
    device: str = "cpu",
    seed: int = 0,
    top_k: int | None = 48,
    temperature: float = 1.0,
):
    """Yield ``(scenario_id, object_ids [A], trajectories [R, A, 80, 4])`` per scenario (the
    ``closedloop rollout`` files) with ``planner`` (one spec) driving the SDC and
    ``sim_agents`` (``log`` or a policy spec) the others. A failing planner raises
    :class:`PlannerError` naming the scenario."""
    shooting, others = load_planners([planner])
    if len(shooting) + len(others) != 1:
        raise ValueError(f"--ego-planner takes one planner, not {planner!r} ({len(shooting) + len(others)} planners)")
    ego_model = ego_dynamics(ego)
    sim = load_sim_agents(sim_agents, seed=seed, dynamics=sim_dynamics, top_k=top_k, temperature=temperature)
    costmaps = CostMaps()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        for index, scenario in enumerate(scenarios):
            batch = collate_scenarios([scenario]).to(device)
            runs = []
            for r in range(num_rollouts):
                generator = _generator(device, seed, index, r)
                if shooting:
                    episode = PlannerEpisode(batch, sim, ego_model, generator)
                    rs = RandomShooting(torch.tensor([shooting[0][1:]]), costmaps)
                    rs.reset(episode.state, episode.route, ego_model)
                    while not episode.done:
                        episode.step(rs.act(episode.state))
                else:
                    episode = PlannerEpisode(batch, sim, ego_model, generator)
                    error = _run_user(others[0], episode, seed + r, None)
                    if error is not None:
                        raise PlannerError(f"scenario {scenario.scenario_id}, rollout {r}, {error}")
                objects, traj = episode.trajectories()
                runs.append(traj[0, objects[0]].cpu())
            ids = batch.agent_id[0, objects[0]].cpu().numpy()
            yield scenario.scenario_id, ids, torch.stack(runs).float().numpy()


def write_outputs(result: dict, out: str | Path) -> None:
    """``OUT/policy_eval.json`` (the result), ``OUT/values.csv`` (a row per planner, a
    column per sim-agent model) and ``OUT/values.png`` (each model's values against the
    ground truth's)."""
    from closedloop._atomic import atomic_write

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / RESULT_FILE, "w") as handle:
        json.dump(json_ready(result), handle, indent=1)
        handle.write("\n")
    sims = result["settings"]["sim_agents"]
    with atomic_write(out / VALUES_FILE, "w") as handle:
        writer = csv.writer(handle)
        writer.writerow(["planner", *sims])
        for planner, row in result["values"].items():
            writer.writerow([planner, *(f"{row[s]:.6f}" for s in sims)])
    plot_values(result, out / PLOT_FILE)


def json_ready(value):
    """``value`` with NaN (an undefined correlation) as None, so the JSON is standard."""
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_ready(item) for item in value]
    if isinstance(value, float) and value != value:
        return None
    return value


def plot_values(result: dict, path: Path) -> None:
    """Each sim-agent model's planner values against the ground truth's (the diagonal is
    perfect agreement)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    truth = result["ground_truth"]
    values = result["values"]
    fig = Figure(figsize=(6, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    x = [row[truth] for row in values.values()]
    for sim in result["settings"]["sim_agents"]:
        if sim == truth:
            continue
        rho = result["spearman"][truth][sim]
        ax.scatter(x, [row[sim] for row in values.values()], s=14, label=f"{sim} (rho {rho:.2f})")
    if x:
        low, high = min(x), max(x)
        ax.plot([low, high], [low, high], color="#777777", linewidth=1, label="agreement")
    ax.set_xlabel(f"planner value under {truth}")
    ax.set_ylabel("planner value under the sim-agent model")
    ax.set_title("policy evaluation: planner values")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def markdown_tables(result: dict) -> str:
    """The values, the agreement with the ground truth and both matrices as Markdown."""
    sims = result["settings"]["sim_agents"]
    truth = result["ground_truth"]

    def number(x: float | None) -> str:
        return "nan" if x is None or x != x else f"{x:.4f}"

    def table(header: list[str], rows: list[list[str]]) -> str:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)

    scenarios = len(result["settings"]["scenarios"])
    parts = [
        f"Planner values (mean return over {scenarios} scenarios) under each sim-agent model:\n",
        table(["planner", *sims], [[p, *(number(v[s]) for s in sims)] for p, v in result["values"].items()]),
        f"\nAgreement with {truth} over {len(result['values'])} planners:\n",
        table(
            ["sim agents", f"Spearman vs {truth}", f"MAE vs {truth}"],
            [[s, number(result["spearman"][truth][s]), number(result["mae"][truth][s])] for s in sims],
        ),
    ]
    for key, title in (("spearman", "Spearman rank correlation"), ("mae", "Mean absolute error")):
        parts.append(f"\n{title}, sim agents x sim agents:\n")
        parts.append(table(["", *sims], [[a, *(number(result[key][a][b]) for b in sims)] for a in sims]))
    return "\n".join(parts)
