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
CYCLIC_TOLERANCE_M2 = 1.0


@dataclass
class PolylineTable:
    """Polylines padded to one length, flattened into segments the reference's way."""

    start: torch.Tensor  # [S, D]
    end: torch.Tensor  # [S, D]
    valid: torch.Tensor  # [S] both end points are real
    start_valid: torch.Tensor  # [S] the start point is real (the reference's lane matching)
    owner: torch.Tensor  # [S] polyline index
    prior: torch.Tensor  # [S] index of the segment before (wrapping for cyclic ones)
    next: torch.Tensor  # [S]
    prior_valid: torch.Tensor  # [S]
    next_valid: torch.Tensor  # [S]
    convex_before: torch.Tensor  # [S]
    convex_after: torch.Tensor  # [S]

    def to(self, device) -> PolylineTable:
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)})


def polyline_table(polylines: list[np.ndarray], dims: int) -> PolylineTable:
    """Pad ``polylines`` (each ``[n >= 2, dims]``) to the longest and build segment
    neighbourhoods exactly as the reference does, quirks included: padding points are
    zeros, and a cyclic polyline shorter than the longest wraps onto padding."""
    polylines = [np.asarray(p, dtype=np.float32) for p in polylines if len(p) >= 2]
    count = len(polylines)
    if count == 0:
        empty = torch.zeros(0)
        return PolylineTable(
            torch.zeros(0, dims),
            torch.zeros(0, dims),
            empty.bool(),
            empty.bool(),
            empty.long(),
            empty.long(),
            empty.long(),
            empty.bool(),
            empty.bool(),
            empty.bool(),
            empty.bool(),
        )
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
        start=t(start.reshape(-1, dims)),
        end=t(end.reshape(-1, dims)),
        valid=t(valid.reshape(-1)),
        start_valid=t(point_valid[:, :-1].reshape(-1)),
        owner=t(np.repeat(np.arange(count), segs)),
        prior=t((base + prior).reshape(-1)),
        next=t((base + nxt).reshape(-1)),
        prior_valid=t(np.take_along_axis(valid, prior, 1).reshape(-1)),
        next_valid=t(np.take_along_axis(valid, nxt, 1).reshape(-1)),
        convex_before=t(convex[:, :-1].reshape(-1)),
        convex_after=t(convex[:, 1:].reshape(-1)),
    )


def stack_tables(tables: list[PolylineTable]) -> tuple[PolylineTable, int]:
    """Pad per-scenario tables to one segment count and flatten them, scenario-major.

    Segment ``k`` of scenario ``b`` gets the global index ``b * per_scene + k``; neighbour
    and owner indices are shifted the same way (owners by ``b * polylines_per_scene``).
    Returns the flat table and ``per_scene``.
    """
    per_scene = max(max(t.start.shape[0] for t in tables), 1)
    polys = max(max((int(t.owner.max()) + 1) if t.owner.numel() else 0 for t in tables), 1)
    parts: dict[str, list[torch.Tensor]] = {f.name: [] for f in dataclasses.fields(PolylineTable)}
    for b, t in enumerate(tables):
        n, pad = t.start.shape[0], per_scene - t.start.shape[0]
        shift = b * per_scene
        for f in dataclasses.fields(PolylineTable):
            value = getattr(t, f.name)
            if f.name in ("prior", "next"):
                value = value + shift
            elif f.name == "owner":
                value = value + b * polys
            if pad:
                fill = torch.zeros((pad, *value.shape[1:]), dtype=value.dtype)
                if f.name in ("prior", "next"):
                    fill = torch.arange(n, per_scene, dtype=value.dtype) + shift
                elif f.name == "owner":
                    fill = torch.full((pad,), b * polys, dtype=value.dtype)
                value = torch.cat([value, fill])
            parts[f.name].append(value)
    return PolylineTable(**{k: torch.cat(v) for k, v in parts.items()}), per_scene


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

    @classmethod
    def from_scenario(cls, scenario: Scenario) -> WosacScene:
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
        dims[:, cur + 1 :] = dims[:, cur : cur + 1]

        edges = [scenario.map_polyline(i) for i in np.flatnonzero(scenario.map_kind == MAP_KIND_INDEX["road_edge"])]
        lane_rows = np.flatnonzero(
            (scenario.map_kind == MAP_KIND_INDEX["lane"]) & (scenario.map_subtype == LANE_SURFACE_STREET)
        )
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


