import numpy as np
import pytest
from waymo_open_dataset.protos import scenario_pb2

from closedloop.data import (
    ScenarioDecodeError,
    SkipCounter,
    read_scenarios,
    scenario_from_proto,
    scenario_to_proto,
    write_scenarios,
)
from closedloop.data.scenario import MAP_KINDS, Scenario
from closedloop.data.tfrecord import TFRecordError, encode_record, iter_records
from closedloop.inspect import summarize


def _proto(path):
    proto = scenario_pb2.Scenario()
    proto.ParseFromString(next(iter_records(path)))
    return proto


def test_known_counts_of_real_scenarios(real_scenarios):
    s = summarize(real_scenarios["637f20cafde22ff8"])
    assert s["num_tracks"] == 83
    assert s["track_types"] == {"vehicle": 70, "pedestrian": 10, "cyclist": 3, "other": 0}
    assert s["num_map_features"] == 301 and s["num_steps"] == 91
    assert s["sdc_track_index"] == 82 and s["num_valid_at_current"] == 50
    assert s["map_feature_types"] == {
        "lane": 199,
        "road_line": 59,
        "road_edge": 28,
        "stop_sign": 8,
        "crosswalk": 4,
        "speed_bump": 3,
    }
    assert s["tracks_to_predict"] == [72, 43, 42]
    large = summarize(real_scenarios["ee519cf571686d19"])
    assert large["num_tracks"] == 257 and large["num_valid_at_current"] == 84
    assert large["objects_of_interest"] == [625, 2694]
    assert large["num_traffic_light_lanes"] == 0


def test_state_values_match_the_proto(scenario_file, real_scenarios):
    proto = _proto(scenario_file)
    scenario = real_scenarios["637f20cafde22ff8"]
    rng = np.random.default_rng(0)
    for a, t in zip(rng.integers(0, 83, 40), rng.integers(0, 91, 40)):
        state = proto.tracks[a].states[t]
        assert scenario.track_id[a] == proto.tracks[a].id
        assert scenario.track_type[a] == proto.tracks[a].object_type
        assert tuple(scenario.track_xyz[a, t]) == (state.center_x, state.center_y, state.center_z)
        np.testing.assert_array_equal(scenario.track_dims[a, t], np.float32([state.length, state.width, state.height]))
        assert scenario.track_heading[a, t] == np.float32(state.heading)
        assert tuple(scenario.track_velocity[a, t]) == (np.float32(state.velocity_x), np.float32(state.velocity_y))
        assert scenario.track_valid[a, t] == state.valid
    np.testing.assert_array_equal(scenario.timestamps_seconds, proto.timestamps_seconds)


def test_map_features_match_the_proto(scenario_file, real_scenarios):
    proto = _proto(scenario_file)
    scenario = real_scenarios["637f20cafde22ff8"]
    for i, feature in enumerate(proto.map_features):
        kind = feature.WhichOneof("feature_data")
        assert MAP_KINDS[scenario.map_kind[i]] == kind and scenario.map_id[i] == feature.id
        data = getattr(feature, kind)
        points = (
            [data.position]
            if kind == "stop_sign"
            else data.polygon
            if kind in ("crosswalk", "speed_bump", "driveway")
            else data.polyline
        )
        np.testing.assert_array_equal(
            scenario.map_polyline(i), np.array([[p.x, p.y, p.z] for p in points]).reshape(-1, 3)
        )
        if kind == "lane":
            entries = scenario.lane_entry_lanes[scenario.lane_entry_splits[i] : scenario.lane_entry_splits[i + 1]]
            assert entries.tolist() == list(data.entry_lanes)
            assert scenario.lane_speed_limit_mph[i] == data.speed_limit_mph


def test_traffic_light_states_per_step(scenario_file, real_scenarios):
    proto = _proto(scenario_file)
    scenario = real_scenarios["637f20cafde22ff8"]
    assert scenario.num_dynamic_states == len(proto.dynamic_map_states) == 91
    for step, dynamic in enumerate(proto.dynamic_map_states):
        rows = scenario.light_step == step
        assert rows.sum() == len(dynamic.lane_states)
        assert scenario.light_lane[rows].tolist() == [ls.lane for ls in dynamic.lane_states]
        assert scenario.light_state[rows].tolist() == [ls.state for ls in dynamic.lane_states]
    # Lights change over the scenario: some lane has more than one state.
    changing = [
        lane
        for lane in np.unique(scenario.light_lane)
        if len(np.unique(scenario.light_state[scenario.light_lane == lane])) > 1
    ]
    assert len(changing) == 8


