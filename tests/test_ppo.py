"""PPO baselines: the batched agent-slot vector env against EgoEnv, the SB3 adapter's
conventions, ``closedloop train ppo`` end to end with the ``ppo:RUN_DIR`` planner, and
shared-parameter multi-agent PPO."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cli import run

from closedloop.envs import SimulationError
from closedloop.envs.faces import EgoEnv
from closedloop.envs.gym_vector import AgentVectorEnv, agents_vector_env, ego_vector_env

ROOT = Path(__file__).resolve().parents[1]
# Hard acceleration and a slight turn: some SDCs collide early, the others reach the end.
PUSH = np.array([4.0, 0.05], np.float32)


@pytest.fixture(scope="module")
def scenarios():
    from closedloop.data.synthetic import generate_scenarios

    return list(generate_scenarios(4, seed=0, town="cross", agents=(20, 30)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, scenarios):
    from closedloop.data import write_scenarios

    root = tmp_path_factory.mktemp("ppo_data")
    write_scenarios(root / "train.tfrecord", scenarios)
    return root


def _assert_same_observations(a: np.ndarray, b: np.ndarray, what: str = "") -> None:
    """Observations ``[..., D]`` equal up to the order of equidistant neighbours: the
    nearest-K blocks (agents, road points, lights) are compared as sets of rows, since
    top-K breaks distance ties by memory layout, which padding changes."""
    from closedloop.envs.observation import (
        AGENT_FEATURES,
        LIGHT_FEATURES,
        OWN_FEATURES,
        ROAD_FEATURES,
        ObservationConfig,
    )

    cfg = ObservationConfig()
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    np.testing.assert_allclose(a[:, :OWN_FEATURES], b[:, :OWN_FEATURES], atol=1e-5, err_msg=what)
    start = OWN_FEATURES
    for count, width in (
        (cfg.num_agents, AGENT_FEATURES),
        (cfg.num_road_points, ROAD_FEATURES),
        (cfg.num_lights, LIGHT_FEATURES),
    ):
        stop = start + count * width
        for row_a, row_b in zip(a[:, start:stop], b[:, start:stop]):
            blocks_a = np.round(row_a.reshape(count, width), 4)
            blocks_b = np.round(row_b.reshape(count, width), 4)
            np.testing.assert_allclose(
                np.unique(blocks_a, axis=0), np.unique(blocks_b, axis=0), atol=2e-4, err_msg=what
            )
        start = stop


def _actions(steps: int, n: int, seed: int = 0) -> np.ndarray:
    """Random bicycle actions around PUSH, the same for every test that compares envs."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, 1, (steps, n, 2)).astype(np.float32) * np.array([1.0, 0.02], np.float32)
    return PUSH + noise


def test_vector_env_agrees_with_ego_env_step_by_step(scenarios):
    """Same scenario, same actions: the same observations, rewards and flags, with ghost
    steps (reward 0, terminated) after an SDC collided, until the log ends."""
    venv = ego_vector_env(scenarios, num_envs=len(scenarios), shuffle=False)
    obs, infos = venv.reset(seed=0)
    assert obs.shape == (4, venv.single_observation_space.shape[0]) and venv.observation_space.contains(obs)
    assert list(infos["scenario_id"]) == [s.scenario_id for s in scenarios]
    singles = [EgoEnv([s]) for s in scenarios]
    single_obs = [env.reset(seed=0)[0] for env in singles]
    _assert_same_observations(obs, np.stack(single_obs))
    actions = _actions(80, 4)
    finished = np.zeros(4, bool)
    returns, single_returns = np.zeros(4), np.zeros(4)
    for t in range(80):
        obs, rewards, terminated, truncated, infos = venv.step(actions[t])
        np.testing.assert_array_equal(infos["ghost"], finished)
        assert (rewards[finished] == 0).all() and terminated[finished].all()
        returns += rewards
        for i, env in enumerate(singles):
            if finished[i]:
                continue
            o, r, te, tr, info = env.step(actions[t, i])
            single_returns[i] += r
            _assert_same_observations(obs[i], o, f"env {i} step {t}")
            np.testing.assert_allclose(rewards[i], r, rtol=1e-5, atol=1e-6)
            assert (terminated[i], truncated[i]) == (te, tr)
            assert infos["collision"][i] == info["collision"]
            finished[i] = te or tr
    assert venv.log_ended and finished.all()
    assert 0 < int(truncated.sum()) < 4, "the workload should make some SDCs collide and others finish"
    np.testing.assert_allclose(returns, single_returns, rtol=1e-5)
    # Next-step auto-reset: the actions are ignored, new first observations, no flags.
    obs, rewards, terminated, truncated, infos = venv.step(np.full((4, 2), np.nan, np.float32))
    assert infos["reset"].all() and not (terminated | truncated | infos["ghost"]).any() and (rewards == 0).all()


