"""The synthetic town's road network: lanes, connectors, map features and signal plans.

Conventions follow WOMD: right-hand traffic, 3.5 m lanes, lane centre lines sampled every
0.5 m, road edges oriented with the road on their left, traffic-light states attached to
the lanes that cross an intersection with the stop point at their start.

A town is a set of straight two-way roads (horizontal and vertical) that cross at
intersections. Each road has ``lanes`` lanes per direction, an optional raised median and
an optional parking strip between the outer lane and the road edge.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from closedloop.data.synthetic.geometry import arc, headings, line, smooth_turn

LANE_WIDTH = 3.5
LANE_SPACING = 0.5  # metres between lane centre-line samples, as in WOMD
LINE_SPACING = 1.0  # road lines and edges
CROSSWALK_START, CROSSWALK_WIDTH = 0.5, 3.0  # beyond the crossing road's edge
SETBACK = CROSSWALK_START + CROSSWALK_WIDTH + 0.5  # stop line, beyond the crossing road's edge
CORNER_RADIUS = 5.0
MPH = 0.44704

# Proto enum values used below.
LANE_SURFACE_STREET = 2
BROKEN_SINGLE_WHITE, SOLID_SINGLE_WHITE, SOLID_DOUBLE_YELLOW = 1, 2, 7
EDGE_BOUNDARY, EDGE_MEDIAN = 1, 2

# Headings of travel: east, north, west, south.
DIRECTIONS = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])


@dataclass
class Road:
    axis: str  # "h" (along x, at y = offset) or "v" (along y, at x = offset)
    offset: float
    lanes: int
    speed_mph: float
    median: float = 0.0
    parking: float = 0.0

    @property
    def half_width(self) -> float:
        return self.median / 2 + self.lanes * LANE_WIDTH + self.parking

    def lane_offset(self, k: int) -> float:
        """Distance from the road's centre line to lane ``k`` (0 = next to the centre)."""
        return self.median / 2 + (k + 0.5) * LANE_WIDTH


@dataclass
class Lane:
    id: int
    points: np.ndarray  # [n, 2]
    speed_limit: float  # m/s
    road: int  # road index (segments) or -1 (connectors)
    direction: int  # index into DIRECTIONS of travel at the lane's start
    index_in_road: int = -1  # k, for segments
    intersection: int = -1  # connectors: the intersection they cross
    maneuver: str = ""  # connectors: straight / left / right
    ends_at: int = -1  # segments: the intersection at their end, -1 at the map boundary
    starts_at_boundary: bool = False
    entry: list[int] = field(default_factory=list)
    exit: list[int] = field(default_factory=list)
    left_neighbor: int = -1
    right_neighbor: int = -1
    left_boundary: tuple[int, int] | None = None  # (road line id, line type)
    right_boundary: tuple[int, int] | None = None


@dataclass
class Intersection:
    center: np.ndarray
    roads: tuple[int, int]  # (horizontal road, vertical road)
    control: str  # "signal" or "stop"
    connectors: list[int] = field(default_factory=list)
    phase_offset: float = 0.0


@dataclass
class MapFeature:
    id: int
    kind: str  # a MAP_KINDS name
    subtype: int
    points: np.ndarray  # [n, 2]
    lane_ids: tuple[int, ...] = ()  # stop signs: the lanes they control


# Signal plan: (phase name, green seconds); each vehicle phase is followed by yellow and
# all-red; the last phase is an all-way pedestrian walk phase (no vehicle has green).
SIGNAL_PHASES = (("ew_left", 5.0), ("ew_through", 20.0), ("ns_left", 5.0), ("ns_through", 20.0), ("walk", 10.0))
YELLOW, ALL_RED = 3.0, 1.5