@pytest.mark.parametrize("scenario_id", ["637f20cafde22ff8", "ee519cf571686d19"])
def test_round_trip_proto_record_proto_record_is_exact(real_scenarios, scenario_id):
    scenario = real_scenarios[scenario_id]
    again = scenario_from_proto(scenario_to_proto(scenario))
    assert again.equals(scenario)


def test_round_trip_through_arrays_and_files(tmp_path, real_scenarios):
    scenarios = list(real_scenarios.values())
    path = tmp_path / "out.tfrecord"
    assert write_scenarios(path, scenarios) == 2
    for original, read in zip(scenarios, read_scenarios(path)):
        assert read.equals(original)
        assert Scenario.from_arrays(original.to_arrays()).equals(original)


def test_read_motion_tf_example(example_file, tmp_path):
    (scenario,) = read_scenarios(example_file)
    assert scenario.scenario_id == "a3bb37c25ce56418"
    assert scenario.num_steps == 91 and scenario.current_time_index == 10
    assert scenario.num_tracks == 128 and scenario.sdc_track_index >= 0
    assert scenario.track_id[0] == 7 and scenario.track_valid[0, 10]
    assert scenario.track_xyz[0, 0, 0] == pytest.approx(-344.7308044)
    assert scenario.map_points.shape == (20000, 3)
    assert set(np.unique(scenario.map_kind)) <= set(range(len(MAP_KINDS)))
    assert len(np.unique(scenario.light_lane)) == 21
    # It converts to a Scenario proto and back unchanged.
    assert scenario_from_proto(scenario_to_proto(scenario)).equals(scenario)


def test_non_scenario_record_is_a_clear_error(tmp_path):
    path = tmp_path / "junk.tfrecord"
    path.write_bytes(encode_record(b"\xff\xff\xff not a proto"))
    with pytest.raises(ScenarioDecodeError, match=r"junk.tfrecord: record 0: not a WOMD Scenario"):
        list(read_scenarios(path))


def test_skip_mode_counts_bad_records(tmp_path, scenario_file):
    good = next(iter_records(scenario_file))
    path = tmp_path / "mixed.tfrecord"
    path.write_bytes(encode_record(good) + encode_record(b"\xff\xffjunk") + encode_record(good))
    skipped = SkipCounter()
    with pytest.warns(UserWarning, match="record 1"):
        scenarios = list(read_scenarios(path, on_error="skip", skipped=skipped))
    assert len(scenarios) == 2 and len(skipped) == 1
    # A truncated tail is skipped (and counted) too, keeping what came before.
    truncated = tmp_path / "truncated.tfrecord"
    truncated.write_bytes(encode_record(good) + encode_record(good)[:-100])
    skipped = SkipCounter()
    with pytest.warns(UserWarning, match="truncated"):
        assert len(list(read_scenarios(truncated, on_error="skip", skipped=skipped))) == 1
    assert len(skipped) == 1
    with pytest.raises(ValueError, match="on_error"):
        list(read_scenarios(path, on_error="ignore"))


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        list(read_scenarios(str(tmp_path / "nothing-here*.tfrecord")))


def test_skip_mode_skips_only_a_record_with_a_corrupt_payload(tmp_path, scenario_file):
    good = encode_record(next(iter_records(scenario_file)))
    data = bytearray(good * 2)
    data[12 + 1000] ^= 0x01  # one bit in record 0's payload; length and header CRC intact
    path = tmp_path / "flipped.tfrecord"
    path.write_bytes(bytes(data))
    skipped = SkipCounter()
    with pytest.warns(UserWarning, match=r"skipping bad record: .*record 0 .*CRC mismatch in the payload"):
        scenarios = list(read_scenarios(path, on_error="skip", skipped=skipped))
    assert [s.scenario_id for s in scenarios] == ["637f20cafde22ff8"] and len(skipped) == 1
    with pytest.raises(TFRecordError, match="record 0"):
        list(read_scenarios(path))


