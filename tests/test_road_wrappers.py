"""RoaD, plain-sampling and expert guidance: the choice, the recovery blend, both faces."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from closedloop.agents.tokens import default_vocabulary
from closedloop.envs import SimulationError, parallel_env
from closedloop.envs.vector import BatchedEnv
from closedloop.wrappers import Expert, RoaD, Sampling
from closedloop.wrappers.guidance import recovery_blend, road_choose
from closedloop.wrappers.road import ExpertParallel, RoaDBatched, RoaDParallel


@pytest.fixture(scope="module")
def scenarios():
    from closedloop.data.synthetic import generate_scenarios

    return list(generate_scenarios(1, seed=5, town="cross", agents=(8, 10)))


@pytest.fixture(scope="module")
def vocabulary():
    return default_vocabulary()


def test_recovery_blend_matches_the_formula_on_a_hand_made_case():
    # Chosen: straight along x at y = 0, heading 3.0; expert: 2 m to the left, heading -3.0
    # (the shorter arc between them crosses pi: 0.2832 rad).
    H, steps = 6, 4
    j = torch.arange(1, H + 1, dtype=torch.float64)
    chosen = torch.stack([j, 0 * j, 0 * j + 3.0], -1)
    expert = torch.stack([j, 0 * j + 2.0, 0 * j - 3.0], -1)
    valid = torch.tensor([True, True, True, True, True, False])
    out = recovery_blend(chosen, expert, valid, steps)
    w = [0.25, 0.5, 0.75, 1.0, 1.0, 0.0]  # min(j / 4, 1); 0 where the expert step is invalid
    arc = 2 * math.pi - 6.0
    for i, wi in enumerate(w):
        assert out[i, 0].item() == pytest.approx(i + 1)
        assert out[i, 1].item() == pytest.approx(2.0 * wi)
        heading = 3.0 + wi * arc
        heading = (heading + math.pi) % (2 * math.pi) - math.pi
        assert out[i, 2].item() == pytest.approx(heading)


def _line(y: float, H: int = 5) -> torch.Tensor:
    return torch.stack([torch.arange(1.0, H + 1), torch.full((H,), y), torch.zeros(H)], -1)


def test_road_choose_takes_the_weighted_nearest_and_recovers_only_beyond_the_distance():
    expert = _line(0.0)[None, None]  # [1, 1, 5, 3]
    valid = torch.ones(1, 1, 5, dtype=torch.bool)
    box = torch.tensor([[[4.0, 2.0]]])
    # Candidate 0 is 1 m off everywhere; candidate 1 is exact but 6 m off at the last step.
    far_end = _line(0.0)
    far_end[-1, 1] = 6.0
    candidates = torch.stack([_line(1.0), far_end])[None, None]  # [1, 1, 2, 5, 3]
    guided = torch.tensor([[True]])
    uniform = road_choose(candidates, expert, valid, box, guided)
    assert uniform.choice.item() == 0 and uniform.distance.item() == pytest.approx(1.0)
    late = road_choose(candidates, expert, valid, box, guided, weights=torch.tensor([0.0, 0, 0, 0, 1]))
    early = road_choose(candidates, expert, valid, box, guided, weights=torch.tensor([1.0, 1, 1, 1, 0]))
    assert late.choice.item() == 0 and early.choice.item() == 1 and early.distance.item() == pytest.approx(0.0)
    assert not uniform.recovery.any()
    assert torch.equal(uniform.poses, candidates[:, :, 0])
    # 4 m off: beyond 3 m, so blended toward the expert over 2 steps.
    off = _line(4.0)[None, None, None]
    blended = road_choose(off, expert, valid, box, guided, recovery_distance=3.0, recovery_steps=2)
    assert blended.recovery.item() and blended.distance.item() == pytest.approx(4.0)
    assert blended.poses[0, 0, :, 1].tolist() == pytest.approx([2.0, 0.0, 0.0, 0.0, 0.0])
    # Unguided agents and plain sampling take candidate 0 and never recover.
    assert road_choose(candidates, expert, valid, box, torch.tensor([[False]])).choice.item() == 0
    plain = road_choose(off, expert, valid, box, guided, select=False)
    assert plain.choice.item() == 0 and not plain.recovery.item()


def _trajectory_env(scenarios, k=4, horizon=None):
    return RoaD(parallel_env(scenarios, dynamics="trajectory"), k=k, horizon=horizon)


@pytest.mark.parametrize("dynamics", ["tokens", "trajectory"])
def test_wrapped_parallel_env_passes_the_api_test(scenarios, vocabulary, dynamics):
    from pettingzoo.test import parallel_api_test

    if dynamics == "tokens":
        inner = parallel_env(scenarios, dynamics="tokens", vocabulary=vocabulary.table())
        env = RoaD(inner, k=4, vocabulary=vocabulary)
    else:
        env = _trajectory_env(scenarios, k=3, horizon=8)
    assert isinstance(env, RoaDParallel)
    assert env.action_space(env.possible_agents[0]).shape == ((4,) if dynamics == "tokens" else (3, 8, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parallel_api_test(env, num_cycles=20)


def _expert_candidates(env, k: int, noise: float, generator: torch.Generator):
    """k local trajectories per agent: the log's next chunk plus noise (candidate i has i * noise)."""
    core = env.unwrapped.core
    action = core.guidance(expert=True).expert_action[0]  # [N, chunk, 3]
    scale = torch.arange(k, dtype=torch.float32)[:, None, None] * noise
    slot = {name: i for i, name in enumerate(env.unwrapped.names)}
    out = {}
    for agent in env.agents:
        jitter = torch.randn(k, *action.shape[1:], generator=generator) * scale
        jitter[..., 2] = 0
        out[agent] = (action[slot[agent]][None] + jitter).numpy().astype(np.float32)
    return out


