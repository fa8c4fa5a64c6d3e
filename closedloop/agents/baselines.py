"""Baseline sim agents for the batched core: log replay, expert, constant velocity, IDM.

Each implements the policy protocol (:mod:`closedloop.agents.policy`): ``reset(state,
dynamics, generator)`` then ``act(state) -> actions [B, N, ...]`` for every agent (the
simulator uses the controlled agents' actions). Where the log has no next state (the
agent leaves the log), the log-based policies keep the agent's current velocity.
"""

from __future__ import annotations

import torch

from closedloop.agents.policy import BasePolicy
from closedloop.constants import DT, is_drivable_lane
from closedloop.envs.core import SimState
from closedloop.envs.dynamics import Dynamics, wrap_angle
from closedloop.envs.env import constant_velocity_targets, expert_targets
from closedloop.envs.events import StopLines
from closedloop.envs.map_index import FAR, NearestPoints

LANE_CANDIDATES = 64  # nearest lane points IDM looks at for one running its agent's way


class LogReplay(BasePolicy):
    """Open loop: the action that takes the *logged* current state to the logged next
    one (with a lossy model such as the bicycle, errors accumulate)."""

    def act(self, state: SimState) -> torch.Tensor:
        log_now = state.log_states(state.t, state.t + 1)[:, :, 0]
        now = torch.where(state.batch.agent_valid[:, :, state.t, None], log_now, state.current)
        return self.dynamics.inverse(now, expert_targets(state, self.dynamics.chunk), state.batch.agent_type)


class Expert(BasePolicy):
    """Closed loop: the action from the *simulated* state towards the logged next state,
    so it corrects its own drift."""

    def act(self, state: SimState) -> torch.Tensor:
        return self.dynamics.inverse(state.current, expert_targets(state, self.dynamics.chunk), state.batch.agent_type)


class ConstantVelocity(BasePolicy):
    """Keep the current velocity and heading."""

    def act(self, state: SimState) -> torch.Tensor:
        targets = constant_velocity_targets(state.current, self.dynamics.chunk)
        return self.dynamics.inverse(state.current, targets, state.batch.agent_type)


POLICIES = {"log": LogReplay, "expert": Expert, "constant_velocity": ConstantVelocity}


