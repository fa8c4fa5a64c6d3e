"""Static pictures of a scenario with matplotlib: map, trajectories and boxes at one step."""

from __future__ import annotations

import numpy as np

from closedloop.constants import TYPE_CYCLIST, TYPE_PEDESTRIAN, light_is_red, light_is_yellow
from closedloop.data.scenario import MAP_KIND_INDEX, POLYGON_KINDS, Scenario

_MAP_STYLE = {
    MAP_KIND_INDEX["lane"]: dict(color="#9db4c0", lw=0.6, ls="--"),
    MAP_KIND_INDEX["road_line"]: dict(color="#e0b000", lw=0.8),
    MAP_KIND_INDEX["road_edge"]: dict(color="#222222", lw=1.2),
    MAP_KIND_INDEX["crosswalk"]: dict(color="#3a6ea5", lw=1.0),
    MAP_KIND_INDEX["speed_bump"]: dict(color="#b04fc0", lw=1.0),
    MAP_KIND_INDEX["driveway"]: dict(color="#8b5a2b", lw=0.8),
}
_AGENT_COLOR = {TYPE_PEDESTRIAN: "#2a9d8f", TYPE_CYCLIST: "#e76f51"}


def _box(x, y, heading, length, width) -> np.ndarray:
    c, s = np.cos(heading), np.sin(heading)
    corners = np.array([[1, 1], [1, -1], [-1, -1], [-1, 1], [1, 1]]) * [length / 2, width / 2]
    return corners @ np.array([[c, s], [-s, c]]) + [x, y]


def plot_scenario(
    scenario: Scenario, ax=None, step: int | None = None, title: str | None = None, trajectories: bool = True
):
    """Draw the map, each agent's logged trajectory, and boxes at ``step`` (default current)."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(9, 9))
    step = scenario.current_time_index if step is None else step
    for i in range(scenario.num_map_features):
        kind = int(scenario.map_kind[i])
        pts = scenario.map_polyline(i)[:, :2]
        if kind == MAP_KIND_INDEX["stop_sign"]:
            ax.plot(pts[:, 0], pts[:, 1], "8", color="#d62828", ms=6)
            continue
        if kind in POLYGON_KINDS:
            pts = np.concatenate([pts, pts[:1]])
        ax.plot(pts[:, 0], pts[:, 1], **_MAP_STYLE[kind])
    rows = scenario.light_step == step
    for state, point in zip(scenario.light_state[rows], scenario.light_stop_point[rows]):
        color = "#d62828" if light_is_red(state) else "#f4a261" if light_is_yellow(state) else "#2a9d2a"
        ax.plot(point[0], point[1], "o", color=color, ms=4)
    for a in range(scenario.num_tracks):
        valid = scenario.track_valid[a]
        if not valid.any():
            continue
        color = "#1d3557" if a == scenario.sdc_track_index else _AGENT_COLOR.get(int(scenario.track_type[a]), "#457b9d")
        if trajectories:
            xy = scenario.track_xyz[a, valid, :2]
            ax.plot(xy[:, 0], xy[:, 1], "-", color=color, lw=0.8, alpha=0.6)
        if valid[step]:
            x, y, _ = scenario.track_xyz[a, step]
            length, width, _ = scenario.track_dims[a, step]
            outline = _box(x, y, scenario.track_heading[a, step], length, width)
            ax.fill(outline[:, 0], outline[:, 1], color=color, alpha=0.9 if a == scenario.sdc_track_index else 0.6)
    ax.set_aspect("equal")
    ax.set_title(title or f"{scenario.scenario_id} (step {step})")
    return ax
