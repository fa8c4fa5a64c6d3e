"""Roll policies out on the env core and write ``closedloop rollout`` files."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from closedloop.data.batch import collate_scenarios, select_scenarios
from closedloop.data.scenario import Scenario
from closedloop.envs.core import SimState, global_trajectories, reset
from closedloop.envs.dynamics import Dynamics
from closedloop.envs.env import EnvConfig, EnvCore
from closedloop.metrics.rollouts import save_rollouts
from closedloop.paths import scenario_path


def _policy(policy):
    from closedloop.agents.policy import as_policy

    return as_policy(policy)


def _check_chunks(state: SimState, dynamics: Dynamics) -> None:
    if (state.num_steps - 1 - state.t) % dynamics.chunk:
        raise ValueError(
            f"{dynamics.name} moves {dynamics.chunk} steps at a time, which does not "
            f"divide the {state.num_steps - 1 - state.t} steps left"
        )


EVENTS = ("collision", "offroad", "red_light")
"""The events of :mod:`closedloop.envs.events` that rollouts can flag per agent."""


def _episode(
    state: SimState, policy, dynamics: Dynamics, generator: torch.Generator | None, events: bool
) -> tuple[SimState, dict[str, torch.Tensor] | None]:
    """Step ``policy`` to the end; with ``events``, also which agents ``[B, N]`` had each of
    :data:`EVENTS` at least once (the env core's own events, ORed over the transitions)."""
    _check_chunks(state, dynamics)
    env = EnvCore(state, EnvConfig(dynamics), track_events=events)
    policy = _policy(policy)
    policy.reset(state, dynamics, generator)
    flags = {key: torch.zeros_like(state.controlled) for key in EVENTS} if events else None
    while not env.done:
        transition = env.step(policy.act(env.state))
        if flags is not None:
            for key in EVENTS:
                flags[key] |= transition.events[key]
    return env.state, flags


def run_episode(state: SimState, policy, dynamics: Dynamics, generator: torch.Generator | None = None) -> SimState:
    """Step ``policy`` (see :mod:`closedloop.agents.policy`) from ``state`` to the end of the
    scenarios (step 90); returns the final state."""
    return _episode(state, policy, dynamics, generator, events=False)[0]


def episode_events(
    state: SimState, policy, dynamics: Dynamics, generator: torch.Generator | None = None
) -> tuple[SimState, dict[str, torch.Tensor]]:
    """Step ``policy`` to the end; returns the final state and, for each of :data:`EVENTS`,
    a ``[B, N]`` bool tensor of the agents that had that event at least once (at the steps
    the env core checks: collision and off-road after each action, i.e. every
    ``dynamics.chunk`` steps, red lights at every step). Mask it with ``state.controlled``
    for the agents the policy drove."""
    final, flags = _episode(state, policy, dynamics, generator, events=True)
    return final, flags


def count_events(
    state: SimState,
    policy,
    dynamics: Dynamics,
    agents: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[SimState, dict[str, int]]:
    """Step ``policy`` to the end, counting the steps at which ``agents`` ``[B, N]``
    (default: the controlled ones) collide, leave the road or run a red light."""
    _check_chunks(state, dynamics)
    agents = state.controlled if agents is None else agents
    env = EnvCore(state, EnvConfig(dynamics))
    policy = _policy(policy)
    policy.reset(state, dynamics, generator)
    counts = {
        key: torch.zeros((), dtype=torch.long, device=state.device) for key in ("collision", "offroad", "red_light")
    }
    while not env.done:
        events = env.step(policy.act(env.state)).events
        for key in counts:
            counts[key] += (events[key] & agents).sum()
    return env.state, {key: int(value) for key, value in counts.items()}


def rollout_scenarios(
    scenarios: Iterable[Scenario],
    policy,
    dynamics: Dynamics,
    num_rollouts: int = 32,
    batch_size: int = 8,
    device: str = "cpu",
    seed: int = 0,
    rollouts_together: int = 1,
    events: bool = False,
) -> Iterator[tuple]:
    """Yield ``(scenario_id, object_ids [A], trajectories [R, A, 80, 4])`` per scenario,
    the WOSAC objects (valid at step 10) controlled by ``policy``, in track order.

    With ``events``, yield ``(scenario_id, object_ids, trajectories, flags)`` where ``flags``
    maps each of :data:`EVENTS` to a bool array ``[R, A]``: whether that object had the
    event at least once in that rollout (see :func:`episode_events`). The trajectories are
    the same either way.

    ``batch_size`` scenarios are simulated together, each ``rollouts_together`` times in
    one batch (learned policies run much faster on one batch of 32 copies than on 32
    batches). Each episode hands the policy a ``torch.Generator`` seeded from ``seed``; the
    global torch RNG is seeded the same way for policies that ignore it."""
    if num_rollouts < 1 or rollouts_together < 1 or batch_size < 1:
        raise ValueError(
            f"num_rollouts ({num_rollouts}), rollouts_together ({rollouts_together}) and batch_size ({batch_size}) "
            "must be positive"
        )
    policy = _policy(policy)
    seeds = torch.Generator().manual_seed(seed)
    pending: list[Scenario] = []

    def flush():
        runs, run_flags = [], []
        B = len(pending)
        scenes = collate_scenarios(pending).to(device)
        for first in range(0, num_rollouts, rollouts_together):
            copies = min(rollouts_together, num_rollouts - first)
            batch = select_scenarios(scenes, list(range(B)) * copies) if copies > 1 else scenes
            rollout_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=seeds))
            torch.manual_seed(rollout_seed)
            generator = torch.Generator(device=device).manual_seed(rollout_seed)
            final, flags = _episode(reset(batch), policy, dynamics, generator, events)
            cur = batch.current_time_index
            traj = global_trajectories(final, cur + 1, final.num_steps).cpu()  # [copies * B, N, 80, 4]
            runs.extend(traj.view(copies, B, *traj.shape[1:]).unbind(0))
            if events:  # [copies * B, N] per event -> copies x [E, B, N]
                stacked = torch.stack([flags[key] & final.controlled for key in EVENTS]).cpu()
                run_flags.extend(stacked.view(len(EVENTS), copies, B, -1).unbind(1))
        traj = torch.stack(runs, dim=1)  # [B, R, N, 80, 4]
        flags = torch.stack(run_flags, dim=2).numpy() if events else None  # [E, B, R, N]
        controlled = final.controlled.cpu()
        for b, scenario in enumerate(pending):
            agents = torch.nonzero(controlled[b]).squeeze(-1)
            ids = scenes.agent_id[b, agents].cpu().numpy()
            result = (scenario.scenario_id, ids, traj[b][:, agents].numpy().astype(np.float32))
            if events:
                cols = agents.numpy()
                result += ({key: flags[e, b][:, cols] for e, key in enumerate(EVENTS)},)
            yield result
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