def test_vector_env_reset_is_seeded_and_returns_fresh_arrays(scenarios):
    """Gymnasium's env-checker properties that apply to a vector env."""
    first, second = (ego_vector_env(scenarios * 2, num_envs=4) for _ in range(2))
    (obs_a, info_a), (obs_b, info_b) = first.reset(seed=3), second.reset(seed=3)
    assert list(info_a["scenario_id"]) == list(info_b["scenario_id"])
    np.testing.assert_array_equal(obs_a, obs_b)
    obs_a[:] = 0  # the caller's copy: the env's next observations are unaffected
    step_a, step_b = first.step(np.zeros((4, 2), np.float32))[0], second.step(np.zeros((4, 2), np.float32))[0]
    np.testing.assert_array_equal(step_a, step_b)
    assert first.action_space.shape == (4, 2) and first.action_space.sample().shape == (4, 2)


def test_vector_env_rejects_bad_actions(scenarios):
    venv = ego_vector_env(scenarios, num_envs=4, shuffle=False)
    venv.reset(seed=0)
    with pytest.raises(SimulationError, match=r"shape \[3, 2\].*\[4, 2\]"):
        venv.step(np.zeros((3, 2), np.float32))
    bad = np.zeros((4, 2), np.float32)
    bad[2, 1] = np.nan
    with pytest.raises(SimulationError, match=f"env 2 \\(scenario {scenarios[2].scenario_id}\\): non-finite"):
        venv.step(bad)
    with pytest.raises(SimulationError, match="call reset"):
        ego_vector_env(scenarios, num_envs=2).step(np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="agents must be"):
        AgentVectorEnv(scenarios, agents="sdc_and_friends")


def test_vector_env_with_a_sim_agent_policy_matches_ego_env(scenarios):
    """``others``: the same semantics as EgoEnv's (the policy drives every other agent)."""
    from closedloop.agents.policy import load_policy

    venv = ego_vector_env(scenarios[:2], num_envs=2, shuffle=False, others=load_policy("constant_velocity"))
    obs, _ = venv.reset(seed=0)
    singles = [EgoEnv([s], others=load_policy("constant_velocity")) for s in scenarios[:2]]
    [env.reset(seed=0) for env in singles]
    actions = _actions(10, 2, seed=1)
    for t in range(10):
        obs, rewards, *_ = venv.step(actions[t])
        for i, env in enumerate(singles):
            o, r, *_ = env.step(actions[t, i])
            _assert_same_observations(obs[i], o)
            np.testing.assert_allclose(rewards[i], r, rtol=1e-5, atol=1e-6)


def test_sb3_adapter_conventions(scenarios):
    """Auto-reset in step_wait, terminal observations, TimeLimit.truncated, episode stats
    equal to the summed rewards of real episodes, none for ghost steps."""
    from closedloop.wrappers.sb3 import SB3VecEnv

    venv = SB3VecEnv(ego_vector_env(scenarios, num_envs=4, shuffle=False))
    venv.seed(0)
    obs = venv.reset()
    assert obs.shape == (4, venv.observation_space.shape[0])
    assert venv.get_attr("num_scenarios") == [4, 4, 4, 4] and venv.env_is_wrapped(object) == [False] * 4
    assert venv.env_method("scenario_of", 1, indices=[0]) == [scenarios[1].scenario_id]
    actions = _actions(80, 4)
    returns, episodes, ghosts = np.zeros(4), {}, 0
    for t in range(80):
        previous = obs
        obs, rewards, dones, infos = venv.step(actions[t])
        returns += rewards
        for i in np.flatnonzero(dones):
            assert "terminal_observation" in infos[i]
            if infos[i]["ghost"]:
                ghosts += 1
                assert "episode" not in infos[i] and rewards[i] == 0
                np.testing.assert_array_equal(infos[i]["terminal_observation"], previous[i])
            else:
                episodes[i] = infos[i]["episode"]
                assert infos[i]["TimeLimit.truncated"] == (t == 79)
    assert sorted(episodes) == [0, 1, 2, 3] and ghosts > 0
    for i, episode in episodes.items():
        assert episode["r"] == pytest.approx(returns[i], rel=1e-5)
        assert 0 < episode["l"] <= 80
    assert not np.array_equal(obs, infos[0]["terminal_observation"])  # a new batch started in place
    assert all(info["reset"] for info in infos) is False  # SB3 never sees the next-step reset


