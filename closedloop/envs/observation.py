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
from closedloop.envs.core import SimState
from closedloop.envs.map_index import FAR, NearestPoints

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

    def __init__(self, config: ObservationConfig = ObservationConfig()):
        self.config = config
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
            cfg = self.config
            self._road[shape] = NearestPoints(
                b.road_xyz[..., :2], b.road_mask, cfg.road_candidates, polyline_id=b.road_id
            )
        return self._road[shape]

    def __call__(
        self, state: SimState, agents: torch.Tensor | None = None, observed: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Observations ``[B, Q, size]`` of agents ``agents`` ``[B, Q]`` (slot indices; the
        same number per scenario), or ``[B, N, size]`` of every slot by default, where
        ``observed`` ``[B, N]`` may limit the work to some slots (the others get zeros).
        Only the observed agents' roadgraph neighbourhoods are searched.

        Written as few, large operations (an ego env observes one agent per step, where
        each operation's fixed cost dominates): every vector that turns into the agent's
        frame is rotated in one pass, and each block is scaled by one multiplication."""
        cfg, b = self.config, state.batch
        pose = state.current
        valid = state.valid_now
        B, N = valid.shape
        blank_unobserved = agents is None and observed is not None
        subset = agents is not None
        if agents is None:
            agents = torch.arange(N, device=pose.device).expand(B, N)
            observed = torch.ones_like(valid) if observed is None else observed
        if self._road_batch is not b:
            self._road, self._road_batch = {}, b
            self._road_table, self._light_colours = _road_table(b), _light_colours(b)
        me = _take(pose, agents)  # [B, Q, 5]
        Q = agents.shape[1]
        xy, yaw = me[..., :2], me[..., 2]

        # Nearest other agents.
        k = min(cfg.num_agents, max(N - 1, 1))
        d = torch.linalg.vector_norm(pose[:, None, :, :2] - xy[:, :, None], dim=-1)  # [B, Q, N]
        itself = agents[..., None] == torch.arange(N, device=pose.device)
        d = d.masked_fill(~valid[:, None, :] | itself, float("inf"))
        near = d.topk(k, dim=-1, largest=False)
        other = _take(pose, near.indices.flatten(1)).view(B, Q, k, 5)
        other_dims = _take(state.dims, near.indices.flatten(1)).view(B, Q, k, 3)

        # Nearest roadgraph points (exact: see NearestPoints).
        m = min(cfg.num_road_points, b.road_xyz.shape[1])
        if subset:  # search for the asked agents only
            pts, road_distance = self._road_index(b, tuple(agents.shape))(xy, m, active=_take(valid, agents))
        else:
            pts, road_distance = self._road_index(b, tuple(valid.shape))(pose[..., :2], m, active=valid & observed)
        table = self._road_table
        point = torch.gather(table, 1, pts.reshape(B, -1, 1).expand(-1, -1, table.shape[-1])).view(B, Q, m, -1)

        # Nearest traffic lights (their stop points).
        L = b.light_lane_id.shape[1]
        nl = min(cfg.num_lights, L)
        if nl:
            stop = b.light_stop_point[..., :2]
            ld = torch.linalg.vector_norm(stop[:, None] - xy[:, :, None], dim=-1)  # [B, Q, L]
            ld = ld.masked_fill(~b.light_mask[:, None], float("inf"))
            pick = ld.topk(nl, dim=-1, largest=False)
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
        cos, sin = torch.cos(yaw)[..., None], torch.sin(yaw)[..., None]
        vx, vy = vectors[..., 0], vectors[..., 1]
        turned = torch.stack([vx * cos + vy * sin, vy * cos - vx * sin], -1)
        velocity, rel_xy, rel_v, road_xy, road_dir, light_rel = turned.split([1, k, k, m, m, nl], dim=2)

        kind = _take(b.agent_type, agents)
        kinds = kind[..., None] == torch.tensor([TYPE_VEHICLE, TYPE_PEDESTRIAN, TYPE_CYCLIST], device=kind.device)
        own = torch.cat(
            [me[..., 3:5].norm(dim=-1, keepdim=True), velocity[:, :, 0], _take(state.dims, agents)[..., :2], kinds], -1
        ) * _OWN_SCALE.to(pose.device)

        dh = other[..., 2] - yaw[..., None]
        present = torch.isfinite(near.values)[..., None]
        nearby = torch.cat(
            [rel_xy, torch.cos(dh)[..., None], torch.sin(dh)[..., None], rel_v, other_dims[..., :2], present], -1
        ) * _AGENT_SCALE.to(pose.device)
        nearby = _pad(nearby.masked_fill(~present, 0.0), cfg.num_agents)

        present = (road_distance < FAR / 2)[..., None]
        road = torch.cat([road_xy / POSITION_SCALE, road_dir, point[..., 4:], present], -1).masked_fill(~present, 0.0)
        road = _pad(road, cfg.num_road_points)

        lights = torch.zeros(B, Q, cfg.num_lights, LIGHT_FEATURES, device=pose.device)
        if nl:
            colour = _take(self._light_colours[:, :, state.t], pick.indices.flatten(1)).view(B, Q, nl, 3)
            present = torch.isfinite(pick.values)[..., None]
            lights[:, :, :nl] = torch.cat([light_rel / POSITION_SCALE, colour, present], -1).masked_fill(~present, 0.0)
        obs = torch.cat([own, nearby.flatten(2), road.flatten(2), lights.flatten(2)], -1).float()
        if blank_unobserved:
            obs = obs * observed[..., None]
        return obs.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


_OWN_SCALE = torch.tensor(
    [1 / SPEED_SCALE, 1 / SPEED_SCALE, 1 / SPEED_SCALE, 1 / LENGTH_SCALE, 1 / WIDTH_SCALE, 1.0, 1.0, 1.0]
)
_AGENT_SCALE = torch.tensor(
    [1 / POSITION_SCALE, 1 / POSITION_SCALE, 1.0, 1.0, 1 / SPEED_SCALE, 1 / SPEED_SCALE]
    + [1 / LENGTH_SCALE, 1 / WIDTH_SCALE, 1.0]
)


def _light_colours(b) -> torch.Tensor:
    """Whether each light is red, yellow or green at each step ``[B, L, T, 3]`` (floats)."""
    state = b.light_state
    return torch.stack([light_is_red(state), light_is_yellow(state), light_is_green(state)], -1).float()


def _road_table(b) -> torch.Tensor:
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
