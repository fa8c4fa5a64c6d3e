"""Evaluate a policy in one pass: closed-loop rollouts, WOSAC metrics and event rates.

``evaluate_policy(scenarios, policy, dynamics, ...)`` is what ``closedloop evaluate`` runs
and what a training loop calls for periodic evaluation on held-out scenarios. It rolls
``policy`` out ``num_rollouts`` times on each scenario (:func:`closedloop.envs.rollout.
rollout_scenarios`, the rollouts ``closedloop rollout`` writes for the same settings),
scores the rollouts with the WOSAC metrics (the numbers ``closedloop metrics`` gives on
those files) and flags the env core's events (:mod:`closedloop.envs.events`) per agent.

The result (also ``OUT/evaluation.json`` with ``out``)::

    {
      "settings": {"policy": ..., "num_rollouts": R, "seed": S, "dynamics": ..., ...},
      "scenarios": [per-scenario dict, ...],   # in input order
      "all": {"scenario_id": "ALL", ...},
    }

Each per-scenario dict is the one ``closedloop metrics --json`` prints (the
:data:`closedloop.metrics.config.FIELDS` of :func:`~closedloop.metrics.wosac.score_scenario`
plus the :func:`~closedloop.metrics.wosac.buckets`) with three more fields,
``collision_rate``, ``offroad_rate`` and ``red_light_rate``: the fraction of
(object valid at step 10, rollout) pairs in which that object, driven by the policy,
had at least one such event during the 80 simulated steps (the env core's events, as the
env checks them: collisions and off-road after each action, i.e. every ``dynamics.chunk``
steps, red-light crossings at every step). ``all`` is
:func:`~closedloop.metrics.wosac.aggregate` (the mean of each metric over scenarios) and
its buckets, with the three rates **pooled over every (object, rollout) pair of every
scenario** (not a mean of the per-scenario rates: a scenario with many objects weighs
more).

The same three rates for the SDC alone (``sdc_collision_rate``, ``sdc_offroad_rate``,
``sdc_red_light_rate``: the fraction of rollouts in which the SDC had the event; NaN where
the SDC is not one of the scored objects; in ``all`` pooled over the (scenario, rollout)
pairs that have it) judge an ego planner such as the GMM ego policy, whose other agents
follow the log.
"""

from __future__ import annotations

import json
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from closedloop.data.scenario import Scenario
from closedloop.envs.dynamics import Dynamics
from closedloop.envs.rollout import EVENTS, rollout_scenarios

RATES = {"collision": "collision_rate", "offroad": "offroad_rate", "red_light": "red_light_rate"}
"""Each event of :data:`closedloop.envs.rollout.EVENTS` and the name of its rate."""
SDC_RATES = {key: f"sdc_{name}" for key, name in RATES.items()}
"""The same rates for the SDC alone."""

RESULT_FILE = "evaluation.json"


