"""Simulator events against independent computations: shapely for off-road and
collisions, a brute-force search over every road edge for the neighbourhoods."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from shapely.affinity import rotate, translate
from shapely.geometry import Point, Polygon, box

from closedloop.data import collate_scenarios
from closedloop.data.scenario import LIGHT_ARROW_STOP, LIGHT_GO, LIGHT_STOP
from closedloop.envs import collisions, map_index, reset
from closedloop.envs.core import log_state
from closedloop.envs.events import EventTracker, agent_corners
from closedloop.envs.map_index import FAR, RoadEdges, _point_segment_sq
from scenes import STEPS, make_scenario, straight


def _densify(ring: list[tuple[float, float]], spacing: float = 1.0) -> np.ndarray:
    """A closed polyline through ``ring`` with points every ``spacing`` metres."""
    points = []
    for a, b in zip(ring, ring[1:] + ring[:1]):
        a, b = np.asarray(a, float), np.asarray(b, float)
        n = max(int(np.ceil(np.linalg.norm(b - a) / spacing)), 1)
        points += [a + (b - a) * i / n for i in range(n)]
    points.append(points[0])
    return np.array(points)


def _random_boxes(rng, n: int, low, high) -> list[dict]:
    xy = rng.uniform(low, high, (n, 2))
    heading = rng.uniform(-np.pi, np.pi, n)
    size = rng.uniform([0.5, 0.5, 1.5], [7.0, 2.8, 1.5], (n, 3))
    return [{"xy": xy[i], "heading": heading[i], "size": tuple(size[i])} for i in range(n)]


def _shapely_box(track: dict) -> Polygon:
    length, width, _ = track["size"]
    shape = box(-length / 2, -width / 2, length / 2, width / 2)
    return translate(rotate(shape, track["heading"], use_radians=True, origin=(0, 0)), *track["xy"])


@pytest.fixture(params=["selected", "whole_batch"])
def offroad_mode(request, monkeypatch):
    """Both ways RoadEdges works: on selected agents (large batches) and on all (small)."""
    monkeypatch.setattr(map_index, "DENSE_AGENTS", 0 if request.param == "selected" else 10**9)
    return request.param


def test_offroad_signed_distance_matches_shapely_on_a_road_with_an_island(offroad_mode):
    # An L-shaped road (concave and convex vertices) with a square island in it. Edges keep
    # the road on their left: the outer ring runs counter-clockwise, the island clockwise.
    outer = [(0, 0), (60, 0), (60, 25), (25, 25), (25, 60), (0, 60)]
    island = [(8, 8), (8, 16), (16, 16), (16, 8)]
    road = Polygon(outer, holes=[island])
    rng = np.random.default_rng(0)
    tracks = _random_boxes(rng, 400, (-8, -8), (68, 68))
    scenario = make_scenario(tracks, road_edges=[_densify(outer), _densify(island)])
    batch = collate_scenarios([scenario])
    state = reset(batch)
    got = RoadEdges(batch).signed_distance(agent_corners(state))[0].double()
    slot = {int(k): i for i, k in enumerate(batch.agent_track_index[0].tolist()) if k >= 0}
    exact_checked = 0
    for k, track in enumerate(tracks):
        value = float(got[slot[k]])
        corners = np.asarray(_shapely_box(track).exterior.coords)[:4]
        expected = max((-1 if road.contains(Point(c)) else 1) * road.boundary.distance(Point(c)) for c in corners)
        half_diagonal = np.hypot(track["size"][0], track["size"][1]) / 2
        if road.boundary.distance(Point(track["xy"])) <= half_diagonal:  # exact zone
            assert abs(value - expected) < 1e-3, (k, value, expected)
            exact_checked += 1
        else:  # the box is wholly on one side: exact sign, a bound on the value
            assert np.sign(value) == np.sign(expected), (k, value, expected)
            assert (value >= expected - 1e-3) if expected < 0 else (value <= expected + 1e-3)
    assert exact_checked > 50


@pytest.mark.parametrize("shape", [{}, {"chunk": 8, "chunks_per_agent": 4, "group": 2, "groups_per_agent": 3}])
def test_offroad_neighbourhoods_find_the_nearest_edge_on_real_scenarios(real_scenarios, offroad_mode, shape):
    # The second shape keeps tiny neighbourhoods from few groups: the bounds from the
    # groups left out and from the chunks left out both decide refreshes there, and many
    # boxes need more than such a neighbourhood holds (measured against every edge).
    batch = collate_scenarios(list(real_scenarios.values()))
    state = log_state(batch)  # the log, every step
    edges = RoadEdges(batch, **shape)
    columns = edges.features[..., :5].clone()  # every segment, padding far away
    columns[edges.features[..., 5] == 0] = torch.tensor([FAR, FAR, 0.0, 0.0, 0.0])
    columns = columns.transpose(1, 2)[:, None, None]
    rows = torch.arange(batch.batch_size)[:, None, None]
    checked = 0
    last = STEPS if not shape else 40  # the tiny neighbourhoods measure many boxes against every edge: slow
    for t in range(10, last):
        corners = agent_corners(state, t)
        valid = state.valid[:, :, t] & batch.agent_mask
        got = edges.signed_distance(corners)  # every step, so neighbourhoods follow the agents
        if t % 4:
            continue
        nearest = _point_segment_sq(corners[..., 0:1], corners[..., 1:2], columns).argmin(-1)
        brute = edges._signed(rows, nearest, corners[..., 0], corners[..., 1]).amax(-1)
        centre = corners.mean(2)
        reach = torch.linalg.norm(corners[:, :, 0] - centre, dim=-1)
        centre_nearest = _point_segment_sq(centre[..., 0:1], centre[..., 1:2], columns[:, :, 0]).argmin(-1)
        centre_distance = edges._signed(rows[..., 0], centre_nearest, centre[..., 0], centre[..., 1]).abs()
        exact = valid & (centre_distance <= reach)
        assert torch.allclose(got[exact], brute[exact], atol=1e-4)
        assert torch.equal(got[valid] > 0, brute[valid] > 0)
        checked += int(exact.sum())
    assert checked > (500 if not shape else 150)
    agent_steps = int(batch.agent_mask.sum()) * (last - 10)
    if not shape:  # the default neighbourhoods are rebuilt only where needed, and rarely fall short
        assert edges.refreshed < 0.2 * agent_steps
        assert edges.exhaustive < 0.01 * agent_steps
    else:
        assert edges.exhaustive > 0


def test_offroad_leaves_inactive_agents_alone(real_scenarios, offroad_mode):
    """Boxes outside ``active`` are never rebuilt nor measured against every edge (an
    absent agent parked where its neighbourhood cannot vouch for it cost a search of every
    edge each step), and the active ones get the same values as with every box active."""
    batch = collate_scenarios(list(real_scenarios.values()))
    state = log_state(batch)
    tiny = {"chunk": 8, "chunks_per_agent": 4, "group": 2, "groups_per_agent": 3}  # many fall short
    every, present, none = RoadEdges(batch, **tiny), RoadEdges(batch, **tiny), RoadEdges(batch, **tiny)
    poses, from_pose = RoadEdges(batch, **tiny), RoadEdges(batch, **tiny)  # the event tracker's way
    for t in range(10, 30):
        corners = agent_corners(state, t)
        valid = state.valid[:, :, t] & batch.agent_mask
        expected = every.signed_distance(corners)
        assert torch.equal(present.signed_distance(corners, active=valid)[valid], expected[valid])
        none.signed_distance(corners, active=torch.zeros_like(valid))
        p, dims = state.pose[:, :, t], state.dims
        box = (p[..., 0], p[..., 1], p[..., 2].cos(), p[..., 2].sin(), dims[..., 0], dims[..., 1])
        all_boxes = poses.box_signed_distance(*box)
        assert torch.equal(from_pose.box_signed_distance(*box, active=valid)[valid], all_boxes[valid])
    assert every.exhaustive > present.exhaustive > 0 and every.refreshed > present.refreshed
    assert poses.exhaustive > from_pose.exhaustive
    assert none.exhaustive == 0 and none.refreshed == valid.numel()  # the first build only


def test_offroad_rejects_an_active_mask_of_the_wrong_shape_or_dtype(real_scenarios):
    batch = collate_scenarios(list(real_scenarios.values()))
    state = log_state(batch)
    edges, corners = RoadEdges(batch), agent_corners(state, 10)
    valid = state.valid[:, :, 10] & batch.agent_mask
    p, dims = state.pose[:, :, 10], state.dims
    box = (p[..., 0], p[..., 1], p[..., 2].cos(), p[..., 2].sin(), dims[..., 0], dims[..., 1])
    for bad in (valid[:, :1], valid.float()):
        with pytest.raises(ValueError, match="active must be a boolean mask of shape"):
            edges.signed_distance(corners, active=bad)
        with pytest.raises(ValueError, match="active must be a boolean mask of shape"):
            edges.box_signed_distance(*box, active=bad)
    assert torch.equal(
        edges.signed_distance(corners, active=valid)[valid], RoadEdges(batch).signed_distance(corners)[valid]
    )


def test_collisions_match_shapely_for_every_pair():
    rng = np.random.default_rng(1)
    tracks = _random_boxes(rng, 120, (0, 0), (40, 40))
    batch = collate_scenarios([make_scenario(tracks)])
    hit = collisions(reset(batch))[0]
    shapes = [_shapely_box(t) for t in tracks]
    expected = [any(a is not b and a.intersection(b).area > 1e-9 for b in shapes) for a in shapes]
    slot = batch.agent_track_index[0].tolist()
    got = [bool(hit[slot.index(k)]) for k in range(len(tracks))]
    assert got == expected and 10 < sum(expected) < 110


def test_late_agents_have_their_logged_box():
    late = np.zeros(STEPS, bool)
    late[30:] = True
    cars = [{"xy": straight(0.0, 0.0, 5.0)}, {"xy": straight(0.0, 6.0, 5.0), "valid": late, "size": (9.0, 2.5, 3.0)}]
    batch = collate_scenarios([make_scenario(cars)])
    state = reset(batch)
    slot = batch.agent_track_index[0].tolist()
    assert state.dims[0, slot.index(1)].tolist() == [9.0, 2.5, 3.0]
    assert batch.agent_dims[0, slot.index(1), 10].tolist() == [-1.0, -1.0, -1.0]


def _red_light_steps(scenario) -> dict[int, list[int]]:
    """Steps at which each track (by index) runs a red light when replaying the log."""
    batch = collate_scenarios([scenario])
    state = log_state(batch)
    tracker = EventTracker(state)
    steps: dict[int, list[int]] = {}
    for t in range(11, STEPS):
        previous, state = log_state(batch, t - 1), log_state(batch, t)
        for slot in torch.nonzero(tracker(previous, state)["red_light"][0])[:, 0].tolist():
            steps.setdefault(int(batch.agent_track_index[0, slot]), []).append(t)
    return steps


def test_red_light_violation_at_the_crossing_step_only():
    lane = np.stack([np.linspace(0, 50, 51), np.zeros(51)], -1)
    cars = [{"xy": straight(-20.0, 0.0, 10.0)}, {"xy": straight(-20.0, 0.3, 10.0)}, {"xy": straight(-20.0, 5.0, 10.0)}]
    for states, expected in ((np.full(STEPS, LIGHT_STOP), {0: [20], 1: [20]}), (np.full(STEPS, LIGHT_GO), {})):
        scenario = make_scenario(cars, lanes=[lane], lights=[(0, states, (0.0, 0.0))])
        assert _red_light_steps(scenario) == expected  # the car 5 m to the side is in another lane


def test_red_left_arrow_beside_a_green_through_light():
    # One stop line at (0, 0), two lanes leaving it: straight on (green) and a left turn
    # of radius 15 m (red arrow). Only the car that turns runs the red light, and that is
    # known once it is clearly on the turn lane.
    through = np.stack([np.linspace(0, 40, 81), np.zeros(81)], -1)
    angle = np.linspace(0, np.pi / 2, 48)
    left = np.stack([15 * np.sin(angle), 15 - 15 * np.cos(angle)], -1)
    t = np.arange(STEPS) * 0.1
    s = -20.0 + 10.0 * t  # metres along each car's path, past the stop line from step 20
    arc = np.clip(s, 0, None) / 15
    turning = np.where(
        s[:, None] < 0, np.stack([s, np.zeros_like(s)], -1), np.stack([15 * np.sin(arc), 15 - 15 * np.cos(arc)], -1)
    )
    turning[s > 15 * np.pi / 2] = [15.0, 15.0]  # done turning: wait there
    cars = [
        {"xy": straight(-20.0, 0.0, 10.0)},
        {"xy": turning, "heading": np.where(s < 0, 0.0, np.minimum(arc, np.pi / 2))},
    ]
    lights = [(0, np.full(STEPS, LIGHT_GO), (0.0, 0.0)), (1, np.full(STEPS, LIGHT_ARROW_STOP), (0.0, 0.0))]
    steps = _red_light_steps(make_scenario(cars, lanes=[through, left], lights=lights))
    assert list(steps) == [1] and len(steps[1]) == 1 and 21 <= steps[1][0] <= 35, steps


def _walk_and_compare(near, points, valid, positions, g, steps=60):
    for step_index in range(steps):
        jump = 30.0 if step_index == steps // 2 else 1.5  # a reset-like jump halfway
        positions = positions + (torch.rand(positions.shape, generator=g) - 0.5) * 2 * jump
        index, distance = near(positions, 8)
        brute = torch.cdist(positions, points, compute_mode="donot_use_mm_for_euclid_dist")
        brute = brute.masked_fill(~valid[:, None], float("inf")).topk(8, largest=False)
        assert torch.allclose(distance, brute.values, atol=1e-4)
        rows = torch.arange(len(points))[:, None, None]
        found = torch.linalg.norm(points[rows, index] - positions[:, :, None], dim=-1)
        assert torch.allclose(found, brute.values, atol=1e-4)


def test_nearest_points_stay_exact_as_agents_move():
    g = torch.Generator().manual_seed(3)
    points = torch.rand(2, 3000, 2, generator=g) * 200
    valid = torch.rand(2, 3000, generator=g) > 0.1
    near = map_index.NearestPoints(points, valid, keep=64)
    _walk_and_compare(near, points, valid, torch.rand(2, 16, 2, generator=g) * 200, g)
    assert near.searched < 0.5 * 2 * 16 * 60  # searches only where the kept points no longer vouch


def test_nearest_roadgraph_points_of_real_scenarios(real_scenarios):
    batch = collate_scenarios(list(real_scenarios.values()))
    points, valid = batch.road_xyz[..., :2], batch.road_mask
    near = map_index.NearestPoints(points, valid, keep=128, polyline_id=batch.road_id)
    g = torch.Generator().manual_seed(4)
    start = batch.agent_xyz[:, :24, 10, :2]  # logged agents: on and near the roads
    _walk_and_compare(near, points, valid, start, g, steps=30)


def test_events_of_some_agents_equal_those_of_all_agents():
    """The tracker asked about a subset (an ego env's SDC, or uneven counts per scenario)
    reports exactly what the full tracker reports for those agents, and nothing else."""
    from closedloop.data.synthetic import generate_scenarios
    from closedloop.envs.core import step
    from closedloop.envs.dynamics import make_dynamics

    batch = collate_scenarios(list(generate_scenarios(2, seed=7, town="grid", agents=(20, 30))))
    state = reset(batch)
    dynamics = make_dynamics("delta_local")
    generator = torch.Generator().manual_seed(0)
    subset = state.controlled & (torch.rand(state.controlled.shape, generator=generator) < 0.3)
    subset[1] = False
    subset[1, :3] = state.controlled[1, :3]  # fewer agents in the second scenario
    sdc = batch.is_sdc & state.controlled
    everyone, some, ego = EventTracker(state), EventTracker(state, subset), EventTracker(state, sdc)
    seen = {"collision": 0, "offroad": 0}
    for _ in range(30):
        actions = torch.zeros(*state.controlled.shape, 3)
        actions[..., 0] = 1.2  # 12 m/s straight ahead: collisions and off-road happen
        actions[..., 2] = torch.randn(state.controlled.shape, generator=generator) * 0.05
        nxt = step(state, actions, dynamics)
        full = everyone(state, nxt)
        for mask, tracker in ((subset, some), (sdc, ego)):
            part = tracker(state, nxt)
            for key in ("collision", "offroad", "red_light"):
                assert torch.equal(part[key], full[key] & mask), key
            assert torch.equal(part["distance_to_log"].nan_to_num(-1), full["distance_to_log"].nan_to_num(-1))
        seen = {key: seen[key] + int((full[key] & subset).sum()) for key in seen}
        state = nxt
    assert seen["collision"] > 0 and seen["offroad"] > 0  # the comparison covered both events


def test_batched_env_events_for_the_exposed_agents():
    from closedloop.data.synthetic import generate_scenarios
    from closedloop.envs.vector import BatchedEnv

    scenarios = list(generate_scenarios(2, seed=7, town="grid", agents=(20, 30)))
    envs = [BatchedEnv(scenarios, batch_size=2, controlled="sdc", events_for=mode) for mode in ("all", "exposed")]
    for env in envs:
        env.reset(seed=0)
    forward = torch.zeros(2, 128, 3)
    forward[..., 0] = 1.5
    for _ in range(20):
        (_, r_all, *_, i_all), (_, r_sdc, *_, i_sdc) = (env.step(forward) for env in envs)
        assert torch.equal(r_all, r_sdc)  # only the SDC is rewarded: the same rewards
        for key in ("collision", "offroad"):
            assert torch.equal(i_sdc[key], i_all[key] & i_all["controlled"])
    with pytest.raises(ValueError, match="events_for"):
        BatchedEnv(scenarios, events_for="some")
    from closedloop.envs.env import EnvConfig, EnvCore

    with pytest.raises(ValueError, match="events_for"):
        EnvCore(collate_scenarios(scenarios), EnvConfig(envs[0].dynamics), events_for="some")


def test_lane_point_indices_equal_a_dense_search():
    from closedloop.envs.events import lane_point_indices

    generator = torch.Generator().manual_seed(3)
    road_id = torch.randint(0, 40, (3, 500), generator=generator)
    road_mask = torch.rand(3, 500, generator=generator) < 0.9
    lane_id = torch.randint(-1, 45, (3, 7), generator=generator)  # some lanes with no point
    same_lane = (road_id[:, None, :] == lane_id[:, :, None]) & road_mask[:, None, :]
    P = road_id.shape[1]
    expected = torch.where(same_lane, torch.arange(P), P).sort(-1).values[..., : int(same_lane.sum(-1).max())]
    assert torch.equal(lane_point_indices(road_id, road_mask, lane_id), expected)


@pytest.mark.parametrize("copies", [1, 4])  # 1: the fused small-batch pass; 4 x 128 slots: corners first
def test_boxes_measured_from_their_pose_equal_boxes_measured_from_their_corners(real_scenarios, copies):
    """``box_signed_distance`` (corners made in the measuring pass) against
    ``signed_distance`` of the geometry's corners, over the logs of the real scenarios:
    the same values to float precision and the same off-road flags away from the edge.
    Boxes whose centre is within 1 cm of their half-diagonal from an edge are left out:
    there the answer switches between the exact corners and the far-box bound, and the
    two ways round the half-diagonal differently in the last bits."""
    from closedloop.geometry import box_corners

    scenarios = list(real_scenarios.values())
    batch = collate_scenarios([scenarios[i % len(scenarios)] for i in range(copies)], max_agents=128, pad_agents=True)
    state = log_state(batch)
    from_pose, from_corners, centres = RoadEdges(batch), RoadEdges(batch), RoadEdges(batch)
    for t in range(batch.current_time_index, state.num_steps, 5):
        p, dims = state.pose[:, :, t], state.dims
        heading = p[..., 2]
        got = from_pose.box_signed_distance(
            p[..., 0], p[..., 1], heading.cos(), heading.sin(), dims[..., 0], dims[..., 1]
        )
        corners = box_corners(p[..., 0], p[..., 1], heading, dims[..., 0], dims[..., 1])
        expected = from_corners.signed_distance(corners)
        centre = centres.signed_distance(p[:, :, None, :2].expand(-1, -1, 4, -1))  # boxes of size 0
        reach = torch.hypot(dims[..., 0], dims[..., 1]) / 2
        clear = ((centre.abs() - reach).abs() > 1e-2) & (expected.abs() > 1e-3)
        torch.testing.assert_close(got[clear], expected[clear], atol=1e-3, rtol=1e-5)
        assert torch.equal((got > 0)[clear], (expected > 0)[clear]) and int(clear.sum()) > 0.9 * clear.numel()


def test_sibling_may_go_is_the_per_step_rule(real_scenarios):
    """The precomputed ``sibling_may_go`` ``[B, L, T]`` equals, at every step, "some
    sibling of the light does not say stop" evaluated directly."""
    from closedloop.data.synthetic import generate_scenarios
    from closedloop.envs.events import StopLines

    scenarios = list(generate_scenarios(2, seed=5, town="grid", agents=(20, 30))) + list(real_scenarios.values())
    lines = StopLines(collate_scenarios(scenarios))
    assert int(lines.siblings.sum()) > 0
    for t in range(lines.stop.shape[-1]):
        direct = (lines.siblings & ~lines.stop[:, None, :, t]).any(-1)
        assert torch.equal(lines.sibling_may_go[:, :, t], direct), t
