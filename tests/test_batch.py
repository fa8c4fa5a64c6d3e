import numpy as np
import pytest
import torch

from closedloop.data import collate_scenarios, select_agents


def test_collate_shapes_masks_and_origin(real_scenarios):
    small, large = real_scenarios["637f20cafde22ff8"], real_scenarios["ee519cf571686d19"]
    batch = collate_scenarios([small, large], max_agents=128)
    assert batch.scenario_id == ["637f20cafde22ff8", "ee519cf571686d19"]
    assert batch.agent_xyz.shape == (2, 128, 91, 3) and batch.agent_xyz.dtype == torch.float32
    assert batch.agent_mask.sum(1).tolist() == [83, 128]
    # Positions are relative to the SDC at the current step: the SDC sits at the origin.
    sdc_xy = batch.agent_xyz[batch.is_sdc][:, 10, :2]
    assert torch.allclose(sdc_xy, torch.zeros(2, 2), atol=1e-4)
    assert torch.allclose(batch.origin[0], torch.tensor(small.track_xyz[82, 10, :2], dtype=torch.float64))
    # Absolute positions are recovered to float64 precision from origin + float32 offsets.
    a = int(np.flatnonzero(small.track_valid[:, 10])[3])
    recovered = batch.agent_xyz[0, a, 10, :2].double() + batch.origin[0]
    assert torch.allclose(recovered, torch.tensor(small.track_xyz[a, 10, :2]), atol=1e-3)
    assert batch.tracks_to_predict[0].sum() == 3 and batch.objects_of_interest[1].sum() == 2
    assert batch.light_mask.sum(1).tolist() == [12, 0]
    # The light state tensor matches the record's per-step rows.
    lane = int(batch.light_lane_id[0, 0])
    rows = small.light_lane == lane
    assert batch.light_state[0, 0, small.light_step[rows]].tolist() == small.light_state[rows].tolist()
    assert batch.road_mask[0].sum() > small.map_points.shape[0]  # polygons are closed


def test_truncation_keeps_sdc_predicted_and_scored(real_scenarios):
    large = real_scenarios["ee519cf571686d19"]
    kept, dropped = select_agents(large, 100)
    assert dropped == 0 and len(kept) == 100
    assert large.sdc_track_index in kept
    assert set(large.tracks_to_predict) <= set(kept)
    assert set(np.flatnonzero(large.track_valid[:, 10])) <= set(kept)
    assert np.all(np.diff(kept) > 0)  # track order


def test_truncation_refuses_to_drop_scored_agents(real_scenarios):
    large = real_scenarios["ee519cf571686d19"]
    with pytest.raises(ValueError, match=r"ee519cf571686d19: 84 objects are valid"):
        collate_scenarios([large], max_agents=64)
    with pytest.warns(UserWarning, match="dropped 20 scored"):
        batch = collate_scenarios([large], max_agents=64, allow_drop_scored=True)
    assert batch.num_dropped_scored.tolist() == [20]
    # The kept scored agents are the ones closest to the SDC.
    with pytest.warns(UserWarning):
        kept, _ = select_agents(large, 64, allow_drop_scored=True)
    cur = large.track_valid[:, 10]
    dist = np.linalg.norm(large.track_xyz[:, 10, :2] - large.track_xyz[256, 10, :2], axis=1)
    kept_scored = [k for k in kept if cur[k] and k not in large.tracks_to_predict]
    dropped = [i for i in np.flatnonzero(cur) if i not in kept]
    assert max(dist[kept_scored]) <= min(dist[dropped])


def test_batch_to_device_and_errors(real_scenarios):
    batch = collate_scenarios([real_scenarios["637f20cafde22ff8"]])
    moved = batch.to("cpu")
    assert moved.agent_xyz.device.type == "cpu" and moved.scenario_id == batch.scenario_id
    with pytest.raises(ValueError, match="empty"):
        collate_scenarios([])


def test_select_scenarios_picks_rows_with_repeats(real_scenarios):
    from closedloop.data.batch import select_scenarios

    batch = collate_scenarios(list(real_scenarios.values()))
    picked = select_scenarios(batch, [1, 1, 0])
    assert picked.scenario_id == [batch.scenario_id[1], batch.scenario_id[1], batch.scenario_id[0]]
    assert torch.equal(picked.agent_xyz[2], batch.agent_xyz[0]) and torch.equal(picked.road_xyz[0], batch.road_xyz[1])
    assert torch.equal(picked.origin[1], batch.origin[1]) and picked.current_time_index == batch.current_time_index


def test_roadgraph_points_equal_a_loop_over_map_features(real_scenarios):
    """The collated roadgraph (one gather for all features) against a plain loop over the
    features: points in order, polygons closed by their first point, directions to the next
    point (zero at a feature's last), type codes and feature ids."""
    from closedloop.data.batch import _road_points
    from closedloop.data.scenario import POLYGON_KINDS, road_type_code
    from closedloop.data.synthetic import generate_scenarios

    def by_feature(s):
        points, directions, codes, ids = [], [], [], []
        for i, (kind, subtype, fid) in enumerate(zip(s.map_kind, s.map_subtype, s.map_id)):
            poly = s.map_points[s.map_point_splits[i] : s.map_point_splits[i + 1]]
            if len(poly) == 0:
                continue
            if int(kind) in POLYGON_KINDS and len(poly) > 1:
                poly = np.concatenate([poly, poly[:1]])
            direction = np.zeros_like(poly)
            direction[:-1] = poly[1:] - poly[:-1]
            points.append(poly)
            directions.append(direction)
            codes += [road_type_code(int(kind), int(subtype))] * len(poly)
            ids += [int(fid)] * len(poly)
        return np.concatenate(points), np.concatenate(directions), np.array(codes), np.array(ids)

    scenarios = list(real_scenarios.values()) + list(generate_scenarios(2, seed=3, town="cross"))
    for scenario in scenarios:
        got, expected = _road_points(scenario), by_feature(scenario)
        for a, b in zip(got, expected):
            assert a.shape == b.shape and np.array_equal(a, b), scenario.scenario_id
        assert got[2].dtype == np.int64 and got[3].dtype == np.int64
