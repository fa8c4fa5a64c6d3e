"""The planner-evaluation reward and the SDC's route, defined once.

The random-shooting planners score their candidates with it and a planner's return is the
sum of it over the episode (Peng et al.'s planner score, per step)::

    r = -10 * collision - offroad - offroute + 1e-4 * progress

- ``collision`` / ``offroad``: indicators (for the executed motion, the simulator's own
  events, :mod:`closedloop.envs.events`: oriented boxes overlap; a box corner beyond a road
  edge);
- ``offroute``: the SDC's centre is more than :data:`OFFROUTE_DISTANCE` from the route;
- ``progress``: metres gained along the route (the change of the centre's projection).

The route is the SDC's logged path (its valid positions, steps 0..90), extended straight
by :data:`ROUTE_EXTENSION` past both ends along the logged heading there, so a planner
that drives on beyond where the log ends is not off-route. It is ground truth about where
the SDC wants to go (a navigation route), not about how it gets there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from closedloop.data.batch import ScenarioBatch

COLLISION_WEIGHT = 10.0
OFFROAD_WEIGHT = 1.0
OFFROUTE_WEIGHT = 1.0
PROGRESS_WEIGHT = 1e-4
OFFROUTE_DISTANCE = 2.0  # metres: more than half a 3.5 m lane plus margin
ROUTE_EXTENSION = 200.0  # metres of straight route before the first and after the last logged position


def planner_reward(
    collision: torch.Tensor, offroad: torch.Tensor, offroute: torch.Tensor, progress: torch.Tensor
) -> torch.Tensor:
    """``-10 * collision - offroad - offroute + 1e-4 * progress`` (indicators as bools or
    floats, progress in metres), broadcast."""
    return (
        -COLLISION_WEIGHT * collision.float()
        - OFFROAD_WEIGHT * offroad.float()
        - OFFROUTE_WEIGHT * offroute.float()
        + PROGRESS_WEIGHT * progress
    )


def sdc_slots(batch: ScenarioBatch) -> torch.Tensor:
    """The SDC's agent slot in each scenario ``[B]``."""
    if not bool(batch.is_sdc.any(1).all()):
        missing = [sid for sid, has in zip(batch.scenario_id, batch.is_sdc.any(1).tolist()) if not has]
        raise ValueError(f"scenarios {missing[:5]} have no SDC to plan for")
    return batch.is_sdc.to(torch.uint8).argmax(1)


@dataclass(frozen=True)
class Route:
    """Waypoints ``[B, R, 2]`` (the batch's frame) and the arc length at each ``[B, R]``.
    Consecutive waypoints form the route's segments; rows with fewer logged positions
    repeat their last one (zero-length segments, harmless)."""

    points: torch.Tensor
    arc: torch.Tensor

    @classmethod
    def from_log(cls, batch: ScenarioBatch, extension: float = ROUTE_EXTENSION) -> Route:
        """The SDC's logged path, extended at both ends (see the module docstring)."""
        sdc = sdc_slots(batch)
        rows = torch.arange(batch.batch_size, device=sdc.device)
        xy = batch.agent_xyz[rows, sdc, :, :2].double()  # [B, T, 2]
        valid = batch.agent_valid[rows, sdc]
        heading = batch.agent_heading[rows, sdc].double()
        T = valid.shape[1]
        steps = torch.arange(T, device=sdc.device).expand_as(valid)
        order = torch.where(valid, steps, T).sort(1).values  # valid steps first, in time order
        count = valid.sum(1, keepdim=True)
        last = order.gather(1, (count - 1).clamp_min(0))
        index = torch.where(steps < count, order, last)
        points = xy.gather(1, index[..., None].expand(-1, -1, 2))
        h0, h1 = heading.gather(1, index[:, :1]), heading.gather(1, last)
        before = points[:, :1] - extension * torch.stack([torch.cos(h0), torch.sin(h0)], -1)
        after = points[:, -1:] + extension * torch.stack([torch.cos(h1), torch.sin(h1)], -1)
        points = torch.cat([before, points, after], 1)
        lengths = torch.linalg.norm(points.diff(dim=1), dim=-1)
        arc = torch.cat([torch.zeros_like(lengths[:, :1]), lengths.cumsum(1)], 1)
        return cls(points.float(), arc.float())

    def select(self, rows: torch.Tensor) -> Route:
        return Route(self.points[rows], self.arc[rows])

    def project(self, xy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Distance to the route and arc length of the nearest route point, ``[B, ...]``
        each, for points ``xy`` ``[B, ..., 2]``."""
        shape = xy.shape[:-1]
        p = xy.reshape(shape[0], -1, 1, 2).float()
        start = self.points[:, None, :-1]  # [B, 1, S, 2]
        along = self.points.diff(dim=1)[:, None]
        length2 = (along * along).sum(-1)
        rel = p - start  # [B, M, S, 2]
        t = ((rel * along).sum(-1) / length2.clamp_min(1e-9)).clamp(0, 1)
        gap = rel - t[..., None] * along
        d2 = (gap * gap).sum(-1)
        best, segment = d2.min(-1)  # [B, M]
        seg_length = length2.sqrt().expand_as(t).gather(-1, segment[..., None])[..., 0]
        arc = self.arc[:, :-1].gather(1, segment) + t.gather(-1, segment[..., None])[..., 0] * seg_length
        return best.sqrt().view(shape), arc.view(shape)
