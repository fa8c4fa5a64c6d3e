"""Ego-centric observations: own state, nearest agents, nearest roadgraph points, lights.

Everything is in the observing agent's frame (x forward, y left), positions scaled by
``POSITION_SCALE`` and speeds by ``SPEED_SCALE``; ground truth (the log's future) is never
part of an observation. One flat float32 vector per agent:

    own       8: speed, forward and lateral velocity, length, width, vehicle/pedestrian/cyclist
    agents  9 K: x, y, cos and sin of relative heading, relative vx, vy, length, width, valid
    road    9 M: x, y, direction x, y, lane, road line, road edge, crossing/stop, valid
    lights  6 L: stop-point x, y, red, yellow, green, valid
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from closedloop.data.scenario import (
    LIGHT_ARROW_CAUTION,
    LIGHT_ARROW_GO,
    LIGHT_ARROW_STOP,
    LIGHT_CAUTION,
    LIGHT_FLASHING_CAUTION,
    LIGHT_FLASHING_STOP,
    LIGHT_GO,
    LIGHT_STOP,
    TYPE_CYCLIST,
    TYPE_PEDESTRIAN,
    TYPE_VEHICLE,
)
from closedloop.envs.core import SimState
from closedloop.envs.map_index import FAR, NearestPoints

POSITION_SCALE = 50.0
SPEED_SCALE = 20.0


@dataclass(frozen=True)
class ObservationConfig:
    num_agents: int = 8
    num_road_points: int = 32
    num_lights: int = 4
    road_candidates: int = 256  # road points each agent keeps between searches

    @property
    def size(self) -> int:
        return 8 + 9 * self.num_agents + 9 * self.num_road_points + 6 * self.num_lights


def _to_frame(dx: torch.Tensor, dy: torch.Tensor, yaw: torch.Tensor):
    c, s = torch.cos(yaw), torch.sin(yaw)
    return dx * c + dy * s, -dx * s + dy * c


class Observer:
    """Builds observations ``[B, N, size]`` for every agent of a rollout."""

    def __init__(self, config: ObservationConfig = ObservationConfig()):
        self.config = config
        self._road: NearestPoints | None = None
        self._road_batch = None  # the batch _road indexes
        self._road_table: torch.Tensor | None = None

    def __call__(self, state: SimState) -> torch.Tensor:
        cfg, b, t = self.config, state.batch, state.t
        pose = state.pose[:, :, t]
        x, y, yaw, vx, vy = pose.unbind(-1)
        dims = state.dims
        valid = state.valid[:, :, t] & b.agent_mask
        B, N = valid.shape
        fwd, lat = _to_frame(vx, vy, yaw)
        own = torch.stack([torch.hypot(vx, vy) / SPEED_SCALE, fwd / SPEED_SCALE, lat / SPEED_SCALE,
                           dims[..., 0] / 10, dims[..., 1] / 5,
                           (b.agent_type == TYPE_VEHICLE).float(), (b.agent_type == TYPE_PEDESTRIAN).float(),
                           (b.agent_type == TYPE_CYCLIST).float()], -1)

        # Nearest other agents.
        k = min(cfg.num_agents, max(N - 1, 1))
        d = torch.cdist(pose[..., :2].float(), pose[..., :2].float())
        d = d.masked_fill(~valid[:, None, :] | torch.eye(N, dtype=torch.bool, device=d.device), float("inf"))
        near = d.topk(k, dim=-1, largest=False)
        idx = near.indices
        bidx = torch.arange(B, device=d.device)[:, None, None]
        ox, oy = _to_frame(x[bidx, idx] - x[..., None], y[bidx, idx] - y[..., None], yaw[..., None])
        ovx, ovy = _to_frame(vx[bidx, idx] - vx[..., None], vy[bidx, idx] - vy[..., None], yaw[..., None])
        dh = yaw[bidx, idx] - yaw[..., None]
        ok = torch.isfinite(near.values).float()
        agents = torch.stack([ox / POSITION_SCALE, oy / POSITION_SCALE, torch.cos(dh), torch.sin(dh),
                              ovx / SPEED_SCALE, ovy / SPEED_SCALE, dims[bidx, idx, 0] / 10,
                              dims[bidx, idx, 1] / 5, ok], -1) * ok[..., None]
        agents = _pad(agents, cfg.num_agents)

        # Nearest roadgraph points (exact: see NearestPoints).
        if self._road is None or self._road_batch is not b:
            self._road = NearestPoints(b.road_xyz[..., :2], b.road_mask, cfg.road_candidates, polyline_id=b.road_id)
            self._road_table = _road_table(b)
            self._road_batch = b
        m = min(cfg.num_road_points, b.road_xyz.shape[1])
        pts, road_distance = self._road(pose[..., :2], m, active=valid)
        table = self._road_table
        point = torch.gather(table, 1, pts.reshape(B, -1, 1).expand(-1, -1, table.shape[-1])).view(B, N, m, -1)
        px, py = _to_frame(point[..., 0] - x[..., None], point[..., 1] - y[..., None], yaw[..., None])
        dx, dy = _to_frame(point[..., 2], point[..., 3], yaw[..., None])
        ok = (road_distance < FAR / 2).float()
        road = torch.cat([torch.stack([px / POSITION_SCALE, py / POSITION_SCALE, dx, dy], -1), point[..., 4:],
                          ok[..., None]], -1) * ok[..., None]
        road = _pad(road, cfg.num_road_points)

        # Nearest traffic lights (their stop points) and their state now.
        L = b.light_lane_id.shape[1]
        lights = torch.zeros(B, N, cfg.num_lights, 6, device=pose.device)
        if bool(b.light_mask.any()):
            stop = b.light_stop_point[..., :2]
            ld = torch.cdist(pose[..., :2].float(), stop.float()).masked_fill(~b.light_mask[:, None], float("inf"))
            nl = min(cfg.num_lights, L)
            pick = ld.topk(nl, dim=-1, largest=False)
            li = pick.indices
            sx, sy = _to_frame(stop[bidx, li, 0] - x[..., None], stop[bidx, li, 1] - y[..., None], yaw[..., None])
            st = b.light_state[:, :, t][bidx, li]
            red = (st == LIGHT_STOP) | (st == LIGHT_ARROW_STOP) | (st == LIGHT_FLASHING_STOP)
            yellow = (st == LIGHT_CAUTION) | (st == LIGHT_ARROW_CAUTION) | (st == LIGHT_FLASHING_CAUTION)
            green = (st == LIGHT_GO) | (st == LIGHT_ARROW_GO)
            ok = torch.isfinite(pick.values).float()
            lights[:, :, :nl] = torch.stack([sx / POSITION_SCALE, sy / POSITION_SCALE, red.float(),
                                             yellow.float(), green.float(), ok], -1) * ok[..., None]
        obs = torch.cat([own, agents.flatten(2), road.flatten(2), lights.flatten(2)], -1)
        return obs.float().nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def _road_table(b) -> torch.Tensor:
    """Per roadgraph point ``[B, P, 8]``: x, y, unit direction, and whether it is a lane,
    a road line, a road edge, or a crossing / stop sign / speed bump / driveway."""
    direction = b.road_dir[..., :2]
    direction = direction / torch.linalg.norm(direction, dim=-1, keepdim=True).clamp_min(1e-6)
    code = b.road_type
    kinds = torch.stack([code <= 3, (code >= 5) & (code <= 13), (code >= 14) & (code <= 16), code >= 17], -1)
    return torch.cat([b.road_xyz[..., :2], direction, kinds.float()], -1).float().contiguous()


def _pad(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[2] == size:
        return x
    pad = torch.zeros(*x.shape[:2], size - x.shape[2], x.shape[3], device=x.device, dtype=x.dtype)
    return torch.cat([x, pad], dim=2)