def _rng_devices(device: str | torch.device) -> list:
    device = torch.device(device)
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def evaluate_policy(
    scenarios: Iterable[Scenario],
    policy,
    dynamics: Dynamics,
    num_rollouts: int = 32,
    seed: int = 0,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    rollouts_together: int = 1,
    config: str = "2025",
    out: str | Path | None = None,
    progress: bool = False,
    settings: dict | None = None,
    on_scenario: Callable[[dict], None] | None = None,
) -> dict:
    """Roll ``policy`` out on ``scenarios``, score the rollouts and count events; returns
    ``{"settings", "scenarios", "all"}`` (see the module docstring).

    ``policy``: a policy object (:mod:`closedloop.agents.policy`; anything
    :func:`~closedloop.agents.policy.as_policy` takes) driving ``dynamics``. The rollouts
    are those of :func:`~closedloop.envs.rollout.rollout_scenarios` with the same
    ``num_rollouts``, ``seed``, ``batch_size`` and ``rollouts_together`` (which together
    decide each episode's seed), so the result is deterministic for them. The global torch
    RNG (CPU, and ``device``'s when it is a GPU), which rollouts seed, is restored on
    return, so evaluating in the middle of training leaves its random stream alone; the
    policy itself is used as it is (a token policy puts its model in eval mode on every
    episode: a training loop sets ``train()`` again afterwards).

    ``scenarios`` may be any iterable (it is read once, ``batch_size`` scenarios at a time,
    and only those are kept). ``config``: the WOSAC config, ``"2025"`` or ``"2024"``.
    ``out``: a directory for ``<scenario_id>.npz`` rollout files (the format of
    ``closedloop rollout``) and ``evaluation.json`` (the result, written atomically).
    ``progress``: a tqdm bar over scenarios on stderr. ``settings``: more entries for the
    result's settings (the CLI adds the policy spec, ``top_k`` and ``temperature``).
    ``on_scenario``: called with each per-scenario dict as soon as it is scored. Nothing is
    printed."""
    from tqdm import tqdm

    from closedloop.agents.policy import as_policy
    from closedloop.metrics.rollouts import save_rollouts
    from closedloop.metrics.wosac import aggregate, buckets, score_scenarios
    from closedloop.paths import scenario_path

    policy = as_policy(policy)
    total = len(scenarios) if hasattr(scenarios, "__len__") else None
    run_settings = {
        "policy": getattr(policy, "__name__", type(policy).__name__),
        "num_rollouts": num_rollouts,
        "seed": seed,
        "dynamics": dynamics.name,
        "batch_size": batch_size,
        "rollouts_together": rollouts_together,
        "config": config,
        **(settings or {}),
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
    taken: deque[Scenario] = deque()  # scenarios handed to the rollouts, not yet scored

    def feed() -> Iterator[Scenario]:
        for scenario in scenarios:
            taken.append(scenario)
            yield scenario

    rows: list[dict] = []
    events = np.zeros(len(EVENTS), np.int64)  # pooled over every (object, rollout) pair
    pairs = 0
    sdc_events = np.zeros(len(EVENTS), np.int64)  # pooled over (scenario, rollout) pairs with the SDC scored
    sdc_pairs = 0
    pending: list[tuple[Scenario, np.ndarray, np.ndarray, dict[str, np.ndarray]]] = []

    def score() -> None:
        nonlocal events, pairs, sdc_events, sdc_pairs
        items = [(scenario, ids, traj) for scenario, ids, traj, _ in pending]
        for row, (scenario, ids, _, flags) in zip(
            score_scenarios(items, config, device, batch_size=len(items)), pending
        ):
            row.update(buckets(row, config))
            counts = np.array([int(flags[key].sum()) for key in EVENTS])
            size = flags[EVENTS[0]].size
            for key, count in zip(EVENTS, counts):
                row[RATES[key]] = count / size if size else float("nan")
            events += counts
            pairs += size
            column = np.flatnonzero(ids == scenario.track_id[scenario.sdc_track_index])
            rollouts = flags[EVENTS[0]].shape[0] if column.size else 0
            sdc_counts = np.array([int(flags[key][:, column].sum()) for key in EVENTS])
            for key, count in zip(EVENTS, sdc_counts):
                row[SDC_RATES[key]] = count / rollouts if rollouts else float("nan")
            sdc_events += sdc_counts
            sdc_pairs += rollouts
            rows.append(row)
            if on_scenario is not None:
                on_scenario(row)
        pending.clear()

    with torch.random.fork_rng(devices=_rng_devices(device)):
        results = rollout_scenarios(
            feed(),
            policy,
            dynamics,
            num_rollouts,
            batch_size=batch_size,
            device=str(device),
            seed=seed,
            rollouts_together=rollouts_together,
            events=True,
        )
        bar = tqdm(results, total=total, desc="evaluate", unit="scenario", disable=not progress, file=sys.stderr)
        for sid, ids, traj, flags in bar:
            scenario = taken.popleft()
            assert scenario.scenario_id == sid
            if out is not None:
                save_rollouts(scenario_path(out, sid, ".npz"), sid, ids, traj)
            pending.append((scenario, ids, traj, flags))
            if len(pending) >= batch_size:
                score()
        if pending:
            score()
    if not rows:
        raise ValueError("no scenarios to evaluate")
    total_row = aggregate(rows)
    total_row.update(buckets(total_row, config))
    for key, count in zip(EVENTS, events):
        total_row[RATES[key]] = int(count) / pairs if pairs else float("nan")
    for key, count in zip(EVENTS, sdc_events):
        total_row[SDC_RATES[key]] = int(count) / sdc_pairs if sdc_pairs else float("nan")
    result = {"settings": run_settings, "scenarios": rows, "all": total_row}
    if out is not None:
        from closedloop._atomic import atomic_write

        with atomic_write(out / RESULT_FILE, "w") as handle:
            json.dump(result, handle, indent=1)
            handle.write("\n")
    return result
