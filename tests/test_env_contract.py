"""The env contract: public API, history, BatchedEnv sources / seeding / guidance, the
policy protocol and custom policies, hostile actions, observation and reward values."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from closedloop.agents.baselines import IDM, ConstantVelocity, Expert
from closedloop.agents.policy import BasePolicy, as_policy, load_policy
from closedloop.data import collate_scenarios
from closedloop.envs import (
    BatchedEnv,
    EnvConfig,
    EnvCore,
    ObservationConfig,
    RewardConfig,
    SimulationError,
    make_dynamics,
    parallel_env,
    reset,
    step,
)
from closedloop.envs.observation import POSITION_SCALE, SPEED_SCALE
from closedloop.envs.rollout import run_episode
from scenes import make_scenario, straight


@pytest.fixture(scope="module")
def town():
    from closedloop.data.synthetic import generate_scenarios

    return list(generate_scenarios(5, seed=11, town="cross", agents=(10, 14)))


# -- the public API -------------------------------------------------------------------


@pytest.mark.parametrize(
    "first_import",
    ["closedloop.envs", "closedloop.agents.policy", "closedloop.agents.baselines", "closedloop.wrappers"],
)
def test_public_api_in_a_fresh_interpreter(first_import):
    code = textwrap.dedent(f"""
        import {first_import}
        import gymnasium
        from closedloop.envs import parallel_env, ego_env, BatchedEnv, ObservationConfig, RewardConfig
        from closedloop.data.synthetic import generate_scenarios
        env = gymnasium.make("closedloop/Ego-v0", scenarios=list(generate_scenarios(1, seed=0, town="cross")))
        obs, info = env.reset(seed=0)
        print(obs.shape[0] == ObservationConfig().size)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


def test_parallel_env_does_not_simulate_before_reset(town):
    env = parallel_env(town[:2])
    assert env.core is None and env.agents == []
    expected = {str(i) for s in town[:2] for i in s.track_id[s.valid_at_current()]}
    assert set(env.possible_agents) == expected
    with pytest.raises(SimulationError, match="reset"):
        env.step({})
    env.reset(seed=1)
    assert set(env.possible_agents) < expected and env.agents == env.possible_agents


def test_parallel_env_trajectories_are_the_rollout_in_world_coordinates(real_scenarios):
    scenario = real_scenarios["637f20cafde22ff8"]
    env = parallel_env([scenario], dynamics="delta_global")
    obs, infos = env.reset(seed=0)
    while env.agents:  # drive every agent along its logged next state
        current = env.sim_state.current[0].numpy()
        actions = {}
        for a in env.agents:
            nxt, cur = infos[a]["log_next"], current[env.names.index(a)]
            actions[a] = np.zeros(3, np.float32) if np.isnan(nxt).any() else (nxt[:3] - cur[:3]).astype(np.float32)
        obs, rewards, terms, truncs, infos = env.step(actions)
    object_ids, traj = env.trajectories()
    valid_now = scenario.valid_at_current()
    assert np.array_equal(object_ids, scenario.track_id[valid_now]) and traj.shape == (len(object_ids), 80, 4)
    logged = scenario.track_valid[valid_now, 11:]
    error = np.linalg.norm(traj[..., :2] - scenario.track_xyz[valid_now, 11:, :2], axis=-1)
    assert error[logged].max() < 1e-2  # float32 in the scenario frame, float64 in the world
    assert np.allclose(traj[..., 2][logged], scenario.track_xyz[valid_now, 11:, 2][logged], atol=1e-4)


def test_base_parallel_wrapper_forwards(town):
    from pettingzoo.test import parallel_api_test

    from closedloop.wrappers import BaseParallelWrapper

    env = parallel_env(town[:1])
    wrapped = BaseParallelWrapper(BaseParallelWrapper(env))
    assert wrapped.unwrapped is env
    parallel_api_test(wrapped, num_cycles=5)
    wrapped.reset(seed=0)
    assert wrapped.sim_state is env.sim_state and wrapped.agents == env.agents
    assert wrapped.action_space(wrapped.agents[0]) == env.action_space(env.agents[0])


