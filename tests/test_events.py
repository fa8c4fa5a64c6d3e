"""Simulator events against independent computations: shapely for off-road and
collisions, a brute-force search over every road edge for the neighbourhoods."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from shapely.geometry import Point, Polygon, box
from shapely.affinity import rotate, translate

from closedloop.data import collate_scenarios
from closedloop.data.scenario import LIGHT_GO, LIGHT_STOP
from closedloop.envs import collisions, reset
from closedloop.envs.events import EventTracker, StopLines, agent_corners
from closedloop.envs import map_index
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


def test_offroad_neighbourhoods_find_the_nearest_edge_on_real_scenarios(real_scenarios, offroad_mode):
    batch = collate_scenarios(list(real_scenarios.values()))
    state = reset(batch)  # the log, every step
    edges = RoadEdges(batch)
    columns = edges.features[..., :5].clone()  # every segment, padding far away
    columns[edges.features[..., 5] == 0] = torch.tensor([FAR, FAR, 0.0, 0.0, 0.0])
    columns = columns.transpose(1, 2)[:, None, None]
    rows = torch.arange(batch.batch_size)[:, None, None]
    checked = 0
    for t in range(10, STEPS):
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
    assert checked > 500
    if offroad_mode == "selected":  # neighbourhoods are rebuilt only where needed
        assert edges.refreshed < 0.3 * int(batch.agent_mask.sum()) * (STEPS - 10)


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


def test_red_light_violation_at_the_crossing_step_only():
    lane = np.stack([np.linspace(-50, 50, 101), np.zeros(101)], -1)
    red = np.full(STEPS, LIGHT_STOP)
    green = np.full(STEPS, LIGHT_GO)
    cars = [{"xy": straight(-20.0, 0.0, 10.0)}, {"xy": straight(-20.0, 0.3, 10.0)}]
    for states, expected in ((red, True), (green, False)):
        batch = collate_scenarios([make_scenario(cars, lanes=[lane], lights=[(0, states, (0.0, 0.0))])])
        state = reset(batch)
        lines = StopLines(state)
        hits = {t: lines.violations(state.pose[:, :, t - 1, :2], state.pose[:, :, t, :2], t)[0]
                for t in range(11, STEPS)}
        crossing = [t for t, h in hits.items() if bool(h.any())]
        assert crossing == ([20] if expected else []), crossing
        if expected:
            assert hits[20][batch.agent_mask[0]].all()
        tracker = EventTracker(state)
        assert tracker(state, state)["red_light"].shape == state.controlled.shape