def test_road_executes_the_nearest_of_noisy_expert_candidates(scenarios):
    env = _trajectory_env(scenarios, k=4)
    env.reset(seed=0)
    g = torch.Generator().manual_seed(0)
    # Shuffle the candidates: the wrapper must find the exact one wherever it is.
    actions = _expert_candidates(env, 4, 0.5, g)
    order = {agent: np.random.default_rng(i).permutation(4) for i, agent in enumerate(actions)}
    _, _, _, _, infos = env.step({agent: a[order[agent]] for agent, a in actions.items()})
    guided = [agent for agent, info in infos.items() if info["road_guided"]]
    assert guided
    for agent in guided:
        info = infos[agent]
        assert order[agent][info["road_choice"]] == 0, agent
        assert info["road_distance"] < 1e-3 and not info["recovery_mode"]
        np.testing.assert_allclose(info["executed_action"], actions[agent][0], atol=1e-4)


def test_batched_and_parallel_wrappers_make_the_same_choice(scenarios):
    g = torch.Generator().manual_seed(3)
    batched = RoaD(BatchedEnv(scenarios, batch_size=1, dynamics="trajectory"), k=5, recovery_distance=1.0)
    parallel = RoaD(parallel_env(scenarios, dynamics="trajectory"), k=5, recovery_distance=1.0)
    parallel.reset(seed=0)
    assert isinstance(batched, RoaDBatched)
    batched.reset(seed=0)
    names = parallel.unwrapped.names
    slot = {name: i for i, name in enumerate(names)}
    N = batched.state.controlled.shape[1]
    recovered = 0
    for _ in range(4):
        candidates = torch.randn(1, N, 5, 5, 3, generator=g) * torch.tensor([3.0, 1.0, 0.1]) + torch.tensor(
            [2.0, 0.0, 0.0]
        )
        _, _, _, _, infos = parallel.step({a: candidates[0, slot[a]].numpy() for a in parallel.agents})
        _, _, _, _, info = batched.step(candidates)
        for agent, agent_info in infos.items():
            i = slot[agent]
            assert agent_info["road_choice"] == int(info["road_choice"][0, i])
            assert agent_info["recovery_mode"] == bool(info["recovery_mode"][0, i])
            np.testing.assert_allclose(agent_info["executed_action"], info["executed_action"][0, i].numpy(), atol=1e-5)
            recovered += agent_info["recovery_mode"]
    assert recovered > 0  # random candidates are far from the log: recovery mode is exercised
    n = parallel.sim_state.pose.shape[1]
    assert torch.allclose(parallel.sim_state.pose, batched.state.pose[:, :n], atol=1e-4, equal_nan=True)