# -- history ---------------------------------------------------------------------------


def _ahead(state, metres=0.5):
    actions = torch.zeros(*state.controlled.shape, 3)
    actions[..., 0] = metres
    return actions


def test_a_state_shows_only_its_past(real_scenarios):
    batch = collate_scenarios([real_scenarios["637f20cafde22ff8"]])
    dynamics = make_dynamics("delta_local")
    first = step(reset(batch), _ahead(reset(batch)), dynamics)
    kept = first.pose.clone()
    assert first.pose.shape[2] == first.t + 1 == 12
    later = first
    for _ in range(5):
        later = step(later, _ahead(later, 1.0), dynamics)
    assert later.history is first.history  # the fast path shares the buffer
    assert torch.equal(first.pose, kept) and first.pose.shape[2] == 12  # and the past cannot see the future


def test_snapshot_is_independent_and_steps_like_the_original(real_scenarios):
    batch = collate_scenarios([real_scenarios["637f20cafde22ff8"]])
    dynamics = make_dynamics("delta_local")
    state = step(reset(batch), _ahead(reset(batch)), dynamics)
    snap = state.snapshot()
    assert snap.history is not state.history and torch.equal(snap.pose, state.pose)
    # The snapshot's steps after t hold the log, whatever the rollout did since.
    on = step(state, _ahead(state, 2.0), dynamics)
    assert torch.equal(snap.history.pose[:, :, 12:], state.log_states(12, 91))
    assert not torch.equal(snap.history.pose[:, :, 12], on.pose[:, :, 12])
    again = step(snap, _ahead(snap, 2.0), dynamics)
    assert torch.equal(on.pose, again.pose)


def test_differentiable_rollouts_backpropagate_through_steps(real_scenarios):
    batch = collate_scenarios([real_scenarios["637f20cafde22ff8"]])
    dynamics = make_dynamics("delta_global")
    state = reset(batch, differentiable=True)
    first = _ahead(state).requires_grad_(True)
    second = _ahead(state).requires_grad_(True)
    final = step(step(state, first, dynamics), second, dynamics)
    final.current[..., 0].sum().backward()
    ctrl = state.controlled
    # x after two delta_global steps is x0 + a1 + a2: d/da = 1 for controlled agents, 0 else.
    for grad in (first.grad, second.grad):
        assert torch.equal(grad[..., 0], ctrl.float()) and not grad[..., 1:].any()
    # A model that reads the heading (saved for backward) through three steps: the
    # differentiable mode gives gradients; the in-place fast path keeps no graph at all
    # (actions that carry one, a policy's output say, are detached).
    local = make_dynamics("delta_local")
    for differentiable in (True, False):
        start = reset(batch, differentiable=differentiable)
        a = _ahead(start).requires_grad_(True)
        turn = torch.zeros_like(a)
        turn[..., 2] = 0.1
        final = step(step(step(start, a, local), turn, local), _ahead(start), local)
        if differentiable:
            final.current[..., 1].sum().backward()
            assert torch.isfinite(a.grad).all() and a.grad[ctrl].abs().sum() > 0
        else:
            assert not final.current.requires_grad and not final.pose.requires_grad


# -- BatchedEnv ------------------------------------------------------------------------


class _MapStyle:
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class _ReIterable:
    def __init__(self, items):
        self.items = items

    def __iter__(self):
        return iter(self.items)


@pytest.mark.parametrize("kind", ["list", "dataset", "reiterable"])
def test_batched_env_sources_run_several_epochs(town, kind):
    source = {"list": town, "dataset": _MapStyle(town), "reiterable": _ReIterable(town)}[kind]
    env = BatchedEnv(source, batch_size=3, max_agents=32, dynamics="delta_local", guidance=False)
    seen = []
    obs, info = env.reset(seed=0)
    seen += info["scenario_id"]
    for _ in range(3):  # three more batches: 12 draws from 5 scenarios, epoch after epoch
        env.core.state = dataclasses.replace(env.core.state, t=90)  # jump to the end of the episode
        obs, *_, info = env.step(torch.zeros(3, 32, 3))
        assert info["reset"]
        seen += info["scenario_id"]
    assert len(seen) == 12 and set(seen) == {s.scenario_id for s in town}
    if kind == "reiterable":  # read in order
        assert seen[:5] == [s.scenario_id for s in town]


