"""The random-shooting MPC planners of the RL fine-tuning paper's policy-evaluation
benchmark (Peng et al.): 64 planners, all scored as tensors in one batch.

A planner ``rs_J{j}_D{d}`` holds a fixed library of ``j`` candidates, each one steering
angle and one acceleration kept for ``d`` steps of the bicycle model. Every step it rolls
every candidate out from the SDC's current state, scores it, executes the first step of
the best one, and plans again at the next step. A candidate's score is its predicted
return: the planner-evaluation reward (:mod:`closedloop.agents.planners.scoring`) summed
over its ``d`` steps, i.e. ``-10 * (steps in collision) - (steps off-road) - (steps
off-route) + 1e-4 * progress``, where at each step

- ``collision``: its box meets the box of another agent valid now as predicted by
  **constant-velocity extrapolation** of that agent's current state (position moves with
  the current velocity, heading and size stay): the planner's assumption about the
  others, whatever the sim agents then do;
- ``offroad``: a corner of its box is beyond a road edge;
- ``offroute``: its centre is farther than the off-route threshold from the route;

and ``progress`` is the metres along the route from now to its last step. Road edges and
the route are read from a cost map (:mod:`closedloop.agents.planners.costmap`: a 1 m grid
built once per scenario, interpolated), the planner's own approximation. Counting steps
rather than flagging "ever" keeps a gradient when every candidate is off-route: the one
that gets back soonest wins.

The library: steering angles and accelerations on a 9 x 9 grid (:data:`STEERING_ANGLES`,
:data:`ACCELERATIONS`; curvature = tan(steering) / :data:`WHEELBASE`), ordered by farthest
point sampling from "straight on at the current speed", so the first 9 are the coarse
3 x 3 grid and each longer library refines the shorter ones (planner ``J`` uses the first
``J``: more candidates can only find a better-scored one). Braking candidates stop at zero
speed rather than reverse. ``J`` takes the 16 values :data:`NUM_CANDIDATES` from 9 to 81,
``d`` the 4 values :data:`DEPTHS`.

All planners and scenarios of a batch are scored at once: candidates are padded to 81 and
16 steps, ``[B, 81, 16, ...]`` tensors, with masks for each row's ``J`` and ``d``.
"""

from __future__ import annotations

import math
import re

import torch

from closedloop.constants import DT
from closedloop.envs.core import SimState
from closedloop.envs.dynamics import Bicycle, Dynamics
from closedloop.geometry import box_corners, rectangles_overlap

from .costmap import CostMaps, reach
from .scoring import OFFROUTE_DISTANCE, Route, planner_reward, sdc_slots

NUM_CANDIDATES = tuple(round(9 + i * 72 / 15) for i in range(16))  # 9, 14, 19, ..., 76, 81
DEPTHS = (6, 8, 12, 16)
WHEELBASE = 2.8  # metres, for curvature = tan(steering angle) / wheelbase
STEERING_ANGLES = tuple(0.5 * math.copysign(u * u, u) for u in torch.linspace(-1, 1, 9).tolist())  # denser near 0
ACCELERATIONS = (-6.0, -4.0, -2.5, -1.0, 0.0, 0.75, 1.5, 2.25, 3.0)  # m/s^2, 0 in the middle
NAMES = tuple(f"rs_J{j}_D{d}" for j in NUM_CANDIDATES for d in DEPTHS)
_NAME = re.compile(r"rs_J(\d+)_D(\d+)")


def parse_name(name: str) -> tuple[int, int] | None:
    """``(J, D)`` of a random-shooting planner name ``rs_J{j}_D{d}``, None for other names
    (any J in 1..81 and D >= 1 is accepted; the benchmark's 64 are :data:`NAMES`)."""
    match = _NAME.fullmatch(name)
    if match is None:
        return None
    j, d = int(match[1]), int(match[2])
    if not (1 <= j <= len(STEERING_ANGLES) * len(ACCELERATIONS) and d >= 1):
        raise ValueError(f"planner {name}: J must be in 1..81 and D at least 1")
    return j, d


