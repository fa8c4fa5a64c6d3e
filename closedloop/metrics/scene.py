"""The tensors WOSAC scoring needs from a scenario, built once per scenario.

``WosacScene`` holds, for B scenarios padded to A simulated objects (the objects valid at
the current step, in track order) and E evaluated objects (the SDC and the
tracks_to_predict, ordered by object id as the reference orders them), the logged
trajectories, box sizes, road-edge and lane polylines and traffic-signal states.
Everything is float32, like the reference, so features match it bit for bit where the
arithmetic is the same.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from closedloop.data.scenario import MAP_KIND_INDEX, Scenario

LANE_SURFACE_STREET = 2
SIM_STEPS = 80
CYCLIC_TOLERANCE_M2 = 1.0


@dataclass
class PolylineTable:
    """Polylines padded to one length, flattened into segments the reference's way."""

    start: torch.Tensor  # [S, D]
    end: torch.Tensor  # [S, D]
    valid: torch.Tensor  # [S]
    owner: torch.Tensor  # [S] polyline index
    prior: torch.Tensor  # [S] index of the segment before (wrapping for cyclic ones)
    next: torch.Tensor  # [S]
    prior_valid: torch.Tensor  # [S]
    next_valid: torch.Tensor  # [S]
    convex_before: torch.Tensor  # [S]
    convex_after: torch.Tensor  # [S]

    def to(self, device) -> "PolylineTable":
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device)
                                            for f in dataclasses.fields(self)})


def polyline_table(polylines: list[np.ndarray], dims: int) -> PolylineTable:
    """Pad ``polylines`` (each ``[n >= 2, dims]``) to the longest and build segment
    neighbourhoods exactly as the reference does, quirks included: padding points are
    zeros, and a cyclic polyline shorter than the longest wraps onto padding."""
    polylines = [np.asarray(p, dtype=np.float32) for p in polylines if len(p) >= 2]
    count = len(polylines)
    if count == 0:
        empty = torch.zeros(0)
        return PolylineTable(torch.zeros(0, dims), torch.zeros(0, dims), empty.bool(),
                             empty.long(), empty.long(), empty.long(), empty.bool(),
                             empty.bool(), empty.bool(), empty.bool())
    length = max(len(p) for p in polylines)
    points = np.zeros((count, length, dims), np.float32)
    point_valid = np.zeros((count, length), bool)
    cyclic = np.zeros(count, bool)
    for i, p in enumerate(polylines):
        points[i, : len(p)] = p[:, :dims]
        point_valid[i, : len(p)] = True
        cyclic[i] = float(np.sum((p[0, :3] - p[-1, :3]) ** 2)) < CYCLIC_TOLERANCE_M2
    segs = length - 1
    start, end = points[:, :-1], points[:, 1:]
    valid = point_valid[:, :-1] & point_valid[:, 1:]
    d = (end - start)[..., :2]
    padded = np.concatenate([d[:, -1:], d, d[:, :1]], axis=1)
    convex = padded[:, :-1, 0] * padded[:, 1:, 1] - padded[:, :-1, 1] * padded[:, 1:, 0] > 0
    col = np.arange(segs)
    prior = np.where(col > 0, col - 1, np.where(cyclic[:, None], segs - 1, 0))
    nxt = np.where(col < segs - 1, col + 1, np.where(cyclic[:, None], 0, segs - 1))
    base = (np.arange(count) * segs)[:, None]
    t = torch.from_numpy
    return PolylineTable(
        start=t(start.reshape(-1, dims)), end=t(end.reshape(-1, dims)),
        valid=t(valid.reshape(-1)), owner=t(np.repeat(np.arange(count), segs)),
        prior=t((base + prior).reshape(-1)), next=t((base + nxt).reshape(-1)),
        prior_valid=t(np.take_along_axis(valid, prior, 1).reshape(-1)),
        next_valid=t(np.take_along_axis(valid, nxt, 1).reshape(-1)),
        convex_before=t(convex[:, :-1].reshape(-1)), convex_after=t(convex[:, 1:].reshape(-1)),
    )