def test_batched_env_seeding_and_bad_sources(town):
    a = BatchedEnv(town, batch_size=2, max_agents=32, guidance=False)
    b = BatchedEnv(town, batch_size=2, max_agents=32, guidance=False)
    assert a.reset(seed=4)[1]["scenario_id"] == b.reset(seed=4)[1]["scenario_id"]
    orders = {tuple(a.reset(seed=s)[1]["scenario_id"]) for s in range(6)}
    assert len(orders) > 1  # the seed shuffles
    with pytest.raises(TypeError, match="one-shot iterator"):
        BatchedEnv(s for s in town)
    with pytest.raises(ValueError, match="the scenario source is empty"):
        BatchedEnv([], batch_size=2).reset()
    with pytest.raises(SimulationError, match="call reset\\(\\) before step\\(\\)"):
        BatchedEnv(town).step(torch.zeros(8, 128, 3))


def test_batched_env_guidance_is_the_log_and_the_expert(town):
    env = BatchedEnv(town, batch_size=2, max_agents=32, dynamics=make_dynamics("trajectory", chunk=5))
    obs, info = env.reset(seed=0)
    state = env.state
    b = state.batch
    log = torch.cat(
        [b.agent_xyz[:, :, 11:16, :2], b.agent_heading[:, :, 11:16, None], b.agent_velocity[:, :, 11:16]], -1
    )
    assert info["log_next"].shape == (2, 32, 5, 5)
    assert torch.equal(info["log_next_valid"], b.agent_valid[:, :, 11:16])
    ok = info["log_next_valid"]
    assert torch.equal(info["log_next"][ok], log[ok]) and info["log_next"][~ok].isnan().all()
    expert = Expert()
    expert.reset(state, env.dynamics)
    assert torch.equal(info["expert_action"], expert.act(state))
    for _ in range(16):
        obs, rewards, terminated, truncated, info = env.step(info["expert_action"])
    assert terminated.shape == truncated.shape == rewards.shape == (2, 32)
    assert torch.equal(truncated, info["controlled"]) and info["log_next"].isnan().all()


@pytest.mark.parametrize("dynamics", ["delta_local", "bicycle"])
def test_batched_env_terminated_agents_stand_still_and_earn_nothing(dynamics):
    # Two cars driving into each other head on at 10 m/s; a third far away, faster than its log.
    cars = [{"xy": straight(0.0, 0.0, 10.0)}, {"xy": straight(25.0, 0.0, -10.0)}, {"xy": straight(0.0, 50.0, 5.0)}]
    scenario = make_scenario(cars)
    scenario.track_velocity[:, :, 0] = [[10.0], [-10.0], [10.0]]
    env = BatchedEnv(
        [scenario], batch_size=1, max_agents=3, terminate_on_collision=True, dynamics=dynamics, guidance=False
    )
    env.reset(seed=0)
    # Straight on at 10 m/s: 1 m ahead per step, or no acceleration and no turn.
    ahead = torch.tensor([1.0, 0.0, 0.0]).expand(1, 3, 3) if dynamics == "delta_local" else torch.zeros(1, 3, 2)
    ended_at = None
    for i in range(40):
        _, rewards, terminated, truncated, info = env.step(ahead)
        if terminated[0, 0]:
            ended_at = i
            assert terminated[0].tolist() == [True, True, False]
            where = env.state.current[0, :2, :2].clone()
        elif ended_at is not None:
            assert not terminated.any() and rewards[0, :2].eq(0).all() and rewards[0, 2] != 0
            assert torch.allclose(env.state.current[0, :2, :2], where, atol=1e-5)  # standing still
            assert not env.state.current[0, :2, 3:].any()
    assert ended_at is not None and info["active"][0].tolist() == [False, False, True]


