"""One-line and JSON summaries of scenarios (what ``closedloop inspect`` prints)."""

from __future__ import annotations

import numpy as np

from closedloop.data.scenario import (
    MAP_KINDS,
    TYPE_CYCLIST,
    TYPE_OTHER,
    TYPE_PEDESTRIAN,
    TYPE_UNSET,
    TYPE_VEHICLE,
    Scenario,
)


def summarize(scenario: Scenario) -> dict:
    """The ``closedloop inspect --json`` object of one scenario."""
    types = scenario.track_type
    track_types = {
        "vehicle": int((types == TYPE_VEHICLE).sum()),
        "pedestrian": int((types == TYPE_PEDESTRIAN).sum()),
        "cyclist": int((types == TYPE_CYCLIST).sum()),
        "other": int((types == TYPE_OTHER).sum()),
    }
    if (types == TYPE_UNSET).any():
        track_types["unset"] = int((types == TYPE_UNSET).sum())
    kinds = np.bincount(scenario.map_kind.astype(np.int64), minlength=len(MAP_KINDS))
    light_lanes = np.unique(scenario.light_lane)
    changing = 0
    for lane in light_lanes:
        states = scenario.light_state[scenario.light_lane == lane]
        changing += int(len(np.unique(states)) > 1)
    return {
        "scenario_id": scenario.scenario_id,
        "num_tracks": scenario.num_tracks,
        "num_map_features": scenario.num_map_features,
        "num_steps": scenario.num_steps,
        "current_time_index": scenario.current_time_index,
        "sdc_track_index": scenario.sdc_track_index,
        "track_types": track_types,
        "map_feature_types": {name: int(n) for name, n in zip(MAP_KINDS, kinds) if n},
        "num_valid_at_current": int(scenario.valid_at_current().sum()),
        "tracks_to_predict": scenario.tracks_to_predict.tolist(),
        "objects_of_interest": scenario.objects_of_interest.tolist(),
        "num_map_points": int(scenario.map_points.shape[0]),
        "num_traffic_light_lanes": int(len(light_lanes)),
        "num_traffic_light_lanes_changing": changing,
    }


def summary_line(summary: dict) -> str:
    """The one-line text form of :func:`summarize`."""
    tt = summary["track_types"]
    maps = " ".join(f"{k}={v}" for k, v in summary["map_feature_types"].items())
    return (
        f"{summary['scenario_id']}: {summary['num_tracks']} tracks "
        f"({tt['vehicle']} veh, {tt['pedestrian']} ped, {tt['cyclist']} cyc, {tt['other']} other), "
        f"{summary['num_valid_at_current']} valid at {summary['current_time_index']}, "
        f"sdc {summary['sdc_track_index']}, {summary['num_steps']} steps, "
        f"{summary['num_map_features']} map features [{maps}], "
        f"{summary['num_traffic_light_lanes']} light lanes "
        f"({summary['num_traffic_light_lanes_changing']} changing), "
        f"predict {summary['tracks_to_predict']}"
    )