def test_sb3_import_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "stable_baselines3.common.vec_env", None)
    monkeypatch.delitem(sys.modules, "closedloop.wrappers.sb3", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'closedloop\[rl\]'"):
        import closedloop.wrappers.sb3  # noqa: F401


def test_unit_actions_map_onto_the_bounds(scenarios):
    from closedloop.wrappers.sb3 import SB3VecEnv, UnitActions, to_bounds

    venv = UnitActions(SB3VecEnv(ego_vector_env(scenarios, num_envs=4)))
    assert venv.action_space.low.tolist() == [-1, -1] and venv.action_space.high.tolist() == [1, 1]
    np.testing.assert_allclose(
        to_bounds(np.array([[-1, 1], [0, 0], [5, -5]]), venv.low, venv.high), [[-6, 0.3], [0, 0], [6, -0.3]]
    )


def test_ppo_learns_on_the_batched_env_and_evaluation_counts_env_events(scenarios):
    """A few hundred PPO steps run; evaluate_ego's rates equal EgoEnv's events counted by hand."""
    from stable_baselines3 import PPO

    from closedloop.trainers.ppo import evaluate_ego, make_vec_env, reward_config

    settings = _settings()
    env = make_vec_env("batched", scenarios, settings, seed=0)
    model = PPO("MlpPolicy", env, n_steps=80, batch_size=80, n_epochs=1, seed=0)
    model.learn(320)
    assert model.num_timesteps == 320 and len(model.ep_info_buffer) >= 4

    for terminate in (False, True):  # with termination, ghost steps must not count
        settings["terminate_on_collision"] = terminate
        result = evaluate_ego(scenarios, lambda obs: np.tile(PUSH, (len(obs), 1)), settings, batch=3)
        collided, offroad, total = [], [], []
        for s in scenarios:
            env = EgoEnv([s], reward=reward_config(settings), terminate_on_collision=terminate)
            env.reset(seed=0)
            done, hit, off, ret = False, False, False, 0.0
            while not done:
                _, r, te, tr, info = env.step(PUSH)
                hit, off, ret, done = hit or info["collision"] > 0, off or info["offroad"] > 0, ret + r, te or tr
            collided.append(hit)
            offroad.append(off)
            total.append(ret)
        assert result["episodes"] == 4
        assert result["collision_rate"] == pytest.approx(np.mean(collided))
        assert result["offroad_rate"] == pytest.approx(np.mean(offroad))
        assert result["mean_return"] == pytest.approx(np.mean(total), rel=1e-5)


def test_dummy_vec_env_of_ego_envs_reports_the_same_episodes(scenarios):
    """``--vec-env dummy``: SB3's DummyVecEnv of monitored EgoEnvs, in unit actions too."""
    from closedloop.trainers.ppo import make_vec_env

    env = make_vec_env("dummy", scenarios, _settings(), seed=0)
    assert env.num_envs == 4 and env.action_space.high.tolist() == [1, 1]
    env.seed(0)
    env.reset()
    episodes = []
    for _ in range(81):
        _, _, dones, infos = env.step(np.tile([0.5, 0.0], (4, 1)))
        episodes += [info["episode"] for info, done in zip(infos, dones) if done]
    assert len(episodes) >= 4 and all(0 < e["l"] <= 80 for e in episodes)


def _settings() -> dict:
    """A fresh run's settings, as ``closedloop train ppo --num-envs 4`` makes them."""
    from closedloop.cli import build_parser
    from closedloop.trainers.ppo import settings_from_args

    args = ["train", "ppo", "--data", "unused", "--out", "unused", "--num-envs", "4"]
    return settings_from_args(build_parser().parse_args(args))


def test_multiagent_vector_env_pads_slots_with_ghosts(scenarios):
    venv = agents_vector_env(scenarios, num_scenarios=2, max_agents=48, shuffle=False)
    obs, infos = venv.reset(seed=0)
    assert venv.num_envs == 96 and obs.shape[0] == 96
    live = ~infos["ghost"]
    per_scenario = live.reshape(2, 48).sum(1).tolist()
    assert per_scenario == [int(s.valid_at_current().sum()) for s in scenarios[:2]]
    assert (obs[~live] == 0).all() and (obs[live] != 0).any(1).all()
    obs, rewards, terminated, truncated, infos = venv.step(np.zeros((96, 2), np.float32))
    assert terminated[~live].all() and (rewards[~live] == 0).all() and not terminated[live].any()


@pytest.mark.slow
def test_train_ppo_cli_end_to_end(tmp_path, data_dir):
    """train ppo (with checkpoints and eval.json), resume, the planner in rollout and
    policy-eval, render; bad input exits 2 with a clear message."""
    out = tmp_path / "run"
    common = ["--num-envs", "4", "--n-steps", "40", "--batch-size", "80", "--n-epochs", "1", "--quiet"]
    run("train", "ppo", "--data", data_dir, "--out", out, "--timesteps", 160, "--checkpoint-every", 80, *common,
        "--eval-data", data_dir, "--reward-progress", "0.01", "--normalize-reward")  # fmt: skip
    for name in ("init.zip", "init.safetensors", "model.zip", "policy.safetensors", "config.json", "eval.json"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "checkpoints").glob("*.zip")) == ["step_160.zip", "step_80.zip"]
    assert list((out / "tb").rglob("events.out.tfevents*"))
    result = json.loads((out / "eval.json").read_text())
    assert {"ppo", "init", "constant_velocity"} <= set(result)
    assert json.loads((out / "config.json").read_text())["reward_progress"] == 0.01

    from closedloop.safetensors_io import read_safetensors

    header = read_safetensors(
        out / "checkpoints" / "step_160.safetensors", "ppo", ValueError, 1 << 30, "closedloop-ppo-policy-v1"
    )[1]
    assert header["return_rms"]["count"] > 1  # --normalize-reward's statistics travel with the checkpoint
    proc = run("train", "ppo", "--resume", out, "--timesteps", 320, "--quiet")
    assert "320 env steps" in proc.stdout and (out / "checkpoints" / "step_320.zip").is_file()

    from closedloop.agents.planners.ppo import PPOPlanner

    assert PPOPlanner(out).num_timesteps == 320 and PPOPlanner(out / "init.safetensors").num_timesteps == 0

    rollouts = tmp_path / "rollouts"
    run("rollout", "--data", data_dir, "--ego-planner", f"ppo:{out}", "--policy", "log", "--num-rollouts", 1,
        "--out", rollouts, "--quiet")  # fmt: skip
    assert len(list(rollouts.glob("*.npz"))) == 4
    run("render", "--data", data_dir, "--rollouts", rollouts, "--out", tmp_path / "ppo.gif")
    assert (tmp_path / "ppo.gif").stat().st_size > 0
    proc = run("policy-eval", "--data", data_dir, "--planners", f"ppo:{out},ppo:{out}/init.safetensors",
               "--sim-agents", "log", "--json", "--quiet")  # fmt: skip
    assert set(json.loads(proc.stdout)["values"]) >= {f"ppo:{out}", f"ppo:{out}/init.safetensors"}

    bad = run("rollout", "--data", data_dir, "--ego-planner", f"ppo:{tmp_path}/nope", "--out", rollouts, check=False)
    assert bad.returncode == 2 and "no PPO policy" in bad.stderr
    bad = run("train", "ppo", "--out", tmp_path / "x", check=False)
    assert bad.returncode == 2 and "--data" in bad.stderr
    bad = run("train", "ppo", "--resume", tmp_path / "nothing", check=False)
    assert bad.returncode == 2 and "no config.json" in bad.stderr