def test_batched_env_auto_reset_step_ignores_actions_and_keeps_the_info_keys(town):
    env = BatchedEnv(town, batch_size=2, max_agents=32, dynamics=make_dynamics("trajectory", chunk=10))
    obs, first_info = env.reset(seed=0)
    for _ in range(8):
        obs, rewards, terminated, truncated, info = env.step(first_info["expert_action"] * 0)
    assert env.core.done and truncated.any()
    garbage = torch.full((2, 32, 10, 3), float("nan"))
    obs, rewards, terminated, truncated, reset_info = env.step(garbage)  # ignored: a new batch starts
    assert reset_info["reset"] and env.state.t == 10 and set(reset_info) == set(info) == set(first_info)
    assert not rewards.any() and not terminated.any() and not truncated.any()
    assert not reset_info["collision"].any() and reset_info["distance_to_log"].isnan().all()
    with pytest.raises(SimulationError, match="NaN/inf"):
        env.step(garbage)  # the next step reads them again


def test_chunks_must_divide_the_episode(town):
    with pytest.raises(SimulationError, match="trajectory moves 3 steps at a time, which does not divide the 80"):
        BatchedEnv(town, batch_size=1, max_agents=32, dynamics=make_dynamics("trajectory", chunk=3)).reset()
    with pytest.raises(SimulationError, match="does not divide"):
        parallel_env(town[:1], dynamics=make_dynamics("trajectory", chunk=3)).reset(seed=0)


def test_batched_env_with_a_function_for_the_others_and_an_iterable_dataset(town):
    from torch.utils.data import IterableDataset

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(town)

        def __len__(self):
            return len(town)

    def stand(state, dynamics):
        return torch.zeros(*state.controlled.shape, 3)

    env = BatchedEnv(Stream(), batch_size=2, max_agents=32, controlled="sdc", others=stand, guidance=False)
    obs, info = env.reset(seed=0)
    assert info["scenario_id"] == [s.scenario_id for s in town[:2]]  # in order: an iterable
    assert torch.equal(info["controlled"], env.state.batch.is_sdc & env.state.batch.agent_mask)
    assert obs[~info["controlled"]].eq(0).all() and obs[info["controlled"]].abs().sum() > 0  # only exposed observed
    before = env.state.current.clone()
    env.step(torch.zeros(2, 32, 3))
    others = env.state.controlled & ~info["controlled"]
    assert torch.allclose(env.state.current[others][:, :2], before[others][:, :2])  # the others' policy stood


def test_actions_within_bounds_are_untouched_and_inf_is_refused(town):
    batch = collate_scenarios(town[:1])
    for name in ("delta_local", "state", "trajectory"):
        dynamics = make_dynamics(name)
        core = EnvCore(batch, EnvConfig(dynamics))
        ctrl = core.state.controlled
        g = torch.Generator().manual_seed(0)
        low, high = dynamics.limits(torch.zeros(()))
        actions = (
            low + (high - low) * torch.rand(*ctrl.shape, *dynamics.spec.shape, generator=g) * 0.98 + 0.01 * (high - low)
        )
        actions[..., 2] = torch.rand(actions[..., 2].shape, generator=g) * 0.02 - 0.01  # small turns
        transition = core.step(actions)
        assert not transition.clipped.any()
        assert torch.equal(transition.actions[ctrl], actions[ctrl])
    core = EnvCore(batch, EnvConfig(make_dynamics("delta_local")))
    actions = torch.zeros(*core.state.controlled.shape, 3)
    slot = int(torch.nonzero(core.state.controlled[0])[0])
    actions[0, slot, 0] = float("inf")
    with pytest.raises(
        SimulationError, match=f"NaN/inf at step 10 for scenario .* track {int(batch.agent_id[0, slot])}"
    ):
        core.step(actions)


