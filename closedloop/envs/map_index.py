"""Per-agent neighbourhoods of the roadgraph, refreshed as agents move.

A full agents x roadgraph search every step is too costly at scale, so each agent keeps a
neighbourhood of roadgraph items near it and per-step work looks only at those. Both
indexes here stay exact for the agents asked about (``active``): a neighbourhood remembers
how far away the nearest item it left out was, and an agent is searched again as soon as
that bound no longer vouches for its answer. ``NearestPoints`` does this for the k nearest
points (observations), ``RoadEdges`` for the signed distance to road edges (off-road).

Road edges are grouped into *chunks*: up to ``chunk`` consecutive segments of one
polyline with a bounding circle. A refresh ranks chunks by the lower bound
``|p - centre| - radius`` of their distance to the agent, keeps the nearest chunks'
segments as the agent's candidates (contiguous tensors, no indexing into the whole
roadgraph per step), and remembers the smallest lower bound ``L`` among the chunks it
left out. An agent that has since moved by ``delta`` can have no left-out segment nearer
than ``L - delta``: while its nearest candidate is nearer than that, the candidates hold
the true nearest segment and the answer is exact. Agents for which this no longer holds
are refreshed, alone, at the step where it fails. To keep a refresh cheap where a map has
hundreds of chunks, chunks come in *groups* of consecutive ones with circles of their own:
a refresh ranks the groups, then only the chunks of the nearest groups, and ``L`` is the
smaller of the two left-out bounds. An agent whose needs a refreshed neighbourhood still
cannot vouch for (rare with the defaults) is measured against every road edge instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from closedloop.constants import is_road_edge
from closedloop.data.batch import ScenarioBatch, stacked_instance
from closedloop.envs.compiled import kernel

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
        self.keep = keep
        self._start()

    @classmethod
    def stack(cls, parts: Sequence[NearestPoints]) -> NearestPoints:
        """The index of the points of ``parts`` stacked in order (each built on one
        scenario's points, with the same settings): equal to one built on the stacked
        points, at the cost of padding and concatenating. Nothing searched is carried over."""
        shapes = {(part.keep, part.table.shape[-1]) for part in parts}
        if len(shapes) != 1:
            raise ValueError(f"cannot stack nearest-point indexes of different keep and chunk sizes: {sorted(shapes)}")
        padding = {"points": 0.0, "table": -1, "centre": 0.0, "radius": 0.0, "chunk_valid": False}
        index = stacked_instance(cls, parts, padding)
        index.keep = parts[0].keep
        index._start()
        return index

    def fresh(self) -> NearestPoints:
        """An index of the same points, sharing their tables, with nothing searched yet
        (for queries of another shape)."""
        index = object.__new__(type(self))
        index.__dict__.update(self.__dict__)
        index._start()
        return index

    def _start(self) -> None:
        """Nothing searched yet."""
        chunk = self.table.shape[-1]
        self.chunks_per_agent = max(1, min(-(-self.keep // chunk), self.table.shape[1]))
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
        active = _active_mask(active, self.left_out)
        distance, nearest, stale, any_stale = _nearest_pass(
            self.kept, self.index, positions, self.anchor, self.left_out, active, k
        )
        if bool(any_stale):
            b, n = torch.nonzero(stale, as_tuple=True)
            self.index[b, n], self.kept[b, n], self.left_out[b, n] = self._search(b, positions[b, n])
            self.anchor[b, n] = positions[b, n]
            distance[b, n], nearest[b, n] = _k_nearest(self.kept[b, n], self.index[b, n], positions[b, n], k)
        return nearest, distance


@kernel
def _nearest_pass(
    kept: torch.Tensor,
    index: torch.Tensor,
    positions: torch.Tensor,
    anchor: torch.Tensor,
    left_out: torch.Tensor,
    active: torch.Tensor,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:meth:`NearestPoints.__call__` up to its one branch, as a pure function: the k
    nearest kept points of every agent, which active agents must be searched again (their
    kept points cannot vouch for the k-th nearest) and whether any must."""
    distance, nearest = _k_nearest(kept, index, positions, k)
    offset = positions - anchor
    moved = (offset[..., 0] * offset[..., 0] + offset[..., 1] * offset[..., 1]).sqrt()
    stale = (distance[..., -1] > left_out - moved) & (moved > 0) & active
    return distance, nearest, stale, stale.any()


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
    A refresh looks at the chunks of the ``groups_per_agent`` nearest groups of ``group``
    chunks; fewer of them make refreshes cheaper and their bounds weaker.
    """

    def __init__(
        self,
        batch: ScenarioBatch,
        chunk: int = 8,
        chunks_per_agent: int = 16,
        group: int = 4,
        groups_per_agent: int = 16,
    ):
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
        # A run (polyline piece) breaks at a new feature, at a gap, and at the padding: a
        # padding segment repeats the last point, which may continue the row's last edge.
        new_run[:, 1:] = (road_id[:, 1:] != road_id[:, :-1]) | (order[:, 1:] != order[:, :-1] + 1) | ~seg_valid[:, 1:]
        self.features = self._with_neighbours(segment, new_run, pos)
        self.settings = (chunk, chunks_per_agent, group, groups_per_agent)
        self._build_chunks(new_run, chunk)
        self._build_groups(group)
        self._start()

    @classmethod
    def stack(cls, parts: Sequence[RoadEdges]) -> RoadEdges:
        """The index of the batch that stacks the scenarios of ``parts`` in order (each
        built on its own scenario, with the same settings): equal to one built on that
        batch, at the cost of padding and concatenating. The parts are left unchanged and
        none of their neighbourhoods is carried over."""
        settings = {part.settings for part in parts}
        if len(settings) != 1:
            raise ValueError(f"cannot stack road-edge indexes built with different settings: {sorted(settings)}")
        # Each part's chunk table ends with its empty chunk; padding adds more empty ones.
        padding = {"features": 0.0, "chunk_table": -1, "chunk_centre": FAR, "chunk_radius": 0.0}
        edges = stacked_instance(cls, parts, padding)
        edges.settings = parts[0].settings
        edges._build_groups(edges.settings[2])
        edges._start()
        return edges

    def _start(self) -> None:
        """No neighbourhood yet; the neighbourhood sizes this batch allows."""
        _, chunks_per_agent, group, groups_per_agent = self.settings
        self.chunks_per_agent = min(chunks_per_agent, self.chunk_table.shape[1] - 1)
        self.groups_per_agent = min(max(groups_per_agent, -(-chunks_per_agent // group)), self.group_table.shape[1])
        self.candidates: torch.Tensor | None = None  # [B, N, 5, K] segment columns SX..INV_LEN2
        self.candidate_index: torch.Tensor | None = None  # [B, N, K] rows of ``features``
        self.anchor: torch.Tensor | None = None  # [B, N, 2] where each agent was last refreshed
        self.left_out: torch.Tensor | None = None  # [B, N] the bound L of that refresh
        self.refreshed = 0  # agent refreshes so far (each agent's first included)
        self.exhaustive = 0  # agent measurements against every edge so far
        self._every: torch.Tensor | None = None  # [B, 5, E] every segment, for those
        self._lookup: tuple[torch.Tensor, ...] | None = None  # the refreshes' tables, see _tables

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
        """Chunk table ``[B, C + 1, chunk]`` of segment rows (-1: none) with the chunks'
        circles. The table's last entry (index ``C``) is empty, a point far away."""
        table = chunk_table(new_run, self.features[..., OK] > 0, chunk)
        B, C, _ = table.shape
        self.chunk_table = torch.cat([table, table.new_full((B, 1, chunk), -1)], 1)  # [B, C + 1, chunk]
        has = self.chunk_table >= 0
        seg = _take(self.features, self.chunk_table.clamp_min(0))  # [B, C + 1, chunk, F]
        ends = torch.cat([seg[..., SX:GX], seg[..., SX:GX] + seg[..., GX:INV_LEN2]], -2)  # [B, C + 1, 2 chunk, 2]
        centre, radius = bounding_circles(ends, torch.cat([has, has], -1))
        valid = has.any(-1)
        # Empty chunks sit far away with radius 0: they rank last without a mask.
        self.chunk_centre = centre.masked_fill(~valid[..., None], FAR)
        self.chunk_radius = radius.masked_fill(~valid, 0.0)

    def _build_groups(self, group: int) -> None:
        """Groups of ``group`` consecutive chunks (neighbours along the polylines) with
        circles around their chunks' circles; the groups' padding points to the empty
        last chunk."""
        B, C = self.chunk_table.shape[0], self.chunk_table.shape[1] - 1
        valid = (self.chunk_table >= 0).any(-1)
        G = -(-C // group)
        members = torch.arange(G * group, device=valid.device).view(G, group).clamp_max(C)  # C: the empty chunk
        self.group_table = members.expand(B, G, group)  # [B, G, group] chunk indices, one table for every row
        member_centre = self.chunk_centre[:, members]  # [B, G, group, 2]
        member_radius = self.chunk_radius[:, members]
        present = valid[:, members]
        ok = present[..., None].expand_as(member_centre)
        lo = (member_centre - member_radius[..., None]).masked_fill(~ok, BIG).amin(2)
        hi = (member_centre + member_radius[..., None]).masked_fill(~ok, -BIG).amax(2)
        group_centre = (lo + hi) / 2
        reach = torch.linalg.norm(member_centre - group_centre[:, :, None], dim=-1) + member_radius
        group_valid = present.any(-1)
        self.group_centre = group_centre.masked_fill(~group_valid[..., None], FAR)
        self.group_radius = reach.masked_fill(~present, 0.0).amax(-1).masked_fill(~group_valid, 0.0)

    def _signed(self, rows: torch.Tensor, index: torch.Tensor, px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
        """Signed distance (positive off the road) from points to the road-edge segments
        ``index`` of scenarios ``rows`` (broadcast together); see :func:`_signed`."""
        return _signed(self.features, rows, index, px, py)

    def _neighbourhoods(self, rows: torch.Tensor, positions: torch.Tensor):
        """Candidate columns ``[M, 5, K]``, their rows ``[M, K]`` and the left-out bound
        ``[M]`` for M agents at ``positions`` ``[M, 2]`` in scenarios ``rows`` ``[M]``.

        Groups are ranked first, then the chunks of the ``groups_per_agent`` nearest groups;
        a chunk left out is either in a group left out (no nearer than that group's lower
        bound) or ranked after the kept chunks, so the bound is the smaller of the two.
        Every lookup is one ``index_select`` into a flat table (see :meth:`_tables`):
        refreshes run every step, and 2-D advanced indexing costs several times more."""
        group_circles, chunk_circles, chunk_rows, columns = self._tables()
        M, g, k = rows.shape[0], self.groups_per_agent, self.chunks_per_agent
        lower = _lower_bounds(group_circles.index_select(0, rows), positions)  # [M, G]
        ranked = lower.topk(min(g + 1, lower.shape[-1]), dim=-1, largest=False)
        group_bound = ranked.values[:, g] if ranked.values.shape[-1] > g else torch.full_like(lower[:, 0], BIG)
        members = self.group_table[0]  # [G, group]: every scenario's groups are the same chunk numbers
        chunks = members.index_select(0, ranked.indices[:, :g].flatten()).view(M, g * members.shape[1])
        flat = chunks + (rows * self.chunk_table.shape[1])[:, None]  # rows of the flat chunk tables
        lower = _lower_bounds(chunk_circles.index_select(0, flat.flatten()).view(M, flat.shape[1], 3), positions)
        ranked = lower.topk(min(k + 1, lower.shape[-1]), dim=-1, largest=False)
        left_out = ranked.values[:, k] if ranked.values.shape[-1] > k else torch.full_like(lower[:, 0], BIG)
        left_out = torch.minimum(left_out, group_bound)
        K = k * chunk_rows.shape[1]
        segments = chunk_rows.index_select(0, flat.gather(1, ranked.indices[:, :k]).flatten()).view(M, K)
        # Empty slots read the tables' last column, a point segment far away: no mask per step.
        candidates = columns.index_select(1, segments.flatten()).view(5, M, K).transpose(0, 1)
        B, E, _ = self.features.shape
        index = torch.where(segments < B * E, segments - (rows * E)[:, None], 0)
        return candidates, index, left_out

    def _tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Lookup tables of the refreshes, made at the first: the groups' and chunks'
        circles ``[B, G, 3]`` and ``[B * (C + 1), 3]`` (x, y, radius), each chunk's
        segments as rows of the flat ``features`` ``[B * (C + 1), chunk]`` (``B * E`` for
        none) and the segments' columns SX..INV_LEN2 ``[5, B * E + 1]``, ending with a
        point segment far away."""
        if self._lookup is None:
            B, E, _ = self.features.shape
            rows = torch.arange(B, device=self.features.device)[:, None, None]
            segment_rows = torch.where(self.chunk_table >= 0, self.chunk_table + rows * E, B * E)
            far = self.features.new_tensor([FAR, FAR, 0.0, 0.0, 0.0])[:, None]
            self._lookup = (
                torch.cat([self.group_centre, self.group_radius[..., None]], -1),
                torch.cat([self.chunk_centre, self.chunk_radius[..., None]], -1).flatten(0, 1),
                segment_rows.flatten(0, 1),
                torch.cat([self.features[..., : INV_LEN2 + 1].reshape(B * E, -1).T, far], 1).contiguous(),
            )
        return self._lookup

    def refresh(self, positions: torch.Tensor, agents: torch.Tensor | None = None) -> None:
        """Rebuild the neighbourhoods of ``agents`` (a ``[B, N]`` mask; all when None) at
        ``positions`` ``[B, N, 2]``."""
        B, N, _ = positions.shape
        if agents is None or self.candidates is None:
            rows = torch.arange(B, device=positions.device).repeat_interleave(N)
            columns, index, left_out = self._neighbourhoods(rows, positions.reshape(-1, 2))
            self.candidates = columns.reshape(B, N, *columns.shape[1:]).contiguous()
            self.candidate_index = index.reshape(B, N, -1)
            self.left_out = left_out.reshape(B, N)
            self.anchor = positions.clone()
            self.refreshed += B * N
            return
        b, n = torch.nonzero(agents, as_tuple=True)
        if b.numel():
            self._rebuild(b, n, positions)

    def _rebuild(self, b: torch.Tensor, n: torch.Tensor, positions: torch.Tensor) -> None:
        """Rebuild the neighbourhoods of agents ``n`` of scenarios ``b`` at ``positions``."""
        columns, index, left_out = self._neighbourhoods(b, positions[b, n])
        self.candidates[b, n] = columns
        self.candidate_index[b, n] = index
        self.left_out[b, n] = left_out
        self.anchor[b, n] = positions[b, n]
        self.refreshed += int(b.numel())

    def signed_distance(self, corners: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        """Largest signed distance ``[B, N]`` of box corners ``[B, N, 4, 2]`` to the road
        edge: negative on the road (edges keep the road on their left), positive off it.

        Exact (against every road edge of the scenario) for boxes within reach of an edge.
        A box farther than its half-diagonal from every edge lies wholly on one side; its
        value is then the centre's signed distance shrunk by the half-diagonal (a bound
        with the exact sign). An agent's neighbourhood is rebuilt when it can no longer
        vouch for the nearest segments it needs. Agents with no road edge in the scenario
        are on the road (``-1e9``).

        Boxes outside ``active`` ``[B, N]`` (agents not in the scene now, padding) are
        never rebuilt nor measured against every edge: their value is whatever their
        neighbourhood gives, exact or not. Without it, an absent agent parked where its
        neighbourhood cannot vouch for it would be measured against every edge each step.
        """
        centre = corners.mean(2)
        reach = torch.linalg.norm(corners[:, :, 0] - centre, dim=-1)  # half the diagonal
        if self.candidates is None:
            self.refresh(centre)
        active = _active_mask(active, reach)
        B, N = reach.shape
        if B * N <= DENSE_AGENTS:
            return self._whole_batch(centre, corners, reach, active)
        return self._selected(centre, corners, reach, active)

    def box_signed_distance(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        length: torch.Tensor,
        width: torch.Tensor,
        active: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """:meth:`signed_distance` of the boxes of centres ``x``, ``y``, headings of cosine
        ``cos`` and sine ``sin``, and sizes ``length``, ``width`` (each ``[B, N]``). For
        small batches the corners are made in the same pass that measures them (one kernel
        when compiling) instead of a dozen operations before it."""
        B, N = x.shape
        if B * N > DENSE_AGENTS:
            return self.signed_distance(_box_corners(x, y, cos, sin, length, width), active)
        if self.candidates is None:
            self.refresh(torch.stack([x, y], -1))
        active = _active_mask(active, x)
        rows = torch.arange(B, device=x.device)[:, None]
        first = _box_pass(
            self.features,
            rows,
            self.candidates,
            self.candidate_index,
            x,
            y,
            cos,
            sin,
            length,
            width,
            self.anchor,
            self.left_out,
            active,
        )
        return self._finish(*first, active)

    def _whole_batch(
        self, centre: torch.Tensor, corners: torch.Tensor, reach: torch.Tensor, active: torch.Tensor
    ) -> torch.Tensor:
        """Small batches: the centre and the four corners of every box in one pass (fewer,
        larger operations than selecting the boxes near an edge)."""
        rows = torch.arange(centre.shape[0], device=centre.device)[:, None]
        points = torch.cat([centre[:, :, None], corners], 2)  # [B, N, 5, 2]
        signed, stale, moved, combined = _whole_batch_pass(
            self.features,
            rows,
            self.candidates,
            self.candidate_index,
            points,
            reach,
            self.anchor,
            self.left_out,
            active,
        )
        return self._finish(signed, stale, moved, combined, points, reach, active)

    def _finish(
        self,
        signed: torch.Tensor,
        stale: torch.Tensor,
        moved: torch.Tensor,
        combined: torch.Tensor,
        points: torch.Tensor,
        reach: torch.Tensor,
        active: torch.Tensor,
    ) -> torch.Tensor:
        """The whole-batch answer from its first pass (see :func:`_whole_batch_pass`):
        that pass's where no neighbourhood is stale, else after rebuilding them."""
        if not bool(stale.any()):
            return combined
        centre = points[..., 0, :]
        unsure = self._settle(stale, moved, centre, reach, signed, points, active)
        if bool(unsure.any()):
            b, n = torch.nonzero(unsure, as_tuple=True)
            signed[b, n] = self._every_edge(b, points[b, n])
        return _combine(signed[..., 0], signed[..., 1:].amax(-1), reach)

    def _selected(
        self, centre: torch.Tensor, corners: torch.Tensor, reach: torch.Tensor, active: torch.Tensor
    ) -> torch.Tensor:
        """Large batches: every centre, then the corners of the boxes near an edge only."""
        B, N = reach.shape
        rows = torch.arange(B, device=centre.device).repeat_interleave(N)
        candidates, index = self.candidates.flatten(0, 1), self.candidate_index.flatten(0, 1)
        centre_signed = self._measure(rows, candidates, index, centre.reshape(-1, 1, 2))[:, 0].view(B, N)
        stale, moved = self._stale(centre, reach, centre_signed.abs(), active)
        unsure = None
        if bool(stale.any()):
            unsure = self._settle(stale, moved, centre, reach, centre_signed[..., None], centre[:, :, None], active)
            if bool(unsure.any()):
                b, n = torch.nonzero(unsure, as_tuple=True)
                centre_signed[b, n] = self._every_edge(b, centre[b, n, None])[:, 0]
            else:
                unsure = None
        exact = torch.zeros_like(centre_signed)
        near = centre_signed.abs() <= reach  # boxes that may reach an edge
        b, n = torch.nonzero(near if unsure is None else near & ~unsure, as_tuple=True)
        if b.numel():
            slot = b * N + n
            exact[b, n] = self._measure(b, candidates[slot], index[slot], corners[b, n]).amax(-1)
        if unsure is not None:
            b, n = torch.nonzero(near & unsure, as_tuple=True)
            if b.numel():
                exact[b, n] = self._every_edge(b, corners[b, n]).amax(-1)
        return _combine(centre_signed, exact, reach)

    def _stale(
        self, centre: torch.Tensor, reach: torch.Tensor, distance: torch.Tensor, active: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Active agents ``[B, N]`` whose neighbourhood cannot vouch for the segments they
        need, and how far each has moved since its neighbourhood was built. A box away from
        the edges needs the centre's nearest segment, a box near one its corners' (each
        within distance + 2 reach of the centre); a left-out segment is at least
        ``left_out - moved`` from the centre."""
        return _stale(centre, reach, distance, self.anchor, self.left_out, active)

    def _settle(
        self,
        stale: torch.Tensor,
        moved: torch.Tensor,
        centre: torch.Tensor,
        reach: torch.Tensor,
        values: torch.Tensor,
        points: torch.Tensor,
        active: torch.Tensor,
    ) -> torch.Tensor:
        """Rebuild the neighbourhoods of the stale agents that moved and measure their
        ``points`` ``[B, N, P, 2]`` again into ``values`` ``[B, N, P]`` (the centre first).
        Returns the agents still stale: those rebuilt whose needs lie beyond any
        neighbourhood of ``chunks_per_agent`` chunks, and those that have not moved since
        their neighbourhood was built (rebuilding it again would give the same); the caller
        measures them against every edge."""
        b, n = torch.nonzero(stale & (moved > 0), as_tuple=True)
        if b.numel():
            self._rebuild(b, n, centre)
            values[b, n] = self._measure(b, self.candidates[b, n], self.candidate_index[b, n], points[b, n])
        return self._stale(centre, reach, values[..., 0].abs(), active)[0]

    def _every_edge(self, rows: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """Signed distance ``[M, P]`` of ``points`` ``[M, P, 2]`` in scenarios ``rows`` to
        their nearest road edge, searching every edge (the rare boxes no neighbourhood can
        vouch for)."""
        if self._every is None:
            columns = self.features[..., : INV_LEN2 + 1].masked_fill((self.features[..., OK] == 0)[..., None], 0.0)
            columns[..., SX:GX] = columns[..., SX:GX].masked_fill((self.features[..., OK] == 0)[..., None], FAR)
            self._every = columns.transpose(1, 2).contiguous()  # [B, 5, E]
        E = self._every.shape[-1]
        self.exhaustive += int(rows.numel())
        index = torch.arange(E, device=points.device).expand(rows.shape[0], E)
        return self._measure(rows, self._every[rows], index, points)

    def _measure(
        self, rows: torch.Tensor, candidates: torch.Tensor, candidate_index: torch.Tensor, points: torch.Tensor
    ) -> torch.Tensor:
        """Signed distance ``[..., P]`` of ``points`` ``[..., P, 2]`` to their nearest
        candidate segment (``candidates`` ``[..., 5, K]``, rows of ``features``
        ``candidate_index`` ``[..., K]``) in scenarios ``rows`` ``[...]``; BIG for none."""
        return _measure(self.features, rows, candidates, candidate_index, points)


@kernel
def _measure(
    features: torch.Tensor,
    rows: torch.Tensor,
    candidates: torch.Tensor,
    candidate_index: torch.Tensor,
    points: torch.Tensor,
) -> torch.Tensor:
    """:meth:`RoadEdges._measure` as a pure function (a compiled kernel when compiling)."""
    d2 = _point_segment_sq(points[..., 0:1], points[..., 1:2], candidates.unsqueeze(-3))  # [..., P, K]
    best, nearest = d2.min(-1)
    index = candidate_index.gather(-1, nearest)
    signed = _signed(features, rows[..., None], index, points[..., 0], points[..., 1])
    return signed.masked_fill(best >= (FAR / 2) ** 2, BIG)


@kernel
def _whole_batch_pass(
    features: torch.Tensor,
    rows: torch.Tensor,
    candidates: torch.Tensor,
    candidate_index: torch.Tensor,
    points: torch.Tensor,
    reach: torch.Tensor,
    anchor: torch.Tensor,
    left_out: torch.Tensor,
    active: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:meth:`RoadEdges._whole_batch` up to its one branch, as a pure function: the signed
    distances ``[B, N, 5]`` of the centres and corners ``points`` to their candidates,
    which agents are stale and how far each moved (see :meth:`RoadEdges._stale`), and the
    answer ``[B, N]`` should none be stale."""
    signed = _measure.fn(features, rows, candidates, candidate_index, points)
    stale, moved = _stale(points[..., 0, :], reach, signed[..., 0].abs(), anchor, left_out, active)
    return signed, stale, moved, _combine(signed[..., 0], signed[..., 1:].amax(-1), reach)


@kernel
def _box_pass(
    features: torch.Tensor,
    rows: torch.Tensor,
    candidates: torch.Tensor,
    candidate_index: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    length: torch.Tensor,
    width: torch.Tensor,
    anchor: torch.Tensor,
    left_out: torch.Tensor,
    active: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """:func:`_whole_batch_pass` of boxes given by centre, heading and size: also returns
    the points measured ``[B, N, 5, 2]`` (the centre, then the corners) and the boxes'
    half-diagonals ``[B, N]``."""
    centre = torch.stack([x, y], -1)
    points = torch.cat([centre[:, :, None], _box_corners(x, y, cos, sin, length, width)], 2)
    reach = (length * length + width * width).sqrt() / 2
    signed, stale, moved, combined = _whole_batch_pass.fn(
        features, rows, candidates, candidate_index, points, reach, anchor, left_out, active
    )
    return signed, stale, moved, combined, points, reach


def _box_corners(
    x: torch.Tensor, y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, length: torch.Tensor, width: torch.Tensor
) -> torch.Tensor:
    """Corners ``[B, N, 4, 2]`` of boxes, in :func:`closedloop.geometry.box_corners`' order
    (front-left, rear-left, rear-right, front-right), from their heading's cosine and sine
    (arithmetic only, for the kernels)."""
    along_x, along_y = cos * length / 2, sin * length / 2  # half the length, along the heading
    across_x, across_y = -sin * width / 2, cos * width / 2  # half the width, to the left
    cx = torch.stack([along_x + across_x, -along_x + across_x, -along_x - across_x, along_x - across_x], -1)
    cy = torch.stack([along_y + across_y, -along_y + across_y, -along_y - across_y, along_y - across_y], -1)
    return torch.stack([cx + x[..., None], cy + y[..., None]], -1)


def _stale(
    centre: torch.Tensor,
    reach: torch.Tensor,
    distance: torch.Tensor,
    anchor: torch.Tensor,
    left_out: torch.Tensor,
    active: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:meth:`RoadEdges._stale` as a pure function."""
    moved = torch.linalg.norm(centre - anchor, dim=-1)
    needed = torch.where(distance > reach, distance, distance + 2 * reach)
    return (needed > left_out - moved) & (distance < BIG) & active, moved


def _signed(
    features: torch.Tensor, rows: torch.Tensor, index: torch.Tensor, px: torch.Tensor, py: torch.Tensor
) -> torch.Tensor:
    """Signed distance (positive off the road) from points to the road-edge segments
    ``index`` of scenarios ``rows`` (broadcast together; rows of ``features``). Where a
    point's nearest spot is a vertex, the side comes from both segments meeting there (off
    the road if either says so at a left turn, if both do at a right one), as WOSAC's
    reference does."""
    row = rows * features.shape[1] + index  # one row lookup: cheaper than 2-D indexing
    f = features.view(-1, 3, 6).index_select(0, row.reshape(-1)).view(*row.shape, 3, 6)
    # Columns [..., 3] over the own, prior and next segment (see the column constants).
    sx, sy, gx, gy, fifth, sixth = f.unbind(-1)
    inv_len2, has_prior, has_next = fifth.unbind(-1)
    left_at_start, left_at_end = sixth[..., 1], sixth[..., 2]
    dx, dy = px[..., None] - sx, py[..., None] - sy
    # Cross products, positive where the point is right of (off the road from) each segment.
    # Sides combine by max (either says off) and min (both do), as floats: compiled
    # boolean tensors ran several times slower.
    # A NaN product (a point or segment at infinity) says "on the road", as a comparison would.
    own, before, after = (dx * gy).addcmul_(dy, gx, value=-1).nan_to_num_(nan=0.0).unbind(-1)
    dx, dy, gx, gy = dx[..., 0], dy[..., 0], gx[..., 0], gy[..., 0]
    t = (dx * gx).addcmul_(dy, gy).mul_(inv_len2)
    tc = t.clamp(0, 1)
    distance = torch.hypot(dx - gx * tc, dy - gy * tc)
    at_start = torch.where(left_at_start > 0, torch.maximum(own, before), torch.minimum(own, before))
    at_end = torch.where(left_at_end > 0, torch.maximum(own, after), torch.minimum(own, after))
    side = torch.where((t < 0) & (has_prior > 0), at_start, torch.where((t > 1) & (has_next > 0), at_end, own))
    return torch.where(side > 0, distance, -distance)


def _active_mask(active: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """The agents asked about, ``[B, N]`` booleans shaped as ``like`` (all when None)."""
    if active is None:
        return torch.ones_like(like, dtype=torch.bool)
    if active.shape != like.shape or active.dtype != torch.bool:
        raise ValueError(
            f"active must be a boolean mask of shape {list(like.shape)}, got {active.dtype} {list(active.shape)}"
        )
    return active


def _lower_bounds(circles: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Lower bounds ``[M, X]`` on the distance from ``positions`` ``[M, 2]`` to anything
    inside the circles ``[M, X, 3]`` (x, y, radius). (They may differ from
    ``torch.linalg.norm``'s in the last bit: a bound, not an answer, so only when an agent's
    neighbourhood is rebuilt can change, never what it answers.)"""
    dx = circles[..., 0] - positions[:, 0:1]
    dy = circles[..., 1] - positions[:, 1:2]
    return dx.mul_(dx).addcmul_(dy, dy).sqrt_().sub_(circles[..., 2])


def _combine(centre_signed: torch.Tensor, exact: torch.Tensor, reach: torch.Tensor) -> torch.Tensor:
    """The exact corner value for boxes within ``reach`` of an edge, else the centre's
    value shrunk by ``reach``; ``-BIG`` (on the road) where the scenario has no edge."""
    distance = centre_signed.abs()
    bound = centre_signed - torch.sign(centre_signed) * reach
    return torch.where(distance <= reach, exact, bound).masked_fill(distance >= BIG, -BIG)


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