def test_skip_mode_ends_the_file_at_broken_framing(tmp_path, scenario_file):
    good = encode_record(next(iter_records(scenario_file)))
    data = bytearray(good * 2)
    data[1] ^= 0x01  # record 0's length: nothing after it can be located
    path = tmp_path / "framing.tfrecord"
    path.write_bytes(bytes(data))
    skipped = SkipCounter()
    with pytest.warns(UserWarning, match=r"rest of a corrupt file: .*record 0 .*length header"):
        assert list(read_scenarios(path, on_error="skip", skipped=skipped)) == []
    assert len(skipped) == 1


def _mutated_example(example_file, mutate) -> bytes:
    from closedloop.data.tfexample import example_class

    example = example_class()()
    example.ParseFromString(next(iter_records(example_file)))
    mutate(example.features.feature)
    return example.SerializeToString()


def _set_bytes(feature, value: list[bytes]) -> None:
    feature.bytes_list.value[:] = value  # assigning the oneof member drops the numbers


@pytest.mark.parametrize(
    "feature, mutate",
    [
        ("scenario/id", lambda f: f["scenario/id"].bytes_list.value.pop()),
        ("state/current/x", lambda f: _set_bytes(f["state/current/x"], [b"1.0"] * 128)),
        (
            "state/tracks_to_predict",
            lambda f: f["state/tracks_to_predict"].int64_list.value.__delitem__(slice(5, None)),
        ),
        (
            "roadgraph_samples/valid",
            lambda f: f["roadgraph_samples/valid"].int64_list.value.__delitem__(slice(100, None)),
        ),
        ("state/is_sdc", lambda f: f.__delitem__("state/is_sdc")),
        ("state/id", lambda f: f["state/id"].float_list.value.__setitem__(0, 0.5)),
        ("roadgraph_samples/type", lambda f: f["roadgraph_samples/type"].int64_list.value.__setitem__(0, 99)),
        ("traffic_light_state/past/state", lambda f: f["traffic_light_state/past/state"].int64_list.value.append(1)),
    ],
)
def test_malformed_tf_example_names_record_and_feature(tmp_path, example_file, feature, mutate):
    good = next(iter_records(example_file))
    path = tmp_path / "bad_example.tfrecord"
    path.write_bytes(encode_record(_mutated_example(example_file, mutate)) + encode_record(good))
    with pytest.raises(ScenarioDecodeError, match=rf"bad_example.tfrecord: record 0: .*'{feature}'"):
        list(read_scenarios(path))
    skipped = SkipCounter()
    with pytest.warns(UserWarning, match=feature):
        scenarios = list(read_scenarios(path, on_error="skip", skipped=skipped))
    assert [s.scenario_id for s in scenarios] == ["a3bb37c25ce56418"] and len(skipped) == 1


def _set_neighbor_index(proto) -> None:
    lane = next(f.lane for f in proto.map_features if f.lane.left_neighbors)
    lane.left_neighbors[0].self_end_index = 10**6


def _set_neighbor_far_index(proto) -> None:
    lane = next(f.lane for f in proto.map_features if f.lane.left_neighbors)
    lane.left_neighbors[0].neighbor_end_index = 10**6  # into the neighbour's polyline


def _set_boundary_index(proto) -> None:
    lane = next(f.lane for f in proto.map_features if f.lane.right_boundaries)
    lane.right_boundaries[0].lane_start_index = -3


@pytest.mark.parametrize(
    "field, mutate",
    [
        ("sdc_track_index", lambda p: setattr(p, "sdc_track_index", 83)),
        ("current_time_index", lambda p: setattr(p, "current_time_index", 91)),
        ("tracks_to_predict", lambda p: setattr(p.tracks_to_predict[1], "track_index", -1)),
        ("tracks_to_predict", lambda p: setattr(p.tracks_to_predict[0], "track_index", 1000)),
        ("left_neighbors", _set_neighbor_index),
        ("left_neighbors: neighbour", _set_neighbor_far_index),
        ("right_boundaries", _set_boundary_index),
        ("dynamic_map_states", lambda p: p.dynamic_map_states.add()),
        ("tracks", lambda p: p.tracks[3].states.add()),
    ],
)
def test_out_of_range_references_are_decode_errors(tmp_path, scenario_file, field, mutate):
    proto = _proto(scenario_file)
    mutate(proto)
    path = tmp_path / "refs.tfrecord"
    path.write_bytes(encode_record(proto.SerializeToString()))
    with pytest.raises(ScenarioDecodeError, match=rf"refs.tfrecord: record 0: malformed scenario: .*{field}"):
        list(read_scenarios(path))