def test_multiagent_script_trains_a_few_hundred_steps(tmp_path, data_dir):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "ppo_multiagent.py"), "--data", str(data_dir),
         "--timesteps", "256", "--num-scenarios", "2", "--max-agents", "48", "--out", str(tmp_path / "ma")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "ma" / "model.zip").is_file() and "agent-steps" in proc.stdout


def test_resume_overrides_may_set_a_flag_back_to_its_default(tmp_path):
    from closedloop.cli import build_parser
    from closedloop.trainers.ppo import settings_from_args

    fresh = settings_from_args(build_parser().parse_args(["train", "ppo", "--data", "d", "--out", str(tmp_path)]))
    assert fresh["timesteps"] == 100_000 and fresh["threads"] == 1 and fresh["device"] == "cpu"
    saved = {**fresh, "timesteps": 200_000, "threads": 2, "device": "cuda", "lr": 1e-3}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    args = ["train", "ppo", "--resume", str(tmp_path), "--timesteps", "100000", "--threads", "1"]
    resumed = settings_from_args(build_parser().parse_args(args))
    assert resumed["timesteps"] == 100_000 and resumed["threads"] == 1  # given: back to the default value
    assert resumed["device"] == "cuda" and resumed["lr"] == 1e-3  # not given: the run's own