@dataclass
class WosacScene:
    """One scenario's inputs to the WOSAC features (see the module docstring)."""

    scenario_id: str
    object_id: torch.Tensor  # int64 [A] simulated objects, track order
    object_type: torch.Tensor  # int64 [A]
    eval_index: torch.Tensor  # int64 [E] into the A objects, sorted by object id
    log_xyzh: torch.Tensor  # float32 [A, 91, 4]
    log_valid: torch.Tensor  # bool [A, 91]
    dims: torch.Tensor  # float32 [A, 91, 3] per-step history, index-10 sizes afterwards
    road_edges: PolylineTable  # 3D
    lanes: PolylineTable  # 2D, surface-street lanes
    lane_id: torch.Tensor  # int64 [num lanes]
    signal_lane: torch.Tensor  # int64 [S]
    signal_state: torch.Tensor  # int64 [91, S]
    signal_stop: torch.Tensor  # float32 [91, S, 2]
    current_time_index: int = 10

    @property
    def num_objects(self) -> int:
        return int(self.object_id.shape[0])

    def to(self, device) -> "WosacScene":
        changes = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (torch.Tensor, PolylineTable)):
                changes[f.name] = value.to(device)
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_scenario(cls, scenario: Scenario) -> "WosacScene":
        cur = scenario.current_time_index
        sim = np.flatnonzero(scenario.track_valid[:, cur])
        if len(sim) == 0:
            raise ValueError(f"scenario {scenario.scenario_id}: no object is valid at step {cur}")
        ids = scenario.track_id[sim]
        evaluated = {int(scenario.track_id[scenario.sdc_track_index])}
        evaluated |= {int(scenario.track_id[i]) for i in scenario.tracks_to_predict}
        position = {int(i): k for k, i in enumerate(ids)}
        eval_index = [position[i] for i in sorted(evaluated) if i in position]
        xyzh = np.concatenate([scenario.track_xyz[sim], scenario.track_heading[sim, :, None]], -1)
        dims = scenario.track_dims[sim].copy()
        dims[:, cur + 1:] = dims[:, cur: cur + 1]

        edges = [scenario.map_polyline(i) for i in np.flatnonzero(scenario.map_kind == MAP_KIND_INDEX["road_edge"])]
        lane_rows = np.flatnonzero((scenario.map_kind == MAP_KIND_INDEX["lane"])
                                   & (scenario.map_subtype == LANE_SURFACE_STREET))
        lane_rows = [i for i in lane_rows if len(scenario.map_polyline(i)) >= 2]
        lanes = [scenario.map_polyline(i)[:, :2] for i in lane_rows]
        signal_lane = np.unique(scenario.light_lane)
        steps = scenario.num_steps
        state = np.zeros((steps, len(signal_lane)), np.int64)
        stop = np.zeros((steps, len(signal_lane), 2), np.float32)
        slot = np.searchsorted(signal_lane, scenario.light_lane)
        ok = scenario.light_step < steps
        state[scenario.light_step[ok], slot[ok]] = scenario.light_state[ok]
        stop[scenario.light_step[ok], slot[ok]] = scenario.light_stop_point[ok, :2]
        t = torch.from_numpy
        return cls(
            scenario_id=scenario.scenario_id,
            object_id=t(ids.astype(np.int64)),
            object_type=t(scenario.track_type[sim].astype(np.int64)),
            eval_index=torch.tensor(eval_index, dtype=torch.int64),
            log_xyzh=t(xyzh.astype(np.float32)),
            log_valid=t(scenario.track_valid[sim].copy()),
            dims=t(dims.astype(np.float32)),
            road_edges=polyline_table(edges, 3),
            lanes=polyline_table(lanes, 2),
            lane_id=torch.tensor(scenario.map_id[lane_rows], dtype=torch.int64),
            signal_lane=t(signal_lane.astype(np.int64)),
            signal_state=t(state),
            signal_stop=t(stop),
            current_time_index=cur,
        )

    def simulated(self, trajectories: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-length trajectories ``[R, A, 91, 4]`` and validity ``[A, 91]`` for rollouts
        ``[R, A, 80, 4]``: logged history, simulated future (always valid)."""
        cur = self.current_time_index
        rollouts = trajectories.shape[0]
        history = self.log_xyzh[None, :, : cur + 1].expand(rollouts, -1, -1, -1)
        full = torch.cat([history, trajectories.to(self.log_xyzh.dtype)], dim=2)
        valid = torch.cat([self.log_valid[:, : cur + 1],
                           torch.ones_like(self.log_valid[:, cur + 1:])], dim=1)
        return full, valid
