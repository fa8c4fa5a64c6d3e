"""Microscopic traffic for the synthetic town, vectorised over agents with numpy.

Vehicles and cyclists follow lane routes (left / straight / right picked at random at each
intersection) with the Intelligent Driver Model; their desired speed is the lane's speed
limit capped by the route's curvature (lateral acceleration <= 2.5 m/s^2, braking-feasible
ahead of curves). At intersections a vehicle needs a *reservation* of its connector lane
before crossing the stop line: it gets one only if the signal allows it (green, or yellow
when it can no longer stop comfortably) or, at stop signs, after standing at the line for
0.5 s, and only if no conflicting connector is reserved. Without one it stops at the line.
Parked vehicles stand in the parking strips; pedestrians walk on the sidewalks and cross at
signalised crosswalks during the walk phase.

Enforced ranges (vehicles): speed <= 1.05 x the speed limit, acceleration in
[-6, 2.5] m/s^2, jerk <= 12 m/s^3 except emergency braking, yaw rate from curvature
<= 2.5 m/s^2 lateral acceleration; pedestrians: speed <= 1.8 m/s, acceleration <= 1 m/s^2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from closedloop.constants import DT, TYPE_CYCLIST, TYPE_PEDESTRIAN, TYPE_VEHICLE
from closedloop.data.synthetic import signals
from closedloop.data.synthetic.roads import RoadNetwork

CAP_SPACING = 0.5
LATERAL_ACCEL = 2.5
CAP_DECEL = 1.5
JERK = 12.0
STOP_GAP = 0.5  # metres between a stopped front bumper and the stop line
NO_SIGNAL = -1


@dataclass
class AgentLog:
    """Recorded states of every agent over the recorded window."""

    agent_type: np.ndarray  # [A]
    dims: np.ndarray  # [A, 3] length, width, height
    xy: np.ndarray  # [A, T, 2]
    heading: np.ndarray  # [A, T]
    speed: np.ndarray  # [A, T]
    valid: np.ndarray  # [A, T]


class _Lanes:
    """All lane polylines of a network packed into flat arrays for vectorised lookups."""

    def __init__(self, net: RoadNetwork):
        lanes = net.lanes
        self.first = np.cumsum([0] + [len(l.points) for l in lanes])[:-1]
        self.count = np.array([len(l.points) for l in lanes])
        self.length = np.array([l.length for l in lanes])
        self.step = self.length / np.maximum(self.count - 1, 1)
        self.points = np.concatenate([l.points for l in lanes])
        self.heading = np.concatenate([l.heading for l in lanes])
        self.is_connector = np.array([l.road < 0 for l in lanes])
        self.intersection = np.array([l.intersection for l in lanes])
        self.speed_limit = np.array([l.speed_limit for l in lanes])

    def locate(self, lane: np.ndarray, local: np.ndarray):
        """Interpolated position [n, 2] and heading [n] at arc length ``local`` on ``lane``."""
        f = np.clip(local / self.step[lane], 0, self.count[lane] - 1)
        i0 = np.minimum(f.astype(np.int64), self.count[lane] - 2)
        w = (f - i0)[:, None]
        g = self.first[lane] + i0
        xy = self.points[g] * (1 - w) + self.points[g + 1] * w
        h0, h1 = self.heading[g], self.heading[g + 1]
        return xy, h0 + (h1 - h0) * w[:, 0]


def _conflicts(net: RoadNetwork) -> np.ndarray:
    """[L, L] connectors that must not be occupied at once: paths closer than 3 m, or
    sharing an entry lane (a follower could not see a leader on a sibling connector)."""
    n = len(net.lanes)
    out = np.zeros((n, n), dtype=bool)
    for inter in net.intersections:
        conns = inter.connectors
        for a_pos, a in enumerate(conns):
            for b in conns[a_pos + 1 :]:
                la, lb = net.lanes[a], net.lanes[b]
                if la.entry == lb.entry:
                    hit = True
                else:
                    d = np.linalg.norm(la.points[:, None, :] - lb.points[None, :, :], axis=-1)
                    hit = bool(d.min() < 3.0)
                out[a, b] = out[b, a] = hit
    return out


class TrafficSimulation:
    """Runs the town's traffic for ``warmup + steps`` steps and records the last ``steps``."""

    def __init__(
        self,
        net: RoadNetwork,
        rng: np.random.Generator,
        *,
        num_vehicles: int,
        num_parked: int,
        num_pedestrians: int,
        num_cyclists: int,
        spawn_rate: float = 0.04,
    ):
        self.net, self.rng = net, rng
        self.lanes = _Lanes(net)
        self.conflict = _conflicts(net)
        self.spawn_rate = spawn_rate
        self.entry_lanes = [i for i, l in enumerate(net.lanes) if l.starts_at_boundary]
        self.signal_phase = {}
        for i, lane in enumerate(net.lanes):
            if lane.road < 0 and net.intersections[lane.intersection].control == "signal":
                self.signal_phase[i] = signals.phase_of(lane.direction, lane.maneuver)
        self._init_vehicles(num_vehicles, num_cyclists)
        self._init_parked(num_parked)
        self._init_pedestrians(num_pedestrians)

    # -- routes -------------------------------------------------------------------------
    def _route(self, start: int, cyclist: bool) -> list[int]:
        net, route = self.net, [start]
        while net.lanes[route[-1]].ends_at >= 0 and len(route) < 15:
            options = [
                net.index(c)
                for c in net.lanes[route[-1]].exit
                if net.index(net.lanes[net.index(c)].exit[0]) not in route
            ]
            if not options:
                break
            weights = np.array([{"left": 0.25, "straight": 0.5, "right": 0.25}[net.lanes[c].maneuver] for c in options])
            if cyclist:
                weights *= np.array([net.lanes[c].maneuver != "left" for c in options])
            if len(route) > 8:  # head out of the map
                weights *= np.array([net.lanes[c].maneuver == "straight" for c in options]) + 1e-3
            conn = options[self.rng.choice(len(options), p=weights / weights.sum())]
            route += [conn, net.index(net.lanes[conn].exit[0])]
        return route

    def _caps(self, route: list[int], factor: float, vmax: float) -> np.ndarray:
        """Speed cap along the route every CAP_SPACING metres."""
        pts = np.concatenate([self.net.lanes[i].points for i in route])
        limit = np.concatenate([np.full(len(self.net.lanes[i].points), self.lanes.speed_limit[i]) for i in route])
        seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
        keep = np.concatenate([[True], seg > 1e-6])
        pts, limit = pts[keep], limit[keep]
        arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(pts, axis=0), axis=1))])
        h = np.unwrap(np.arctan2(*np.diff(pts, axis=0).T[::-1]))
        kappa = np.abs(np.diff(h)) / np.maximum(np.diff(arc)[1:], 1e-6)
        kappa = np.concatenate([[0.0], kappa, [0.0]])
        kappa = np.lib.stride_tricks.sliding_window_view(np.pad(kappa, 4, mode="edge"), 9).max(1)
        cap = np.minimum(limit * factor, np.sqrt(LATERAL_ACCEL / np.maximum(kappa, 1e-4)))
        cap = np.minimum(cap, vmax)
        grid = np.arange(0.0, arc[-1] + CAP_SPACING, CAP_SPACING)
        cap = np.interp(grid, arc, cap)
        # Braking-feasible: cap[i]^2 <= cap[k]^2 + 2 b (k - i) ds for every k >= i.
        ramp = 2 * CAP_DECEL * CAP_SPACING * np.arange(len(cap))
        reach = np.minimum.accumulate((cap**2 + ramp)[::-1])[::-1] - ramp
        return np.sqrt(np.maximum(reach, 0.0))

    # -- vehicles -----------------------------------------------------------------------
    def _init_vehicles(self, num_vehicles: int, num_cyclists: int) -> None:
        cap = num_vehicles + num_cyclists + 80
        self.v_type = np.zeros(cap, np.int8)
        self.v_dims = np.zeros((cap, 3))
        self.v_active = np.zeros(cap, bool)
        self.v_s = np.zeros(cap)
        self.v_v = np.zeros(cap)
        self.v_a = np.zeros(cap)
        self.v_amax = np.zeros(cap)
        self.v_b = np.zeros(cap)
        self.v_T = np.zeros(cap)
        self.v_route = np.full((cap, 16), -1, np.int64)
        # Arc length at which each lane starts along each vehicle's route (inf if not on it).
        self.v_lane_start = np.full((cap, len(self.net.lanes)), np.inf)
        self.v_off = np.full((cap, 17), np.inf)
        self.v_caps = np.zeros((cap, 1))
        self.v_ncap = np.ones(cap, np.int64)
        self.v_reserved = np.full(cap, -1, np.int64)
        self.v_reserved_end = np.zeros(cap)
        self.v_stopped_for = np.zeros(cap)  # seconds standing at a stop line
        self.n_vehicles = 0
        segments = [i for i, l in enumerate(self.net.lanes) if l.road >= 0]
        weights = np.array([self.lanes.length[i] for i in segments])
        placed: dict[int, list[tuple[float, float]]] = {}
        for k in range(num_vehicles + num_cyclists):
            cyclist = k >= num_vehicles
            for _ in range(20):  # tries
                if cyclist:
                    options = [i for i in segments if self._is_rightmost(i)]
                    lane = options[self.rng.integers(len(options))]
                else:
                    lane = segments[self.rng.choice(len(segments), p=weights / weights.sum())]
                length = self._sample_dims(cyclist)[0]
                usable = self.lanes.length[lane] - 14 - length
                if usable <= 1:
                    continue
                pos = length / 2 + 0.5 + self.rng.uniform(0, usable)
                if all(abs(pos - p) > (length + l2) / 2 + 8 for p, l2 in placed.get(lane, [])):
                    placed.setdefault(lane, []).append((pos, length))
                    self._add_vehicle(lane, cyclist, pos, initial=True)
                    break

    def _is_rightmost(self, lane: int) -> bool:
        l = self.net.lanes[lane]
        return l.road >= 0 and l.index_in_road == self.net.roads[l.road].lanes - 1

    def _sample_dims(self, cyclist: bool) -> np.ndarray:
        if cyclist:
            return np.array([self.rng.uniform(1.6, 1.9), self.rng.uniform(0.6, 0.8), self.rng.uniform(1.5, 1.8)])
        kind = self.rng.random()
        if kind < 0.8:  # cars
            return np.array([self.rng.uniform(4.2, 5.0), self.rng.uniform(1.8, 2.05), self.rng.uniform(1.4, 1.8)])
        if kind < 0.95:  # SUVs / vans
            return np.array([self.rng.uniform(5.0, 5.8), self.rng.uniform(2.0, 2.2), self.rng.uniform(1.8, 2.3)])
        return np.array([self.rng.uniform(7.0, 9.0), self.rng.uniform(2.3, 2.5), self.rng.uniform(2.8, 3.4)])

    def _add_vehicle(self, lane: int, cyclist: bool, pos: float, initial: bool) -> int:
        i = self.n_vehicles
        if i >= len(self.v_active):
            return -1
        self.n_vehicles += 1
        route = self._route(lane, cyclist)
        self.v_type[i] = TYPE_CYCLIST if cyclist else TYPE_VEHICLE
        self.v_dims[i] = self._sample_dims(cyclist)
        self.v_route[i, : len(route)] = route
        off = np.concatenate([[0.0], np.cumsum(self.lanes.length[route])])
        self.v_off[i, : len(off)] = off
        self.v_lane_start[i, route] = off[:-1]
        factor = self.rng.uniform(0.85, 1.05)
        caps = self._caps(route, factor, 6.0 if cyclist else 30.0)
        if caps.shape[0] > self.v_caps.shape[1]:
            grown = np.zeros((len(self.v_active), caps.shape[0]))
            grown[:, : self.v_caps.shape[1]] = self.v_caps
            self.v_caps = grown
        self.v_caps[i, : len(caps)] = caps
        self.v_ncap[i] = len(caps)
        self.v_amax[i] = self.rng.uniform(1.0, 1.5) if cyclist else self.rng.uniform(1.5, 2.5)
        self.v_b[i] = self.rng.uniform(2.0, 3.0)
        self.v_T[i] = self.rng.uniform(1.0, 1.8)
        self.v_s[i] = pos
        start_speed = caps[min(int(pos / CAP_SPACING), len(caps) - 1)]
        if initial:
            # No faster than what stops comfortably before the lane's end (a stop line).
            to_end = self.lanes.length[lane] - pos - self.v_dims[i, 0] / 2
            start_speed = min(start_speed * self.rng.uniform(0.6, 1.0), np.sqrt(2 * 1.5 * max(to_end - 3, 0)))
        self.v_v[i] = start_speed
        self.v_a[i] = 0.0
        self.v_active[i] = True
        return i

    def _spawn(self) -> None:
        """New vehicles enter at boundary lanes when the lane's first metres are free."""
        draws = self.rng.random(len(self.entry_lanes))
        chosen = [lane for lane, u in zip(self.entry_lanes, draws) if u < self.spawn_rate * DT * 10]
        if not chosen:
            return
        n = self.n_vehicles
        lanes_now, local = self._positions()[:2]
        for lane in chosen:
            cyclist = self._is_rightmost(lane) and self.rng.random() < 0.1
            on_lane = self.v_active[:n] & (lanes_now == lane)
            rear = local - self.v_dims[:n, 0] / 2
            if np.any(on_lane & (rear < 25.0)):
                continue
            i = self._add_vehicle(lane, cyclist, 0.0, initial=False)
            if i >= 0:
                self.v_s[i] = self.v_dims[i, 0] / 2
                ahead = on_lane & (rear >= 25.0)
                if ahead.any():
                    self.v_v[i] = min(self.v_v[i], float(self.v_v[:n][ahead].min()) + 2)

    def _positions(self):
        """Per vehicle (all slots so far): current lane, local arc length, route index."""
        n = self.n_vehicles
        j = (self.v_s[:n, None] >= self.v_off[:n, 1:]).sum(1)
        j = np.minimum(j, (self.v_route[:n] >= 0).sum(1) - 1)
        lane = self.v_route[np.arange(n), j]
        local = self.v_s[:n] - self.v_off[np.arange(n), j]
        return lane, local, j

    def _step_vehicles(self, t: float) -> None:
        """Advance every active vehicle by one step (all arrays below are over active ones)."""
        self._aspects = self._aspect_table[int(round(t / DT))]
        # Release reservations once the rear has left the connector (or the vehicle left).
        n_all = self.n_vehicles
        rear_all = self.v_s[:n_all] - self.v_dims[:n_all, 0] / 2
        done = (self.v_reserved[:n_all] >= 0) & ((rear_all > self.v_reserved_end[:n_all]) | ~self.v_active[:n_all])
        self.v_reserved[:n_all][done] = -1
        ids = np.flatnonzero(self.v_active[:n_all])
        n = len(ids)
        if n == 0:
            return
        rows = np.arange(n)
        route, off = self.v_route[ids], self.v_off[ids]
        s, v, length = self.v_s[ids], self.v_v[ids], self.v_dims[ids, 0]
        j = np.minimum((s[:, None] >= off[:, 1:]).sum(1), (route >= 0).sum(1) - 1)
        lane = route[rows, j]
        local = s - off[rows, j]
        front = s + length / 2

        # Stop lines ahead: the start of the next lane when it is a connector.
        nxt = route[rows, np.minimum(j + 1, 15)]
        nxt_conn = (j + 1 < 16) & (nxt >= 0) & self.lanes.is_connector[np.maximum(nxt, 0)]
        line_pos = np.where(nxt_conn, off[rows, np.minimum(j + 1, 16)], np.inf)
        dist_line = line_pos - front
        stopped_here = nxt_conn & (v < 0.3) & (dist_line < STOP_GAP + 3.0)
        self.v_stopped_for[ids] = np.where(stopped_here, self.v_stopped_for[ids] + DT, 0.0)
        reserved = self.v_reserved[ids]
        holds = nxt_conn & (reserved == nxt)

        # Yellow: a vehicle that can still stop comfortably gives its reservation back.
        for r in np.flatnonzero(holds):
            if (
                self._aspects[nxt[r]] not in (signals.GREEN, NO_SIGNAL)
                and dist_line[r] - STOP_GAP > v[r] ** 2 / (2 * 3.0) + 1.0
            ):
                reserved[r] = -1
                holds[r] = False

        # Try to reserve, nearest to its line first.
        want = nxt_conn & ~holds & (reserved < 0) & (dist_line < v**2 / (2 * 2.0) + 10.0)
        for r in sorted(np.flatnonzero(want), key=lambda r: dist_line[r]):
            conn = int(nxt[r])
            if not self._may_enter(ids[r], conn, dist_line[r], v[r]):
                continue
            taken = reserved[(reserved >= 0) & (rows != r)]
            if np.any(self.conflict[conn, taken]):
                continue
            reserved[r] = conn
            self.v_reserved_end[ids[r]] = off[r, j[r] + 2]
            holds[r] = True
        self.v_reserved[ids] = reserved
        must_stop = nxt_conn & ~holds

        # Leaders along each route: position of every other vehicle in my route coordinate,
        # for vehicles on my current lane or a later one of my route.
        lane_start = self.v_lane_start[ids][:, lane]
        here = off[rows, j]
        pos = np.where(lane_start >= here[:, None], lane_start + local, np.inf)
        pos[rows, rows] = np.inf
        gap = np.where(pos > s[:, None], pos - s[:, None] - (length[:, None] + length) / 2, np.inf)
        leader = gap.argmin(1)
        lead_gap = gap[rows, leader]
        lead_v = np.where(np.isfinite(lead_gap), v[leader], 0.0)

        # IDM against the leader and, when it must stop, the stop line.
        amax, b, T = self.v_amax[ids], self.v_b[ids], self.v_T[ids]
        last = self.v_ncap[ids] - 1
        here = np.clip((s / CAP_SPACING).astype(np.int64), 0, last)
        look = np.clip(((s + v + 2.0) / CAP_SPACING).astype(np.int64), 0, last)
        v0 = np.maximum(np.minimum(self.v_caps[ids, here], self.v_caps[ids, look]), 0.5)
        free = amax * (1 - (v / v0) ** 4)

        def interaction(g, dv):
            s_star = 2.0 + np.maximum(0.0, v * T + v * dv / (2 * np.sqrt(amax * b)))
            return -amax * (s_star / np.maximum(g, 0.05)) ** 2

        acc = free + interaction(lead_gap, v - lead_v)
        stop_gap = np.where(must_stop, dist_line - STOP_GAP + 2.0, np.inf)
        acc = np.clip(np.minimum(acc, free + interaction(stop_gap, v)), -6.0, amax)
        prev = self.v_a[ids]
        acc = np.where(
            acc < -3.5, np.maximum(acc, prev - 2.0 * JERK * DT), np.clip(acc, prev - JERK * DT, prev + JERK * DT)
        )
        v_new = np.maximum(v + acc * DT, 0.0)
        s_new = s + (v + v_new) / 2 * DT
        # Hard limits: never closer than 0.5 m to the leader, never past a line it must stop at.
        lead_s_new = np.where(np.isfinite(lead_gap), pos[rows, leader] + (s_new[leader] - s[leader]), np.inf)
        bound = np.minimum(
            lead_s_new - (length + length[leader]) / 2 - 0.5, np.where(must_stop, line_pos - length / 2, np.inf)
        )
        bound = np.maximum(bound, s)  # never backwards
        over = s_new > bound
        s_new = np.where(over, bound, s_new)
        v_new = np.where(over, np.clip(2 * (s_new - s) / DT - v, 0.0, v_new), v_new)
        self.v_s[ids], self.v_v[ids], self.v_a[ids] = s_new, v_new, (v_new - v) / DT

        # Leave at the end of the route (the map boundary).
        finished = s_new + length / 2 >= off[rows, (route >= 0).sum(1)]
        self.v_active[ids[finished]] = False

    def _offset(self, conn: int) -> float:
        return self.net.intersections[self.lanes.intersection[conn]].phase_offset

    def _may_enter(self, i: int, conn: int, dist_line: float, v: float) -> bool:
        aspect = self._aspects[conn]
        if aspect == NO_SIGNAL:  # stop sign: stand at the line for a second first
            return self.v_stopped_for[i] >= 0.5
        if aspect == signals.GREEN:
            return True
        if aspect == signals.AMBER:
            return dist_line - STOP_GAP < v**2 / (2 * 3.0)
        return False

    # -- parked vehicles ----------------------------------------------------------------
    def _init_parked(self, count: int) -> None:
        self.parked: list[tuple[np.ndarray, float, np.ndarray]] = []
        strips = []
        for r, road in enumerate(self.net.roads):
            if road.parking <= 0:
                continue
            for a, b, _, _ in self.net._intervals(r):
                for sign in (1, -1):
                    strips.append((r, a + 6, b - 6, sign))
        if not strips:
            return
        used: dict[int, list[tuple[float, float]]] = {}
        for _ in range(count * 5):
            if len(self.parked) >= count:
                break
            r, a, b, sign = strips[self.rng.integers(len(strips))]
            road = self.net.roads[r]
            dims = self._sample_dims(False)
            if dims[0] > 6 or b - a < dims[0] + 2:
                continue
            along = self.rng.uniform(a + dims[0] / 2, b - dims[0] / 2)
            key = (r, sign)
            if any(abs(along - p) < (dims[0] + l2) / 2 + 1.0 for p, l2 in used.get(key, [])):
                continue
            used.setdefault(key, []).append((along, dims[0]))
            lateral = -sign * (road.median / 2 + road.lanes * 3.5 + road.parking / 2)
            xy = self.net._point(road, along, lateral)
            heading = (0.0 if sign == 1 else np.pi) if road.axis == "h" else (np.pi / 2 if sign == 1 else -np.pi / 2)
            dims[1] = min(dims[1], road.parking - 0.3)
            self.parked.append((xy, heading, dims))

    # -- pedestrians --------------------------------------------------------------------
    def _init_pedestrians(self, count: int) -> None:
        walks = []
        for r, road in enumerate(self.net.roads):
            crossings = [(q - h - 0.3, q + h + 0.3, i) for q, i, h in self.net._crossings(r)]
            for side in (1, -1):
                walks.append((r, side * (road.half_width + 2.5), crossings))
        self.walks = walks
        n = count
        self.p_walk = np.zeros(n, np.int64)
        self.p_u = np.zeros(n)
        self.p_dir = np.ones(n)
        self.p_speed = np.zeros(n)
        self.p_want = np.zeros(n)
        self.p_heading = np.zeros(n)
        self.p_crossing = np.full(n, -1, np.int64)
        self.p_active = np.ones(n, bool)
        self.p_dims = np.zeros((n, 3))
        extent = self.net.extent
        for k in range(n):
            w = int(self.rng.integers(len(walks)))
            crossings = walks[w][2]
            while True:
                u = self.rng.uniform(-extent + 5, extent - 5)
                if not any(a - 1 < u < b + 1 for a, b, _ in crossings):
                    break
            self.p_walk[k], self.p_u[k] = w, u
            self.p_dir[k] = self.rng.choice([-1.0, 1.0])
            self.p_want[k] = 0.0 if self.rng.random() < 0.2 else self.rng.uniform(1.1, 1.6)
            self.p_speed[k] = self.p_want[k]
            self.p_heading[k] = self._walk_heading(w, self.p_dir[k])
            self.p_dims[k] = [self.rng.uniform(0.5, 0.9), self.rng.uniform(0.5, 0.9), self.rng.uniform(1.5, 1.9)]

    def _walk_heading(self, w: int, direction: float) -> float:
        road = self.net.roads[self.walks[w][0]]
        base = 0.0 if road.axis == "h" else np.pi / 2
        return base if direction > 0 else base + np.pi

    def _walk_xy(self, w: int, u: float) -> np.ndarray:
        r, lateral, _ = self.walks[w]
        return self.net._point(self.net.roads[r], u, lateral)

    def _step_pedestrians(self, t: float) -> None:
        extent = self.net.extent
        for k in np.flatnonzero(self.p_active):
            w, d = self.p_walk[k], self.p_dir[k]
            target_heading = self._walk_heading(w, d)
            diff = (target_heading - self.p_heading[k] + np.pi) % (2 * np.pi) - np.pi
            if abs(diff) > 1e-3:  # turning on the spot, at most 2 rad/s
                self.p_heading[k] += np.clip(diff, -0.2, 0.2)
                self.p_speed[k] = max(self.p_speed[k] - 0.1, 0.0)
                continue
            want = self.p_want[k]
            if self.p_crossing[k] < 0:
                for a, b, inter in self.walks[w][2]:
                    curb = a if d > 0 else b
                    to_curb = (curb - self.p_u[k]) * d
                    if 0 <= to_curb < 1.5:
                        control = self.net.intersections[inter].control
                        elapsed = signals.walk_elapsed(t + self.net.intersections[inter].phase_offset)
                        remaining = signals.walk_remaining(t + self.net.intersections[inter].phase_offset)
                        if (
                            control == "signal"
                            and elapsed is not None
                            and 1.0 <= elapsed <= 4.0
                            and remaining > (b - a) / max(want, 1.0) + 1.0
                            and want > 0
                        ):
                            self.p_crossing[k] = inter
                        elif control == "stop" or (self.rng.random() < 0.01 and elapsed is None):
                            self.p_dir[k] = -d  # turn back
                            want = 0.0
                        else:
                            want = 0.0  # wait at the curb
                        break
            else:
                if not any(a <= self.p_u[k] <= b for a, b, _ in self.walks[w][2]):
                    self.p_crossing[k] = -1
            self.p_speed[k] = float(np.clip(want, self.p_speed[k] - 0.1, self.p_speed[k] + 0.1))
            self.p_u[k] += d * self.p_speed[k] * DT
            if abs(self.p_u[k]) > extent:
                self.p_active[k] = False

    # -- run ----------------------------------------------------------------------------
    def run(self, warmup: int, steps: int) -> AgentLog:
        # Signal aspect of every lane at every step (NO_SIGNAL where there is no light).
        times = np.arange(warmup + steps) * DT
        self._aspect_table = np.full((len(times), len(self.net.lanes)), NO_SIGNAL, np.int64)
        for conn, phase in self.signal_phase.items():
            self._aspect_table[:, conn] = signals.aspect(phase, times + self._offset(conn))
        n_ped = len(self.p_u)
        v_cap = len(self.v_active)
        xy = np.zeros((v_cap, steps, 2))
        heading = np.zeros((v_cap, steps))
        speed = np.zeros((v_cap, steps))
        valid = np.zeros((v_cap, steps), bool)
        p_xy = np.zeros((n_ped, steps, 2))
        p_heading = np.zeros((n_ped, steps))
        p_speed = np.zeros((n_ped, steps))
        p_valid = np.zeros((n_ped, steps), bool)
        for k in range(warmup + steps):
            t = k * DT
            self._step_vehicles(t)
            self._step_pedestrians(t)
            self._spawn()
            rec = k - warmup
            if rec < 0:
                continue
            n = self.n_vehicles
            lane, local, _ = self._positions()
            pos, head = self.lanes.locate(lane, local)
            xy[:n, rec], heading[:n, rec] = pos, head
            speed[:n, rec] = self.v_v[:n]
            valid[:n, rec] = self.v_active[:n]
            for p in range(n_ped):
                p_xy[p, rec] = self._walk_xy(self.p_walk[p], self.p_u[p])
            p_heading[:, rec] = self.p_heading
            p_speed[:, rec] = self.p_speed
            p_valid[:, rec] = self.p_active
        n = self.n_vehicles
        parked = self.parked
        park_xy = np.array([p[0] for p in parked]).reshape(-1, 1, 2).repeat(steps, 1)
        park_h = np.array([p[1] for p in parked]).reshape(-1, 1).repeat(steps, 1)
        return AgentLog(
            agent_type=np.concatenate(
                [self.v_type[:n], np.full(len(parked), TYPE_VEHICLE, np.int8), np.full(n_ped, TYPE_PEDESTRIAN, np.int8)]
            ),
            dims=np.concatenate([self.v_dims[:n], np.array([p[2] for p in parked]).reshape(-1, 3), self.p_dims]),
            xy=np.concatenate([xy[:n], park_xy, p_xy]),
            heading=np.concatenate([heading[:n], park_h, p_heading]),
            speed=np.concatenate([speed[:n], np.zeros((len(parked), steps)), p_speed]),
            valid=np.concatenate([valid[:n], np.ones((len(parked), steps), bool), p_valid]),
        )
