"""Per-agent neighbourhoods of the roadgraph, refreshed as agents move.

A full agents x roadgraph search every step is too costly at scale, so each agent keeps a
neighbourhood of roadgraph items near it and per-step work looks only at those. Both
indexes here stay exact: a neighbourhood remembers how far away the nearest item it left
out was, and an agent is searched again as soon as that bound no longer vouches for its
answer. ``NearestPoints`` does this for the k nearest points (observations),
``RoadEdges`` for the signed distance to road edges (off-road).

Road edges are grouped into *chunks*: up to ``chunk`` consecutive segments of one
polyline with a bounding circle. A refresh ranks chunks by the lower bound
``|p - centre| - radius`` of their distance to the agent, keeps the nearest chunks'
segments as the agent's candidates (contiguous tensors, no indexing into the whole
roadgraph per step), and remembers the smallest lower bound ``L`` among the chunks it
left out. An agent that has since moved by ``delta`` can have no left-out segment nearer
than ``L - delta``: while its nearest candidate is nearer than that, the candidates hold
the true nearest segment and the answer is exact. Agents for which this no longer holds
are refreshed, alone, at the step where it fails.
"""

from __future__ import annotations

import torch

from closedloop.constants import is_road_edge
from closedloop.data.batch import ScenarioBatch

BIG = 1e9
DENSE_AGENTS = 256  # agent slots up to which signed_distance works on the whole batch
SEARCH_BLOCK = 1 << 22  # chunk bounds computed at once by a NearestPoints search
FAR = 1e6  # where empty candidate slots sit (metres); squared, still finite in float32


def chunk_table(new_run: torch.Tensor, valid: torch.Tensor, size: int) -> torch.Tensor:
    """Group items ``[B, E]`` in order into chunks of up to ``size`` consecutive valid
    items, starting a new chunk wherever ``new_run`` is set (a new polyline): the table
    ``[B, C, size]`` of item indices, -1 for empty slots."""
    B, E = valid.shape
    pos = torch.arange(E, device=valid.device).expand(B, E)
    run_start = torch.where(new_run, pos, torch.zeros_like(pos)).cummax(dim=1).values
    slot = (pos - run_start) % size
    chunk_id = torch.cumsum(new_run | (slot == 0), dim=1) - 1
    C = max(int(chunk_id.masked_fill(~valid, -1).max()) + 1, 1)
    # Invalid items all go to an extra last row, dropped afterwards.
    chunk_id = torch.where(valid, chunk_id, torch.full_like(chunk_id, C))
    table = torch.full((B, C + 1, size), -1, dtype=torch.long, device=valid.device)
    table[torch.arange(B, device=valid.device)[:, None].expand(B, E), chunk_id, slot] = torch.where(valid, pos, -1)
    return table[:, :C]