def candidate_library() -> torch.Tensor:
    """The 81 candidates ``[81, 2]`` (acceleration, curvature), in library order."""
    a_index, s_index = torch.meshgrid(torch.arange(9), torch.arange(9), indexing="ij")
    grid = torch.stack([a_index.flatten(), s_index.flatten()], -1).double()
    chosen = [40]  # the centre: acceleration 0, steering 0
    distance = torch.linalg.norm(grid - grid[40], dim=-1)
    for _ in range(80):  # farthest point next; ties go to the lowest index
        distance[chosen] = -1
        nxt = int(distance.argmax())
        chosen.append(nxt)
        distance = torch.minimum(distance, torch.linalg.norm(grid - grid[nxt], dim=-1))
    accel = torch.tensor(ACCELERATIONS, dtype=torch.float64)
    curvature = torch.tan(torch.tensor(STEERING_ANGLES, dtype=torch.float64)) / WHEELBASE
    order = torch.tensor(chosen)
    return torch.stack([accel[a_index.flatten()[order]], curvature[s_index.flatten()[order]]], -1).float()


class RandomShooting:
    """A batch of random-shooting planners: row ``b`` of the simulated batch is driven by
    planner ``(J[b], D[b])``. ``reset`` once per episode, then ``act(state)`` every step
    gives the ego action ``[B, *ego.spec.shape]`` (bicycle actions as they are; for another
    ego dynamics, its inverse of the chosen candidate's first state). ``costmaps``: grids
    to reuse across episodes on the same scenarios."""

    def __init__(self, configs: torch.Tensor, costmaps: CostMaps | None = None):
        self.configs = configs  # [B, 2] (J, D) per row
        self.costmaps = CostMaps() if costmaps is None else costmaps

    def reset(self, state: SimState, route: Route, ego: Dynamics) -> None:
        device = state.device
        self.route, self.ego = route, ego
        self.sdc = sdc_slots(state.batch)
        self.model = Bicycle()
        self.num = self.configs[:, 0].to(device)
        self.library = candidate_library()[: int(self.num.max())].to(device)  # no row looks further
        self.depth = self.configs[:, 1].to(device)
        self.horizon = int(self.depth.max())
        rows = torch.arange(state.controlled.shape[0], device=device)
        speed = torch.hypot(state.current[rows, self.sdc, 3], state.current[rows, self.sdc, 4])
        seconds = (state.num_steps - 1 - state.t + max(DEPTHS)) * DT
        self.costmap = self.costmaps.for_batch(state.batch, route, reach(speed, seconds, max(ACCELERATIONS)))

    def _candidates(self, now: torch.Tensor) -> torch.Tensor:
        """States ``[B, J, H, 5]`` of every candidate over the horizon from ``now`` ``[B, 5]``
        (J and H: the batch's largest)."""
        B, J = now.shape[0], self.library.shape[0]
        accel = self.library[:, 0].expand(B, J)
        curvature = self.library[:, 1].expand(B, J)
        state = now[:, None].expand(B, J, 5)
        states = []
        for _ in range(self.horizon):
            speed = torch.hypot(state[..., 3], state[..., 4])
            action = torch.stack([torch.maximum(accel, -speed / DT), curvature], -1)  # stop, do not reverse
            state = self.model.forward(state, action)[..., 0, :]
            states.append(state)
        return torch.stack(states, 2)

    def _collisions(self, state: SimState, ego: torch.Tensor, dims: torch.Tensor) -> torch.Tensor:
        """Whether each candidate step ``[B, J, H]`` meets another agent's box, the others
        extrapolated at constant velocity. Only (row, agent) pairs that can meet within the
        horizon get the box tests."""
        B, J, H, _ = ego.shape
        cur = state.current
        rows = torch.arange(B, device=cur.device)
        others = state.valid_now & ~state.batch.is_sdc
        radius = torch.hypot(state.dims[..., 0], state.dims[..., 1]) / 2  # [B, N]
        sdc_radius = torch.hypot(dims[:, 0], dims[:, 1]) / 2
        horizon = H * DT
        speed = torch.hypot(cur[..., 3], cur[..., 4])
        sdc_now = cur[rows, self.sdc]
        sdc_reach = (torch.hypot(sdc_now[:, 3], sdc_now[:, 4]) + 6.0 * horizon) * horizon
        gap = torch.linalg.norm(cur[..., :2] - sdc_now[:, None, :2], dim=-1)
        near = others & (gap < sdc_reach[:, None] + speed * horizon + radius + sdc_radius[:, None])
        hit = torch.zeros(B, J, H, dtype=torch.bool, device=cur.device)
        b, n = torch.nonzero(near, as_tuple=True)
        if not b.numel():
            return hit
        steps = torch.arange(1, H + 1, device=cur.device, dtype=cur.dtype) * DT
        other = cur[b, n]  # [P, 5]
        ox = other[:, None, 0] + other[:, None, 3] * steps  # [P, H]
        oy = other[:, None, 1] + other[:, None, 4] * steps
        mine = ego[b]  # [P, J, H, 5]
        reach = (radius[b, n] + sdc_radius[b])[:, None, None]
        close = torch.hypot(mine[..., 0] - ox[:, None], mine[..., 1] - oy[:, None]) < reach  # [P, J, H]
        p, j, h = torch.nonzero(close, as_tuple=True)
        if p.numel():
            m = mine[p, j, h]
            box_ego = (m[:, 0], m[:, 1], m[:, 2], dims[b[p], 0], dims[b[p], 1])
            box_other = (ox[p, h], oy[p, h], other[p, 2], state.dims[b[p], n[p], 0], state.dims[b[p], n[p], 1])
            overlap = rectangles_overlap(box_ego, box_other)
            hit[b[p[overlap]], j[overlap], h[overlap]] = True
        return hit

    def act(self, state: SimState) -> torch.Tensor:
        B = state.controlled.shape[0]
        rows = torch.arange(B, device=state.device)
        now = state.current[rows, self.sdc]  # [B, 5]
        dims = state.dims[rows, self.sdc]  # [B, 3]
        ego = self._candidates(now)  # [B, J, H, 5]
        J, H = ego.shape[1], ego.shape[2]
        corners = box_corners(
            ego[..., 0], ego[..., 1], ego[..., 2], dims[:, None, None, 0], dims[:, None, None, 1]
        )  # [B, J, H, 4, 2]
        offroad = (self.costmap.lookup(corners)[..., 0] > 0).any(-1)  # [B, J, H]
        centre = self.costmap.lookup(ego[..., :2])
        distance, arc = centre[..., 1], centre[..., 2]
        arc_now = self.costmap.lookup(now[:, None, :2])[..., 2]
        collision = self._collisions(state, ego, dims)
        within = torch.arange(H, device=state.device) < self.depth[:, None]  # [B, H]
        within = within[:, None]

        def steps(event: torch.Tensor) -> torch.Tensor:
            return (event & within).sum(-1)

        last = (self.depth - 1)[:, None, None].expand(B, J, 1)
        progress = arc.gather(2, last)[..., 0] - arc_now
        score = planner_reward(steps(collision), steps(offroad), steps(distance > OFFROUTE_DISTANCE), progress)
        score = score.masked_fill(torch.arange(J, device=state.device) >= self.num[:, None], -math.inf)
        best = score.argmax(1)  # ties: the earlier candidate in library order
        if isinstance(self.ego, Bicycle):
            return torch.stack(
                [torch.maximum(self.library[best, 0], -torch.hypot(now[:, 3], now[:, 4]) / DT), self.library[best, 1]],
                -1,
            )
        first = ego[rows, best, 0]  # [B, 5]
        return self.ego.inverse(now, first[:, None])
