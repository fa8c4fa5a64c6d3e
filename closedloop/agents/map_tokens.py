"""Map tokens: the roadgraph cut into short oriented segments (CAT-K / SMART: 5 m).

Lanes, road lines, road edges and crosswalks of a :class:`~closedloop.data.batch.ScenarioBatch`
become tokens. A polyline is a run of consecutive roadgraph points with the same ``road_id``
(``road_dir`` leads from each point to the next one; it is zero at a polyline's end);
a crosswalk polygon contributes each of its edges as a polyline of its own. Each polyline of
arc length ``L`` is cut into ``ceil(L / segment_length)`` pieces of equal arc length (so
every token is at most ``segment_length`` long, and at least half of it unless the whole
polyline is shorter). A token is described by its chord: ``position`` is the chord's
midpoint and ``heading`` its direction, in the batch frame (relative to ``batch.origin``).

Traffic lights are dynamic: ``light[b, m, t]`` is the state at step ``t`` of the light that
controls the lane a lane token belongs to (0, ``LIGHT_UNKNOWN``, where there is none).

Everything is vectorised over the batch and the roadgraph points (no Python loop over
polylines): arc lengths are one cumulative sum, token end points are found with
``searchsorted``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from closedloop.constants import CROSSWALK_CODE, is_lane, is_road_edge, is_road_line
from closedloop.data.batch import ScenarioBatch

# Token kinds (MapTokens.kind).
MAP_LANE, MAP_ROAD_LINE, MAP_ROAD_EDGE, MAP_CROSSWALK = range(4)
MAP_KINDS = ("lane", "road_line", "road_edge", "crosswalk")


@dataclass
class MapTokens:
    """M map tokens per scenario, padded, with a mask.

    - ``position`` float32 [B, M, 2]: chord midpoint, batch frame.
    - ``heading`` float32 [B, M]: chord direction, radians in (-pi, pi].
    - ``kind`` int64 [B, M]: 0 lane, 1 road line, 2 road edge, 3 crosswalk.
    - ``subtype`` int64 [B, M]: the WOMD roadgraph type code (0..3, 5..16, 18).
    - ``length`` float32 [B, M]: arc length in metres.
    - ``light`` int64 [B, M, T]: traffic-light state of the token's lane at each step
      (``closedloop.constants.LIGHT_*``), 0 where none.
    - ``feature_id`` int64 [B, M]: the ``road_id`` of the polyline the token comes from.
    - ``mask`` bool [B, M]: the slot holds a token. Padding holds zeros.
    """

    position: torch.Tensor
    heading: torch.Tensor
    kind: torch.Tensor
    subtype: torch.Tensor
    length: torch.Tensor
    light: torch.Tensor
    feature_id: torch.Tensor
    mask: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.mask.shape[1]

    @property
    def pose(self) -> torch.Tensor:
        """[B, M, 3] x, y, heading."""
        return torch.cat([self.position, self.heading.unsqueeze(-1)], dim=-1)

    def _map(self, fn) -> MapTokens:
        return dataclasses.replace(self, **{f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MapTokens:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def select(self, rows: torch.Tensor) -> MapTokens:
        """The tokens of scenarios ``rows`` (indices into this batch, repeats allowed)."""
        return self._map(lambda t: t[rows])

    def repeat_interleave(self, repeats: int) -> MapTokens:
        """Each scenario ``repeats`` times in a row (e.g. one map for 32 rollouts)."""
        return self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def transformed(self, rotation: float, translation: tuple[float, float]) -> MapTokens:
        """The same tokens after rotating the scene by ``rotation`` about the origin and then
        translating it (for invariance tests)."""
        c, s = math.cos(rotation), math.sin(rotation)
        x, y = self.position.unbind(-1)
        position = torch.stack([c * x - s * y + translation[0], s * x + c * y + translation[1]], dim=-1)
        heading = torch.remainder(self.heading + rotation + math.pi, 2 * math.pi) - math.pi
        return dataclasses.replace(self, position=position, heading=heading)


def _token_kind(code: torch.Tensor) -> torch.Tensor:
    """Token kind of roadgraph codes, -1 for the ones that make no token."""
    kind = torch.full_like(code, -1)
    kind = torch.where(is_lane(code), MAP_LANE, kind)
    kind = torch.where(is_road_line(code), MAP_ROAD_LINE, kind)
    kind = torch.where(is_road_edge(code), MAP_ROAD_EDGE, kind)
    return torch.where(code == CROSSWALK_CODE, MAP_CROSSWALK, kind)


def map_tokens(batch: ScenarioBatch, segment_length: float = 5.0, max_tokens: int | None = None) -> MapTokens:
    """Cut the roadgraph of ``batch`` into tokens (see the module docstring).

    With ``max_tokens`` each scenario keeps the ``max_tokens`` tokens whose midpoints are
    nearest the batch frame's origin (the SDC at the current step); kept tokens stay in
    roadgraph order. Returns :class:`MapTokens` with ``M = max tokens over the batch`` (at
    least 1).
    """
    if segment_length <= 0:
        raise ValueError(f"segment_length must be positive, got {segment_length}")
    device = batch.road_xyz.device
    B, P = batch.road_mask.shape
    T = batch.light_state.shape[-1]
    xy = batch.road_xyz[..., :2].reshape(-1, 2).double()
    d = batch.road_dir[..., :2].reshape(-1, 2).double()
    code = batch.road_type.reshape(-1)
    rid = batch.road_id.reshape(-1)
    seg_len = torch.linalg.norm(d, dim=-1)
    kind = _token_kind(code)
    keep = batch.road_mask.reshape(-1) & (kind >= 0) & (seg_len > 0)
    seg_len = torch.where(keep, seg_len, 0.0)

    # Polylines: runs of kept points with the same id in the same scenario; a crosswalk edge
    # is a polyline of its own.
    idx = torch.arange(B * P, device=device)
    prev = (idx - 1).clamp_min(0)
    continues = (idx % P != 0) & keep[prev] & (rid == rid[prev]) & (code == code[prev]) & (kind != MAP_CROSSWALK)
    starts = keep & ~continues
    poly_of_point = torch.cumsum(starts.long(), 0) - 1  # valid where keep
    first = idx[starts]  # [K] first point of each polyline
    num_poly = first.numel()
    if num_poly == 0:
        return _empty(B, T, device)
    cum_end = torch.cumsum(seg_len, 0)
    cum_start = cum_end - seg_len
    poly_len = torch.zeros(num_poly, dtype=torch.float64, device=device)
    poly_len.index_add_(0, poly_of_point[keep], seg_len[keep])
    poly_start = cum_start[first]  # global arc coordinate of each polyline's start
    count = torch.ceil(poly_len / segment_length - 1e-9).long().clamp_min(1)

    # Tokens: arc intervals [a, b] of equal length along each polyline.
    poly = torch.repeat_interleave(torch.arange(num_poly, device=device), count)
    offsets = torch.cumsum(count, 0) - count
    j = torch.arange(poly.numel(), device=device) - offsets[poly]
    piece = poly_len[poly] / count[poly]
    a = poly_start[poly] + j * piece
    b = a + piece
    # Start points: the last point whose segment starts at or before a (it has positive length
    # and contains a); end points: the first point whose segment ends at or after b.
    # Both stay on the token's own polyline: rounding in the running sums must never hand a
    # piece's end to the next polyline (or make tokens depend on the scenarios batched before).
    last = torch.zeros(num_poly, dtype=torch.long, device=device)
    last.scatter_reduce_(0, poly_of_point[keep], idx[keep], reduce="amax", include_self=False)
    low, high = first[poly], last[poly]
    i_a = torch.minimum(torch.maximum(torch.searchsorted(cum_start, a, right=True) - 1, low), high)
    i_b = torch.minimum(torch.maximum(torch.searchsorted(cum_end, b, right=False), low), high)

    def point_at(i: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        t = ((s - cum_start[i]) / seg_len[i].clamp_min(1e-12)).clamp(0.0, 1.0)
        return xy[i] + t.unsqueeze(-1) * d[i]

    p_a, p_b = point_at(i_a, a), point_at(i_b, b)
    chord = p_b - p_a
    src = first[poly]  # a point of the token's polyline
    tok_batch = src // P
    tok_pos = ((p_a + p_b) / 2).float()
    tok_heading = torch.atan2(chord[:, 1], chord[:, 0]).float()
    tok_kind, tok_code, tok_id = kind[src], code[src], rid[src]
    tok_len = piece.float()

    # Keep the nearest max_tokens per scenario (in roadgraph order).
    per_batch = torch.bincount(tok_batch, minlength=B)
    rank = torch.arange(tok_batch.numel(), device=device) - (torch.cumsum(per_batch, 0) - per_batch)[tok_batch]
    M = max(int(per_batch.max()), 1)
    slot_valid = torch.zeros(B, M, dtype=torch.bool, device=device)
    slot_valid[tok_batch, rank] = True
    if max_tokens is not None and M > max_tokens:
        dist = torch.full((B, M), math.inf, device=device)
        dist[tok_batch, rank] = torch.linalg.norm(tok_pos, dim=-1)
        nearest = torch.topk(dist, max_tokens, dim=1, largest=False).indices
        chosen = torch.zeros(B, M, dtype=torch.bool, device=device)
        chosen.scatter_(1, nearest, True)
        chosen &= slot_valid
        sel = chosen[tok_batch, rank]
        tok_batch, tok_pos, tok_heading = tok_batch[sel], tok_pos[sel], tok_heading[sel]
        tok_kind, tok_code, tok_id, tok_len = tok_kind[sel], tok_code[sel], tok_id[sel], tok_len[sel]
        # New slots: rank among the chosen of the same scenario.
        new_rank = torch.cumsum(chosen.long(), 1) - 1
        rank = new_rank[tok_batch, rank[sel]]
        M = max(int(chosen.sum(1).max()), 1)

    def scatter(values: torch.Tensor, fill=0) -> torch.Tensor:
        out = torch.full((B, M, *values.shape[1:]), fill, dtype=values.dtype, device=device)
        out[tok_batch, rank] = values
        return out

    mask = scatter(torch.ones_like(tok_batch, dtype=torch.bool), False)
    feature_id = scatter(tok_id, -1)
    kind_out = scatter(tok_kind)

    # Dynamic light state: the light slot controlling each lane token's feature.
    match = (
        (feature_id.unsqueeze(-1) == batch.light_lane_id.unsqueeze(1))
        & batch.light_mask.unsqueeze(1)
        & (mask & (kind_out == MAP_LANE)).unsqueeze(-1)
    )  # [B, M, L]
    has_light = match.any(-1)
    slot = match.long().argmax(-1)  # [B, M]
    light = torch.gather(batch.light_state, 1, slot.unsqueeze(-1).expand(B, M, T))
    light = torch.where(has_light.unsqueeze(-1), light, 0)

    return MapTokens(
        position=scatter(tok_pos),
        heading=scatter(tok_heading),
        kind=kind_out,
        subtype=scatter(tok_code),
        length=scatter(tok_len),
        light=light,
        feature_id=feature_id,
        mask=mask,
    )


def _empty(B: int, T: int, device: torch.device) -> MapTokens:
    z = torch.zeros(B, 1, device=device)
    zl = torch.zeros(B, 1, dtype=torch.long, device=device)
    return MapTokens(
        position=torch.zeros(B, 1, 2, device=device),
        heading=z,
        kind=zl,
        subtype=zl.clone(),
        length=z.clone(),
        light=torch.zeros(B, 1, T, dtype=torch.long, device=device),
        feature_id=zl - 1,
        mask=torch.zeros(B, 1, dtype=torch.bool, device=device),
    )
