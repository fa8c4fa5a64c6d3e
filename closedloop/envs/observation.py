"""Ego-centric observations: own state, nearest agents, nearest roadgraph points, lights.

Everything is in the observing agent's frame (x forward, y left). One flat float32 vector
per observed agent, ``ObservationConfig.size`` long, in four blocks (K = ``num_agents``,
M = ``num_road_points``, L = ``num_lights``); positions are divided by
``POSITION_SCALE`` (50 m), speeds by ``SPEED_SCALE`` (20 m/s), lengths by
``LENGTH_SCALE`` (10 m) and widths by ``WIDTH_SCALE`` (5 m):

    own       8: speed, forward and lateral velocity, length, width,
                 is vehicle, is pedestrian, is cyclist
    agents  9 K: the K nearest other valid agents, nearest first: x, y, cos and sin of
                 the relative heading, relative vx, vy, length, width, present (1)
    road    9 M: the M nearest roadgraph points, nearest first: x, y, unit direction x, y,
                 is lane, is road line, is road edge, is crossing / stop sign / speed bump /
                 driveway, present (1)
    lights  6 L: the L nearest traffic-light stop points: x, y, red, yellow, green, present

Absent entries (fewer agents, points or lights than slots) are all zero, and so is any
non-finite value. Ground truth (the log's future) is never part of an observation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from closedloop.constants import (
    TYPE_CYCLIST,
    TYPE_PEDESTRIAN,
    TYPE_VEHICLE,
    is_crossing_or_stop,
    is_lane,
    is_road_edge,
    is_road_line,
    light_is_green,
    light_is_red,
    light_is_yellow,
)
from closedloop.envs.compiled import kernel
from closedloop.envs.core import SimState
from closedloop.envs.map_index import FAR, NearestPoints

if TYPE_CHECKING:
    from closedloop.envs.prepared import MapIndexes

POSITION_SCALE = 50.0
SPEED_SCALE = 20.0
LENGTH_SCALE = 10.0
WIDTH_SCALE = 5.0
OWN_FEATURES, AGENT_FEATURES, ROAD_FEATURES, LIGHT_FEATURES = 8, 9, 9, 6


@dataclass(frozen=True)
class ObservationConfig:
    num_agents: int = 8
    num_road_points: int = 32
    num_lights: int = 4
    road_candidates: int = 256  # road points each agent keeps between searches

    @property
    def size(self) -> int:
        return (
            OWN_FEATURES
            + AGENT_FEATURES * self.num_agents
            + ROAD_FEATURES * self.num_road_points
            + LIGHT_FEATURES * self.num_lights
        )


def _take(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values [B, N, ...]`` at agent indices ``index [B, Q]``: ``[B, Q, ...]``."""
    return values.gather(
        1, index.view(*index.shape, *([1] * (values.dim() - 2))).expand(*index.shape, *values.shape[2:])
    )


