"""Compiled kernels (closedloop.envs.compiled): the same results as eager, and a fallback
that keeps a run going where the compiler fails."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from closedloop.envs import compiled
from closedloop.envs.compiled import Kernel, compile_enabled, set_compile


@pytest.fixture
def compile_switch():
    """Restore the process's compile setting (and its environment variable) afterwards."""
    before = compile_enabled()
    yield set_compile
    set_compile(before)


def _ego_episode(scenarios, steps: int) -> list[tuple]:
    from closedloop.envs.faces import EgoEnv

    env = EgoEnv(scenarios)
    obs, _ = env.reset(seed=3)
    rng = np.random.default_rng(0)
    record = [(obs,)]
    for _ in range(steps):
        action = rng.uniform([-2.0, -0.1], [2.0, 0.1]).astype(np.float32)
        obs, reward, terminated, truncated, info = env.step(action)
        record.append((obs, reward, terminated, truncated, sorted(info.items(), key=lambda kv: kv[0])))
        if terminated or truncated:
            obs, _ = env.reset()
            record.append((obs,))
    return record


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return a.shape == b.shape and np.array_equal(a, b, equal_nan=True)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and np.isnan(a):
        return isinstance(b, float) and np.isnan(b)
    return a == b


@pytest.mark.slow
def test_compiled_ego_env_and_offroad_equal_the_eager_ones(compile_switch, real_scenarios):
    """Compiling takes ~10 s: this runs in CI (slow). An ego env's observations, rewards and
    infos are bit for bit the eager ones (the observation kernel does arithmetic only); the
    off-road distances of a real WOMD rollout agree to the last bits (the compiled hypot
    rounds differently) and say off-road for the same boxes."""
    from closedloop.agents.baselines import Expert
    from closedloop.data.batch import collate_scenarios
    from closedloop.data.synthetic import generate_scenarios
    from closedloop.envs.core import reset, step
    from closedloop.envs.dynamics import make_dynamics
    from closedloop.envs.events import agent_corners
    from closedloop.envs.map_index import RoadEdges

    scenarios = list(generate_scenarios(3, seed=4, town="grid", agents=(30, 50)))
    batch = collate_scenarios(list(real_scenarios.values())[:2])
    dynamics = make_dynamics("bicycle")

    def offroad() -> list[torch.Tensor]:
        """Per step, the boxes measured from their corners and from their pose (the
        kernel that makes the corners itself)."""
        state = reset(batch)
        expert, edges, boxes, values = Expert(), RoadEdges(batch), RoadEdges(batch), []
        expert.reset(state, dynamics)
        for _ in range(30):
            state = step(state, expert.act(state), dynamics)
            p, dims = state.current, state.dims
            from_pose = boxes.box_signed_distance(
                p[..., 0], p[..., 1], p[..., 2].cos(), p[..., 2].sin(), dims[..., 0], dims[..., 1], state.valid_now
            )
            values += [edges.signed_distance(agent_corners(state)), from_pose]
        return values

    compile_switch(False)
    eager_episode, eager_offroad = _ego_episode(scenarios, 60), offroad()
    compile_switch(True)
    compiled_episode, compiled_offroad = _ego_episode(scenarios, 60), offroad()
    assert _same(eager_episode, compiled_episode)
    for eager, compiled_values in zip(eager_offroad, compiled_offroad):  # absent boxes' values too
        assert torch.allclose(eager, compiled_values, rtol=1e-6, atol=1e-5)
        assert torch.equal(eager > 0, compiled_values > 0)


def _vector_episode(scenarios, steps: int) -> list[tuple]:
    from closedloop.envs.gym_vector import ego_vector_env

    env = ego_vector_env(scenarios, 4)
    obs, _ = env.reset(seed=5)
    rng = np.random.default_rng(1)
    record = [(obs,)]
    for _ in range(steps):
        actions = rng.uniform([-2.0, -0.1], [2.0, 0.1], (4, 2)).astype(np.float32)
        obs, rewards, terminated, truncated, infos = env.step(actions)
        events = [infos[key] for key in ("collision", "offroad", "red_light", "distance_to_log")]
        record.append((obs, rewards, terminated, truncated, events))
    return record