def _episode_error(env, candidates_for) -> float:
    env.reset(seed=0)
    while env.agents:
        env.step({agent: candidates_for(agent) for agent in env.agents})
    state = env.sim_state
    cur = state.batch.current_time_index
    valid = state.batch.agent_valid[:, :, cur + 1 :] & env.unwrapped.core.exposed[..., None]
    gap = torch.linalg.vector_norm(state.pose[:, :, cur + 1 :, :2] - state.batch.agent_xyz[:, :, cur + 1 :, :2], dim=-1)
    return float(gap[valid].mean())


def test_recovery_mode_pulls_a_bad_policy_back_to_the_log_and_sampling_does_not(scenarios):
    stop = np.zeros((1, 5, 3), np.float32)  # a policy that only ever proposes standing still
    road = _episode_error(RoaD(parallel_env(scenarios, dynamics="trajectory"), k=1, recovery_steps=5), lambda a: stop)
    plain = _episode_error(Sampling(parallel_env(scenarios, dynamics="trajectory"), k=1), lambda a: stop)
    assert road < 0.5 * plain, (road, plain)


def test_expert_guidance_follows_the_log(scenarios):
    env = Expert(parallel_env(scenarios, dynamics="delta_local"))
    assert isinstance(env, ExpertParallel)
    zero = np.zeros(3, np.float32)
    assert _episode_error(env, lambda agent: zero) < 0.05
    batched = Expert(BatchedEnv(scenarios, batch_size=1, dynamics="delta_local"))
    batched.reset(seed=0)
    N = batched.state.controlled.shape[1]
    _, _, _, _, info = batched.step(torch.zeros(1, N, 3))
    assert info["expert_used"].any()


def test_one_vocabulary_for_every_kind(scenarios, vocabulary):
    from closedloop.wrappers import CatK

    table = vocabulary.table()[0]  # [V, steps, 3]: the vehicles' tokens for every agent
    for wrap in (lambda env: RoaD(env, k=3), lambda env: CatK(env, 3)):
        env = wrap(parallel_env(scenarios, dynamics="tokens", vocabulary=table))
        env.reset(seed=0)
        _, _, _, _, infos = env.step({agent: np.arange(3) for agent in env.agents})
        assert len(infos) == len(env.possible_agents)


def test_bad_candidates_name_the_agent(scenarios):
    env = _trajectory_env(scenarios, k=3)
    env.reset(seed=0)
    agent = env.agents[0]
    actions = {a: np.zeros((3, 5, 3), np.float32) for a in env.agents}
    actions[agent] = np.zeros((2, 5, 3), np.float32)
    with pytest.raises(SimulationError, match=agent):
        env.step(actions)
    actions[agent] = np.full((3, 5, 3), np.nan, np.float32)
    with pytest.raises(SimulationError, match=agent):
        env.step(actions)
    with pytest.raises(SimulationError, match="tokens or trajectory"):
        RoaD(parallel_env(scenarios, dynamics="delta_local"), k=3)
    with pytest.raises(SimulationError, match="shorter"):
        RoaD(parallel_env(scenarios, dynamics="trajectory"), k=3, horizon=2)
    with pytest.raises(SimulationError, match="weights"):
        RoaD(parallel_env(scenarios, dynamics="trajectory"), k=3, weights=[1.0, 2.0])
    batched = RoaD(BatchedEnv(scenarios, batch_size=1, dynamics="trajectory"), k=3)
    batched.reset(seed=0)
    with pytest.raises(SimulationError, match="candidates"):
        batched.step(torch.zeros(1, 2, 3, 5, 3))