def bounding_circles(points: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre ``[B, C, 2]`` (of the bounding box) and radius ``[B, C]`` of the points
    ``[B, C, m, 2]`` of each chunk where ``present`` ``[B, C, m]``."""
    ok = present[..., None].expand_as(points)
    lo = points.masked_fill(~ok, BIG).amin(2)
    hi = points.masked_fill(~ok, -BIG).amax(2)
    centre = (lo + hi) / 2
    radius = torch.linalg.norm(points - centre[:, :, None], dim=-1).masked_fill(~present, 0).amax(-1)
    return centre, radius


class NearestPoints:
    """The ``k`` nearest valid points of a fixed set ``[B, P, 2]`` to moving agents,
    exact at every query.

    Points are grouped in chunks of ``chunk`` consecutive points (of one polyline when
    ``polyline_id`` is given) with bounding circles. Each agent keeps the points of its
    nearest chunks and the smallest lower bound on the distance to a chunk it left out.
    While its k-th nearest kept point is nearer than that bound less how far the agent
    has moved since, the kept points hold its true k nearest; agents for which this fails
    are searched again, alone.
    """

    def __init__(
        self,
        points: torch.Tensor,
        valid: torch.Tensor,
        keep: int = 256,
        chunk: int = 8,
        polyline_id: torch.Tensor | None = None,
    ):
        B, P, _ = points.shape
        self.points = points.float()
        new_run = torch.zeros_like(valid)
        new_run[:, 0] = True
        if polyline_id is not None:
            new_run[:, 1:] |= polyline_id[:, 1:] != polyline_id[:, :-1]
        self.table = chunk_table(new_run, valid, chunk)  # [B, C, chunk]
        present = self.table >= 0
        members = torch.gather(self.points, 1, self.table.clamp_min(0).reshape(B, -1, 1).expand(-1, -1, 2))
        self.centre, self.radius = bounding_circles(members.view(*self.table.shape, 2), present)
        self.chunk_valid = present.any(-1)
        self.chunks_per_agent = max(1, min(-(-keep // chunk), self.table.shape[1]))
        self.index: torch.Tensor | None = None  # [B, N, keep] kept points (0 for empty slots)
        self.kept: torch.Tensor | None = None  # [B, N, 2, keep] their x and y (FAR for empty slots)
        self.anchor: torch.Tensor | None = None  # [B, N, 2]
        self.left_out: torch.Tensor | None = None  # [B, N]
        self.searched = 0  # agent searches so far
        self._k = 1  # the k of the latest query

    def _search(self, rows: torch.Tensor, positions: torch.Tensor, widen: int = 1):
        """Kept indices ``[M, keep]``, their x and y ``[M, 2, keep]`` and the left-out
        bound ``[M]`` for M agents at ``positions`` ``[M, 2]`` in scenarios ``rows``,
        looking at the ``widen`` x ``chunks_per_agent`` nearest chunks."""
        index, kept, left_out = [], [], []
        C = self.table.shape[1]
        keep = self.chunks_per_agent * self.table.shape[-1]
        k = min(self.chunks_per_agent * widen, C)
        per_block = max(1, SEARCH_BLOCK // (C * widen))
        for start in range(0, len(rows), per_block):
            r, p = rows[start : start + per_block], positions[start : start + per_block]
            lower = torch.linalg.norm(self.centre[r] - p[:, None], dim=-1) - self.radius[r]  # [m, C]
            lower = lower.masked_fill(~self.chunk_valid[r], BIG)
            ranked = lower.topk(min(k + 1, C), dim=-1, largest=False)
            bound = ranked.values[:, k] if ranked.values.shape[-1] > k else torch.full_like(p[:, 0], BIG)
            members = self.table[r[:, None], ranked.indices[:, :k]].flatten(1)  # [m, k * chunk], -1: empty
            xy = self.points[r[:, None], members.clamp_min(0)].masked_fill((members < 0)[..., None], FAR)
            if widen > 1:  # keep the nearest of the wider set; the next one bounds the rest
                d = torch.linalg.norm(xy - p[:, None], dim=-1)
                top = d.topk(min(keep + 1, d.shape[-1]), dim=-1, largest=False)
                if top.values.shape[-1] > keep:
                    bound = torch.minimum(bound, top.values[:, keep])
                pick = top.indices[:, :keep]
                members, xy = members.gather(1, pick), xy.gather(1, pick[..., None].expand(-1, -1, 2))
            index.append(members.clamp_min(0))
            kept.append(xy.transpose(1, 2))
            left_out.append(bound)
        index, kept, left_out = torch.cat(index), torch.cat(kept).contiguous(), torch.cat(left_out)
        # Where the kept points cannot vouch for the k-th nearest (a left-out chunk may hold
        # a nearer one), look wider: 4x the chunks, and so on up to every chunk.
        d2 = (kept[:, 0] - positions[:, 0:1]) ** 2 + (kept[:, 1] - positions[:, 1:2]) ** 2
        kth = d2.kthvalue(min(self._k, d2.shape[-1]), dim=-1).values.sqrt()
        (short,) = torch.nonzero(kth > left_out, as_tuple=True)
        if short.numel() and k < C:
            index[short], kept[short], left_out[short] = self._search(rows[short], positions[short], 4 * widen)
        if widen == 1:
            self.searched += len(rows)
        return index, kept, left_out

    def __call__(
        self, positions: torch.Tensor, k: int, active: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices and distances ``[B, N, k]`` of the ``k`` nearest points to each of
        ``positions`` ``[B, N, 2]``, nearest first (distance >= FAR / 2 where a scenario
        has fewer than k points). Agents outside ``active`` ``[B, N]`` (padding, say) are
        never searched: their answer is whatever their kept points give."""
        B, N, _ = positions.shape
        positions = positions.float()
        self._k = k
        if self.index is None:
            keep = self.chunks_per_agent * self.table.shape[-1]
            self.index = torch.zeros(B, N, keep, dtype=torch.long, device=positions.device)
            self.kept = torch.full((B, N, 2, keep), FAR, device=positions.device)
            self.left_out = torch.full((B, N), -BIG, device=positions.device)  # stale: never searched
            self.anchor = torch.full((B, N, 2), FAR, device=positions.device)
        k = min(k, self.index.shape[-1])
        distance, nearest = _k_nearest(self.kept, self.index, positions, k)
        moved = torch.linalg.norm(positions - self.anchor, dim=-1)
        stale = (distance[..., -1] > self.left_out - moved) & (moved > 0)
        if active is not None:
            stale &= active
        if bool(stale.any()):
            b, n = torch.nonzero(stale, as_tuple=True)
            self.index[b, n], self.kept[b, n], self.left_out[b, n] = self._search(b, positions[b, n])
            self.anchor[b, n] = positions[b, n]
            distance[b, n], nearest[b, n] = _k_nearest(self.kept[b, n], self.index[b, n], positions[b, n], k)
        return nearest, distance


def _k_nearest(kept: torch.Tensor, index: torch.Tensor, positions: torch.Tensor, k: int):
    """Distances and indices ``[..., k]`` of the k nearest of the kept points (x and y
    ``[..., 2, keep]``, indices ``[..., keep]``) to ``positions`` ``[..., 2]``."""
    dx = kept[..., 0, :] - positions[..., 0:1]
    dy = kept[..., 1, :] - positions[..., 1:2]
    top = dx.mul_(dx).addcmul_(dy, dy).topk(k, dim=-1, largest=False)
    return top.values.sqrt(), index.gather(-1, top.indices)


# Columns of RoadEdges.features, three blocks of six: the segment (start, direction,
# 1/length^2, valid), then its neighbour before and after it on the polyline (start,
# direction, present, whether the polyline turns left at the vertex they share).
SX, SY, GX, GY, INV_LEN2, OK = range(6)
PRIOR, HAS_PRIOR, LEFT_AT_START = 6, 10, 11
NEXT, HAS_NEXT, LEFT_AT_END = 12, 16, 17


class RoadEdges:
    """Road-edge segments of a batch, grouped in chunks, and each agent's candidates.

    ``chunks_per_agent`` chunks of up to ``chunk`` segments make an agent's neighbourhood;
    more of them mean fewer refreshes where road edges are dense, and more work per step.
    """

    def __init__(self, batch: ScenarioBatch, chunk: int = 8, chunks_per_agent: int = 8):
        is_edge = is_road_edge(batch.road_type)
        seg_len = torch.linalg.norm(batch.road_dir[..., :2], dim=-1)
        valid = is_edge & batch.road_mask & (seg_len > 1e-6)
        # Pack the road-edge segments to the left, in roadgraph order: [B, E].
        P = valid.shape[1]
        local = torch.arange(P, device=valid.device)
        order = torch.where(valid, local, torch.full_like(local, P)).sort(dim=1).values
        E = max(int(valid.sum(1).max()), 1)
        order = order[:, :E]
        seg_valid = order < P
        order = order.clamp_max(P - 1)
        start = torch.gather(batch.road_xyz[..., :2], 1, order[..., None].expand(-1, -1, 2))
        direction = torch.gather(batch.road_dir[..., :2], 1, order[..., None].expand(-1, -1, 2))
        inv_len2 = 1.0 / (direction**2).sum(-1, keepdim=True).clamp_min(1e-12)
        segment = torch.cat([start, direction, inv_len2, seg_valid[..., None].float()], -1)  # [B, E, 6]
        road_id = torch.gather(batch.road_id, 1, order)
        pos = torch.arange(E, device=order.device).expand(order.shape)
        new_run = torch.ones_like(seg_valid)
        new_run[:, 1:] = (road_id[:, 1:] != road_id[:, :-1]) | (order[:, 1:] != order[:, :-1] + 1)
        self.features = self._with_neighbours(segment, new_run, pos)
        self._build_chunks(new_run, chunk)
        self.chunks_per_agent = min(chunks_per_agent, self.chunk_table.shape[1])
        self.candidates: torch.Tensor | None = None  # [B, N, 5, K] segment columns SX..INV_LEN2
        self.candidate_index: torch.Tensor | None = None  # [B, N, K] rows of ``features``
        self.anchor: torch.Tensor | None = None  # [B, N, 2] where each agent was last refreshed
        self.left_out: torch.Tensor | None = None  # [B, N] the bound L of that refresh
        self.refreshed = 0  # agent refreshes so far (each agent's first included)

    @staticmethod
    def _with_neighbours(segment: torch.Tensor, new_run: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """``features`` ``[B, E, 18]``: each segment with its neighbours on the polyline
        (closed polylines wrap) and whether the polyline turns left at each vertex."""
        E = pos.shape[1]
        run_end = torch.ones_like(new_run)
        run_end[:, :-1] = new_run[:, 1:]
        run_start = torch.where(new_run, pos, torch.zeros_like(pos)).cummax(dim=1).values
        run_last = torch.where(run_end, pos, torch.full_like(pos, E)).flip(1).cummin(1).values.flip(1)
        first, last = _take(segment, run_start), _take(segment, run_last)
        gap = torch.linalg.norm(last[..., SX:GX] + last[..., GX:INV_LEN2] - first[..., SX:GX], dim=-1)
        closed = (gap < 0.1) & (run_last > run_start)
        valid = segment[..., OK] > 0
        has_prior = valid & (~new_run | closed)
        has_next = valid & (~run_end | closed)
        prior = _take(segment, torch.where(new_run, run_last, pos - 1).clamp(0, E - 1))
        nxt = _take(segment, torch.where(run_end, run_start, pos + 1).clamp(0, E - 1))

        def turns_left(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return (a[..., GX] * b[..., GY] - a[..., GY] * b[..., GX] > 0).float()[..., None]

        return torch.cat(
            [
                segment,
                prior[..., :4],
                has_prior[..., None].float(),
                turns_left(prior, segment),
                nxt[..., :4],
                has_next[..., None].float(),
                turns_left(segment, nxt),
            ],
            -1,
        ).contiguous()

    def _build_chunks(self, new_run: torch.Tensor, chunk: int) -> None:
        """Chunk table ``[B, C, chunk]`` of segment rows (-1: none), centres and radii."""
        self.chunk_table = chunk_table(new_run, self.features[..., OK] > 0, chunk)
        has = self.chunk_table >= 0
        self.chunk_valid = has.any(-1)
        seg = _take(self.features, self.chunk_table.clamp_min(0))  # [B, C, chunk, F]
        ends = torch.cat(
            [seg[..., SX:GX], seg[..., SX:GX] + seg[..., GX:INV_LEN2]], -2
        )  # both ends: [B, C, 2 chunk, 2]
        self.chunk_centre, self.chunk_radius = bounding_circles(ends, torch.cat([has, has], -1))

    def _signed(self, rows: torch.Tensor, index: torch.Tensor, px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
        """Signed distance (positive off the road) from points to the road-edge segments
        ``index`` of scenarios ``rows`` (broadcast together). Where a point's nearest spot
        is a vertex, the side comes from both segments meeting there (off the road if
        either says so at a left turn, if both do at a right one), as WOSAC's reference
        does."""
        f = self.features[rows, index].unflatten(-1, (3, 6))  # [..., 3, 6]: own, prior, next
        dx, dy = px[..., None] - f[..., SX], py[..., None] - f[..., SY]
        off = (dx * f[..., GY]).addcmul_(dy, f[..., GX], value=-1) > 0  # right of each segment
        own, before, after = off.unbind(-1)
        gx, gy = f[..., 0, GX], f[..., 0, GY]
        t = (dx[..., 0] * gx).addcmul_(dy[..., 0], gy).mul_(f[..., 0, INV_LEN2])
        tc = t.clamp(0, 1)
        distance = torch.hypot(dx[..., 0] - gx * tc, dy[..., 0] - gy * tc)
        at_start = torch.where(f[..., 1, LEFT_AT_START - PRIOR] > 0, own | before, own & before)
        at_end = torch.where(f[..., 2, LEFT_AT_END - NEXT] > 0, own | after, own & after)
        off_road = torch.where(
            (t < 0) & (f[..., 1, HAS_PRIOR - PRIOR] > 0),
            at_start,
            torch.where((t > 1) & (f[..., 2, HAS_NEXT - NEXT] > 0), at_end, own),
        )
        return torch.where(off_road, distance, -distance)

    def _neighbourhoods(self, rows: torch.Tensor, positions: torch.Tensor):
        """Candidate columns ``[M, 5, K]``, their rows ``[M, K]`` and the left-out bound
        ``[M]`` for M agents at ``positions`` ``[M, 2]`` in scenarios ``rows`` ``[M]``."""
        lower = torch.linalg.norm(positions[:, None] - self.chunk_centre[rows], dim=-1) - self.chunk_radius[rows]
        lower = lower.masked_fill(~self.chunk_valid[rows], BIG)
        k = self.chunks_per_agent
        ranked = lower.topk(min(k + 1, lower.shape[-1]), dim=-1, largest=False)
        left_out = ranked.values[:, k] if ranked.values.shape[-1] > k else torch.full_like(lower[:, 0], BIG)
        index = self.chunk_table[rows[:, None], ranked.indices[:, :k]].flatten(1)  # [M, K], -1: none
        columns = self.features[rows[:, None], index.clamp_min(0), : INV_LEN2 + 1]  # [M, K, 5]
        # Empty slots become a point segment far away, so no mask is needed per step.
        columns = torch.where((index >= 0)[..., None], columns, columns.new_tensor([FAR, FAR, 0.0, 0.0, 0.0]))
        return columns.transpose(1, 2).contiguous(), index.clamp_min(0), left_out

    def refresh(self, positions: torch.Tensor, agents: torch.Tensor | None = None) -> None:
        """Rebuild the neighbourhoods of ``agents`` (a ``[B, N]`` mask; all when None) at
        ``positions`` ``[B, N, 2]``."""
        B, N, _ = positions.shape
        if agents is None or self.candidates is None:
            rows = torch.arange(B, device=positions.device).repeat_interleave(N)
            columns, index, left_out = self._neighbourhoods(rows, positions.reshape(-1, 2))
            self.candidates = columns.reshape(B, N, *columns.shape[1:])
            self.candidate_index = index.reshape(B, N, -1)
            self.left_out = left_out.reshape(B, N)
            self.anchor = positions.clone()
            self.refreshed += B * N
            return
        b, n = torch.nonzero(agents, as_tuple=True)
        if not b.numel():
            return
        columns, index, left_out = self._neighbourhoods(b, positions[b, n])
        self.candidates[b, n] = columns
        self.candidate_index[b, n] = index
        self.left_out[b, n] = left_out
        self.anchor[b, n] = positions[b, n]
        self.refreshed += int(b.numel())

    def _centre_distance(
        self, rows: torch.Tensor, centre: torch.Tensor, slots: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Signed distance ``[M]`` from box centres ``[M, 2]`` of agents ``slots`` (flat
        ``b * N + n``; all when None) in scenarios ``rows`` to their nearest candidate
        (BIG for none)."""
        K = self.candidate_index.shape[-1]
        candidates = self.candidates.view(-1, *self.candidates.shape[2:])  # [B * N, 5, K]
        index = self.candidate_index.view(-1, K)
        if slots is not None:
            candidates, index = candidates[slots], index[slots]
        d2 = _point_segment_sq(centre[:, 0:1], centre[:, 1:2], candidates)
        best, nearest = d2.min(-1)
        index = index.gather(-1, nearest[:, None])[:, 0]
        return self._signed(rows, index, centre[:, 0], centre[:, 1]).masked_fill(best >= (FAR / 2) ** 2, BIG)

    def signed_distance(self, corners: torch.Tensor) -> torch.Tensor:
        """Largest signed distance ``[B, N]`` of box corners ``[B, N, 4, 2]`` to the road
        edge: negative on the road (edges keep the road on their left), positive off it.

        Exact (against every road edge of the scenario) for boxes within reach of an edge.
        A box farther than its half-diagonal from every edge lies wholly on one side; its
        value is then the centre's signed distance shrunk by the half-diagonal (a bound
        with the exact sign). An agent's neighbourhood is rebuilt when it can no longer
        vouch for the nearest segments it needs. Agents with no road edge in the scenario
        are on the road (``-1e9``).
        """
        centre = corners.mean(2)
        reach = torch.linalg.norm(corners[:, :, 0] - centre, dim=-1)  # half the diagonal
        if self.candidates is None:
            self.refresh(centre)
        B, N = reach.shape
        rows = torch.arange(B, device=centre.device).repeat_interleave(N)
        centre_signed = self._centre_distance(rows, centre.reshape(-1, 2)).view(B, N)
        distance = centre_signed.abs()
        # A box away from the edges needs the centre's nearest segment, a box near one its
        # corners' (each within distance + 2 reach of the centre); a left-out segment is at
        # least left_out - moved from the centre.
        moved = torch.linalg.norm(centre - self.anchor, dim=-1)
        needed = torch.where(distance > reach, distance, distance + 2 * reach)
        stale = (needed > self.left_out - moved) & (moved > 0) & (distance < BIG)
        # Small batches do whole-batch work: cheaper there than selecting agents.
        dense = B * N <= DENSE_AGENTS
        if bool(stale.any()):
            if dense:
                self.refresh(centre)
                centre_signed = self._centre_distance(rows, centre.reshape(-1, 2)).view(B, N)
            else:
                self.refresh(centre, stale)
                b, n = torch.nonzero(stale, as_tuple=True)
                centre_signed[b, n] = self._centre_distance(b, centre[b, n], slots=b * N + n)
            distance = centre_signed.abs()
        signed = centre_signed - torch.sign(centre_signed) * reach
        near = distance <= reach  # the box may reach an edge: measure every corner
        if dense:
            exact = self._corner_distance(rows.view(B, N, 1), self.candidates, self.candidate_index, corners)
            signed = torch.where(near, exact, signed)
        else:
            b, n = torch.nonzero(near, as_tuple=True)
            if b.numel():
                signed[b, n] = self._corner_distance(
                    b[:, None], self.candidates[b, n], self.candidate_index[b, n], corners[b, n]
                )
        return signed.masked_fill(distance >= BIG, -BIG)

    def _corner_distance(
        self, rows: torch.Tensor, candidates: torch.Tensor, candidate_index: torch.Tensor, corners: torch.Tensor
    ) -> torch.Tensor:
        """Exact largest signed corner distance ``[...]`` of boxes ``corners`` ``[..., 4, 2]``
        against their ``candidates`` ``[..., 5, K]`` (rows of ``features``:
        ``candidate_index`` ``[..., K]``) in scenarios ``rows``."""
        d2 = _point_segment_sq(corners[..., 0:1], corners[..., 1:2], candidates.unsqueeze(-3))  # [..., 4, K]
        index = candidate_index.unsqueeze(-2).expand_as(d2).gather(-1, d2.argmin(-1, keepdim=True))[..., 0]
        return self._signed(rows, index, corners[..., 0], corners[..., 1]).amax(-1)


def _take(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[b, index[b, ...]]`` for ``values`` ``[B, E, F]`` and ``index`` ``[B, ...]``."""
    flat = index.reshape(index.shape[0], -1, 1).expand(-1, -1, values.shape[-1])
    return torch.gather(values, 1, flat).reshape(*index.shape, values.shape[-1])


def _point_segment_sq(px: torch.Tensor, py: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Squared distance from points to candidate segments ``columns`` ``[..., 5, K]``
    (broadcasting). Written with fused and in-place operations: this is the hot loop."""
    sx, sy, gx, gy, inv_len2 = columns.unbind(-2)
    tx, ty = px - sx, py - sy
    t = (tx * gx).addcmul_(ty, gy).mul_(inv_len2).clamp_(0, 1)
    dx = tx.addcmul_(gx, t, value=-1)
    dy = ty.addcmul_(gy, t, value=-1)
    return dx.mul_(dx).addcmul_(dy, dy)