class Observer:
    """Builds observations for the agents of a rollout; keeps its roadgraph index."""

    def __init__(self, config: ObservationConfig = ObservationConfig(), maps: MapIndexes | None = None):
        """``maps``: the roadgraph indexes of the first batch observed, where the caller
        has them (their ``road_points`` keeping ``config.road_candidates`` candidates);
        built on first use otherwise."""
        self.config = config
        if maps is not None and maps.road_points.keep != config.road_candidates:
            raise ValueError(
                f"the roadgraph-point index keeps {maps.road_points.keep} candidates, the observation "
                f"config {config.road_candidates}"
            )
        self._given = maps
        self._points: NearestPoints | None = None  # the batch's index, nothing searched in it
        # Nearest-point indexes of the batch, one per query shape: every slot ([B, N]), or
        # the Q agents asked for ([B, Q]: an ego env searches for its SDC only).
        self._road: dict[tuple[int, ...], NearestPoints] = {}
        self._road_batch = None  # the batch _road indexes
        self._road_table: torch.Tensor | None = None
        self._light_colours: torch.Tensor | None = None  # [B, L, T, 3] red, yellow, green

    def _road_index(self, b, shape: tuple[int, ...]) -> NearestPoints:
        """The nearest-point index of batch ``b`` for queries of ``shape`` (its per-slot
        caches stay exact whichever agent a slot holds: see :class:`NearestPoints`)."""
        if shape not in self._road:
            if self._points is None:
                self._points = NearestPoints(
                    b.road_xyz[..., :2], b.road_mask, self.config.road_candidates, polyline_id=b.road_id
                )
            self._road[shape] = self._points.fresh()
        return self._road[shape]

    def __call__(
        self, state: SimState, agents: torch.Tensor | None = None, observed: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Observations ``[B, Q, size]`` of agents ``agents`` ``[B, Q]`` (slot indices; the
        same number per scenario), or ``[B, N, size]`` of every slot by default, where
        ``observed`` ``[B, N]`` may limit the work to some slots (the others get zeros).
        Only the observed agents' roadgraph neighbourhoods are searched (here, eagerly: the
        search branches on the data); the features are one pure kernel (:func:`_features`,
        compiled when compiling: see :mod:`closedloop.envs.compiled`)."""
        cfg, b = self.config, state.batch
        pose = state.current
        valid = state.valid_now
        B, N = valid.shape
        if self._road_batch is not b:
            given = self._given if self._road_batch is None else None
            self._road, self._road_batch = {}, b
            if given is not None:
                if given.road_table.shape[:2] != b.road_xyz.shape[:2]:
                    raise ValueError(
                        f"the roadgraph indexes are of {list(given.road_table.shape[:2])} scenarios x points, "
                        f"the batch observed of {list(b.road_xyz.shape[:2])}"
                    )
                self._points, self._road_table, self._light_colours = (
                    given.road_points,
                    given.road_table,
                    given.light_colours,
                )
            else:
                self._points, self._road_table, self._light_colours = None, road_table(b), light_colours(b)
        # Nearest roadgraph points (exact: see NearestPoints).
        m = min(cfg.num_road_points, b.road_xyz.shape[1])
        blank = None
        if agents is not None:  # search for the asked agents only
            xy = _take(pose[..., :2], agents)
            pts, road_distance = self._road_index(b, tuple(agents.shape))(xy, m, active=_take(valid, agents))
        else:
            agents, blank = torch.arange(N, device=pose.device).expand(B, N), observed
            active = valid if observed is None else valid & observed
            pts, road_distance = self._road_index(b, tuple(valid.shape))(pose[..., :2], m, active=active)
        # The kernel has no transcendental functions or square roots: compiled ones round
        # differently from eager ones in the last bit.
        derived = torch.stack([torch.cos(pose[..., 2]), torch.sin(pose[..., 2]), pose[..., 3:5].norm(dim=-1)], -1)
        obs = _features(
            cfg,
            pose,
            derived,
            state.dims,
            b.agent_type,
            valid,
            agents,
            self._road_table,
            pts,
            road_distance,
            b.light_stop_point,
            b.light_mask,
            self._light_colours[:, :, state.t],
        )
        if blank is not None:
            obs = obs * blank[..., None]
        return obs


@kernel
def _features(
    cfg: ObservationConfig,
    pose: torch.Tensor,
    derived: torch.Tensor,
    dims: torch.Tensor,
    agent_type: torch.Tensor,
    valid: torch.Tensor,
    agents: torch.Tensor,
    road_table: torch.Tensor,
    road_points: torch.Tensor,
    road_distance: torch.Tensor,
    light_stop_point: torch.Tensor,
    light_mask: torch.Tensor,
    light_colours: torch.Tensor,
) -> torch.Tensor:
    """The observation features ``[B, Q, size]`` of agents ``agents`` ``[B, Q]`` given the
    current poses ``[B, N, 5]`` with each heading's cosine and sine and each speed ``[B, N, 3]``,
    boxes, types and validity, the indices and distances of their nearest roadgraph points
    ``[B, Q, m]`` and the lights' colours now ``[B, L, 3]``. Arithmetic only (relative
    headings by the angle-difference identities), so that compiled and eager agree to the
    bit.

    Written as few, large operations (an ego env observes one agent per step, where each
    operation's fixed cost dominates when eager): every vector that turns into the
    agent's frame is rotated in one pass, and each block is scaled by one multiplication."""
    B, N = valid.shape
    Q = agents.shape[1]
    # Per agent: x, y, heading, vx, vy, length, width, type (small integers, exact as
    # floats), cos and sin of the heading, speed.
    table = torch.cat([pose, dims[..., :2], agent_type[..., None].to(pose.dtype), derived], -1)
    me = _take(table, agents)  # [B, Q, 11]
    xy = me[..., :2]

    # Nearest other agents.
    k = min(cfg.num_agents, max(N - 1, 1))
    offset = pose[:, None, :, :2] - xy[:, :, None]
    d = offset[..., 0] * offset[..., 0] + offset[..., 1] * offset[..., 1]  # squared distances [B, Q, N]
    itself = agents[..., None] == torch.arange(N, device=pose.device)
    d = d.masked_fill(~valid[:, None, :] | itself, float("inf"))
    near = d.topk(k, dim=-1, largest=False)
    other = _take(table, near.indices.flatten(1)).view(B, Q, k, -1)

    # The roadgraph points' rows: x, y, unit direction, kinds.
    m = road_points.shape[-1]
    point = torch.gather(road_table, 1, road_points.reshape(B, -1, 1).expand(-1, -1, road_table.shape[-1]))
    point = point.view(B, Q, m, -1)

    # Nearest traffic lights (their stop points).
    nl = min(cfg.num_lights, light_mask.shape[1])
    if nl:
        stop = light_stop_point[..., :2]
        offset = stop[:, None] - xy[:, :, None]
        ld = offset[..., 0] * offset[..., 0] + offset[..., 1] * offset[..., 1]  # squared distances [B, Q, L]
        pick = ld.masked_fill(~light_mask[:, None], float("inf")).topk(nl, dim=-1, largest=False)
        light_xy = _take(stop, pick.indices.flatten(1)).view(B, Q, nl, 2)
    else:
        light_xy = pose.new_zeros(B, Q, 0, 2)

    # Every vector the agent sees, in its frame at once: its velocity; the others'
    # offsets and velocities relative to its own; road point offsets and directions;
    # stop point offsets.
    centre = xy[:, :, None]
    vectors = torch.cat(
        [
            me[:, :, None, 3:5],
            other[..., :2] - centre,
            other[..., 3:5] - me[:, :, None, 3:5],
            point[..., :2] - centre,
            point[..., 2:4],
            light_xy - centre,
        ],
        2,
    )
    cos, sin = me[..., 8:9], me[..., 9:10]
    vx, vy = vectors[..., 0], vectors[..., 1]
    turned = torch.stack([vx * cos + vy * sin, vy * cos - vx * sin], -1)
    velocity, rel_xy, rel_v, road_xy, road_dir, light_rel = turned.split([1, k, k, m, m, nl], dim=2)

    # Scales and type codes as Python numbers: no host-to-device copies on a GPU.
    kind = me[..., 7:8]
    own = torch.cat(
        [
            me[..., 10:11] / SPEED_SCALE,
            velocity[:, :, 0] / SPEED_SCALE,
            me[..., 5:6] / LENGTH_SCALE,
            me[..., 6:7] / WIDTH_SCALE,
            kind == TYPE_VEHICLE,
            kind == TYPE_PEDESTRIAN,
            kind == TYPE_CYCLIST,
        ],
        -1,
    )

    # cos and sin of (their heading - mine)
    cos_dh = (other[..., 8] * cos + other[..., 9] * sin)[..., None]
    sin_dh = (other[..., 9] * cos - other[..., 8] * sin)[..., None]
    present = torch.isfinite(near.values)[..., None]
    nearby = torch.cat(
        [
            rel_xy / POSITION_SCALE,
            cos_dh,
            sin_dh,
            rel_v / SPEED_SCALE,
            other[..., 5:6] / LENGTH_SCALE,
            other[..., 6:7] / WIDTH_SCALE,
            present,
        ],
        -1,
    )
    nearby = _pad(nearby.masked_fill(~present, 0.0), cfg.num_agents)

    present = (road_distance < FAR / 2)[..., None]
    road = torch.cat([road_xy / POSITION_SCALE, road_dir, point[..., 4:], present], -1).masked_fill(~present, 0.0)
    road = _pad(road, cfg.num_road_points)

    lights = pose.new_zeros(B, Q, cfg.num_lights, LIGHT_FEATURES)
    if nl:
        colour = _take(light_colours, pick.indices.flatten(1)).view(B, Q, nl, 3)
        present = torch.isfinite(pick.values)[..., None]
        light = torch.cat([light_rel / POSITION_SCALE, colour, present], -1).masked_fill(~present, 0.0)
        lights = _pad(light, cfg.num_lights)
    obs = torch.cat([own, nearby.flatten(2), road.flatten(2), lights.flatten(2)], -1).float()
    return obs.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def light_colours(b) -> torch.Tensor:
    """Whether each light is red, yellow or green at each step ``[B, L, T, 3]`` (floats)."""
    state = b.light_state
    return torch.stack([light_is_red(state), light_is_yellow(state), light_is_green(state)], -1).float()


def road_table(b) -> torch.Tensor:
    """Per roadgraph point ``[B, P, 8]``: x, y, unit direction, and whether it is a lane,
    a road line, a road edge, or a crossing / stop sign / speed bump / driveway."""
    direction = b.road_dir[..., :2]
    direction = direction / torch.linalg.norm(direction, dim=-1, keepdim=True).clamp_min(1e-6)
    code = b.road_type
    kinds = torch.stack([is_lane(code), is_road_line(code), is_road_edge(code), is_crossing_or_stop(code)], -1)
    return torch.cat([b.road_xyz[..., :2], direction, kinds.float()], -1).float().contiguous()


def _pad(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[2] == size:
        return x
    pad = torch.zeros(*x.shape[:2], size - x.shape[2], x.shape[3], device=x.device, dtype=x.dtype)
    return torch.cat([x, pad], dim=2)