@dataclass
class WosacBatch:
    """B scenes padded to A objects, E evaluated objects and S signals; polyline tables
    flattened scenario-major (see :func:`stack_tables`). Padding objects are never valid."""

    scenario_id: list[str]
    object_type: torch.Tensor  # [B, A]
    object_mask: torch.Tensor  # [B, A]
    eval_index: torch.Tensor  # [B, E]
    eval_mask: torch.Tensor  # [B, E]
    log_xyzh: torch.Tensor  # [B, A, 91, 4]
    log_valid: torch.Tensor  # [B, A, 91]
    dims: torch.Tensor  # [B, A, 91, 3]
    road_edges: PolylineTable
    edges_per_scene: int
    lanes: PolylineTable
    lanes_per_scene: int
    lane_id: torch.Tensor  # [B * lanes per scene], -1 for padding
    segments_per_lane: torch.Tensor  # [B] (each scenario pads its lanes to its longest)
    signal_lane: torch.Tensor  # [B, S], -1 for padding
    signal_state: torch.Tensor  # [B, 91, S]
    signal_stop: torch.Tensor  # [B, 91, S, 2]
    current_time_index: int = 10

    @property
    def batch_size(self) -> int:
        return len(self.scenario_id)

    @classmethod
    def from_scenes(cls, scenes: list[WosacScene]) -> WosacBatch:
        if not scenes:
            raise ValueError("no scenes to batch")
        B = len(scenes)
        A = max(s.num_objects for s in scenes)
        E = max(int(s.eval_index.numel()) for s in scenes)
        S = max(max(int(s.signal_lane.numel()) for s in scenes), 1)
        steps = scenes[0].log_xyzh.shape[1]
        if any(s.log_xyzh.shape[1] != steps for s in scenes):
            raise ValueError("scenes disagree on the number of steps")

        def pad(tensors, size, fill=0):
            out = []
            for t in tensors:
                extra = size - t.shape[0]
                out.append(torch.cat([t, torch.full((extra, *t.shape[1:]), fill, dtype=t.dtype)]) if extra else t)
            return torch.stack(out)

        edges, edges_per_scene = stack_tables([s.road_edges for s in scenes])
        lanes, lanes_per_scene = stack_tables([s.lanes for s in scenes])
        polys = max(max(int(s.lane_id.numel()) for s in scenes), 1)
        lane_id = torch.cat(
            [torch.cat([s.lane_id, torch.full((polys - s.lane_id.numel(),), -1, dtype=torch.int64)]) for s in scenes]
        )
        signal_state = torch.zeros((B, steps, S), dtype=torch.int64)
        signal_stop = torch.zeros((B, steps, S, 2), dtype=torch.float32)
        signal_lane = torch.full((B, S), -1, dtype=torch.int64)
        for b, s in enumerate(scenes):
            n = s.signal_lane.numel()
            signal_lane[b, :n] = s.signal_lane
            signal_state[b, :, :n] = s.signal_state
            signal_stop[b, :, :n] = s.signal_stop
        return cls(
            scenario_id=[s.scenario_id for s in scenes],
            object_type=pad([s.object_type for s in scenes], A, -1),
            object_mask=pad([torch.ones(s.num_objects, dtype=torch.bool) for s in scenes], A, False),
            eval_index=pad([s.eval_index for s in scenes], E, 0),
            eval_mask=pad([torch.ones(s.eval_index.numel(), dtype=torch.bool) for s in scenes], E, False),
            log_xyzh=pad([s.log_xyzh for s in scenes], A),
            log_valid=pad([s.log_valid for s in scenes], A, False),
            dims=pad([s.dims for s in scenes], A, 1.0),
            road_edges=edges,
            edges_per_scene=edges_per_scene,
            lanes=lanes,
            lanes_per_scene=lanes_per_scene,
            lane_id=lane_id,
            segments_per_lane=torch.tensor(
                [s.lanes.start.shape[0] // max(s.lane_id.numel(), 1) for s in scenes], dtype=torch.int64
            ),
            signal_lane=signal_lane,
            signal_state=signal_state,
            signal_stop=signal_stop,
            current_time_index=scenes[0].current_time_index,
        )

    def to(self, device) -> WosacBatch:
        changes = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (torch.Tensor, PolylineTable)):
                changes[f.name] = value.to(device)
        return dataclasses.replace(self, **changes)

    def simulated(self, trajectories: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Full trajectories ``[B, R, A, 91, 4]`` and validity ``[B, 1, A, 91]`` for
        rollouts ``[B, R, A, 80, 4]``: logged history, simulated future (valid for real
        objects)."""
        cur = self.current_time_index
        B, R = trajectories.shape[:2]
        history = self.log_xyzh[:, None, :, : cur + 1].expand(-1, R, -1, -1, -1)
        full = torch.cat([history, trajectories.to(self.log_xyzh.dtype)], dim=3)
        future = self.object_mask[:, :, None].expand(-1, -1, self.log_valid.shape[2] - cur - 1)
        valid = torch.cat([self.log_valid[:, :, : cur + 1], future], dim=2)
        return full, valid[:, None]
