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


def _to_frame(dx: torch.Tensor, dy: torch.Tensor, yaw: torch.Tensor):
    c, s = torch.cos(yaw), torch.sin(yaw)
    return dx * c + dy * s, -dx * s + dy * c


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
        Only the observed agents' roadgraph neighbourhoods are searched."""
        cfg, b, t = self.config, state.batch, state.t
        pose = state.current
        valid = state.valid_now
        B, N = valid.shape
        blank_unobserved = agents is None and observed is not None
        subset = agents is not None
        if agents is not None:
            observed = torch.zeros_like(valid).scatter_(1, agents, True)
        else:
            agents = torch.arange(N, device=pose.device).expand(B, N)
            observed = torch.ones_like(valid) if observed is None else observed
        me = _take(pose, agents)  # [B, Q, 5]
        x, y, yaw, vx, vy = me.unbind(-1)
        dims = state.dims
        fwd, lat = _to_frame(vx, vy, yaw)
        kind = _take(b.agent_type, agents)
        my_dims = _take(dims, agents)
        own = torch.stack(
            [
                torch.hypot(vx, vy) / SPEED_SCALE,
                fwd / SPEED_SCALE,
                lat / SPEED_SCALE,
                my_dims[..., 0] / LENGTH_SCALE,
                my_dims[..., 1] / WIDTH_SCALE,
                (kind == TYPE_VEHICLE).float(),
                (kind == TYPE_PEDESTRIAN).float(),
                (kind == TYPE_CYCLIST).float(),
            ],
            -1,
        )

        # Nearest other agents.
        k = min(cfg.num_agents, max(N - 1, 1))
        d = torch.cdist(me[..., :2].float(), pose[..., :2].float())  # [B, Q, N]
        itself = agents[..., None] == torch.arange(N, device=pose.device)
        d = d.masked_fill(~valid[:, None, :] | itself, float("inf"))
        near = d.topk(k, dim=-1, largest=False)
        other = _take(pose, near.indices.flatten(1)).view(B, -1, k, 5)
        other_dims = _take(dims, near.indices.flatten(1)).view(B, -1, k, 3)
        ox, oy = _to_frame(other[..., 0] - x[..., None], other[..., 1] - y[..., None], yaw[..., None])
        ovx, ovy = _to_frame(other[..., 3] - vx[..., None], other[..., 4] - vy[..., None], yaw[..., None])
        dh = other[..., 2] - yaw[..., None]
        ok = torch.isfinite(near.values).float()
        nearby = (
            torch.stack(
                [
                    ox / POSITION_SCALE,
                    oy / POSITION_SCALE,
                    torch.cos(dh),
                    torch.sin(dh),
                    ovx / SPEED_SCALE,
                    ovy / SPEED_SCALE,
                    other_dims[..., 0] / LENGTH_SCALE,
                    other_dims[..., 1] / WIDTH_SCALE,
                    ok,
                ],
                -1,
            )
            * ok[..., None]
        )
        nearby = _pad(nearby, cfg.num_agents)

        # Nearest roadgraph points (exact: see NearestPoints).
        if self._road_batch is not b:
            self._road, self._road_table, self._road_batch = {}, _road_table(b), b
        m = min(cfg.num_road_points, b.road_xyz.shape[1])
        if subset:  # search for the asked agents only
            pts, road_distance = self._road_index(b, tuple(agents.shape))(me[..., :2], m, active=_take(valid, agents))
        else:
            pts, road_distance = self._road_index(b, tuple(valid.shape))(pose[..., :2], m, active=valid & observed)
        table = self._road_table
        point = torch.gather(table, 1, pts.reshape(B, -1, 1).expand(-1, -1, table.shape[-1])).view(*pts.shape, -1)
        px, py = _to_frame(point[..., 0] - x[..., None], point[..., 1] - y[..., None], yaw[..., None])
        dx, dy = _to_frame(point[..., 2], point[..., 3], yaw[..., None])
        ok = (road_distance < FAR / 2).float()
        road = (
            torch.cat(
                [torch.stack([px / POSITION_SCALE, py / POSITION_SCALE, dx, dy], -1), point[..., 4:], ok[..., None]], -1
            )
            * ok[..., None]
        )
        road = _pad(road, cfg.num_road_points)

        # Nearest traffic lights (their stop points) and their state now.
        L = b.light_lane_id.shape[1]
        Q = agents.shape[1]
        lights = torch.zeros(B, Q, cfg.num_lights, LIGHT_FEATURES, device=pose.device)
        if L and cfg.num_lights:
            stop = b.light_stop_point[..., :2]
            ld = torch.cdist(me[..., :2].float(), stop.float()).masked_fill(~b.light_mask[:, None], float("inf"))
            nl = min(cfg.num_lights, L)
            pick = ld.topk(nl, dim=-1, largest=False)
            li = pick.indices  # [B, Q, nl]
            point = _take(stop, li.flatten(1)).view(B, Q, nl, 2)
            sx, sy = _to_frame(point[..., 0] - x[..., None], point[..., 1] - y[..., None], yaw[..., None])
            st = _take(b.light_state[:, :, t], li.flatten(1)).view(B, Q, nl)
            ok = torch.isfinite(pick.values).float()
            lights[:, :, :nl] = (
                torch.stack(
                    [
                        sx / POSITION_SCALE,
                        sy / POSITION_SCALE,
                        light_is_red(st).float(),
                        light_is_yellow(st).float(),
                        light_is_green(st).float(),
                        ok,
                    ],
                    -1,
                )
                * ok[..., None]
            )
        obs = torch.cat([own, nearby.flatten(2), road.flatten(2), lights.flatten(2)], -1).float()
        if blank_unobserved:
            obs = obs * observed[..., None]
        return obs.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


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
