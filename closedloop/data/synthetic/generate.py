"""Synthetic WOMD scenarios: town layouts, scenario assembly and TFRecord shards.

A scenario is fully determined by ``(town, seed, index)``: each draws its own random stream
from ``numpy.random.SeedSequence([seed, index, town])``, so shards are byte-identical for
a seed whatever the number of worker processes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from closedloop.constants import CURRENT_INDEX, DT, NUM_STEPS, TYPE_VEHICLE
from closedloop.data.scenario import MAP_KIND_INDEX, Scenario
from closedloop.data.synthetic import signals
from closedloop.data.synthetic.roads import LANE_SURFACE_STREET, Road, RoadNetwork
from closedloop.data.synthetic.traffic import AgentLog, TrafficSimulation
from closedloop.data.tfrecord import encode_record

TOWNS = ("grid", "arterial", "cross")
WARMUP_STEPS = 50
DEFAULT_AGENTS = (30, 60)


def terrain(xy: np.ndarray) -> np.ndarray:
    """Ground height: a gentle slope and swell, so z is not trivially zero."""
    x, y = xy[..., 0], xy[..., 1]
    return 0.012 * x - 0.008 * y + 0.8 * np.sin(x / 95.0) * np.cos(y / 120.0)


def town_roads(town: str, rng: np.random.Generator) -> tuple[list[Road], float]:
    """Road layout of a town type with randomised spacing, lanes and speed limits."""
    if town == "grid":
        gap = rng.uniform(55, 80)
        roads = []
        for axis in ("h", "v"):
            for sign in (-1, 1):
                lanes = int(rng.integers(1, 3))
                roads.append(
                    Road(
                        axis,
                        sign * gap + rng.uniform(-5, 5),
                        lanes,
                        float(rng.choice([25, 30, 35])),
                        parking=2.5 if rng.random() < 0.7 else 0.0,
                    )
                )
        return roads, 170.0
    if town == "arterial":
        roads = [Road("h", 0.0, 3, float(rng.choice([35, 40, 45])), median=2.0)]
        for x in (-110.0, 0.0, 110.0):
            roads.append(Road("v", x + rng.uniform(-10, 10), 1, 25.0, parking=2.5))
        return roads, 180.0
    if town == "cross":
        return [
            Road("h", 0.0, int(rng.integers(1, 3)), 30.0, parking=2.5),
            Road("v", 0.0, int(rng.integers(1, 3)), 30.0, parking=2.5),
        ], 150.0
    raise ValueError(f"unknown town {town!r}; choose one of {', '.join(TOWNS)}")


def scenario_id(town: str, seed: int, index: int) -> str:
    return hashlib.sha1(f"closedloop-synthetic:{town}:{seed}:{index}".encode()).hexdigest()[:16]


def generate_scenario(
    index: int, seed: int = 0, town: str = "grid", agents: tuple[int, int] = DEFAULT_AGENTS
) -> Scenario:
    """One synthetic scenario; the same arguments always give the same scenario."""
    if town not in TOWNS:
        raise ValueError(f"unknown town {town!r}; choose one of {', '.join(TOWNS)}")
    lo, hi = agents
    if not 1 <= lo <= hi:
        raise ValueError(f"agents must be MIN:MAX with 1 <= MIN <= MAX, got {lo}:{hi}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, index, TOWNS.index(town)]))
    roads, extent = town_roads(town, rng)
    net = RoadNetwork(roads, extent, rng, stop_probability=0.4 if town != "arterial" else 0.0)
    target = int(rng.integers(lo, hi + 1))
    parked = int(round(target * 0.12)) if any(r.parking for r in roads) else 0
    pedestrians = int(round(target * 0.15))
    cyclists = max(1, int(round(target * 0.05)))
    vehicles = max(target - parked - pedestrians - cyclists, 2)
    sim = TrafficSimulation(
        net,
        rng,
        num_vehicles=vehicles,
        num_parked=parked,
        num_pedestrians=pedestrians,
        num_cyclists=cyclists,
        spawn_rate=0.03,
    )
    log = sim.run(WARMUP_STEPS, NUM_STEPS)
    return _assemble(scenario_id(town, seed, index), net, log, rng)


def _assemble(sid: str, net: RoadNetwork, log: AgentLog, rng: np.random.Generator) -> Scenario:
    keep = np.flatnonzero(log.valid.any(axis=1))
    order = keep[rng.permutation(len(keep))]
    valid = log.valid[order]
    xy = log.xy[order]
    dims = log.dims[order]
    num = len(order)
    height = np.broadcast_to(dims[:, None, 2], (num, NUM_STEPS))
    z = terrain(xy) + height / 2
    heading = (log.heading[order] + np.pi) % (2 * np.pi) - np.pi
    speed = log.speed[order]
    velocity = np.stack([speed * np.cos(heading), speed * np.sin(heading)], axis=-1)
    xyz = np.concatenate([xy, z[..., None]], axis=-1)
    dims_t = np.broadcast_to(dims[:, None, :], (num, NUM_STEPS, 3))
    # Invalid steps hold -1, as WOMD's do.
    xyz = np.where(valid[..., None], xyz, -1.0)
    dims_t = np.where(valid[..., None], dims_t, -1.0)
    heading = np.where(valid, heading, -1.0)
    velocity = np.where(valid[..., None], velocity, -1.0)
    types = log.agent_type[order]

    # SDC: a moving vehicle present throughout, nearest the map centre at the current step.
    full = valid.all(axis=1)
    moving = speed.mean(axis=1) > 1.0
    centre_dist = np.linalg.norm(xy[:, CURRENT_INDEX], axis=1)
    candidates = np.flatnonzero(full & moving & (types == TYPE_VEHICLE))
    if len(candidates) == 0:
        candidates = np.flatnonzero(full & (types == TYPE_VEHICLE))
    if len(candidates) == 0:
        candidates = np.flatnonzero(valid[:, CURRENT_INDEX])
    sdc = int(candidates[np.argmin(centre_dist[candidates])])
    sdc_dist = np.linalg.norm(xy[:, CURRENT_INDEX] - xy[sdc, CURRENT_INDEX], axis=1)
    predict = np.flatnonzero(full & (moving | (types != TYPE_VEHICLE)))
    predict = predict[predict != sdc]
    predict = predict[np.argsort(sdc_dist[predict])][:8].astype(np.int32)
    interest = np.zeros(0, np.int64)
    track_ids = np.sort(rng.choice(np.arange(1, 4000), size=num, replace=False)).astype(np.int64)
    track_ids = track_ids[rng.permutation(num)]
    if len(predict) >= 2 and np.linalg.norm(xy[predict[0], CURRENT_INDEX] - xy[predict[1], CURRENT_INDEX]) < 40:
        interest = track_ids[predict[:2]]

    return Scenario(
        scenario_id=sid,
        timestamps_seconds=np.round(np.arange(NUM_STEPS) * DT, 6),
        current_time_index=CURRENT_INDEX,
        sdc_track_index=sdc,
        track_id=track_ids,
        track_type=types.astype(np.int8),
        track_xyz=xyz.astype(np.float64),
        track_dims=dims_t.astype(np.float32),
        track_heading=heading.astype(np.float32),
        track_velocity=velocity.astype(np.float32),
        track_valid=valid.copy(),
        tracks_to_predict=predict,
        tracks_to_predict_difficulty=np.ones(len(predict), np.int8),
        objects_of_interest=interest,
        **_map_fields(net),
        **_light_fields(net),
    )


def _splits(groups) -> tuple[np.ndarray, np.ndarray]:
    splits = np.zeros(len(groups) + 1, np.int64)
    np.cumsum([len(g) for g in groups], out=splits[1:])
    flat = [x for g in groups for x in g]
    return np.array(flat, dtype=np.int64), splits


def _map_fields(net: RoadNetwork) -> dict:
    ids, kinds, subtypes, polys = [], [], [], []
    speed, entry, exits, stop_lanes = [], [], [], []
    left_b, right_b, left_n, right_n = [], [], [], []
    lane_len = {lane.id: len(lane.points) for lane in net.lanes}
    for lane in net.lanes:
        n = len(lane.points)
        ids.append(lane.id)
        kinds.append(MAP_KIND_INDEX["lane"])
        subtypes.append(LANE_SURFACE_STREET)
        polys.append(lane.points)
        speed.append(round(lane.speed_limit / 0.44704))
        entry.append(lane.entry)
        exits.append(lane.exit)
        stop_lanes.append([])
        left_b.append([(0, n - 1, *lane.left_boundary)] if lane.left_boundary else [])
        right_b.append([(0, n - 1, *lane.right_boundary)] if lane.right_boundary else [])
        left_n.append(
            [(lane.left_neighbor, 0, n - 1, 0, lane_len[lane.left_neighbor] - 1)] if lane.left_neighbor >= 0 else []
        )
        right_n.append(
            [(lane.right_neighbor, 0, n - 1, 0, lane_len[lane.right_neighbor] - 1)] if lane.right_neighbor >= 0 else []
        )
    for feature in net.features:
        ids.append(feature.id)
        kinds.append(MAP_KIND_INDEX[feature.kind])
        subtypes.append(feature.subtype)
        polys.append(feature.points)
        speed.append(0)
        entry.append([])
        exits.append([])
        stop_lanes.append(list(feature.lane_ids))
        left_b.append([])
        right_b.append([])
        left_n.append([])
        right_n.append([])
    points = np.concatenate(polys)
    xyz = np.concatenate([points, terrain(points)[:, None]], axis=1)
    fields = {
        "map_id": np.array(ids, np.int64),
        "map_kind": np.array(kinds, np.int8),
        "map_subtype": np.array(subtypes, np.int8),
        "map_points": np.round(xyz, 4),
        "map_point_splits": _splits([range(len(p)) for p in polys])[1],
        "lane_speed_limit_mph": np.array(speed, np.float64),
        "lane_interpolating": np.zeros(len(ids), bool),
    }
    for name, groups in (("lane_entry_lanes", entry), ("lane_exit_lanes", exits), ("stop_sign_lanes", stop_lanes)):
        flat, splits = _splits(groups)
        fields[name] = flat
        fields[name.replace("_lanes", "_splits") if name != "stop_sign_lanes" else "stop_sign_lane_splits"] = splits
    for side, groups in (("left", left_b), ("right", right_b)):
        flat, splits = _splits(groups)
        fields[f"lane_{side}_boundaries"] = flat.reshape(-1, 4)
        fields[f"lane_{side}_boundary_splits"] = splits
    for side, groups, bounds in (("left", left_n, left_b), ("right", right_n, right_b)):
        flat, splits = _splits(groups)
        fields[f"lane_{side}_neighbors"] = flat.reshape(-1, 5)
        fields[f"lane_{side}_neighbor_splits"] = splits
        # The boundary shared with each neighbour is this lane's boundary on that side.
        shared = [[b[0]] for g, b in zip(groups, bounds) for _ in g if b]
        shared += [[] for g, b in zip(groups, bounds) for _ in g if not b]
        nb_flat, nb_splits = _splits(shared)
        fields[f"lane_{side}_neighbor_boundaries"] = nb_flat.reshape(-1, 4)
        fields[f"lane_{side}_neighbor_boundary_splits"] = nb_splits
    return fields


def _light_fields(net: RoadNetwork) -> dict:
    steps, lanes, states, stops = [], [], [], []
    times = (WARMUP_STEPS + np.arange(NUM_STEPS)) * DT
    for inter in net.intersections:
        if inter.control != "signal":
            continue
        for c in inter.connectors:
            lane = net.lanes[c]
            phase = signals.phase_of(lane.direction, lane.maneuver)
            states.append(signals.light_state(phase, lane.maneuver == "left", times + inter.phase_offset))
            lanes.append(np.full(NUM_STEPS, lane.id))
            steps.append(np.arange(NUM_STEPS))
            p = lane.points[0]
            stops.append(np.tile([p[0], p[1], float(terrain(p))], (NUM_STEPS, 1)))
    if not steps:
        return {"num_dynamic_states": NUM_STEPS}
    step = np.stack(steps, 1).reshape(-1)  # step-major, as dynamic_map_states are
    return {
        "num_dynamic_states": NUM_STEPS,
        "light_step": step.astype(np.int32),
        "light_lane": np.stack(lanes, 1).reshape(-1).astype(np.int64),
        "light_state": np.stack(states, 1).reshape(-1).astype(np.int8),
        "light_stop_point": np.round(np.stack(stops, 1).reshape(-1, 3), 4),
    }


def generate_scenarios(
    num_scenarios: int, seed: int = 0, town: str = "grid", agents: tuple[int, int] = DEFAULT_AGENTS, start: int = 0
) -> Iterator[Scenario]:
    """Scenarios ``start .. start + num_scenarios - 1`` of the stream for ``(town, seed)``."""
    for index in range(start, start + num_scenarios):
        yield generate_scenario(index, seed, town, agents)


def _serialized(args: tuple[int, int, str, tuple[int, int]]) -> bytes:
    from closedloop.data.womd import scenario_to_proto

    return scenario_to_proto(generate_scenario(*args)).SerializeToString()


def generate_dataset(
    out: str | os.PathLike,
    num_scenarios: int,
    seed: int = 0,
    shards: int = 1,
    town: str = "grid",
    agents: tuple[int, int] = DEFAULT_AGENTS,
    workers: int = 1,
    progress: bool = True,
) -> list[Path]:
    """Write ``num_scenarios`` synthetic scenarios as ``shards`` TFRecord files in ``out``.

    The files are byte-identical for the same arguments, whatever ``workers`` is. Each file
    is written atomically; returns the paths in shard order.
    """
    from tqdm import tqdm

    from closedloop._atomic import atomic_write

    if num_scenarios < 1 or shards < 1:
        raise ValueError("num_scenarios and shards must be at least 1")
    if town not in TOWNS:
        raise ValueError(f"unknown town {town!r}; choose one of {', '.join(TOWNS)}")
    shards = min(shards, num_scenarios)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, num_scenarios, shards + 1).round().astype(int)
    jobs = [(i, seed, town, tuple(agents)) for i in range(num_scenarios)]
    bar = tqdm(total=num_scenarios, unit="scenario", desc=f"generate {town}", disable=not progress)
    paths = []
    pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 else None
    try:
        records = pool.map(_serialized, jobs, chunksize=4) if pool else map(_serialized, jobs)
        for k in range(shards):
            path = out / f"synthetic-{town}-s{seed}-{k:05d}-of-{shards:05d}.tfrecord"
            with atomic_write(path) as handle:
                for _ in range(bounds[k], bounds[k + 1]):
                    handle.write(encode_record(next(records)))
                    bar.update()
            paths.append(path)
    finally:
        bar.close()
        if pool:
            pool.shutdown(cancel_futures=True)
    return paths