def test_env_core_refuses_ambiguous_setups(real_scenarios):
    batch = collate_scenarios([real_scenarios["637f20cafde22ff8"]])
    config = EnvConfig(make_dynamics("delta_local"))
    with pytest.raises(SimulationError, match="every controlled agent must be exposed"):
        EnvCore(batch, config, controlled="wosac", exposed="sdc")
    with pytest.raises(SimulationError, match="pass neither"):
        EnvCore(reset(batch), config, differentiable=True)


# -- policies ----------------------------------------------------------------------------


def test_policies_follow_the_protocol_and_idm_resets_per_episode(town):
    batch = collate_scenarios(town[:1])
    dynamics = make_dynamics("bicycle")
    for policy in (Expert(), ConstantVelocity(), IDM()):
        with pytest.raises(RuntimeError, match="reset"):
            policy(reset(batch))
    idm = IDM()
    finals = [run_episode(reset(batch), idm, dynamics) for _ in range(2)]  # the same policy object twice
    assert torch.equal(finals[0].pose, finals[1].pose)


def test_function_policies_and_loading_user_policies(tmp_path, town):
    batch = collate_scenarios(town[:1])
    dynamics = make_dynamics("delta_local")

    def creep(state, dynamics):
        return _ahead(state, 0.1)

    assert isinstance(as_policy(creep), BasePolicy)
    final = run_episode(reset(batch), creep, dynamics)
    moved = torch.linalg.norm(final.current[..., :2] - final.pose[:, :, 10, :2], dim=-1)
    assert torch.allclose(moved[final.controlled], torch.full_like(moved[final.controlled], 8.0), atol=1e-3)
    assert isinstance(load_policy("idm"), IDM)
    assert isinstance(load_policy("closedloop.agents.baselines:ConstantVelocity"), ConstantVelocity)
    path = tmp_path / "mine.py"
    path.write_text("from closedloop.agents.baselines import Expert\npolicy = Expert()\n")
    assert isinstance(load_policy(f"{path}:policy"), Expert)
    with pytest.raises(ValueError, match="unknown policy 'warp'"):
        load_policy("warp")
    with pytest.raises(ValueError, match="has no attribute 'nothing'"):
        load_policy(f"{path}:nothing")
    with pytest.raises(ValueError, match="no such file"):
        load_policy("missing.py:policy")


def test_sampling_policies_get_a_generator_and_rollouts_reproduce(town):
    from closedloop.envs.rollout import rollout_scenarios

    class Jitter(BasePolicy):
        def act(self, state):
            noise = torch.randn(*state.controlled.shape, 3, generator=self.generator, device=state.device) * 0.05
            return _ahead(state, 0.5) + noise

    runs = [
        list(rollout_scenarios(town[:2], Jitter(), make_dynamics("delta_local"), num_rollouts=2, seed=s))
        for s in (3, 3, 4)
    ]
    assert all(np.array_equal(a[2], b[2]) for a, b in zip(runs[0], runs[1]))
    assert not np.array_equal(runs[0][0][2][0], runs[0][0][2][1])  # rollouts differ from each other
    assert not np.array_equal(runs[0][0][2], runs[2][0][2])  # and with the seed


# -- hostile actions -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["delta_global", "delta_local", "bicycle", "state", "trajectory"])
def test_huge_actions_are_clipped_and_counted_and_states_stay_finite(real_scenarios, name):
    batch = collate_scenarios([real_scenarios["637f20cafde22ff8"]])
    dynamics = make_dynamics(name)
    core = EnvCore(batch, EnvConfig(dynamics))
    ctrl = core.state.controlled
    for value in (3e38, -1e9, 1e30):
        actions = torch.full((*ctrl.shape, *dynamics.spec.shape), value)
        transition = core.step(actions)
        assert torch.isfinite(transition.state.current).all() and torch.isfinite(transition.rewards).all()
        assert torch.equal(transition.clipped, ctrl)
    moved = torch.linalg.norm(core.state.current[..., :2] - core.state.pose[:, :, 10, :2], dim=-1)
    assert moved[ctrl].max() < 3e6


