"""The synthetic town: determinism, format, plausibility, safety and multimodality."""

from __future__ import annotations

import numpy as np
import pytest
from shapely import STRtree
from shapely.geometry import LineString, Point, Polygon
from waymo_open_dataset.protos import scenario_pb2

from closedloop.data import read_scenarios
from closedloop.data.scenario import MAP_KIND_INDEX, MAP_KINDS, TYPE_CYCLIST, TYPE_VEHICLE
from closedloop.data.synthetic import generate_dataset, generate_scenario, generate_scenarios
from closedloop.data.tfrecord import iter_records
from closedloop.inspect import summarize

DT = 0.1


@pytest.fixture(scope="module")
def town_scenarios():
    """A few dozen scenarios over all town types."""
    out = []
    for town, count in (("grid", 10), ("arterial", 8), ("cross", 6)):
        out += list(generate_scenarios(count, seed=7, town=town))
    return out


def test_dataset_is_byte_identical_for_a_seed(tmp_path):
    a = generate_dataset(tmp_path / "a", 4, seed=11, shards=2, progress=False)
    b = generate_dataset(tmp_path / "b", 4, seed=11, shards=2, workers=2, progress=False)
    assert [p.name for p in a] == [p.name for p in b]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))
    c = generate_dataset(tmp_path / "c", 4, seed=12, shards=2, progress=False)
    assert a[0].read_bytes() != c[0].read_bytes()


def test_output_parses_with_the_official_proto_and_our_reader(tmp_path):
    paths = generate_dataset(tmp_path, 3, seed=1, shards=1, progress=False)
    payloads = list(iter_records(paths[0]))
    official = [scenario_pb2.Scenario.FromString(p) for p in payloads]
    ours = list(read_scenarios(paths))
    assert [s.scenario_id for s in official] == [s.scenario_id for s in ours]
    for proto, scenario in zip(official, ours):
        assert len(proto.tracks) == scenario.num_tracks
        assert len(proto.timestamps_seconds) == 91 and proto.current_time_index == 10
        assert proto.tracks[proto.sdc_track_index].states[10].valid
        kinds = {f.WhichOneof("feature_data") for f in proto.map_features}
        assert kinds >= {"lane", "road_line", "road_edge", "crosswalk", "driveway"}


def test_every_map_kind_and_changing_lights(town_scenarios):
    kinds = set()
    for scenario in town_scenarios:
        kinds |= set(summarize(scenario)["map_feature_types"])
    assert kinds == set(MAP_KINDS)
    changing = [summarize(s)["num_traffic_light_lanes_changing"] for s in town_scenarios]
    assert sum(c > 0 for c in changing) >= len(changing) // 2
    road_lines = np.concatenate([s.map_subtype[s.map_kind == MAP_KIND_INDEX["road_line"]] for s in town_scenarios])
    assert {1, 2, 6, 7} <= set(road_lines.tolist())  # broken/solid white, solid/double yellow
    edges = np.concatenate([s.map_subtype[s.map_kind == MAP_KIND_INDEX["road_edge"]] for s in town_scenarios])
    assert set(edges.tolist()) == {1, 2}  # boundary and median


def test_agent_counts_masks_and_roles(town_scenarios):
    for s in town_scenarios:
        valid_now = s.valid_at_current().sum()
        assert 20 <= valid_now <= 120
        assert s.track_valid[s.sdc_track_index].all()
        assert len(s.tracks_to_predict) >= 1 and s.sdc_track_index not in s.tracks_to_predict
        assert len(np.unique(s.track_id)) == s.num_tracks
    entering = sum(((~s.track_valid[:, 0]) & s.track_valid[:, -1]).sum() for s in town_scenarios)
    leaving = sum((s.track_valid[:, 0] & ~s.track_valid[:, -1]).sum() for s in town_scenarios)
    assert entering > 0 and leaving > 0


def _finite_differences(s):
    """Speed, acceleration, jerk and yaw rate of every track from positions, with masks."""
    xy, valid = s.track_xyz[..., :2], s.track_valid
    speed = np.linalg.norm(np.diff(xy, axis=1), axis=-1) / DT
    speed_ok = valid[:, 1:] & valid[:, :-1]
    acc = np.diff(speed, axis=1) / DT
    acc_ok = speed_ok[:, 1:] & speed_ok[:, :-1]
    jerk = np.diff(acc, axis=1) / DT
    jerk_ok = acc_ok[:, 1:] & acc_ok[:, :-1]
    yaw = np.diff(np.unwrap(s.track_heading.astype(float), axis=1), axis=1) / DT
    return (speed, speed_ok), (acc, acc_ok), (jerk, jerk_ok), (yaw, speed_ok)