@pytest.mark.slow
def test_compiled_vector_env_and_collisions_equal_the_eager_ones(compile_switch):
    """The vector env (several scenarios, padded agent slots) and the compiled every-pair
    collision tests (of a few agents, and of all) against the eager selected-pairs one, on
    boxes that overlap a lot."""
    from closedloop.data.batch import collate_scenarios
    from closedloop.data.synthetic import generate_scenarios
    from closedloop.envs.core import collisions, reset
    from scenes import make_scenario

    scenarios = list(generate_scenarios(4, seed=6, town="grid", agents=(30, 50)))
    rng = np.random.default_rng(2)
    xy, heading = rng.uniform(0, 40, (120, 2)), rng.uniform(-np.pi, np.pi, 120)
    size = rng.uniform([0.5, 0.5, 1.5], [7.0, 2.8, 1.5], (120, 3))
    boxes = [{"xy": xy[i], "heading": heading[i], "size": tuple(size[i])} for i in range(120)]
    state = reset(collate_scenarios([make_scenario(boxes)]))
    slots = torch.arange(0, state.controlled.shape[1], 3)[None]

    compile_switch(False)
    eager_episode, eager_hits = _vector_episode(scenarios, 30), collisions(state, agents=slots)
    eager_all = collisions(state)
    compile_switch(True)
    compiled_episode, compiled_hits = _vector_episode(scenarios, 30), collisions(state, agents=slots)
    assert _same(eager_episode, compiled_episode)
    assert torch.equal(eager_hits, compiled_hits) and 5 < int(eager_hits.sum()) < slots.shape[1]
    assert torch.equal(collisions(state), eager_all) and 20 < int(eager_all.sum()) < 100


def test_the_every_pair_collision_kernels_equal_the_eager_selection(compile_switch):
    """Both kernels' functions, run eagerly, against the near-pair selection on 120 boxes
    that overlap a lot (eight padding slots, invalid, sit on top of them)."""
    from closedloop.data.batch import collate_scenarios
    from closedloop.envs import core
    from scenes import make_scenario

    rng = np.random.default_rng(3)
    xy, heading = rng.uniform(0, 40, (120, 2)), rng.uniform(-np.pi, np.pi, 120)
    size = rng.uniform([0.5, 0.5, 1.5], [7.0, 2.8, 1.5], (120, 3))
    boxes = [{"xy": xy[i], "heading": heading[i], "size": tuple(size[i])} for i in range(120)]
    state = core.reset(collate_scenarios([make_scenario(boxes)], max_agents=128, pad_agents=True))
    state.pose[:, 120:, state.t, :2] = torch.from_numpy(xy[:8]).float()
    valid = state.valid[:, :, state.t] & state.batch.agent_mask
    pose, dims = state.current, state.dims
    boxes = (pose, pose[..., 2].cos(), pose[..., 2].sin(), dims)
    compile_switch(False)
    expected = core.collisions(state)
    assert torch.equal(core._all_collisions.fn(*boxes, valid), expected)
    slots = torch.arange(0, 120, 3)[None]
    assert torch.equal(core._agents_collisions.fn(*boxes, valid, slots), expected[:, ::3][:, :40])
    assert 20 < int(expected.sum()) < 100 and not expected[:, 120:].any()


