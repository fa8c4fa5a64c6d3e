"""``ScenarioBatch``: scenarios as padded torch tensors with masks, and the collate function.

Positions are stored relative to a per-scenario ``origin`` (the SDC's x, y at the current
step) in float32: WOMD coordinates reach ~10 km, where float32 would lose millimetres.

Agent selection follows DESIGN.md: with ``max_agents`` the batch keeps the SDC, then the
tracks_to_predict, then the objects valid at the current step closest to the SDC, then the
others closest to the SDC. Objects valid at the current step are the ones WOSAC scores, so
dropping one raises unless ``allow_drop_scored=True`` (then the count is kept in
``ScenarioBatch.num_dropped_scored`` and a warning is issued).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from closedloop.data.scenario import POLYGON_KINDS, Scenario, road_type_code


@dataclass
class ScenarioBatch:
    """B scenarios padded to N agents, P roadgraph points, L traffic-light lanes, T steps.

    Every tensor has a leading batch dimension. Roadgraph points carry ``road_dir``, the
    vector to the next point of the same polyline (zero at a polyline's end; polygons are
    closed), so point ``p`` and ``p + road_dir`` form a segment.
    """

    scenario_id: list[str]
    origin: torch.Tensor  # float64 [B, 2] global x, y subtracted from all positions
    current_time_index: int
    # Agents.
    agent_id: torch.Tensor  # int64 [B, N]
    agent_track_index: torch.Tensor  # int64 [B, N] index into Scenario tracks, -1 for padding
    agent_type: torch.Tensor  # int64 [B, N]
    agent_mask: torch.Tensor  # bool [B, N] slot holds a real agent
    agent_xyz: torch.Tensor  # float32 [B, N, T, 3]
    agent_dims: torch.Tensor  # float32 [B, N, T, 3] length, width, height
    agent_heading: torch.Tensor  # float32 [B, N, T]
    agent_velocity: torch.Tensor  # float32 [B, N, T, 2]
    agent_valid: torch.Tensor  # bool [B, N, T]
    is_sdc: torch.Tensor  # bool [B, N]
    tracks_to_predict: torch.Tensor  # bool [B, N]
    objects_of_interest: torch.Tensor  # bool [B, N]
    # Roadgraph.
    road_xyz: torch.Tensor  # float32 [B, P, 3]
    road_dir: torch.Tensor  # float32 [B, P, 3]
    road_type: torch.Tensor  # int64 [B, P]
    road_id: torch.Tensor  # int64 [B, P] map feature id
    road_mask: torch.Tensor  # bool [B, P]
    # Traffic lights (one slot per controlled lane).
    light_lane_id: torch.Tensor  # int64 [B, L]
    light_state: torch.Tensor  # int64 [B, L, T], 0 (unknown) where not reported
    light_stop_point: torch.Tensor  # float32 [B, L, 3]
    light_mask: torch.Tensor  # bool [B, L]
    num_dropped_scored: torch.Tensor  # int64 [B] scored agents dropped by truncation

    @property
    def batch_size(self) -> int:
        return len(self.scenario_id)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ScenarioBatch:
        """A copy with every tensor on ``device``."""
        changes = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **changes)

    def pin_memory(self) -> ScenarioBatch:
        """Called by DataLoader(pin_memory=True)."""
        changes = {
            f.name: getattr(self, f.name).pin_memory()
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **changes)


def select_scenarios(batch: ScenarioBatch, rows: Sequence[int]) -> ScenarioBatch:
    """The scenarios ``rows`` of ``batch`` (indices, repeats allowed), as a batch."""
    index = torch.as_tensor(list(rows), dtype=torch.long, device=batch.agent_xyz.device)
    changes = {
        f.name: getattr(batch, f.name)[index]
        for f in dataclasses.fields(batch)
        if isinstance(getattr(batch, f.name), torch.Tensor)
    }
    return dataclasses.replace(batch, scenario_id=[batch.scenario_id[i] for i in rows], **changes)


def select_agents(
    scenario: Scenario, max_agents: int | None, allow_drop_scored: bool = False
) -> tuple[np.ndarray, int]:
    """Track indices kept (ascending track order) and the number of scored agents dropped."""
    num = scenario.num_tracks
    if max_agents is None or num <= max_agents:
        return np.arange(num), 0
    cur = scenario.current_time_index
    sdc = scenario.sdc_track_index
    valid = scenario.track_valid
    sdc_xy = scenario.track_xyz[sdc, cur, :2]
    # Distance to the SDC: at the current step when valid there, else the closest approach.
    dist = np.linalg.norm(scenario.track_xyz[:, :, :2] - sdc_xy, axis=-1)
    dist = np.where(valid, dist, np.inf)
    dist = np.where(valid[:, cur], dist[:, cur], dist.min(axis=1))
    rank = np.zeros(num)  # lower is kept first
    rank[valid[:, cur]] = 2
    rank[~valid[:, cur]] = 3
    rank[scenario.tracks_to_predict] = 1
    rank[sdc] = 0
    order = np.lexsort((dist, rank))
    kept = np.sort(order[:max_agents])
    dropped_scored = int(valid[order[max_agents:], cur].sum())
    if dropped_scored and not allow_drop_scored:
        raise ValueError(
            f"scenario {scenario.scenario_id}: {int(valid[:, cur].sum())} objects are valid at "
            f"the current step (all scored by WOSAC) but max_agents={max_agents}; raise "
            "max_agents or pass allow_drop_scored=True"
        )
    if dropped_scored:
        warnings.warn(
            f"scenario {scenario.scenario_id}: dropped {dropped_scored} scored objects (max_agents={max_agents})",
            stacklevel=3,
        )
    return kept, dropped_scored


def _road_points(scenario: Scenario) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Roadgraph points, direction vectors (to the next point of the feature; zero at its
    last point), types and feature ids for one scenario: the features' points in order,
    polygons closed by repeating their first point. One gather for all features (a loop
    over features cost ~2 ms a scenario, a tenth of an ego episode)."""
    splits = np.asarray(scenario.map_point_splits, dtype=np.int64)
    kind = np.asarray(scenario.map_kind, dtype=np.int64)
    length = splits[1:] - splits[:-1]
    closed = np.isin(kind, list(POLYGON_KINDS)) & (length > 1)
    count = length + closed  # points each feature contributes
    total = int(count.sum())
    if total == 0:
        return np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0, np.int64), np.zeros(0, np.int64)
    feature = np.repeat(np.arange(len(count)), count)
    start = np.cumsum(count) - count
    offset = np.arange(total) - start[feature]
    source = splits[:-1][feature] + offset
    source = np.where(offset == length[feature], splits[:-1][feature], source)  # a polygon's closing point
    points = np.asarray(scenario.map_points)[source]
    directions = np.zeros_like(points)
    directions[:-1] = points[1:] - points[:-1]
    directions[offset == count[feature] - 1] = 0.0  # each feature's last point
    codes = np.array(
        [road_type_code(k, sub) for k, sub in zip(kind.tolist(), np.asarray(scenario.map_subtype).tolist())],
        dtype=np.int64,
    )
    ids = np.asarray(scenario.map_id, dtype=np.int64)
    return points, directions, codes[feature], ids[feature]