class RoadNetwork:
    """Lanes, connectors, map features and intersection controls of one town."""

    def __init__(self, roads: list[Road], extent: float, rng: np.random.Generator, stop_probability: float = 0.4):
        self.roads = roads
        self.extent = extent
        self.lanes: list[Lane] = []
        self.features: list[MapFeature] = []
        self.intersections: list[Intersection] = []
        self._next_id = int(rng.integers(1, 200))
        self._build_intersections(rng, stop_probability)
        self._build_segments()
        self._build_connectors()
        self._build_markings(rng)
        self._finish_lanes()

    # -- ids ----------------------------------------------------------------------------
    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _add_feature(self, kind: str, subtype: int, points: np.ndarray, lane_ids=()) -> int:
        fid = self._new_id()
        self.features.append(MapFeature(fid, kind, subtype, np.asarray(points, float), tuple(lane_ids)))
        return fid

    # -- construction -------------------------------------------------------------------
    def _build_intersections(self, rng, stop_probability) -> None:
        for h, road_h in enumerate(self.roads):
            for v, road_v in enumerate(self.roads):
                if road_h.axis == "h" and road_v.axis == "v":
                    control = "stop" if rng.random() < stop_probability else "signal"
                    self.intersections.append(
                        Intersection(
                            center=np.array([road_v.offset, road_h.offset]),
                            roads=(h, v),
                            control=control,
                            phase_offset=float(rng.uniform(0, signal_cycle())),
                        )
                    )

    def _crossings(self, r: int) -> list[tuple[float, int, float]]:
        """(position along road r, intersection index, half width of the crossing road)."""
        road = self.roads[r]
        out = []
        for i, inter in enumerate(self.intersections):
            if r in inter.roads:
                other = self.roads[inter.roads[1] if road.axis == "h" else inter.roads[0]]
                along = inter.center[0] if road.axis == "h" else inter.center[1]
                out.append((float(along), i, other.half_width))
        return sorted(out)

    def _point(self, road: Road, along: float, lateral: float) -> np.ndarray:
        """Point at ``along`` the road axis, ``lateral`` metres to the +y (h) / -x (v) side."""
        if road.axis == "h":
            return np.array([along, road.offset + lateral])
        return np.array([road.offset - lateral, along])

    def _intervals(self, r: int):
        """Stretches of road r between nodes: (start, end, start intersection, end intersection)
        measured between the stop lines (a node is an intersection or the map boundary)."""
        nodes = [(-self.extent, -1, -SETBACK)] + self._crossings(r) + [(self.extent, -1, -SETBACK)]
        for (a, ia, ha), (b, ib, hb) in zip(nodes[:-1], nodes[1:]):
            yield a + ha + SETBACK, b - hb - SETBACK, ia, ib

    def _build_segments(self) -> None:
        self.segment_at: dict[tuple[int, int, int, int], int] = {}  # (road, interval, dir sign, k)
        for r, road in enumerate(self.roads):
            base_dir = 0 if road.axis == "h" else 1
            for interval, (a, b, ia, ib) in enumerate(self._intervals(r)):
                for sign in (1, -1):
                    direction = base_dir if sign == 1 else base_dir + 2
                    for k in range(road.lanes):
                        # Travelling in +axis the lanes lie to the right: -y (h) or +x (v).
                        lateral = -sign * road.lane_offset(k)
                        start, end = (a, b) if sign == 1 else (b, a)
                        pts = line(self._point(road, start, lateral), self._point(road, end, lateral), LANE_SPACING)
                        lane = Lane(
                            id=self._new_id(),
                            points=pts,
                            speed_limit=road.speed_mph * MPH,
                            road=r,
                            direction=direction,
                            index_in_road=k,
                            ends_at=ib if sign == 1 else ia,
                            starts_at_boundary=(ia if sign == 1 else ib) == -1,
                        )
                        self.segment_at[(r, interval, sign, k)] = len(self.lanes)
                        self.lanes.append(lane)
        self._lane_index = {lane.id: i for i, lane in enumerate(self.lanes)}

    def _approach_lanes(self, inter_index: int) -> dict[int, list[int]]:
        """Per direction of travel: lane indices (by k) arriving at the intersection."""
        out: dict[int, list[int]] = {}
        for i, lane in enumerate(self.lanes):
            if lane.road >= 0 and lane.ends_at == inter_index:
                out.setdefault(lane.direction, []).append(i)
        return {d: sorted(v, key=lambda i: self.lanes[i].index_in_road) for d, v in out.items()}

    def _departure_lanes(self, inter_index: int) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        inter = self.intersections[inter_index]
        for i, lane in enumerate(self.lanes):
            if lane.road in inter.roads and lane.road >= 0 and lane.ends_at != inter_index:
                start_dist = np.abs(lane.points[0] - inter.center).max()
                road = self.roads[lane.road]
                other = self.roads[inter.roads[1] if road.axis == "h" else inter.roads[0]]
                if start_dist <= other.half_width + SETBACK + 0.01 and self._on_axis(lane, inter):
                    out.setdefault(lane.direction, []).append(i)
        return {d: sorted(v, key=lambda i: self.lanes[i].index_in_road) for d, v in out.items()}

    def _on_axis(self, lane: Lane, inter: Intersection) -> bool:
        road = self.roads[lane.road]
        along = inter.center[0] if road.axis == "h" else inter.center[1]
        first = lane.points[0, 0] if road.axis == "h" else lane.points[0, 1]
        return abs(first - along) < road.half_width + 60 and (
            np.sign(first - along) == np.sign(DIRECTIONS[lane.direction][0 if road.axis == "h" else 1])
        )

    def _build_connectors(self) -> None:
        for n, inter in enumerate(self.intersections):
            arrive, depart = self._approach_lanes(n), self._departure_lanes(n)
            for direction, incoming in arrive.items():
                left_dir, right_dir = (direction + 1) % 4, (direction + 3) % 4
                moves = [("straight", k, direction, k) for k in range(len(incoming))]
                moves.append(("left", 0, left_dir, 0))
                moves.append(("right", len(incoming) - 1, right_dir, len(depart[right_dir]) - 1))
                for maneuver, k_in, out_dir, k_out in moves:
                    src, dst = self.lanes[incoming[k_in]], self.lanes[depart[out_dir][k_out]]
                    h0 = float(np.arctan2(*DIRECTIONS[direction][::-1]))
                    h1 = float(np.arctan2(*DIRECTIONS[out_dir][::-1]))
                    if maneuver == "straight":
                        pts = line(src.points[-1], dst.points[0], LANE_SPACING)
                    else:
                        pts = smooth_turn(src.points[-1], h0, dst.points[0], h1, LANE_SPACING)
                    conn = Lane(
                        id=self._new_id(),
                        points=pts,
                        speed_limit=min(src.speed_limit, dst.speed_limit),
                        road=-1,
                        direction=direction,
                        intersection=n,
                        maneuver=maneuver,
                    )
                    conn.entry, conn.exit = [src.id], [dst.id]
                    src.exit.append(conn.id)
                    dst.entry.append(conn.id)
                    inter.connectors.append(len(self.lanes))
                    self.lanes.append(conn)
        self._lane_index = {lane.id: i for i, lane in enumerate(self.lanes)}

    def _build_markings(self, rng) -> None:
        for r, road in enumerate(self.roads):
            intervals = list(self._intervals(r))
            for interval, (a, b, ia, ib) in enumerate(intervals):

                def along(lateral, spacing=LINE_SPACING, start=a, end=b, road=road):
                    return line(self._point(road, start, lateral), self._point(road, end, lateral), spacing)

                if road.median > 0:
                    m = road.median / 2
                    ring = np.array(
                        [
                            self._point(road, a, -m),
                            self._point(road, a, m),
                            self._point(road, b, m),
                            self._point(road, b, -m),
                            self._point(road, a, -m),
                        ]
                    )
                    self._add_feature("road_edge", EDGE_MEDIAN, _clockwise(ring))
                    center_left = center_right = None
                    for side in (1, -1):  # solid yellow at the median's lane side
                        fid = self._add_feature("road_line", 6, along(side * m))
                        if side == 1:
                            center_left = fid
                        else:
                            center_right = fid
                else:
                    center_left = center_right = self._add_feature("road_line", SOLID_DOUBLE_YELLOW, along(0.0))
                for sign in (1, -1):
                    center = center_right if sign == 1 else center_left
                    lane_ids = [self.lanes[self.segment_at[(r, interval, sign, k)]] for k in range(road.lanes)]
                    boundaries = [(center, SOLID_DOUBLE_YELLOW if road.median == 0 else 6)]
                    for k in range(1, road.lanes):
                        fid = self._add_feature(
                            "road_line", BROKEN_SINGLE_WHITE, along(-sign * (road.median / 2 + k * LANE_WIDTH))
                        )
                        boundaries.append((fid, BROKEN_SINGLE_WHITE))
                    outer = -sign * (road.median / 2 + road.lanes * LANE_WIDTH)
                    if road.parking > 0:
                        fid = self._add_feature("road_line", SOLID_SINGLE_WHITE, along(outer))
                        boundaries.append((fid, SOLID_SINGLE_WHITE))
                    else:
                        boundaries.append((-1, 0))
                    for k, lane in enumerate(lane_ids):
                        lane.left_boundary = boundaries[k]
                        lane.right_boundary = boundaries[k + 1] if boundaries[k + 1][0] >= 0 else None
                        lane.left_neighbor = lane_ids[k - 1].id if k > 0 else -1
                        lane.right_neighbor = lane_ids[k + 1].id if k + 1 < road.lanes else -1
                # Outer road edges, oriented with the road on their left; they stop at the
                # intersection corners (rounded below) but run to the map boundary.
                ea = a - SETBACK + (CORNER_RADIUS if ia >= 0 else 0)
                eb = b + SETBACK - (CORNER_RADIUS if ib >= 0 else 0)
                if ia == -1:
                    ea = a
                if ib == -1:
                    eb = b
                hw = road.half_width
                for lateral in (hw, -hw):
                    pts = along(lateral, start=ea, end=eb)
                    # Road on the left: the +lateral edge runs towards -axis.
                    if lateral > 0:
                        pts = pts[::-1]
                    self._add_feature("road_edge", EDGE_BOUNDARY, pts)
                # Speed bumps and driveways, a few per town.
                length = b - a
                if length > 60 and rng.random() < 0.35:
                    at = rng.uniform(a + 20, b - 20)
                    bump = np.array(
                        [
                            self._point(road, at - 0.5, -hw),
                            self._point(road, at + 0.5, -hw),
                            self._point(road, at + 0.5, hw),
                            self._point(road, at - 0.5, hw),
                        ]
                    )
                    self._add_feature("speed_bump", 0, bump)
                if length > 40:
                    for _ in range(int(rng.integers(0, 3))):
                        at = rng.uniform(a + 10, b - 10)
                        side = rng.choice([-1.0, 1.0])
                        drive = np.array(
                            [
                                self._point(road, at - 2, side * hw),
                                self._point(road, at + 2, side * hw),
                                self._point(road, at + 2, side * (hw + 6)),
                                self._point(road, at - 2, side * (hw + 6)),
                            ]
                        )
                        self._add_feature("driveway", 0, drive)
        for n, inter in enumerate(self.intersections):
            self._build_intersection_markings(n, inter)

    def _build_intersection_markings(self, n: int, inter: Intersection) -> None:
        road_h, road_v = (self.roads[i] for i in inter.roads)
        hh, hv = road_h.half_width, road_v.half_width
        cx, cy = inter.center
        for sx in (1, -1):
            for sy in (1, -1):
                center = (cx + sx * (hv + CORNER_RADIUS), cy + sy * (hh + CORNER_RADIUS))
                a0 = np.arctan2(-sy, 0.0)
                a1 = np.arctan2(0.0, -sx)
                if abs(a1 - a0) > np.pi:
                    a1 += 2 * np.pi * np.sign(a0 - a1)
                corner = arc(center, CORNER_RADIUS, a0, a1, LINE_SPACING)
                self._add_feature("road_edge", EDGE_BOUNDARY, _clockwise_arc(corner, center))
        # Crosswalks across each leg, just beyond the crossing road's edge.
        for axis_x, half_cross, half_road in ((True, hv, hh), (False, hh, hv)):
            for s in (1, -1):
                d0, d1 = half_cross + CROSSWALK_START, half_cross + CROSSWALK_START + CROSSWALK_WIDTH
                if axis_x:
                    poly = [
                        (cx + s * d0, cy - half_road),
                        (cx + s * d1, cy - half_road),
                        (cx + s * d1, cy + half_road),
                        (cx + s * d0, cy + half_road),
                    ]
                else:
                    poly = [
                        (cx - half_road, cy + s * d0),
                        (cx - half_road, cy + s * d1),
                        (cx + half_road, cy + s * d1),
                        (cx + half_road, cy + s * d0),
                    ]
                self._add_feature("crosswalk", 0, np.array(poly))
        if inter.control == "stop":
            for direction, incoming in self._approach_lanes(n).items():
                outer = self.lanes[incoming[-1]]
                d = DIRECTIONS[direction]
                right = np.array([d[1], -d[0]])
                road = self.roads[outer.road]
                curb = road.half_width + 0.8 - road.lane_offset(outer.index_in_road)
                pos = outer.points[-1] + right * curb
                self._add_feature("stop_sign", 0, pos[None], [self.lanes[i].id for i in incoming])

    def _finish_lanes(self) -> None:
        """Arc lengths, headings and curvature-based speed caps used by the traffic model."""
        for lane in self.lanes:
            seg = np.linalg.norm(np.diff(lane.points, axis=0), axis=1)
            lane.arc = np.concatenate([[0.0], np.cumsum(seg)])
            lane.heading = np.unwrap(headings(lane.points))
            lane.length = float(lane.arc[-1])

    # -- queries ------------------------------------------------------------------------
    def lane(self, lane_id: int) -> Lane:
        return self.lanes[self._lane_index[lane_id]]

    def index(self, lane_id: int) -> int:
        return self._lane_index[lane_id]


def signal_cycle() -> float:
    return sum(green + (YELLOW + ALL_RED if name != "walk" else ALL_RED) for name, green in SIGNAL_PHASES)


def _clockwise(ring: np.ndarray) -> np.ndarray:
    x, y = ring[:, 0], ring[:, 1]
    area = 0.5 * np.sum(x[:-1] * y[1:] - x[1:] * y[:-1])
    return ring if area < 0 else ring[::-1]


def _clockwise_arc(points: np.ndarray, center) -> np.ndarray:
    """Orient an arc clockwise about ``center`` (so what lies outside is on its left)."""
    v0, v1 = points[0] - center, points[1] - center
    return points if v0[0] * v1[1] - v0[1] * v1[0] < 0 else points[::-1]