def test_nan_names_the_track_and_padding_is_ignored(town):
    batch = collate_scenarios(town[:2], max_agents=32, pad_agents=True)
    dynamics = make_dynamics("delta_local")
    state = reset(batch)
    assert not batch.agent_mask.all()
    actions = _ahead(state)
    actions[~batch.agent_mask] = float("nan")  # padding slots: ignored
    actions[~state.controlled] = float("inf")  # agents that follow the log: ignored
    step(state, actions, dynamics)
    slot = int(torch.nonzero(state.controlled[1])[0])
    actions[1, slot, 2] = float("nan")
    track = int(batch.agent_id[1, slot])
    with pytest.raises(SimulationError, match=f"NaN/inf at step 10 for scenario {town[1].scenario_id} track {track}$"):
        step(state, actions, dynamics)


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((1, 1, 3), complex), "complex"),
        (np.full((1, 1, 3), "a"), "numeric array"),
        (np.array([[[object(), 0, 0]]], dtype=object), "numeric array"),
        (np.zeros((1, 1, 3), bool), "bool"),
    ],
)
def test_wrong_action_types_are_refused(bad, match):
    scenario = make_scenario([{"xy": straight(0.0, 0.0, 5.0)}])
    state = reset(collate_scenarios([scenario]))
    with pytest.raises(SimulationError, match=match):
        step(state, bad, make_dynamics("state"))


def test_the_face_refuses_what_the_core_refuses(town):
    env = parallel_env(town[:1], dynamics=make_dynamics("bicycle", bins=5))
    env.reset(seed=0)
    first = env.agents[0]
    good = {a: np.array([2, 2]) for a in env.agents}
    with pytest.raises(SimulationError, match=f"agent {first}: .* takes integer actions, not float64"):
        env.step({**good, first: np.array([1.5, 2.0])})  # no silent truncation to 1
    with pytest.raises(SimulationError, match=f"out of \\[0, 5\\) at step 10 for scenario .* track {first}$"):
        env.step({**good, first: np.array([7, 2])})
    env = parallel_env(town[:1], dynamics="state")
    env.reset(seed=0)
    good = {a: np.zeros(3, np.float32) for a in env.agents}
    for bad, match in (
        (np.zeros(3, complex), "complex128"),
        (np.array(["x", "y", "z"]), "<U1"),
        (np.zeros(3, bool), "bool"),
        (np.array([None, 1, 2], dtype=object), "object"),
    ):
        with pytest.raises(SimulationError, match=f"agent {first}: state takes real actions, not {match}"):
            env.step({**good, first: bad})


def test_token_vocabularies_must_be_finite():
    vocabulary = torch.zeros(4, 5, 3)
    vocabulary[2, 3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"\(kind, token\) \[\[0, 2\]\] are NaN/inf"):
        make_dynamics("tokens", vocabulary=vocabulary)


def test_token_matching_in_blocks_gives_the_same_tokens(monkeypatch):
    import closedloop.envs.dynamics as dynamics_module

    g = torch.Generator().manual_seed(4)
    table = torch.cumsum(torch.rand(3, 40, 5, 3, generator=g) * torch.tensor([1.5, 0.2, 0.03]), dim=2)
    dynamics = make_dynamics("tokens", vocabulary=table)
    state = torch.randn(6, 7, 5, generator=g)
    types = torch.randint(1, 4, (6, 7), generator=g)
    tokens = torch.randint(0, 40, (6, 7), generator=g)
    target = dynamics.forward(state, tokens, types)
    whole = dynamics.inverse(state, target, types)
    monkeypatch.setattr(dynamics_module, "INVERSE_BLOCK", 40 * 5 * 3 * 4)  # 4 agents per block
    assert torch.equal(dynamics.inverse(state, target, types), whole) and torch.equal(whole, tokens)