def _lights(scenario: Scenario) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lanes, first = np.unique(scenario.light_lane, return_index=True)
    states = np.zeros((len(lanes), scenario.num_steps), dtype=np.int64)
    slot = np.searchsorted(lanes, scenario.light_lane)
    in_range = scenario.light_step < scenario.num_steps
    states[slot[in_range], scenario.light_step[in_range]] = scenario.light_state[in_range]
    return lanes, states, scenario.light_stop_point[first]


def collate_scenarios(
    scenarios: Sequence[Scenario],
    max_agents: int | None = None,
    allow_drop_scored: bool = False,
    pad_agents: bool = False,
) -> ScenarioBatch:
    """Pad ``scenarios`` into one :class:`ScenarioBatch` (use as a DataLoader ``collate_fn``
    via ``functools.partial`` to set ``max_agents``). With ``pad_agents`` the agent
    dimension is exactly ``max_agents`` (fixed shapes for trainers)."""
    if not scenarios:
        raise ValueError("cannot collate an empty list of scenarios")
    steps = {s.num_steps for s in scenarios}
    currents = {s.current_time_index for s in scenarios}
    if len(steps) > 1 or len(currents) > 1:
        raise ValueError(f"scenarios disagree on num_steps {sorted(steps)} or current index {sorted(currents)}")
    B, T = len(scenarios), steps.pop()
    kept = [select_agents(s, max_agents, allow_drop_scored) for s in scenarios]
    roads = [_road_points(s) for s in scenarios]
    lights = [_lights(s) for s in scenarios]
    N = max(max(len(k) for k, _ in kept), 1)
    if pad_agents:
        if max_agents is None:
            raise ValueError("pad_agents needs max_agents")
        N = max_agents
    P = max(max(len(r[0]) for r in roads), 1)
    L = max(max(len(l[0]) for l in lights), 1)
    cur = currents.pop()

    origin = np.zeros((B, 2))
    agent = {
        "id": np.zeros((B, N), np.int64),
        "track": np.full((B, N), -1, np.int64),
        "type": np.zeros((B, N), np.int64),
        "mask": np.zeros((B, N), bool),
        "xyz": np.zeros((B, N, T, 3), np.float32),
        "dims": np.zeros((B, N, T, 3), np.float32),
        "heading": np.zeros((B, N, T), np.float32),
        "vel": np.zeros((B, N, T, 2), np.float32),
        "valid": np.zeros((B, N, T), bool),
        "sdc": np.zeros((B, N), bool),
        "ttp": np.zeros((B, N), bool),
        "ooi": np.zeros((B, N), bool),
    }
    road = {
        "xyz": np.zeros((B, P, 3), np.float32),
        "dir": np.zeros((B, P, 3), np.float32),
        "type": np.full((B, P), -1, np.int64),
        "id": np.full((B, P), -1, np.int64),
        "mask": np.zeros((B, P), bool),
    }
    light = {
        "lane": np.full((B, L), -1, np.int64),
        "state": np.zeros((B, L, T), np.int64),
        "stop": np.zeros((B, L, 3), np.float32),
        "mask": np.zeros((B, L), bool),
    }
    for b, (s, (idx, _), (rxyz, rdir, rtype, rid), (llane, lstate, lstop)) in enumerate(
        zip(scenarios, kept, roads, lights)
    ):
        origin[b] = s.track_xyz[s.sdc_track_index, cur, :2]
        shift = np.array([origin[b, 0], origin[b, 1], 0.0])
        n = len(idx)
        agent["id"][b, :n] = s.track_id[idx]
        agent["track"][b, :n] = idx
        agent["type"][b, :n] = s.track_type[idx]
        agent["mask"][b, :n] = True
        agent["xyz"][b, :n] = s.track_xyz[idx] - shift
        agent["dims"][b, :n] = s.track_dims[idx]
        agent["heading"][b, :n] = s.track_heading[idx]
        agent["vel"][b, :n] = s.track_velocity[idx]
        agent["valid"][b, :n] = s.track_valid[idx]
        agent["sdc"][b, :n] = idx == s.sdc_track_index
        agent["ttp"][b, :n] = np.isin(idx, s.tracks_to_predict)
        agent["ooi"][b, :n] = np.isin(s.track_id[idx], s.objects_of_interest)
        p = len(rxyz)
        road["xyz"][b, :p] = rxyz - shift
        road["dir"][b, :p] = rdir
        road["type"][b, :p] = rtype
        road["id"][b, :p] = rid
        road["mask"][b, :p] = True
        m = len(llane)
        light["lane"][b, :m] = llane
        light["state"][b, :m] = lstate
        light["stop"][b, :m] = lstop - shift
        light["mask"][b, :m] = True
    t = torch.from_numpy
    return ScenarioBatch(
        scenario_id=[s.scenario_id for s in scenarios],
        origin=t(origin),
        current_time_index=cur,
        agent_id=t(agent["id"]),
        agent_track_index=t(agent["track"]),
        agent_type=t(agent["type"]),
        agent_mask=t(agent["mask"]),
        agent_xyz=t(agent["xyz"]),
        agent_dims=t(agent["dims"]),
        agent_heading=t(agent["heading"]),
        agent_velocity=t(agent["vel"]),
        agent_valid=t(agent["valid"]),
        is_sdc=t(agent["sdc"]),
        tracks_to_predict=t(agent["ttp"]),
        objects_of_interest=t(agent["ooi"]),
        road_xyz=t(road["xyz"]),
        road_dir=t(road["dir"]),
        road_type=t(road["type"]),
        road_id=t(road["id"]),
        road_mask=t(road["mask"]),
        light_lane_id=t(light["lane"]),
        light_state=t(light["state"]),
        light_stop_point=t(light["stop"]),
        light_mask=t(light["mask"]),
        num_dropped_scored=torch.tensor([d for _, d in kept], dtype=torch.int64),
    )