def test_a_kernel_runs_eagerly_when_the_compiler_fails(compile_switch, monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("no C++ compiler")

        return run

    monkeypatch.setattr(compiled.torch, "compile", broken_compile)
    compile_switch(True)
    double = Kernel(lambda x: x * 2)
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler"):
        assert torch.equal(double(torch.ones(3)), torch.full((3,), 2.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: eager from now on
        assert torch.equal(double(torch.ones(2)), torch.full((2,), 2.0))


def test_a_kernel_reports_the_callers_error_not_the_compiler(compile_switch, monkeypatch):
    def failing_compile(fn, **kwargs):
        return fn  # "compiled" runs the function itself: its errors are the input's fault

    monkeypatch.setattr(compiled.torch, "compile", failing_compile)
    compile_switch(True)

    def strict(x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 1:
            raise ValueError(f"expected a vector, got shape {list(x.shape)}")
        return x + 1

    kernel = Kernel(strict)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="expected a vector"):
            kernel(torch.zeros(2, 2))
        assert torch.equal(kernel(torch.zeros(2)), torch.ones(2))  # still compiled, no fallback warning
    assert not kernel._failed


def test_set_compile_reaches_worker_processes(compile_switch):
    import os

    compile_switch(True)
    assert compile_enabled() and os.environ["CLOSEDLOOP_COMPILE"] == "1"
    compile_switch(False)
    assert not compile_enabled() and os.environ["CLOSEDLOOP_COMPILE"] == "0"


@pytest.mark.parametrize(
    "mode, timesteps, variable, expected",
    [
        ("auto", 2_000, None, False),
        ("auto", 100_000, None, True),
        ("auto", 2_000, "1", True),  # the environment's setting wins over the run length
        ("auto", 100_000, "0", False),
        ("on", 10, "0", True),
        ("off", 10**6, "1", False),
    ],
)
def test_train_ppo_compiles_where_it_pays(monkeypatch, mode, timesteps, variable, expected):
    from closedloop.trainers.ppo import compile_wanted

    if variable is None:
        monkeypatch.delenv("CLOSEDLOOP_COMPILE", raising=False)
    else:
        monkeypatch.setenv("CLOSEDLOOP_COMPILE", variable)
    assert compile_wanted(mode, timesteps) is expected


def test_a_failed_collision_kernel_leaves_the_eager_selection(compile_switch, monkeypatch):
    """Once an every-pair collision kernel has fallen back to eager, collisions go back to
    testing the near pairs only (cheaper eagerly); both give the same answer."""
    from closedloop.data.batch import collate_scenarios
    from closedloop.data.synthetic import generate_scenarios
    from closedloop.envs import core

    state = core.reset(collate_scenarios(list(generate_scenarios(1, seed=2, town="grid", agents=(30, 40)))))
    slots = torch.arange(0, 20, 2)[None]
    expected, expected_all = core.collisions(state, agents=slots), core.collisions(state)
    compile_switch(True)
    monkeypatch.setattr(core._agents_collisions, "_failed", True)
    calls = []
    monkeypatch.setattr(core._agents_collisions, "fn", lambda *args: calls.append(args))
    assert not core._agents_collisions.active
    assert torch.equal(core.collisions(state, agents=slots), expected) and not calls
    monkeypatch.setattr(core._all_collisions, "_failed", True)
    monkeypatch.setattr(core._all_collisions, "fn", lambda *args: calls.append(args))
    assert torch.equal(core.collisions(state), expected_all) and not calls


def test_the_collision_kernel_agrees_with_the_corner_form():
    """The kernel's projected separating-axis test (run eagerly here: arithmetic only, so
    compiled it gives the same) against the corner form of ``closedloop.geometry``, over
    200 random boxes per scenario; agents with a pair within 1e-4 m of touching are left
    out."""
    import math

    from closedloop.envs import core
    from closedloop.geometry import _separations

    generator = torch.Generator().manual_seed(0)
    B, N = 4, 200
    xy = torch.rand(B, N, 2, generator=generator) * 60
    heading = (torch.rand(B, N, generator=generator) * 2 - 1) * math.pi
    dims = torch.rand(B, N, 3, generator=generator) * torch.tensor([6.5, 2.5, 1.0]) + torch.tensor([0.5, 0.5, 1.0])
    pose = torch.cat([xy, heading[..., None], torch.zeros(B, N, 2)], -1)
    valid = torch.rand(B, N, generator=generator) > 0.1
    agents = torch.arange(0, N, 2).expand(B, -1)
    got = core._agents_collisions.fn(pose, heading.cos(), heading.sin(), dims, valid, agents)

    def boxes(index):
        take = lambda values: values.gather(1, index.reshape(B, -1)).view(index.shape)  # noqa: E731
        return (take(xy[..., 0]), take(xy[..., 1]), take(heading), take(dims[..., 0]), take(dims[..., 1]))

    mine = boxes(agents[..., None].expand(-1, -1, N))
    theirs = boxes(torch.arange(N).expand(B, agents.shape[1], N))
    separation = _separations(mine, theirs)[0]
    pairs = valid.gather(1, agents)[..., None] & valid[:, None, :] & (agents[..., None] != torch.arange(N))
    expected = ((separation < 0) & pairs).any(-1)
    clear = ~((separation.abs() < 1e-4) & pairs).any(-1)
    assert int(clear.sum()) > 0.95 * clear.numel()
    assert torch.equal(got[clear], expected[clear])
    assert 50 < int(expected.sum()) < expected.numel() - 50


def test_a_kernel_compiles_one_copy_per_family_of_calls(compile_switch, monkeypatch):
    """One-scenario calls (an ego env) and batched ones (a vector env) go to copies of the
    function with names of their own, so Dynamo's record of which shapes changed is kept
    apart for each; calls of one family share a copy. (torch.compile is replaced by a
    recorder here: this is about which copy is compiled, not about compiling.)"""
    from closedloop.envs.compiled import Kernel

    compiled = []

    def record(fn, **kwargs):
        compiled.append(fn.__name__)
        return fn

    monkeypatch.setattr(torch, "compile", record)
    compile_switch(True)

    offset = 1.0

    def double(x: torch.Tensor, scale: float, *, shift: float = 0.5) -> torch.Tensor:
        return x * scale + shift + offset  # a closure and a keyword default: the copies keep both

    twice = Kernel(double)
    assert torch.equal(twice(torch.ones(1, 3), 2.0), torch.full((1, 3), 3.5))
    twice(torch.ones(1, 5), 2.0)
    assert torch.equal(twice(torch.ones(16, 3), 3.0, shift=0.0), torch.full((16, 3), 4.0))
    twice(torch.ones(8, 3), 2.0)
    twice(torch.ones(8), 2.0)  # another rank: another family
    assert compiled == ["double__0", "double__1", "double__2"]