def test_per_kind_token_vocabularies_follow_the_agent_type():
    from closedloop.constants import TYPE_CYCLIST, TYPE_PEDESTRIAN, TYPE_VEHICLE

    steps = torch.arange(1, 6, dtype=torch.float32)[:, None]
    forward = torch.cat([steps * torch.tensor([1.0, 0.0]), torch.zeros(5, 1)], -1)  # 1 m per step ahead
    left = torch.cat([steps * torch.tensor([0.0, 0.3]), torch.zeros(5, 1)], -1)  # 0.3 m per step sideways
    table = torch.stack([torch.stack([forward, left]), torch.stack([left, forward]), torch.stack([forward, forward])])
    dynamics = make_dynamics("tokens", vocabulary=table)  # [3 kinds, 2 tokens, 5, 3]
    state = torch.zeros(3, 5)
    types = torch.tensor([TYPE_VEHICLE, TYPE_PEDESTRIAN, TYPE_CYCLIST])
    moved = dynamics.forward(state, torch.zeros(3, dtype=torch.long), types)[:, -1, :2]
    assert torch.allclose(moved, torch.tensor([[5.0, 0.0], [0.0, 1.5], [5.0, 0.0]]))
    target = dynamics.forward(state, torch.ones(3, dtype=torch.long), types)
    assert dynamics.inverse(state, target, types).tolist() == [1, 1, 0]  # the cyclist's two tokens tie: first
    with pytest.raises(ValueError, match="needs the agents' types"):
        dynamics.forward(state, torch.zeros(3, dtype=torch.long))


# -- observation and reward values -----------------------------------------------------


def test_observation_values_of_a_small_scene():
    # At step 10 car 0 is at (0, 10) heading +y at 10 m/s; car 1 at (3, 15) heading -x with
    # velocity (-3, 10); one lane along y through x = 2; a red light with its stop point at (0, 30).
    up = np.stack([np.zeros(91), np.arange(91) * 1.0], -1)  # 10 m/s along +y
    cars = [
        {"xy": up, "heading": np.full(91, math.pi / 2), "size": (4.5, 2.0, 1.5)},
        {"xy": [3.0, 15.0], "heading": np.full(91, math.pi), "size": (5.0, 2.5, 1.5)},
    ]
    lane = np.stack([np.full(201, 2.0), np.linspace(-50, 150, 201)], -1)
    from closedloop.constants import LIGHT_STOP

    scenario = make_scenario(cars, lanes=[lane], lights=[(0, np.full(91, LIGHT_STOP), (0.0, 30.0))])
    batch = collate_scenarios([scenario])
    batch.agent_velocity[0, 0, :] = torch.tensor([0.0, 10.0])
    batch.agent_velocity[0, 1, :] = torch.tensor([-3.0, 10.0])
    config = ObservationConfig(num_agents=2, num_road_points=3, num_lights=1)
    core = EnvCore(batch, EnvConfig(make_dynamics("delta_local"), observation=config))
    obs = core.observe(torch.tensor([[0]]))[0, 0]
    assert obs.shape == (config.size,)
    own, agents, road, light = obs[:8], obs[8:26].view(2, 9), obs[26:53].view(3, 9), obs[53:]
    # Own: speed 10, all of it forward; 4.5 m / 10, 2 m / 5; a vehicle.
    assert torch.allclose(own, torch.tensor([10 / SPEED_SCALE, 10 / SPEED_SCALE, 0, 0.45, 0.4, 1, 0, 0]), atol=1e-6)
    # The other car, (3, 5) away in the world, is 5 m ahead of car 0 (facing +y) and 3 m to its
    # right; relative heading +pi/2; relative velocity (-3, 0) in the world is 3 m/s to the left.
    expected = torch.tensor(
        [5 / POSITION_SCALE, -3 / POSITION_SCALE, 0.0, 1.0, 0.0, 3 / SPEED_SCALE, 5.0 / 10, 2.5 / 5, 1.0]
    )
    assert torch.allclose(agents[0], expected, atol=1e-5) and not agents[1].any()  # one other agent only
    # The nearest lane point: x = 2 is 2 m to the right; the lane runs forward (+y).
    assert torch.allclose(road[0, :2], torch.tensor([0.0, -2.0]) / POSITION_SCALE, atol=1e-5)
    assert torch.allclose(road[0, 2:], torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]), atol=1e-5)
    # The light: 20 m ahead, red, present.
    assert torch.allclose(light, torch.tensor([20 / POSITION_SCALE, 0.0, 1.0, 0.0, 0.0, 1.0]), atol=1e-5)


