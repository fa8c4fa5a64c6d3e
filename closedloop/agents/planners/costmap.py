"""The random-shooting planners' cost map: what they look up for thousands of candidate
poses per step instead of searching the roadgraph for each.

Per scenario, a grid (:data:`RESOLUTION` metres, centred on the SDC's position at the
current step, the batch frame's origin, wide enough for anywhere the SDC can get in the
episode plus a planning horizon) holds three values per cell centre: the signed distance to
the road edges (positive off the road; the simulator's own road-edge index,
:class:`closedloop.envs.map_index.RoadEdges`, so the same side convention), the distance
to the route and the arc length of the nearest route point. Lookups interpolate
bilinearly; a point outside the grid, or farther than :data:`CORRIDOR` from the route (a
candidate there is hopeless anyway), reads as off the road and far off the route. The
grid is built once per scenario and kept for every episode on it (:class:`CostMaps`).
The executed motion is always judged by the simulator's exact events, not by this map.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from closedloop.data.batch import ScenarioBatch, select_scenarios
from closedloop.envs.map_index import RoadEdges

from .scoring import Route

RESOLUTION = 1.0  # metres between grid points
BLOCK = 16384  # grid points measured at once
CORRIDOR = 20.0  # metres from the route within which the grid is measured
COARSE = 8  # grid points per side of the coarse cells that find the corridor
OUTSIDE = (1.0, 1e3, 0.0)  # what a point outside the grid reads: off-road, far off the route


@dataclass(frozen=True)
class CostMap:
    """Grids of the rows of a batch: ``table`` ``[cells, 3]`` (every scenario's grid,
    flattened one after the other), and per row its grid's ``offset`` into it, ``width``
    (points per side) and ``half`` (half the side, metres)."""

    table: torch.Tensor
    offset: torch.Tensor  # [B] long
    width: torch.Tensor  # [B] long
    half: torch.Tensor  # [B] float

    def lookup(self, xy: torch.Tensor) -> torch.Tensor:
        """Edge signed distance, route distance and route arc length ``[B, ..., 3]`` at
        points ``xy`` ``[B, ..., 2]`` (bilinear)."""
        shape = xy.shape[:-1]
        view = (shape[0],) + (1,) * (len(shape) - 1)
        width, half = self.width.view(view), self.half.view(view)
        fx = (xy[..., 0] + half) / RESOLUTION
        fy = (xy[..., 1] + half) / RESOLUTION
        inside = (fx >= 0) & (fy >= 0) & (fx <= width - 1) & (fy <= width - 1)
        x0 = fx.floor().long().clamp(torch.zeros_like(width), width - 2)
        y0 = fy.floor().long().clamp(torch.zeros_like(width), width - 2)
        wx = (fx - x0).clamp(0, 1)[..., None]
        wy = (fy - y0).clamp(0, 1)[..., None]
        base = self.offset.view(view) + y0 * width + x0

        def at(index: torch.Tensor) -> torch.Tensor:
            return self.table[index.reshape(-1)].view(*shape, 3)

        value = (1 - wy) * ((1 - wx) * at(base) + wx * at(base + 1)) + wy * (
            (1 - wx) * at(base + width) + wx * at(base + width + 1)
        )
        outside = torch.tensor(OUTSIDE, dtype=value.dtype, device=value.device)
        return torch.where(inside[..., None], value, outside)


class CostMaps:
    """Builds and keeps each scenario's grid (by scenario id and size)."""

    def __init__(self):
        self._grids: dict[tuple[str, int], torch.Tensor] = {}

    def for_batch(self, batch: ScenarioBatch, route: Route, reach: torch.Tensor) -> CostMap:
        """The cost map of ``batch``'s rows; ``reach`` ``[B]``: metres the SDC may get from
        its current position (the grid's half side, rounded up)."""
        points = torch.ceil(reach / RESOLUTION).long().clamp_min(1)  # grid points each side of the origin
        tables, offsets, widths, halves, start = [], [], [], [], 0
        placed: dict[tuple[str, int], tuple[int, int]] = {}
        for row, (sid, n) in enumerate(zip(batch.scenario_id, points.tolist())):
            key = (sid, n)
            if key not in placed:
                if key not in self._grids:
                    self._grids[key] = _build(select_scenarios(batch, [row]), route.select(torch.tensor([row])), n)
                grid = self._grids[key]
                placed[key] = (start, 2 * n + 1)
                tables.append(grid)
                start += grid.shape[0]
            offset, width = placed[key]
            offsets.append(offset)
            widths.append(width)
            halves.append(n * RESOLUTION)
        device = batch.agent_xyz.device
        return CostMap(
            torch.cat(tables).to(device),
            torch.tensor(offsets, device=device),
            torch.tensor(widths, device=device),
            torch.tensor(halves, device=device, dtype=torch.float32),
        )


def _build(batch: ScenarioBatch, route: Route, n: int) -> torch.Tensor:
    """The grid ``[(2n + 1)^2, 3]`` of one scenario (row-major, y then x). Only points
    within :data:`CORRIDOR` of the route are measured (found on a coarse grid first);
    the others read as :data:`OUTSIDE`."""
    device = batch.agent_xyz.device
    axis = torch.arange(-n, n + 1, device=device, dtype=torch.float32) * RESOLUTION
    gy, gx = torch.meshgrid(axis, axis, indexing="ij")
    points = torch.stack([gx.reshape(-1), gy.reshape(-1)], -1)
    # Coarse cells of COARSE x COARSE points near the route.
    cells = (2 * n + 1 + COARSE - 1) // COARSE
    centre = (torch.arange(cells, device=device) * COARSE + (COARSE - 1) / 2 - n).float() * RESOLUTION
    cy, cx = torch.meshgrid(centre, centre, indexing="ij")
    coarse = route.project(torch.stack([cx.reshape(-1), cy.reshape(-1)], -1)[None])[0][0]
    near_cell = (coarse < CORRIDOR + COARSE * RESOLUTION).view(cells, cells)
    near = near_cell.repeat_interleave(COARSE, 0).repeat_interleave(COARSE, 1)[: 2 * n + 1, : 2 * n + 1]
    (index,) = torch.nonzero(near.reshape(-1), as_tuple=True)
    grid = torch.tensor(OUTSIDE, device=device).repeat(points.shape[0], 1)
    edges = RoadEdges(batch)
    for start in range(0, index.numel(), BLOCK):
        rows = index[start : start + BLOCK]
        block = points[rows][None]  # [1, M, 2]
        edges.refresh(block)
        signed = edges.signed_distance(block[:, :, None].expand(-1, -1, 4, -1))[0]
        distance, arc = route.project(block)
        grid[rows] = torch.stack([signed.clamp(-1e3, 1e3), distance[0], arc[0]], -1)  # no edge at all: on the road
    far = grid[:, 1] > CORRIDOR
    grid[far] = torch.tensor(OUTSIDE, device=device)
    return grid


def reach(speed: torch.Tensor, seconds: float, max_accel: float) -> torch.Tensor:
    """How far ``speed`` ``[B]`` (m/s) gets in ``seconds`` accelerating at ``max_accel``,
    plus a car's length of margin."""
    return speed * seconds + 0.5 * max_accel * seconds * seconds + 10.0
