"""The batched simulator core: dynamics, expert replay, events, bad input, rollouts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from closedloop.agents.baselines import ConstantVelocity, Expert
from closedloop.data import collate_scenarios
from closedloop.envs import SimulationError, collisions, make_dynamics, reset, step
from closedloop.envs.rollout import count_events, rollout_scenarios, run_episode
from scenes import make_scenario, straight


def _random_states(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * 100 - 50
    yaw = torch.rand(n, generator=g, dtype=torch.float64) * 2 * math.pi - math.pi
    speed = torch.rand(n, generator=g, dtype=torch.float64) * 15 + 1
    return torch.stack([xy[:, 0], xy[:, 1], yaw, speed * torch.cos(yaw), speed * torch.sin(yaw)], -1)


@pytest.mark.parametrize("name", ["delta_global", "delta_local", "state", "trajectory", "bicycle"])
def test_inverse_recovers_the_action(name):
    dynamics = make_dynamics(name)
    state = _random_states(500)
    g = torch.Generator().manual_seed(1)
    low = torch.tensor(dynamics.spec.low, dtype=torch.float64)
    high = torch.tensor(dynamics.spec.high, dtype=torch.float64)
    if name in ("state", "trajectory"):
        low, high = (
            torch.tensor([-5.0, -5.0, -1.0], dtype=torch.float64),
            torch.tensor([5.0, 5.0, 1.0], dtype=torch.float64),
        )
    shape = (500, *dynamics.spec.shape)
    action = low + (high - low) * torch.rand(shape, generator=g, dtype=torch.float64)
    if name == "state":
        action[:, :2] += state[:, :2]
    target = dynamics.forward(state, action)
    assert target.shape == (500, dynamics.chunk, 5)
    again = dynamics.forward(state, dynamics.inverse(state, target))
    assert torch.allclose(again[..., :3], target[..., :3], atol=1e-6)


def test_tokens_pick_their_own_chunk():
    g = torch.Generator().manual_seed(0)
    vocabulary = torch.cumsum(torch.rand(64, 5, 3, generator=g) * torch.tensor([1.5, 0.3, 0.05]), dim=1)
    dynamics = make_dynamics("tokens", vocabulary=vocabulary)
    state = _random_states(64).float()
    tokens = torch.arange(64)
    assert torch.equal(dynamics.inverse(state, dynamics.forward(state, tokens)), tokens)
    with pytest.raises(SimulationError, match="integer"):
        dynamics.check_action(tokens.float(), (64,))
    inside, outside = dynamics.bound(tokens + 1)
    assert outside.tolist() == [False] * 63 + [True] and int(inside.max()) == 63


@pytest.mark.parametrize("name, bound", [("delta_global", 1e-3), ("delta_local", 1e-3)])
def test_expert_reproduces_the_log_exactly(real_scenarios, name, bound):
    batch = collate_scenarios([real_scenarios["637f20cafde22ff8"]])
    final = run_episode(reset(batch), Expert(), make_dynamics(name))
    error = torch.linalg.norm(final.pose[:, :, 11:, :2] - batch.agent_xyz[:, :, 11:, :2], dim=-1)
    mask = batch.agent_valid[:, :, 11:] & final.controlled[..., None]
    assert error[mask].max() < bound


def test_expert_with_the_bicycle_stays_close(real_scenarios):
    batch = collate_scenarios([real_scenarios["637f20cafde22ff8"]])
    final = run_episode(reset(batch), Expert(), make_dynamics("bicycle"))
    error = torch.linalg.norm(final.pose[:, :, 11:, :2] - batch.agent_xyz[:, :, 11:, :2], dim=-1)
    mask = batch.agent_valid[:, :, 11:] & final.controlled[..., None]
    assert error[mask].mean() < 0.1  # measured: 0.041 m


def test_uncontrolled_agents_follow_the_log_and_late_agents_appear(real_scenarios):
    scenario = real_scenarios["637f20cafde22ff8"]
    batch = collate_scenarios([scenario])
    final = run_episode(reset(batch, controlled="sdc"), ConstantVelocity(), make_dynamics("delta_global"))
    others = ~final.controlled
    assert torch.equal(final.pose[others][..., :2], batch.agent_xyz[others][..., :2])
    late = batch.agent_mask[0] & ~batch.agent_valid[0, :, 10] & batch.agent_valid[0, :, 11:].any(-1)
    assert late.any() and torch.equal(final.valid[0, late], batch.agent_valid[0, late])
    assert final.controlled.sum() == 1 and final.controlled[batch.is_sdc].all()


def test_collisions_of_two_overlapping_cars():
    cars = [{"xy": straight(0.0, 0.0, 5.0)}, {"xy": straight(3.0, 0.0, 5.0)}, {"xy": straight(0.0, 10.0, 5.0)}]
    batch = collate_scenarios([make_scenario(cars)])
    state = reset(batch)
    assert collisions(state).tolist() == [[True, True, False]]


def test_bad_input_is_a_clear_error(real_scenarios):
    batch = collate_scenarios([real_scenarios["637f20cafde22ff8"]])
    dynamics = make_dynamics("delta_local")
    state = reset(batch)
    B, N = state.controlled.shape
    action = torch.zeros(B, N, 3)
    action[0, 5, 1] = float("nan")
    track = int(batch.agent_id[0, 5])
    with pytest.raises(SimulationError, match=f"NaN/inf at step 10 for scenario 637f20cafde22ff8 track {track}"):
        step(state, action, dynamics)
    with pytest.raises(SimulationError, match=rf"shape \[1, {N}, 3\]"):
        step(state, torch.zeros(B, N, 2), dynamics)
    final = run_episode(state, Expert(), dynamics)
    with pytest.raises(SimulationError, match="the episode ends at step 90"):
        step(final, torch.zeros(B, N, 3), dynamics)
    not_valid = ~batch.agent_valid[:, :, 10] & batch.agent_mask
    with pytest.raises(SimulationError, match="controlled agents must be valid at step 10"):
        reset(batch, controlled=not_valid)
    with pytest.raises(ValueError, match="unknown dynamics 'warp'"):
        make_dynamics("warp")


def test_rollouts_are_scored_like_the_log(real_scenarios):
    from closedloop.metrics import score_scenario

    scenario = real_scenarios["637f20cafde22ff8"]
    ((sid, ids, traj),) = rollout_scenarios([scenario], Expert(), make_dynamics("delta_global"), num_rollouts=2)
    assert sid == scenario.scenario_id and traj.shape == (2, len(ids), 80, 4)
    assert np.array_equal(ids, scenario.track_id[scenario.valid_at_current()])
    score = score_scenario(scenario, ids, traj)
    assert score["min_average_displacement_error"] < 1e-3


def test_idm_follows_lanes_brakes_for_leaders_and_red_lights():
    from closedloop.agents.baselines import IDM
    from closedloop.data.synthetic import generate_scenarios

    batch = collate_scenarios(list(generate_scenarios(4, seed=9, town="cross")))
    totals = {}
    for policy in (IDM(), ConstantVelocity()):
        state = reset(batch)
        vehicles = (batch.agent_type == 1) & state.controlled
        _, totals[type(policy).__name__] = count_events(state, policy, make_dynamics("bicycle"), vehicles)
    idm, cv = totals["IDM"], totals["ConstantVelocity"]
    assert idm["red_light"] == 0 < cv["red_light"]
    assert idm["collision"] * 5 < cv["collision"]
    assert idm["offroad"] == 0  # lane following keeps every vehicle on the road


def test_normalized_and_discretized_actions():
    state = _random_states(200)
    normalized = make_dynamics("bicycle", normalize=True)
    assert normalized.spec.low == (-1.0, -1.0) and normalized.spec.high == (1.0, 1.0)
    g = torch.Generator().manual_seed(3)
    action = torch.rand(200, 2, generator=g, dtype=torch.float64) * 2 - 1
    target = normalized.forward(state, action)
    assert torch.allclose(normalized.inverse(state, target), action, atol=1e-6)
    discrete = make_dynamics("delta_local", bins=11)
    index = torch.randint(0, 11, (200, 3), generator=g)
    target = discrete.forward(state, index)
    again = discrete.forward(state, discrete.inverse(state, target))  # +-pi are one heading
    assert torch.allclose(again[..., :2], target[..., :2], atol=1e-6)
    assert torch.allclose(torch.cos(again[..., 2] - target[..., 2]), torch.ones(200, 1, dtype=torch.float64))
    with pytest.raises(SimulationError, match=r"integer indices in \[0, 11\)"):
        discrete.check_action(index.float(), (200,))
    assert discrete.bound(index + 11)[1].all()


def test_rollouts_share_history_and_branches_copy_it(real_scenarios):
    batch = collate_scenarios([real_scenarios["637f20cafde22ff8"]])
    dynamics = make_dynamics("delta_local")
    start = reset(batch)
    B, N = start.controlled.shape
    ahead, left = torch.zeros(B, N, 3), torch.zeros(B, N, 3)
    ahead[..., 0], left[..., 1] = 0.5, 0.5
    first = step(start, ahead, dynamics)
    second = step(first, ahead, dynamics)
    assert second.history is start.history  # no copy along one rollout
    branch = step(first, left, dynamics)  # first stepped again: a branch, on its own copy
    assert branch.history is not first.history
    ctrl = start.controlled
    assert torch.equal(branch.pose[:, :, :12], second.pose[:, :, :12])  # shared past
    assert not torch.allclose(branch.pose[ctrl][:, 12, :2], second.pose[ctrl][:, 12, :2])
    third = step(second, ahead, dynamics)  # the first rollout goes on, unaffected
    expected = step(step(step(reset(batch), ahead, dynamics), ahead, dynamics), ahead, dynamics)
    assert torch.equal(third.pose[:, :, :14], expected.pose[:, :, :14])
    assert torch.equal(first.current, expected.pose[:, :, 11])  # history up to t never changes


@pytest.mark.parametrize("name", ["bicycle", "delta_local", "trajectory"])
def test_moving_only_the_controlled_slots_equals_moving_all(real_scenarios, name):
    """``step(..., movers=...)`` (the dynamics run on the controlled agents' slots only)
    gives the states of the dense step: a scenario with one controlled agent, one with
    three and one with none, agents held, bad values still caught and named."""
    from closedloop.envs.core import agent_slots

    scenarios = list(real_scenarios.values())
    batch = collate_scenarios([scenarios[0], scenarios[-1], scenarios[0]], max_agents=128, pad_agents=True)
    controlled = torch.zeros_like(batch.agent_mask)
    valid = batch.agent_valid[:, :, batch.current_time_index] & batch.agent_mask
    controlled[0] = batch.is_sdc[0]
    controlled[1, torch.nonzero(valid[1]).flatten()[:3]] = True
    dynamics = make_dynamics(name)
    generator = torch.Generator().manual_seed(0)
    spec = dynamics.spec
    low, high = torch.tensor(spec.low), torch.tensor(spec.high)
    dense, sparse = reset(batch, controlled), reset(batch, controlled)
    movers = agent_slots(controlled)
    assert movers[0].shape[1] == 3 and not bool(movers[1][2].any())
    hold = torch.zeros_like(controlled)
    for i in range(6):
        actions = low + (high - low) * torch.rand((*controlled.shape, *spec.shape), generator=generator) * 0.5
        hold[1, movers[0][1, 0]] = i >= 3
        dense = step(dense, actions, dynamics, hold=hold)
        sparse = step(sparse, actions, dynamics, hold=hold, movers=movers)
        assert torch.equal(dense.pose, sparse.pose) and torch.equal(dense.z, sparse.z), i
    actions[1, movers[0][1, 1]] = float("nan")
    with pytest.raises(SimulationError, match="NaN"):
        step(sparse, actions, dynamics, movers=movers)


def test_an_env_core_with_few_controlled_agents_moves_only_them(real_scenarios):
    """The SDCs of 4 scenarios padded to 128 slots (512): the core moves the 4 slots only,
    and its episode equals the one of a core made to move every slot."""
    from closedloop.envs.env import EnvConfig, EnvCore

    scenarios = list(real_scenarios.values())
    batch = collate_scenarios([scenarios[i % len(scenarios)] for i in range(4)], max_agents=128, pad_agents=True)
    config = EnvConfig(make_dynamics("bicycle"), terminate_on_collision=True)
    sparse, dense = EnvCore(batch, config, controlled="sdc"), EnvCore(batch, config, controlled="sdc")
    assert sparse._movers is not None and sparse._movers[0].shape == (4, 1)
    dense._movers = None
    generator = torch.Generator().manual_seed(1)
    while not sparse.done:
        actions = (torch.rand(4, 128, 2, generator=generator) - 0.5) * torch.tensor([8.0, 0.4])
        a, b = sparse.step(actions), dense.step(actions)
        assert torch.equal(a.state.pose, b.state.pose) and torch.equal(a.rewards, b.rewards)
        assert all(torch.equal(a.events[k].nan_to_num(), b.events[k].nan_to_num()) for k in a.events)
    one = collate_scenarios(scenarios[:1])
    assert EnvCore(one, config, controlled="sdc")._movers is None  # one scenario: every slot