def test_reward_values():
    from closedloop.envs.env import Transition

    cars = [{"xy": straight(0.0, 0.0, 5.0)}, {"xy": straight(3.0, 0.0, 5.0)}, {"xy": straight(0.0, 10.0, 5.0)}]
    batch = collate_scenarios([make_scenario(cars)])
    dynamics = make_dynamics("delta_global")
    state = reset(batch)
    actions = torch.tensor([[[0.5, 0.0, 0.0], [0.5, 0.0, 0.0], [0.5, 4.0, 0.0]]])  # car 2 goes 4 m off its log
    nxt = step(state, actions, dynamics)
    events = {
        "collision": torch.tensor([[True, True, False]]),
        "offroad": torch.tensor([[False, False, True]]),
        "red_light": torch.tensor([[False, True, False]]),
        "distance_to_log": torch.tensor([[0.0, float("nan"), 4.0]]),
    }
    transition = Transition(state, nxt, dynamics, actions, torch.zeros(1, 3, dtype=torch.bool), events)
    travelled = torch.tensor([0.5, 0.5, math.hypot(0.5, 4.0)])
    got = RewardConfig(
        distance_to_log=-1.0, collision=-2.0, offroad=-3.0, red_light=-5.0, progress=0.1, action=-0.5, scale=0.1
    )(transition)[0]
    action_size = (actions[0] / torch.tensor([6.0, 6.0, math.pi])).square().sum(-1)
    expected = 0.1 * (torch.tensor([-2.0, -2.0 - 5.0, -4.0 - 3.0]) + 0.1 * travelled - 0.5 * action_size)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(RewardConfig()(transition)[0], torch.tensor([-1.0, -1.0, -4.0]))  # the paper's default


def test_observations_of_some_agents_equal_their_rows_of_all_agents():
    """Observing a few agent slots (an ego env's SDCs) searches the roadgraph for those
    agents only: the answer must be their rows of the every-slot observation, step after
    step as the per-slot caches age, and whichever agents the slots hold."""
    from closedloop.data.synthetic import generate_scenarios
    from closedloop.envs.env import EnvConfig, EnvCore
    from closedloop.envs.observation import Observer

    batch = collate_scenarios(list(generate_scenarios(2, seed=9, town="grid", agents=(20, 30))))
    core = EnvCore(batch, EnvConfig(make_dynamics("delta_local")), track_events=False)
    config = ObservationConfig()
    every, some = Observer(config), Observer(config)
    forward = torch.zeros(*core.state.controlled.shape, 3)
    forward[..., 0] = 1.0  # 10 m/s: the slots' kept road points go stale and are searched again
    for k in range(12):
        valid = core.state.valid_now
        ranked = torch.sort(valid.int(), dim=1, descending=True, stable=True).indices  # valid slots first
        agents = ranked[:, [k % 5, 5 + k % 3]]  # other agents in the slots every step
        assert valid.gather(1, agents).all()
        full = every(core.state)
        part = some(core.state, agents)
        rows = full.gather(1, agents[..., None].expand(-1, -1, full.shape[-1]))
        road = slice(8 + 9 * config.num_agents, 8 + 9 * (config.num_agents + config.num_road_points))
        rest = torch.ones(full.shape[-1], dtype=torch.bool)
        rest[road] = False
        assert torch.equal(part[..., rest], rows[..., rest])
        # Road points: the same positions in the same order; points at the same spot (a lane's
        # end and the next one's start) may come in either order, so their rows are compared as sets.
        mine, theirs = part[..., road].unflatten(-1, (-1, 9)), rows[..., road].unflatten(-1, (-1, 9))
        assert torch.equal(mine[..., :2], theirs[..., :2])
        for a, b in zip(mine.flatten(0, 1), theirs.flatten(0, 1)):
            assert sorted(map(tuple, a.tolist())) == sorted(map(tuple, b.tolist()))
        core.step(forward)
