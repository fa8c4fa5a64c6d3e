"""Per-agent neighbourhoods of the roadgraph, refreshed as agents move.

A full agents x roadgraph-points search every step is too costly at scale, so each agent
keeps the K roadgraph items nearest to it (refreshed every ``refresh_every`` steps, which
bounds how far it can move in between) and exact per-step work looks only at those.
"""

from __future__ import annotations

import torch

from closedloop.data.batch import ScenarioBatch
from closedloop.data.scenario import ROAD_EDGE_CODES

BIG = 1e9


def nearest_items(positions: torch.Tensor, items: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[B, N, k]`` of the ``k`` nearest valid ``items`` ``[B, P, 2]`` to each of
    ``positions`` ``[B, N, 2]`` (padded with the nearest when there are fewer)."""
    d = torch.cdist(positions.float(), items.float())  # [B, N, P]
    d = d.masked_fill(~valid[:, None, :], BIG)
    k = max(1, min(k, items.shape[1]))
    return d.topk(k, dim=-1, largest=False).indices


class RoadEdges:
    """Road-edge segments of a batch (start, end) and each agent's nearest ones."""

    def __init__(self, batch: ScenarioBatch, k: int = 64):
        is_edge = torch.zeros_like(batch.road_mask)
        for code in ROAD_EDGE_CODES:
            is_edge |= batch.road_type == code
        seg_len = torch.linalg.norm(batch.road_dir[..., :2], dim=-1)
        valid = is_edge & batch.road_mask & (seg_len > 1e-6)
        # Keep only the road-edge segments, packed to the left: [B, E].
        P = valid.shape[1]
        local = torch.arange(P, device=valid.device)
        order = torch.where(valid, local, torch.full_like(local, P)).sort(dim=1).values
        count = max(int(valid.sum(1).max()), 1)
        order = order[:, :count]
        self.valid = order < P
        order = order.clamp_max(P - 1)
        gather = order[..., None].expand(-1, -1, 2)
        self.start = torch.gather(batch.road_xyz[..., :2], 1, gather)
        self.end = self.start + torch.gather(batch.road_dir[..., :2], 1, gather)
        self.k = k
        self.candidates: torch.Tensor | None = None

    def refresh(self, positions: torch.Tensor) -> None:
        midpoints = (self.start + self.end) / 2
        self.candidates = nearest_items(positions, midpoints, self.valid, self.k)

    def signed_distance(self, corners: torch.Tensor, per_corner: int = 12) -> torch.Tensor:
        """Largest signed distance ``[B, N]`` of box corners ``[B, N, 4, 2]`` to the road
        edge: negative on the road (edges keep the road on their left), positive off it.

        The neighbourhood is narrowed in two stages: the ``per_corner`` segments nearest the
        box centre are the only ones measured from the four corners (a corner is within half
        a diagonal of the centre, so for boxes smaller than the edge spacing this is exact).
        """
        if self.candidates is None:
            raise RuntimeError("RoadEdges.refresh must run before signed_distance")
        B, N, _ = self.candidates.shape
        b = torch.arange(B, device=corners.device)[:, None, None]
        s, e = self.start[b, self.candidates], self.end[b, self.candidates]  # [B, N, k, 2]
        ok = self.valid[b, self.candidates]
        centre = corners.mean(2)  # [B, N, 2]
        near = _point_segment_sq(centre[:, :, None], s, e).masked_fill(~ok, BIG)
        k = min(per_corner, near.shape[-1])
        pick = near.topk(k, dim=-1, largest=False).indices
        s, e = s.gather(2, pick[..., None].expand(-1, -1, -1, 2)), e.gather(2, pick[..., None].expand(-1, -1, -1, 2))
        ok = ok.gather(2, pick)
        p = corners[:, :, :, None, :]  # [B, N, 4, 1, 2]
        seg = (e - s)[:, :, None]
        to_p = p - s[:, :, None]
        dist = _point_segment_sq(p, s[:, :, None], e[:, :, None]).masked_fill(~ok[:, :, None], BIG)
        nearest = dist.argmin(-1, keepdim=True)
        side = seg[..., 0] * to_p[..., 1] - seg[..., 1] * to_p[..., 0]  # > 0: left of the edge
        sign = torch.where(side.gather(-1, nearest) > 0, -1.0, 1.0)
        signed = sign[..., 0] * dist.gather(-1, nearest)[..., 0].sqrt()
        none = ~ok.any(-1)  # no edge near: call it on the road
        return signed.amax(-1).masked_fill(none, -BIG)


def _point_segment_sq(p: torch.Tensor, s: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Squared distance from points to segments (broadcasting over leading dims)."""
    seg = e - s
    to_p = p - s
    t = ((to_p[..., 0] * seg[..., 0] + to_p[..., 1] * seg[..., 1])
         / (seg[..., 0] ** 2 + seg[..., 1] ** 2).clamp_min(1e-12)).clamp(0, 1)
    dx = to_p[..., 0] - seg[..., 0] * t
    dy = to_p[..., 1] - seg[..., 1] * t
    return dx * dx + dy * dy