def test_kinematics_in_human_ranges(town_scenarios):
    """Vehicles: speed <= 22 m/s (45 mph limit x 1.05), |acc| <= 6.5 m/s^2, |yaw rate| <= 1.0 rad/s, 99th
    percentile |jerk| <= 5 m/s^3; pedestrians: speed <= 2 m/s."""
    jerks = []
    for s in town_scenarios:
        (speed, sok), (acc, aok), (jerk, jok), (yaw, yok) = _finite_differences(s)
        veh = np.isin(s.track_type, [TYPE_VEHICLE, TYPE_CYCLIST])[:, None]
        ped = (s.track_type == 2)[:, None]
        assert speed[sok & veh].max() <= 22.0
        assert speed[sok & ped].max() <= 2.0
        assert np.abs(acc[aok & veh]).max() <= 6.5
        assert np.abs(yaw[yok & veh]).max() <= 1.0
        jerks.append(np.abs(jerk[jok & veh]))
        # Logged velocities agree with the motion of the boxes.
        v_log = np.linalg.norm(s.track_velocity[:, 1:], axis=-1)
        assert np.abs(v_log - speed)[sok & veh].mean() < 0.1
    assert np.percentile(np.concatenate(jerks), 99) <= 5.0


def _box(s, a, t) -> Polygon:
    x, y = s.track_xyz[a, t, :2]
    length, width = s.track_dims[a, t, :2]
    c, sn = np.cos(s.track_heading[a, t]), np.sin(s.track_heading[a, t])
    corners = [
        (x + c * dl - sn * dw, y + sn * dl + c * dw)
        for dl, dw in (
            (length / 2, width / 2),
            (length / 2, -width / 2),
            (-length / 2, -width / 2),
            (-length / 2, width / 2),
        )
    ]
    return Polygon(corners)


def test_no_vehicle_overlaps_and_none_off_road(town_scenarios):
    checked = 0
    for s in town_scenarios:
        edges = [
            LineString(s.map_polyline(i)[:, :2])
            for i in range(s.num_map_features)
            if s.map_kind[i] == MAP_KIND_INDEX["road_edge"]
        ]
        edge_tree = STRtree(edges)
        vehicles = np.flatnonzero(np.isin(s.track_type, [TYPE_VEHICLE, TYPE_CYCLIST]))
        for t in range(0, 91, 3):
            here = [a for a in vehicles if s.track_valid[a, t]]
            boxes = [_box(s, a, t) for a in here]
            tree = STRtree(boxes)
            for i, box in enumerate(boxes):
                for j in tree.query(box, predicate="intersects"):
                    if j != i:
                        assert box.intersection(boxes[j]).area < 1e-6, (
                            f"{s.scenario_id}: tracks {here[i]} and {here[j]} overlap at step {t}"
                        )
                assert len(edge_tree.query(box, predicate="intersects")) == 0, (
                    f"{s.scenario_id}: track {here[i]} crosses a road edge at step {t}"
                )
                # The centre is on the road: road edges keep the road on their left.
                centre = Point(*s.track_xyz[here[i], t, :2])
                edge = edges[edge_tree.nearest(centre)]
                u = edge.project(centre)
                p0, p1 = edge.interpolate(max(u - 0.5, 0)), edge.interpolate(min(u + 0.5, edge.length))
                cross = (p1.x - p0.x) * (centre.y - p0.y) - (p1.y - p0.y) * (centre.x - p0.x)
                assert cross > 0, f"{s.scenario_id}: track {here[i]} is off the road at step {t}"
                checked += 1
    assert checked > 10_000


def test_multimodal_futures_from_the_same_approach():
    """Vehicles entering the single intersection of the 'cross' town from the same approach
    leave it turning left, going straight and turning right, in different scenarios."""
    maneuvers: dict[int, set[str]] = {d: set() for d in range(4)}
    for scenario in generate_scenarios(20, seed=3, town="cross"):
        heading = np.unwrap(scenario.track_heading.astype(float), axis=1)
        xy = scenario.track_xyz[..., :2]
        inside = (np.abs(xy) < 12).all(-1) & scenario.track_valid
        for a in np.flatnonzero((scenario.track_type == TYPE_VEHICLE) & inside.any(1)):
            valid = np.flatnonzero(scenario.track_valid[a])
            start = valid[0]
            if np.abs(xy[a, start]).max() < 12:
                continue  # already inside at the first step: approach unknown
            approach = int(np.round(heading[a, start] / (np.pi / 2))) % 4
            turn = heading[a, valid[-1]] - heading[a, start]
            maneuvers[approach].add("left" if turn > 0.5 else "right" if turn < -0.5 else "straight")
    assert any(m == {"left", "straight", "right"} for m in maneuvers.values()), maneuvers
    assert all(len(m) >= 2 for m in maneuvers.values()), maneuvers


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown town"):
        generate_scenario(0, town="mars")
    with pytest.raises(ValueError, match="MIN:MAX"):
        generate_scenario(0, agents=(10, 5))
    with pytest.raises(ValueError, match="at least 1"):
        generate_dataset(tmp_path, 0)
