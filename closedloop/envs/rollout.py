"""Roll policies out in the batched core and write ``closedloop rollout`` files."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from closedloop.data.batch import collate_scenarios
from closedloop.data.scenario import Scenario
from closedloop.envs.core import SimState, global_trajectories, reset, step
from closedloop.envs.dynamics import Dynamics
from closedloop.envs.events import EventTracker
from closedloop.metrics.rollouts import save_rollouts
from closedloop.paths import scenario_path

Policy = Callable[[SimState, Dynamics], torch.Tensor]


def run_episode(state: SimState, policy: Policy, dynamics: Dynamics) -> SimState:
    """Step ``policy`` until the end of the scenarios (step 90)."""
    if (state.num_steps - 1 - state.t) % dynamics.chunk:
        raise ValueError(f"{dynamics.name} moves {dynamics.chunk} steps at a time, which does not "
                         f"divide the {state.num_steps - 1 - state.t} steps left")
    while not state.done:
        state = step(state, policy(state, dynamics), dynamics)
    return state


def count_events(state: SimState, policy: Policy, dynamics: Dynamics,
                 agents: torch.Tensor | None = None) -> tuple[SimState, dict[str, int]]:
    """Step ``policy`` to the end, counting the steps at which ``agents`` ``[B, N]``
    (default: the controlled ones) collide, leave the road or run a red light."""
    agents = state.controlled if agents is None else agents
    tracker = EventTracker(state)
    counts = {"collision": 0, "offroad": 0, "red_light": 0}
    while not state.done:
        nxt = step(state, policy(state, dynamics), dynamics)
        events = tracker(state, nxt)
        state = nxt
        for key in counts:
            counts[key] += int((events[key] & agents).sum())
    return state, counts


def rollout_scenarios(scenarios: Iterable[Scenario], policy: Policy, dynamics: Dynamics,
                      num_rollouts: int = 32, batch_size: int = 8, device: str = "cpu",
                      seed: int = 0) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Yield ``(scenario_id, object_ids [A], trajectories [R, A, 80, 4])`` per scenario,
    the WOSAC objects (valid at step 10) controlled by ``policy``, in track order."""
    generator = torch.Generator().manual_seed(seed)
    pending: list[Scenario] = []

    def flush():
        batch = collate_scenarios(pending).to(device)
        runs = []
        for _ in range(num_rollouts):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
            final = run_episode(reset(batch), policy, dynamics)
            cur = batch.current_time_index
            runs.append(global_trajectories(final, cur + 1, final.num_steps).cpu())
        traj = torch.stack(runs, dim=1)  # [B, R, N, 80, 4]
        controlled = final.controlled.cpu()
        for b, scenario in enumerate(pending):
            agents = torch.nonzero(controlled[b]).squeeze(-1)
            ids = batch.agent_id[b, agents].cpu().numpy()
            yield scenario.scenario_id, ids, traj[b][:, agents].numpy().astype(np.float32)
        pending.clear()

    for scenario in scenarios:
        pending.append(scenario)
        if len(pending) >= batch_size:
            yield from flush()
    if pending:
        yield from flush()


def write_rollouts(results: Iterable[tuple[str, np.ndarray, np.ndarray]], out: str | Path) -> list[Path]:
    """Write ``DIR/<scenario_id>.npz`` for each result; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for sid, ids, traj in results:
        path = scenario_path(out, sid, ".npz")
        save_rollouts(path, sid, ids, traj)
        paths.append(path)
    return paths
