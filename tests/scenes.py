"""Small hand-built scenarios for metric and simulator tests."""

from __future__ import annotations

import numpy as np

from closedloop.data.scenario import MAP_KIND_INDEX, Scenario

STEPS = 91


def make_scenario(
    tracks: list[dict], road_edges=(), lanes=(), lights=(), scenario_id="hand", sdc: int = 0, predict=()
) -> Scenario:
    """``tracks``: dicts with ``xy`` [91, 2] (or [2] for a parked object), optional
    ``heading`` [91] (default: direction of motion), ``size`` (length, width, height),
    ``type`` (1 vehicle), ``valid`` [91], ``z``. ``road_edges`` / ``lanes``: lists of
    [n, 2] or [n, 3] polylines (lane ids are 1000 + index). ``lights``: (lane index,
    state per step [91], stop point (x, y))."""
    num = len(tracks)
    xyz = np.zeros((num, STEPS, 3))
    heading = np.zeros((num, STEPS), np.float32)
    dims = np.zeros((num, STEPS, 3), np.float32)
    valid = np.ones((num, STEPS), bool)
    types = np.ones(num, np.int8)
    for i, t in enumerate(tracks):
        xy = np.broadcast_to(np.asarray(t["xy"], float), (STEPS, 2))
        xyz[i, :, :2] = xy
        xyz[i, :, 2] = t.get("z", 0.0)
        if "heading" in t:
            heading[i] = np.broadcast_to(t["heading"], (STEPS,))
        else:
            d = np.gradient(xy, axis=0)
            heading[i] = np.arctan2(d[:, 1], d[:, 0])
        dims[i] = t.get("size", (4.0, 2.0, 1.5))
        valid[i] = t.get("valid", True)
        dims[i, ~valid[i]] = -1.0  # as WOMD marks invalid states
        types[i] = t.get("type", 1)
    polylines = [np.asarray(p, float) for p in road_edges] + [np.asarray(p, float) for p in lanes]
    polylines = [np.pad(p, ((0, 0), (0, 3 - p.shape[1]))) for p in polylines]
    kinds = [MAP_KIND_INDEX["road_edge"]] * len(road_edges) + [MAP_KIND_INDEX["lane"]] * len(lanes)
    subtypes = [1] * len(road_edges) + [2] * len(lanes)
    ids = list(range(1, len(road_edges) + 1)) + [1000 + k for k in range(len(lanes))]
    splits = np.concatenate([[0], np.cumsum([len(p) for p in polylines])]).astype(np.int64)
    m = len(polylines)
    rows = [(step, 1000 + lane, state[step], stop[0], stop[1]) for lane, state, stop in lights for step in range(STEPS)]
    return Scenario(
        scenario_id=scenario_id,
        timestamps_seconds=np.arange(STEPS) * 0.1,
        current_time_index=10,
        sdc_track_index=sdc,
        track_id=np.arange(1, num + 1, dtype=np.int64),
        track_type=types,
        track_xyz=xyz,
        track_dims=dims,
        track_heading=heading,
        track_velocity=np.zeros((num, STEPS, 2), np.float32),
        track_valid=valid,
        tracks_to_predict=np.asarray(predict, np.int32),
        tracks_to_predict_difficulty=np.zeros(len(predict), np.int8),
        map_id=np.array(ids, np.int64),
        map_kind=np.array(kinds, np.int8),
        map_subtype=np.array(subtypes, np.int8),
        map_points=np.concatenate(polylines) if polylines else np.zeros((0, 3)),
        map_point_splits=splits,
        lane_speed_limit_mph=np.zeros(m),
        lane_interpolating=np.zeros(m, bool),
        lane_entry_splits=np.zeros(m + 1, np.int64),
        lane_exit_splits=np.zeros(m + 1, np.int64),
        lane_left_boundary_splits=np.zeros(m + 1, np.int64),
        lane_right_boundary_splits=np.zeros(m + 1, np.int64),
        lane_left_neighbor_splits=np.zeros(m + 1, np.int64),
        lane_right_neighbor_splits=np.zeros(m + 1, np.int64),
        stop_sign_lane_splits=np.zeros(m + 1, np.int64),
        num_dynamic_states=STEPS if lights else 0,
        light_step=np.array([r[0] for r in rows], np.int32),
        light_lane=np.array([r[1] for r in rows], np.int64),
        light_state=np.array([r[2] for r in rows], np.int8),
        light_stop_point=np.array([[r[3], r[4], 0.0] for r in rows]).reshape(-1, 3),
    )


def straight(x0: float, y0: float, vx: float, vy: float = 0.0) -> np.ndarray:
    t = np.arange(STEPS) * 0.1
    return np.stack([x0 + vx * t, y0 + vy * t], -1)
