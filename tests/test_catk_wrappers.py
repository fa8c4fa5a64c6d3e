"""CAT-K guidance wrappers on the PettingZoo face and the batched tensor env."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from closedloop.agents.tokens import default_vocabulary
from closedloop.envs import SimulationError, parallel_env
from closedloop.envs.vector import BatchedEnv
from closedloop.wrappers.catk import CatK, CatKBatched, CatKParallel


@pytest.fixture(scope="module")
def scenarios():
    from closedloop.data.synthetic import generate_scenarios

    return list(generate_scenarios(1, seed=5, town="cross", agents=(8, 10)))


@pytest.fixture(scope="module")
def vocabulary():
    return default_vocabulary()


def _env(scenarios, vocabulary, k):
    return CatK(parallel_env(scenarios, dynamics="tokens", vocabulary=vocabulary.table()), k, vocabulary)


def test_wrapped_parallel_env_passes_the_api_test(scenarios, vocabulary):
    from pettingzoo.test import parallel_api_test

    env = _env(scenarios, vocabulary, k=4)
    assert isinstance(env, CatKParallel)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parallel_api_test(env, num_cycles=20)


def _episode_error(env, candidates_for) -> float:
    """Mean distance to the log over an episode where each agent proposes candidates_for(agent)."""
    env.reset(seed=0)
    while env.agents:
        env.step({agent: candidates_for(agent) for agent in env.agents})
    state = env.sim_state
    cur = state.batch.current_time_index
    exposed = env.unwrapped.core.exposed
    valid = state.batch.agent_valid[:, :, cur + 1 :] & exposed[..., None]
    gap = torch.linalg.vector_norm(state.pose[:, :, cur + 1 :, :2] - state.batch.agent_xyz[:, :, cur + 1 :, :2], dim=-1)
    return float(gap[valid].mean())


def test_every_token_as_candidate_follows_the_log_and_executes_the_recovery_token(scenarios, vocabulary):
    V = int(vocabulary.sizes().max())
    env = _env(scenarios, vocabulary, k=V)
    env.reset(seed=0)
    _, _, _, _, infos = env.step({agent: np.arange(V) for agent in env.agents})
    for info in infos.values():
        if info["recovery_valid"]:
            assert info["executed_token"] == info["recovery_token"] == info["catk_choice"]
    guided = _episode_error(env, lambda agent: np.arange(V))
    single = _episode_error(_env(scenarios, vocabulary, k=1), lambda agent: np.zeros(1, np.int64))
    assert guided < 0.3 and single > 5 * guided, (guided, single)


def test_batched_and_parallel_wrappers_make_the_same_choice(scenarios, vocabulary):
    V = int(vocabulary.sizes().max())
    g = torch.Generator().manual_seed(3)
    parallel = _env(scenarios, vocabulary, k=6)
    parallel.reset(seed=0)
    batched = CatK(BatchedEnv(scenarios, batch_size=1, dynamics="tokens", vocabulary=vocabulary.table()), 6, vocabulary)
    assert isinstance(batched, CatKBatched)
    batched.reset(seed=0)
    names = parallel.unwrapped.names
    N = batched.state.controlled.shape[1]
    for _ in range(3):
        candidates = torch.randint(0, V, (1, N, 6), generator=g)
        slot = {name: i for i, name in enumerate(names)}
        _, _, _, _, infos = parallel.step({a: candidates[0, slot[a]].numpy() for a in parallel.agents})
        _, _, _, _, info = batched.step(candidates)
        for agent, agent_info in infos.items():
            i = slot[agent]
            assert agent_info["executed_token"] == int(info["executed_token"][0, i])
            assert agent_info["recovery_token"] == int(info["recovery_token"][0, i])
            assert agent_info["catk_choice"] == int(info["catk_choice"][0, i])


def test_bad_candidates_name_the_agent(scenarios, vocabulary):
    env = _env(scenarios, vocabulary, k=3)
    env.reset(seed=0)
    agent = env.agents[0]
    actions = {a: np.zeros(3, np.int64) for a in env.agents}
    actions[agent] = np.zeros(2, np.int64)
    with pytest.raises(SimulationError, match=agent):
        env.step(actions)
    actions[agent] = np.zeros(3, np.float32)
    with pytest.raises(SimulationError, match=agent):
        env.step(actions)
    with pytest.raises(SimulationError, match="tokens dynamics"):
        CatK(parallel_env(scenarios, dynamics="delta_local"), 3)
    batched = CatK(BatchedEnv(scenarios, batch_size=1, dynamics="tokens", vocabulary=vocabulary.table()), 3)
    batched.reset(seed=0)
    with pytest.raises(SimulationError, match="candidates"):
        batched.step(torch.zeros(1, 2, 3, dtype=torch.long))
