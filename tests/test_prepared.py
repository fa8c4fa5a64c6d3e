"""Prepared scenarios: stacking scenarios collated and indexed one at a time equals
collating and indexing the batch, and episodes from stacked batches equal the others."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from closedloop.data.batch import cat_padded, collate_scenarios, stack_batches
from closedloop.data.synthetic import generate_scenarios
from closedloop.envs.dynamics import make_dynamics
from closedloop.envs.env import EnvConfig, EnvCore
from closedloop.envs.errors import SimulationError
from closedloop.envs.events import StopLines
from closedloop.envs.gym_vector import ego_vector_env
from closedloop.envs.map_index import OK, NearestPoints, RoadEdges
from closedloop.envs.observation import ObservationConfig, Observer
from closedloop.envs.prepared import MapIndexes, PreparedScenarios
from closedloop.envs.vector import BatchedEnv


@pytest.fixture(scope="module")
def town():
    # Different numbers of roadgraph points and lights per scenario, so stacking pads.
    return list(generate_scenarios(3, seed=5, town="grid", agents=(20, 40))) + list(
        generate_scenarios(2, seed=6, town="grid", agents=(10, 20))
    )


def mixed(town, real_scenarios):
    reals = list(real_scenarios.values())
    return [town[0], reals[0], town[3], reals[-1], town[0], town[1]]


def test_cat_padded_pads_every_dimension_but_the_first():
    a = torch.ones(1, 2, 3)
    b = torch.full((2, 3, 1), 2.0)
    out = cat_padded([a, b], -1.0)
    assert out.shape == (3, 3, 3)
    assert torch.equal(out[0, :2], a[0]) and bool((out[0, 2] == -1).all())
    assert torch.equal(out[1:, :, :1], b) and bool((out[1:, :, 1:] == -1).all())


def test_stacked_batches_equal_collated_ones(town, real_scenarios):
    chosen = mixed(town, real_scenarios)
    expected = collate_scenarios(chosen, max_agents=128, pad_agents=True)
    singles = [collate_scenarios([s], max_agents=128, pad_agents=True) for s in chosen]
    got = stack_batches(singles)
    assert got.scenario_id == expected.scenario_id
    assert got.current_time_index == expected.current_time_index
    for f in dataclasses.fields(expected):
        mine, theirs = getattr(got, f.name), getattr(expected, f.name)
        if isinstance(theirs, torch.Tensor):
            assert mine.dtype == theirs.dtype and torch.equal(mine, theirs), f.name


def test_stack_batches_refuses_different_agent_slots(town):
    a = collate_scenarios(town[:1], max_agents=64, pad_agents=True)
    b = collate_scenarios(town[1:2], max_agents=128, pad_agents=True)
    with pytest.raises(ValueError, match="agent slots"):
        stack_batches([a, b])
    with pytest.raises(ValueError, match="empty"):
        stack_batches([])


def equal_where(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a[where], b[where])


def test_stacked_indexes_equal_indexes_of_the_batch(town, real_scenarios):
    chosen = mixed(town, real_scenarios)
    batch = collate_scenarios(chosen, max_agents=128, pad_agents=True)
    parts = [MapIndexes.build(collate_scenarios([s], max_agents=128, pad_agents=True), 256) for s in chosen]
    got, expected = MapIndexes.stack(parts), MapIndexes.build(batch, 256)

    edges, theirs = got.edges, expected.edges
    for name in ("chunk_table", "chunk_centre", "chunk_radius", "group_table", "group_centre", "group_radius"):
        assert torch.equal(getattr(edges, name), getattr(theirs, name)), name
    assert (edges.chunks_per_agent, edges.groups_per_agent) == (theirs.chunks_per_agent, theirs.groups_per_agent)
    valid = theirs.features[..., OK] > 0
    assert torch.equal(edges.features[..., OK] > 0, valid)
    assert equal_where(edges.features, theirs.features, valid)  # padding rows are never read

    points, theirs = got.road_points, expected.road_points
    for name in ("points", "table", "centre", "radius", "chunk_valid"):
        assert torch.equal(getattr(points, name), getattr(theirs, name)), name
    assert points.chunks_per_agent == theirs.chunks_per_agent

    assert torch.equal(got.road_table, expected.road_table)
    assert torch.equal(got.light_colours, expected.light_colours)

    lines, theirs = got.stop_lines, expected.stop_lines
    assert torch.equal(lines.valid, theirs.valid) and lines.valid.any()
    for name in ("stop", "siblings", "sibling_may_go", "lane_points", "point"):
        assert torch.equal(getattr(lines, name), getattr(theirs, name)), name
    assert lines.any_stop == theirs.any_stop
    assert equal_where(lines.direction, theirs.direction, theirs.valid)
    L = theirs.valid.shape[1]
    both = torch.cat([theirs.valid, theirs.valid], 1)[:, None].expand_as(theirs.offsets)
    assert equal_where(lines.offsets, theirs.offsets, both)
    assert equal_where(lines.axes[..., :L], theirs.axes[..., :L], theirs.valid[:, None].expand(-1, 2, -1))


def test_stacked_road_edges_measure_as_the_batch_does(town, real_scenarios):
    """Signed distances through the stacked index equal those through the batch's, over a
    rollout of the log (neighbourhoods refreshed as agents move)."""
    from closedloop.envs.core import log_state
    from closedloop.envs.events import agent_corners

    chosen = mixed(town, real_scenarios)
    batch = collate_scenarios(chosen, max_agents=128, pad_agents=True)
    stacked = RoadEdges.stack([RoadEdges(collate_scenarios([s], max_agents=128, pad_agents=True)) for s in chosen])
    direct = RoadEdges(batch)
    state = log_state(batch)
    for t in range(batch.current_time_index, state.num_steps, 4):
        corners = agent_corners(state, t)
        assert torch.equal(stacked.signed_distance(corners), direct.signed_distance(corners)), t
    assert stacked.refreshed == direct.refreshed


def test_stacking_refuses_different_settings(town):
    one = collate_scenarios(town[:1], max_agents=128, pad_agents=True)
    with pytest.raises(ValueError, match="settings"):
        RoadEdges.stack([RoadEdges(one), RoadEdges(one, chunk=4)])
    xy, mask = one.road_xyz[..., :2], one.road_mask
    with pytest.raises(ValueError, match="keep"):
        NearestPoints.stack([NearestPoints(xy, mask, keep=64), NearestPoints(xy, mask, keep=128)])
    assert StopLines.stack([StopLines(one)] * 2).valid.shape[0] == 2


def roll(env, episodes: int, seed: int = 3) -> list:
    """Every output of ``episodes`` episodes (and the resets between them), actions drawn
    from a fixed generator."""
    generator = torch.Generator().manual_seed(seed)
    obs, info = env.reset(seed=seed)
    outputs = [(obs, info)]
    steps = episodes * (80 // env.dynamics.chunk + 1) - 1
    for _ in range(steps):
        spec = env.dynamics.spec
        low, high = torch.tensor(spec.low), torch.tensor(spec.high)
        shape = (*info["controlled"].shape, *spec.shape)
        actions = low + (high - low) * torch.rand(shape, generator=generator)
        outputs.append(env.step(actions))
        info = outputs[-1][-1]
    return outputs


def assert_same(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_batched_env_episodes_equal_with_and_without_prepared_scenarios(town, real_scenarios):
    """Every agent controlled, events of all: the same observations, rewards, flags and
    infos over two episodes (the second drawn after an auto-reset), scenarios prepared
    or collated anew."""
    scenarios = [town[0], town[3], list(real_scenarios.values())[0]]
    common = dict(batch_size=4, max_agents=128, dynamics="delta_local", terminate_on_collision=True)
    prepared = BatchedEnv(scenarios, **common)
    anew = BatchedEnv(scenarios, cached_scenarios=0, **common)
    assert_same(roll(prepared, 2), roll(anew, 2))
    assert prepared.prepared.hits > 0 and len(prepared.prepared) == 3
    assert anew.prepared.hits == 0 and len(anew.prepared) == 0


def test_ego_vector_env_equal_with_and_without_prepared_scenarios(town):
    """The SDCs of 6 scenarios drawn from 5 (the same scenario twice in a batch)."""
    outputs = []
    for cached in (128, 0):
        env = ego_vector_env(town, 6, cached_scenarios=cached)
        obs, _ = env.reset(seed=1)
        got = [obs]
        rng = np.random.default_rng(0)
        for _ in range(100):  # past the end of the log: a reset draws new scenarios
            actions = rng.uniform(-1, 1, (6, 2)).astype(np.float32)
            got.append(env.step(actions))
        outputs.append(got)
    prepared, anew = outputs
    for a, b in zip(prepared, anew):
        a, b = (a,) if not isinstance(a, tuple) else a, (b,) if not isinstance(b, tuple) else b
        for x, y in zip(a, b):
            if isinstance(x, dict):
                assert x.keys() == y.keys()
                for key in x:
                    np.testing.assert_array_equal(np.asarray(x[key]), np.asarray(y[key]), err_msg=key)
            else:
                np.testing.assert_array_equal(x, y)


def test_prepared_scenarios_know_scenarios_by_identity_and_keep_the_latest(town):
    cache = PreparedScenarios(max_agents=64, keep=256, capacity=2)
    cache.batch([town[0], town[1], town[0]])
    assert (cache.misses, cache.hits, len(cache)) == (2, 1, 2)
    copy = dataclasses.replace(town[0])  # equal content, another object: prepared anew
    cache.batch([copy])
    assert (cache.misses, len(cache)) == (3, 2)  # town[1], the least recently drawn, made room
    cache.batch([town[0]])
    assert cache.hits == 2
    cache.batch([town[1]])
    assert cache.misses == 4


def test_prepared_scenarios_refuse_a_negative_capacity():
    with pytest.raises(ValueError, match=">= 0"):
        PreparedScenarios(max_agents=8, keep=8, capacity=-1)


def test_env_core_and_observer_check_given_indexes(town):
    batch = collate_scenarios(town[:2], max_agents=64, pad_agents=True)
    maps = MapIndexes.build(collate_scenarios(town[:1], max_agents=64, pad_agents=True), 256)
    config = EnvConfig(make_dynamics("delta_local"))
    with pytest.raises(SimulationError, match="of 1 scenarios, the batch of 2"):
        EnvCore(batch, config, maps=maps)
    with pytest.raises(ValueError, match="keeps 256 candidates"):
        Observer(ObservationConfig(road_candidates=128), maps)
    core = EnvCore(batch, config)
    with pytest.raises(ValueError, match="scenarios x points"):
        Observer(ObservationConfig(), maps)(core.state)  # indexes of another batch


def test_only_short_list_sources_keep_prepared_scenarios_by_default(town):
    class Reading(torch.utils.data.Dataset):  # makes a new Scenario object at every access
        def __len__(self):
            return len(town)

        def __getitem__(self, i):
            return dataclasses.replace(town[i])

    assert BatchedEnv(town, batch_size=2).prepared.capacity == len(town)
    assert BatchedEnv(tuple(town), batch_size=2).prepared.capacity == len(town)
    assert BatchedEnv([town[0]] * 129, batch_size=2).prepared.capacity == 0  # mostly misses
    assert BatchedEnv(Reading(), batch_size=2).prepared.capacity == 0
    assert BatchedEnv(Reading(), batch_size=2, cached_scenarios=4).prepared.capacity == 4
    env = BatchedEnv(Reading(), batch_size=2, max_agents=64)
    env.reset(seed=0)
    assert len(env.prepared) == 0 and env.state.batch.batch_size == 2


def test_a_roadgraph_ending_with_a_road_edge_is_indexed_alike_alone_and_in_a_batch(town, real_scenarios):
    """A scenario whose roadgraph ends with a road edge, batched with one of more road-edge
    segments: the batch's padding segments must not continue that edge (they did, giving
    its last segment a zero-length successor and flipping the side of boxes past its end)."""
    from closedloop.constants import is_road_edge

    mine = collate_scenarios([town[4]], max_agents=128, pad_agents=True)
    other = collate_scenarios([list(real_scenarios.values())[0]], max_agents=128, pad_agents=True)
    edges_of = lambda b: int((is_road_edge(b.road_type) & b.road_mask).sum())  # noqa: E731
    assert mine.road_xyz.shape[1] > other.road_xyz.shape[1] and edges_of(mine) < edges_of(other)
    k = 10  # the last 10 points become a straight road edge along +x
    xyz, direction = mine.road_xyz.clone(), mine.road_dir.clone()
    xyz[0, -k:, 0], xyz[0, -k:, 1] = torch.arange(k) * 2.0 + 5000.0, 5000.0
    direction[0, -k:] = 0.0
    direction[0, -k:-1, 0] = 2.0
    road_type, road_id = mine.road_type.clone(), mine.road_id.clone()
    road_type[0, -k:] = other.road_type[0][is_road_edge(other.road_type[0])][0]
    road_id[0, -k:] = 999_999
    mine = dataclasses.replace(mine, road_xyz=xyz, road_dir=direction, road_type=road_type, road_id=road_id)

    alone, batched = RoadEdges.stack([RoadEdges(mine), RoadEdges(other)]), RoadEdges(stack_batches([mine, other]))
    valid = batched.features[..., OK] > 0
    assert equal_where(alone.features, batched.features, valid)
    box = torch.tensor([[5019.5, 4999.5], [5019.5, 4998.5], [5020.5, 4998.5], [5020.5, 4999.5]])  # past the end
    corners = torch.stack([box, box + 1e4])[:, None]
    assert torch.equal(alone.signed_distance(corners), batched.signed_distance(corners))