# The value each padded roadgraph point and traffic-light slot holds in a collated batch.
_ROAD_PADDING = {"road_xyz": 0.0, "road_dir": 0.0, "road_type": -1, "road_id": -1, "road_mask": False}
_LIGHT_PADDING = {"light_lane_id": -1, "light_state": 0, "light_stop_point": 0.0, "light_mask": False}


def stack_batches(batches: Sequence[ScenarioBatch]) -> ScenarioBatch:
    """One batch of the scenarios of ``batches`` in order, padded as
    :func:`collate_scenarios` pads them: stacking scenarios collated once (one at a time,
    agents padded to the same ``max_agents``) equals collating them again, at a fraction
    of the cost (an env that draws the same scenarios again and again keeps them
    collated)."""
    if not batches:
        raise ValueError("cannot stack an empty list of batches")
    first = batches[0]
    for batch in batches[1:]:
        if batch.agent_xyz.shape[1:] != first.agent_xyz.shape[1:]:
            raise ValueError(
                f"cannot stack batches of {list(first.agent_xyz.shape[1:3])} and "
                f"{list(batch.agent_xyz.shape[1:3])} agent slots and steps (collate them with "
                "pad_agents and the same max_agents)"
            )
        if batch.current_time_index != first.current_time_index:
            raise ValueError("cannot stack batches with different current time indices")
    padding = {**_ROAD_PADDING, **_LIGHT_PADDING}
    changes: dict = {"scenario_id": [i for batch in batches for i in batch.scenario_id]}
    for f in dataclasses.fields(ScenarioBatch):
        value = getattr(first, f.name)
        if not isinstance(value, torch.Tensor):
            continue
        parts = [getattr(batch, f.name) for batch in batches]
        changes[f.name] = cat_padded(parts, padding[f.name]) if f.name in padding else torch.cat(parts)
    return dataclasses.replace(first, **changes)


def cat_padded(parts: Sequence[torch.Tensor], value) -> torch.Tensor:
    """``parts`` concatenated along their first dimension, each padded with ``value`` to
    the longest in every other dimension."""
    shape = [max(part.shape[d] for part in parts) for d in range(1, parts[0].dim())]
    if all(list(part.shape[1:]) == shape for part in parts):
        return torch.cat(list(parts))
    out = parts[0].new_full((sum(part.shape[0] for part in parts), *shape), value)
    row = 0
    for part in parts:
        out[(slice(row, row + part.shape[0]), *(slice(0, n) for n in part.shape[1:]))] = part
        row += part.shape[0]
    return out


def stacked_instance(cls: type, parts: Sequence, padding: dict[str, object]):
    """A new ``cls`` (``__init__`` not run) whose tensor attributes named in ``padding``
    are the parts' attributes concatenated by :func:`cat_padded` with the given padding
    value: how per-scenario indexes are stacked into the index of a batch."""
    stacked = cls.__new__(cls)
    for name, value in padding.items():
        setattr(stacked, name, cat_padded([getattr(part, name) for part in parts], value))
    return stacked
