"""PettingZoo and Gymnasium faces: API conformance, names, infos and bad input."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from closedloop.envs import SimulationError, ego_env, parallel_env


@pytest.fixture(scope="module")
def small_scenarios():
    from closedloop.data.synthetic import generate_scenarios

    return list(generate_scenarios(2, seed=5, town="cross", agents=(12, 16)))


def _vocabulary():
    g = torch.Generator().manual_seed(0)
    return torch.cumsum(torch.rand(32, 5, 3, generator=g) * torch.tensor([1.5, 0.2, 0.03]), dim=1)


@pytest.mark.parametrize("dynamics", ["delta_global", "delta_local", "bicycle", "state", "trajectory", "tokens"])
def test_parallel_api_for_every_dynamics(small_scenarios, dynamics):
    from pettingzoo.test import parallel_api_test

    env = parallel_env(
        small_scenarios[:1], dynamics=dynamics, vocabulary=_vocabulary() if dynamics == "tokens" else None
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parallel_api_test(env, num_cycles=20)


def test_agents_are_track_ids_and_infos_carry_the_log(real_scenarios):
    scenario = real_scenarios["637f20cafde22ff8"]
    env = parallel_env([scenario], dynamics="delta_global")
    obs, infos = env.reset(seed=0)
    expected = [str(i) for i in scenario.track_id[scenario.valid_at_current()]]
    assert sorted(env.agents) == sorted(expected)
    agent = env.agents[0]
    assert obs[agent].shape == env.observation_space(agent).shape
    assert infos[agent]["log_next"].shape == (5,)
    # Acting with the logged next state (delta_global) keeps every agent on the log.
    steps = 0
    while env.agents:
        actions = {}
        for a in env.agents:
            i = env._index[a]
            cur = env.sim_state.current[0, i].numpy()
            nxt = infos[a]["log_next"]
            actions[a] = np.zeros(3, np.float32) if np.isnan(nxt).any() else (nxt[:3] - cur[:3]).astype(np.float32)
        obs, rewards, terms, truncs, infos = env.step(actions)
        steps += 1
    assert steps == 80 and all(truncs.values())


def test_parallel_bad_input(small_scenarios):
    env = parallel_env(small_scenarios[:1], dynamics="delta_local")
    env.reset(seed=0)
    good = {a: np.zeros(3, np.float32) for a in env.agents}
    with pytest.raises(KeyError, match="unknown or finished agents \\['nobody'\\]"):
        env.step({**good, "nobody": np.zeros(3, np.float32)})
    first = env.agents[0]
    with pytest.raises(SimulationError, match=f"NaN/inf at step 10 for scenario {env.scenario_id} track {first}"):
        env.step({**good, first: np.array([np.nan, 0, 0], np.float32)})
    with pytest.raises(SimulationError, match=f"agent {first}: action shape \\[2\\]"):
        env.step({**good, first: np.zeros(2, np.float32)})
    with pytest.raises(ValueError, match="no action for agents"):
        env.step({first: np.zeros(3, np.float32)})
    for _ in range(80):
        env.step({a: np.zeros(3, np.float32) for a in env.agents})
    with pytest.raises(ValueError, match="after the episode ended"):
        env.step(good)


def test_ego_env_passes_gymnasium_and_sb3_checkers(small_scenarios):
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_env(ego_env(small_scenarios, dynamics="bicycle"))
        sb3_check_env(ego_env(small_scenarios, dynamics="delta_local"))


def test_ego_env_is_registered_and_renders(small_scenarios):
    import gymnasium

    env = gymnasium.make("closedloop/Ego-v0", scenarios=small_scenarios, render_mode="rgb_array")
    obs, info = env.reset(seed=3)
    assert env.observation_space.contains(obs)
    frame = env.render()
    assert frame.shape == (512, 512, 3) and frame.dtype == np.uint8 and frame.std() > 0
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    assert set(info) >= {"log_next", "collision", "offroad", "red_light", "distance_to_log"}


def test_batched_env_steps_and_auto_resets(small_scenarios):
    from closedloop.envs.vector import BatchedEnv

    env = BatchedEnv(small_scenarios, batch_size=2, max_agents=32, dynamics="delta_local")
    obs, info = env.reset()
    assert obs.shape == (2, 32, env.observation.size) and info["controlled"].shape == (2, 32)
    for _ in range(80):
        obs, rewards, terminated, truncated, info = env.step(info["expert_action"])
        assert rewards.shape == (2, 32)
    assert torch.equal(truncated, info["controlled"]) and not terminated.any()
    # The expert follows the log: the distance penalty is float noise, and the only other
    # penalty is for collisions the log itself has.
    controlled = info["controlled"]
    assert info["distance_to_log"][controlled].nan_to_num().max() < 1e-3
    assert torch.allclose(rewards[controlled], -info["collision"][controlled].float(), atol=1e-3)
    obs, rewards, terminated, truncated, info = env.step(torch.zeros(2, 32, 3))
    assert info["reset"] and env.state.t == 10 and obs.shape == (2, 32, env.observation.size)


@pytest.mark.parametrize("options", [{"normalize": True}, {"bins": 7}])
def test_parallel_api_with_normalized_or_discretized_actions(small_scenarios, options):
    from pettingzoo.test import parallel_api_test

    from closedloop.envs.dynamics import make_dynamics

    env = parallel_env(small_scenarios[:1], dynamics=make_dynamics("bicycle", **options))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parallel_api_test(env, num_cycles=10)


def test_parallel_env_with_a_sim_agent_policy_for_the_others(real_scenarios):
    from closedloop.agents.baselines import Expert

    scenario = real_scenarios["637f20cafde22ff8"]
    env = parallel_env([scenario], dynamics="delta_global", controlled="sdc", others=Expert())
    env.reset(seed=0)
    assert env.agents == [str(scenario.track_id[scenario.sdc_track_index])]
    for _ in range(10):
        env.step({a: np.array([1.0, 0.0, 0.0], np.float32) for a in env.agents})
    state = env.sim_state
    batch = state.batch
    sdc = int(torch.nonzero(batch.is_sdc[0])[0])
    others = state.controlled[0].clone()
    others[sdc] = False
    # The expert keeps the other simulated agents on the log; the SDC went its own way.
    error = torch.linalg.norm(state.pose[0, others, 20, :2] - batch.agent_xyz[0, others, 20, :2], dim=-1)
    logged = batch.agent_valid[0, others, 20]
    assert error[logged].max() < 1e-3
    assert torch.linalg.norm(state.pose[0, sdc, 20, :2] - batch.agent_xyz[0, sdc, 20, :2]) > 1.0


def test_ego_env_reusing_a_scenarios_indexes_runs_as_building_them_anew(monkeypatch):
    """A scenario drawn again takes the previous episode's batch and roadgraph indexes
    (event tracker with its pending red-light crossings, observer): its episodes must be
    those of an env that builds everything at each reset."""
    from closedloop.data.synthetic import generate_scenarios
    from closedloop.envs import faces

    scenarios = list(generate_scenarios(2, seed=11, town="grid", agents=(20, 30)))

    def episodes(kept: int) -> list:
        monkeypatch.setattr(faces, "CACHED_CORES", kept)
        env = ego_env(scenarios)
        obs, _ = env.reset(seed=1)
        rng, record, reused = np.random.default_rng(3), [obs], 0
        for _ in range(150):
            obs, reward, terminated, truncated, info = env.step(rng.uniform([0.0, -0.05], [3.0, 0.05]))
            record += [obs, np.float64(reward), np.bool_(terminated)]
            record += [np.asarray(info[k], np.float64) for k in sorted(info)]
            if terminated or truncated:
                before = env.core.tracker
                env.reset()
                reused += env.core.tracker is before
        return record, reused

    (kept, reused), (built, rebuilt) = episodes(8), episodes(0)
    assert reused > 0 and rebuilt == 0
    assert len(kept) == len(built)
    assert all(np.array_equal(a, b, equal_nan=a.dtype.kind == "f") for a, b in zip(kept, built))


def test_env_core_reuses_indexes_only_for_the_same_batch_and_agents(small_scenarios):
    from closedloop.data.batch import collate_scenarios
    from closedloop.envs.dynamics import make_dynamics
    from closedloop.envs.env import EnvConfig, EnvCore

    batch = collate_scenarios(small_scenarios[:1])
    config = EnvConfig(make_dynamics("bicycle"))
    first = EnvCore(batch, config, controlled="sdc", exposed="sdc", events_for="exposed")
    again = EnvCore(batch, config, controlled="sdc", exposed="sdc", events_for="exposed", maps_from=first)
    assert again.tracker is first.tracker and again.observer is first.observer
    every = EnvCore(batch, config, events_for="exposed", maps_from=first)  # every valid agent exposed
    other_batch = EnvCore(
        collate_scenarios(small_scenarios[:1]),
        config,
        controlled="sdc",
        exposed="sdc",
        events_for="exposed",
        maps_from=first,
    )
    all_events = EnvCore(batch, config, controlled="sdc", exposed="sdc", maps_from=first)
    for core in (every, other_batch, all_events):
        assert core.tracker is not first.tracker and core.observer is not first.observer
