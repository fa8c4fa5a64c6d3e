"""The tokenized traffic model as a sim-agent policy: rollouts, caches, seeds, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cli import run

from closedloop.agents.token_policy import TokenPolicy
from closedloop.constants import TYPE_PEDESTRIAN
from closedloop.data import collate_scenarios
from closedloop.envs import SimulationError, make_dynamics, reset, step
from closedloop.envs.rollout import run_episode


@pytest.fixture(scope="module")
def scenes():
    from closedloop.data.synthetic import generate_scenarios

    return list(generate_scenarios(2, seed=21, town="grid", agents=(12, 16)))


@pytest.fixture(scope="module")
def policy():
    return TokenPolicy.untrained("micro", seed=0)


def test_rollouts_are_seeded_and_stay_in_each_kinds_vocabulary(scenes, policy):
    batch = collate_scenarios(scenes)
    dynamics = policy.make_dynamics()
    runs = [run_episode(reset(batch), policy, dynamics, torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert torch.equal(runs[0].pose, runs[1].pose) and not torch.equal(runs[0].pose, runs[2].pose)
    # Tokens drawn for pedestrians come from the (smaller) pedestrian vocabulary.
    state = reset(batch)
    policy.reset(state, dynamics, torch.Generator().manual_seed(3))
    tokens = policy.act(state)
    walkers = (batch.agent_type == TYPE_PEDESTRIAN) & state.controlled
    assert walkers.any() and int(tokens[walkers].max()) < int(policy.sizes[1])
    assert torch.isfinite(runs[0].pose[runs[0].controlled]).all()


def test_the_cache_follows_the_rollout_and_refuses_other_states(scenes, policy):
    batch = collate_scenarios(scenes[:1])
    dynamics = policy.make_dynamics()
    start = reset(batch)
    policy.reset(start, dynamics, torch.Generator().manual_seed(0))
    first = policy.act(start)
    after = step(start, first, dynamics)
    policy.act(after)  # the next state: one incremental decoder step
    ctrl = start.controlled
    # The decoder was fed exactly the tokens that were executed (recovered by the inverse).
    assert torch.equal(policy.cache.last_token[ctrl], first[ctrl])
    with pytest.raises(SimulationError, match="not on it"):
        policy.act(start)  # an older state
    branch = step(start, (first + 1) % int(policy.sizes.min()), dynamics)
    with pytest.raises(SimulationError, match="not on it"):
        policy.act(step(branch, first, dynamics))
    policy.reset(branch, dynamics)  # starting again from the branch works
    policy.act(branch)
    with pytest.raises(SimulationError, match="tokens dynamics of its vocabulary"):
        policy.reset(start, make_dynamics("delta_local"))


def test_cached_distribution_equals_a_full_forward_pass(scenes, policy):
    from closedloop.agents.map_tokens import map_tokens
    from closedloop.agents.tokens import tokenize

    batch = collate_scenarios(scenes[:1])
    dynamics = policy.make_dynamics()
    state = reset(batch)
    policy.reset(state, dynamics, torch.Generator().manual_seed(0))
    executed = []
    for _ in range(3):
        executed.append(policy.act(state))
        state = step(state, executed[-1], dynamics)
    cached = policy.distribution(state).logits  # for the token starting at step 25
    # The same inputs in one teacher-forced pass: the logged history as two tokens, then the
    # executed tokens from the real poses at steps 10, 15, 20 and 25 (a dummy last token:
    # causality keeps it out of the logits at its own element).
    history = tokenize(
        policy.vocabulary,
        state.pose[:, :, :11, :2],
        state.pose[:, :, :11, 2],
        state.valid[:, :, :11] & batch.agent_mask[..., None],
        batch.agent_type,
    )
    # Agents that follow the log (they appear after step 10) executed the tokens nearest their motion.
    for i, t in enumerate((10, 15, 20)):
        logged = dynamics.inverse(state.pose[:, :, t], state.pose[:, :, t + 1 : t + 6], batch.agent_type)
        executed[i] = torch.where(state.controlled, executed[i], logged)
    tokens = torch.cat([history.tokens, torch.stack(executed, -1), torch.zeros_like(executed[0])[..., None]], -1)
    poses = torch.cat([history.poses[:, :, :2], state.pose[:, :, 10::5, :3], state.pose[:, :, 25:26, :3]], 2)
    present = state.valid[:, :, 10::5] & batch.agent_mask[..., None]
    valid = torch.cat([history.token_valid, present], -1)
    logits = policy.model(
        tokens,
        poses,
        valid,
        batch.agent_type,
        map_tokens(batch, max_tokens=policy.max_map_tokens),
        vocabulary=policy.table,
    )
    full = logits[:, :, 5].masked_fill(~policy.mask, -float("inf"))
    ctrl = state.controlled
    assert torch.allclose(full[ctrl], cached[ctrl], atol=1e-4)


def test_cli_rolls_out_an_untrained_model_and_scores_it(tmp_path, scenario_file):
    out = tmp_path / "runs"
    proc = run("rollout", "--data", scenario_file, "--policy", "model:micro", "--num-rollouts", 4, "--out", out)
    assert "4 rollouts, policy model:micro, dynamics tokens" in proc.stdout
    traj = np.load(out / "637f20cafde22ff8.npz")["trajectories"]
    assert traj.shape == (4, 50, 80, 4) and np.isfinite(traj).all() and not np.array_equal(traj[0], traj[1])
    rows = [
        json.loads(x)
        for x in run("metrics", "--data", scenario_file, "--rollouts", out, "--json").stdout.split("\n")
        if x
    ]
    assert rows[-1]["scenario_id"] == "ALL" and 0 <= rows[-1]["metametric"] <= 1
    bad = run(
        "rollout",
        "--data",
        scenario_file,
        "--policy",
        "model:micro",
        "--dynamics",
        "bicycle",
        "--out",
        out,
        check=False,
    )
    assert bad.returncode == 2 and "leave out --dynamics" in bad.stderr
    bad = run("rollout", "--data", scenario_file, "--policy", "model:huge", "--out", out, check=False)
    assert bad.returncode == 2 and "unknown model size 'huge'" in bad.stderr
    info = json.loads(run("model-info", "--model", "micro", "--json").stdout)
    assert info["model"] == "micro" and info["parameters"] > 0