class IDM(BasePolicy):
    """Intelligent Driver Model lane follower that stops for red lights.

    Each agent steers towards the lane point ``lookahead`` metres ahead whose direction
    agrees with its heading, keeps its desired speed (its speed at the first call, at
    least ``min_desired_speed``), and brakes for the nearest agent ahead in its corridor
    and for red stop lines ahead (a stopped virtual leader at the line).

    The lane point ahead is found without an agents x roadgraph search per step: a
    :class:`~closedloop.envs.map_index.NearestPoints` index over the drivable lane points
    gives each probe its nearest ones, and only agents with no point running their way
    among those are searched against the whole roadgraph (the answer is the same).
    """

    def __init__(
        self,
        max_accel: float = 2.0,
        comfortable_decel: float = 3.0,
        headway: float = 1.5,
        min_gap: float = 2.0,
        min_desired_speed: float = 8.0,
        lookahead: float = 8.0,
        max_yaw_rate: float = 0.8,
    ):
        self.max_accel, self.decel, self.headway, self.min_gap = max_accel, comfortable_decel, headway, min_gap
        self.min_desired_speed, self.lookahead, self.max_yaw_rate = min_desired_speed, lookahead, max_yaw_rate

    def reset(self, state: SimState, dynamics: Dynamics, generator: torch.Generator | None = None) -> None:
        """Each agent's desired speed (standing agents away from any lane are parked and
        stay; the others drive) and the scenarios' stop lines."""
        super().reset(state, dynamics, generator)
        speed = torch.hypot(state.current[..., 3], state.current[..., 4])
        own = torch.cdist(state.current[..., :2].float(), state.batch.road_xyz[..., :2].float())
        own = own.masked_fill(~self._usable_lanes(state), float("inf"))
        parked = (speed < 1.0) & (own.min(-1).values > 2.0)
        self._desired = torch.where(parked, torch.zeros_like(speed), speed.clamp_min(self.min_desired_speed))
        self._stop_lines = StopLines(state.batch)
        b = state.batch
        lanes = b.road_mask & is_drivable_lane(b.road_type)
        self._lanes = NearestPoints(b.road_xyz[..., :2], lanes, polyline_id=b.road_id)

    @staticmethod
    def _usable_lanes(state: SimState) -> torch.Tensor:
        """Lane points running each agent's way ``[B, N, P]``."""
        b, yaw = state.batch, state.current[..., 2]
        direction = b.road_dir[..., :2]
        aligned = (direction[:, None] * torch.stack([torch.cos(yaw), torch.sin(yaw)], -1)[:, :, None]).sum(-1) > (
            0.5 * torch.linalg.norm(direction, dim=-1)[:, None]
        )
        return (b.road_mask & is_drivable_lane(b.road_type))[:, None] & aligned

    def _lane_point(self, state: SimState, probe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The nearest lane point to each probe ``[B, N, 2]`` among those running its
        agent's way (:meth:`_usable_lanes`), ``[B, N]``, and whether there is one: from the
        nearest lane points when one of them runs its way, else from all of them."""
        b, yaw = state.batch, state.current[..., 2]
        heading = torch.stack([torch.cos(yaw), torch.sin(yaw)], -1)
        k = min(LANE_CANDIDATES, b.road_xyz.shape[1])
        index, distance = self._lanes(probe, k, active=state.valid_now)  # [B, N, k], nearest first
        direction = torch.gather(b.road_dir[..., :2], 1, index.flatten(1)[..., None].expand(-1, -1, 2))
        direction = direction.view(*index.shape, 2)
        aligned = (direction * heading[:, :, None]).sum(-1) > 0.5 * torch.linalg.norm(direction, dim=-1)
        aligned &= distance < FAR / 2
        found = aligned.any(-1)
        best = index.gather(-1, aligned.to(torch.uint8).argmax(-1, keepdim=True))[..., 0]
        rows, agents = torch.nonzero(~found & state.valid_now, as_tuple=True)
        if rows.numel():  # nothing running its way nearby: search every lane point
            lanes = b.road_mask[rows] & is_drivable_lane(b.road_type[rows])
            road_dir = b.road_dir[rows, :, :2]
            lanes &= (road_dir * heading[rows, agents, None]).sum(-1) > 0.5 * torch.linalg.norm(road_dir, dim=-1)
            d = torch.linalg.norm(b.road_xyz[rows, :, :2] - probe[rows, agents, None], dim=-1)
            d = d.masked_fill(~lanes, float("inf")).min(-1)
            best[rows, agents] = d.indices
            found[rows, agents] = torch.isfinite(d.values)
        return best, found

    def act(self, state: SimState) -> torch.Tensor:
        b = state.batch
        cur = state.current
        x, y, yaw, vx, vy = cur.unbind(-1)
        speed = torch.hypot(vx, vy)
        cos, sin = torch.cos(yaw), torch.sin(yaw)
        length = state.dims[..., 0]
        valid = state.valid[:, :, state.t] & b.agent_mask

        # Leader: the nearest valid agent ahead within a 2 m corridor.
        dx = x[:, None, :] - x[:, :, None]
        dy = y[:, None, :] - y[:, :, None]
        along = dx * cos[..., None] + dy * sin[..., None]
        lateral = -dx * sin[..., None] + dy * cos[..., None]
        gap = along - (length[:, :, None] + length[:, None, :]) / 2
        ahead = (along > 0) & (lateral.abs() < 2.0) & valid[:, None, :]
        ahead &= ~torch.eye(x.shape[1], dtype=torch.bool, device=x.device)
        gap = torch.where(ahead, gap, torch.full_like(gap, float("inf")))
        lead_gap, lead = gap.min(-1)
        lead_speed = torch.gather(speed, 1, lead) * torch.isfinite(lead_gap)

        # Red stop lines ahead act as stopped leaders.
        lines = self._stop_lines
        rel = lines.point[:, None] - torch.stack([x, y], -1)[:, :, None]  # [B, N, L, 2]
        line_along = rel[..., 0] * cos[..., None] + rel[..., 1] * sin[..., None]
        line_lateral = -rel[..., 0] * sin[..., None] + rel[..., 1] * cos[..., None]
        facing = (lines.direction[:, None] * torch.stack([cos, sin], -1)[:, :, None]).sum(-1) > 0.7
        stop = (line_along > 0) & (line_lateral.abs() < 2.0) & lines.red(state.t)[:, None] & facing
        stop_gap = torch.where(stop, line_along - length[..., None] / 2, torch.full_like(line_along, float("inf")))
        stop_gap = stop_gap.min(-1).values

        def interaction(g, dv):
            s_star = self.min_gap + (
                speed * self.headway + speed * dv / (2 * (self.max_accel * self.decel) ** 0.5)
            ).clamp_min(0)
            return -self.max_accel * (s_star / g.clamp_min(0.1)) ** 2

        free = self.max_accel * (1 - (speed / self._desired.clamp_min(1e-3)) ** 4)
        free = torch.where(self._desired > 0, free, -self.decel * (speed > 0))
        accel = free + torch.minimum(interaction(lead_gap, speed - lead_speed), interaction(stop_gap, speed))
        accel = accel.clamp(-6.0, self.max_accel)

        # Steering: towards the aligned lane point ahead.
        probe = torch.stack([x + cos * self.lookahead, y + sin * self.lookahead], -1)
        best, found = self._lane_point(state, probe)
        target = torch.gather(b.road_xyz[..., :2], 1, best[..., None].expand(-1, -1, 2))
        # No lane ahead (the map ends, or only points behind us): keep the heading.
        ahead_of_us = (target[..., 0] - x) * cos + (target[..., 1] - y) * sin > 1.0
        has_lane = found & ahead_of_us
        target_yaw = torch.atan2(target[..., 1] - y, target[..., 0] - x)
        turn = torch.where(has_lane, wrap_angle(target_yaw - yaw), torch.zeros_like(yaw))

        # Roll the command forward over the dynamics' chunk and invert it.
        k = self.dynamics.chunk
        states = []
        px, py, pyaw, v = x, y, yaw, speed
        for _ in range(k):
            v_new = (v + accel * DT).clamp_min(0.0)
            pyaw = pyaw + (turn / k).clamp(-self.max_yaw_rate * DT, self.max_yaw_rate * DT)
            px = px + v_new * torch.cos(pyaw) * DT
            py = py + v_new * torch.sin(pyaw) * DT
            v = v_new
            states.append(torch.stack([px, py, pyaw, v * torch.cos(pyaw), v * torch.sin(pyaw)], -1))
        return self.dynamics.inverse(cur, torch.stack(states, dim=-2), b.agent_type)


POLICIES["idm"] = IDM
