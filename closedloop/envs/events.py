"""Per-step events: collision, off-road, red-light violation, distance to the log."""

from __future__ import annotations

import torch

from closedloop.data.scenario import LIGHT_ARROW_STOP, LIGHT_STOP
from closedloop.envs.core import SimState, collisions, distance_to_log
from closedloop.envs.map_index import RoadEdges
from closedloop.geometry import box_corners

STOP_LINE_HALF_WIDTH = 1.75  # a lane


def agent_corners(state: SimState, t: int | None = None) -> torch.Tensor:
    t = state.t if t is None else t
    p = state.pose[:, :, t]
    return box_corners(p[..., 0], p[..., 1], p[..., 2], state.dims[..., 0], state.dims[..., 1])


class StopLines:
    """Each traffic-light lane's stop line: the stop point and the lane's direction there."""

    def __init__(self, state: SimState):
        b = state.batch
        same_lane = (b.road_id[:, None, :] == b.light_lane_id[:, :, None]) & b.road_mask[:, None, :]
        d = torch.linalg.norm(b.road_xyz[:, None, :, :2] - b.light_stop_point[:, :, None, :2], dim=-1)
        nearest = d.masked_fill(~same_lane, float("inf")).argmin(-1)  # [B, L]
        direction = torch.gather(b.road_dir[..., :2], 1, nearest[..., None].expand(-1, -1, 2))
        norm = torch.linalg.norm(direction, dim=-1, keepdim=True)
        self.direction = direction = direction / norm.clamp_min(1e-6)
        self.point = b.light_stop_point[..., :2]
        self.valid = b.light_mask & same_lane.any(-1) & (norm[..., 0] > 1e-6)
        self.state = b.light_state  # [B, L, T]
        # Along-lane and lateral coordinates relative to each stop line are one product:
        # position @ axes - offsets, with axes [B, 2, 2L] (lane directions, then normals).
        normal = torch.stack([-direction[..., 1], direction[..., 0]], -1)
        axes = torch.cat([direction, normal], dim=1)  # [B, 2L, 2]
        self.axes = axes.transpose(1, 2).contiguous()
        self.offsets = (torch.cat([self.point] * 2, dim=1) * axes).sum(-1)[:, None]  # [B, 1, 2L]

    def violations(self, before: torch.Tensor, after: torch.Tensor, t: int) -> torch.Tensor:
        """Agents ``[B, N]`` whose centre went from behind to past a red stop line between
        positions ``before`` and ``after`` ``[B, N, 2]`` (state at step ``t``)."""
        L = self.valid.shape[1]
        red = ((self.state[:, :, t] == LIGHT_STOP) | (self.state[:, :, t] == LIGHT_ARROW_STOP)) & self.valid
        if not bool(red.any()):
            return torch.zeros(before.shape[:2], dtype=torch.bool, device=before.device)
        rel0 = torch.baddbmm(self.offsets, before, self.axes, alpha=1, beta=-1)  # [B, N, 2L]
        rel1 = torch.baddbmm(self.offsets, after, self.axes, alpha=1, beta=-1)
        lateral = (rel0[..., L:] + rel1[..., L:]).abs() < 2 * STOP_LINE_HALF_WIDTH
        crossed = (rel0[..., :L] < 0) & (rel1[..., :L] >= 0) & lateral & red[:, None]
        return crossed.any(-1)


class EventTracker:
    """Computes the per-step events of a rollout, keeping its roadgraph neighbourhoods."""

    def __init__(self, state: SimState):
        self.edges = RoadEdges(state.batch)
        self.stop_lines = StopLines(state)

    def __call__(self, previous: SimState, state: SimState) -> dict[str, torch.Tensor]:
        """Events ``[B, N]`` at ``state.t`` (after a step from ``previous``)."""
        valid = state.valid[:, :, state.t] & state.batch.agent_mask
        offroad = self.edges.signed_distance(agent_corners(state)) > 0
        red = torch.zeros_like(valid)
        for t in range(previous.t + 1, state.t + 1):  # every step a chunked action covered
            red |= self.stop_lines.violations(state.pose[:, :, t - 1, :2], state.pose[:, :, t, :2], t)
        return {
            "collision": collisions(state) & valid,
            "offroad": offroad & valid,
            "red_light": red & valid,
            "distance_to_log": distance_to_log(state),
        }
