"""WOSAC metric features, batched over scenarios, rollouts, objects and steps (torch).

Each function follows the definition of the reference implementation
(``waymo_open_dataset/wdl_limited/sim_agents_metrics``), including its conventions:
central differences with NaN padding, rounded-box distances, raw (unwrapped) heading
differences in time-to-collision, road-edge signs from the polyline winding with a 3x
vertical stretch to pick the segment, and the reference's lane-matching distance for
traffic lights. Trajectories are ``[N, A, T, 4]`` rows (N = scenarios x rollouts) with
per-row evaluated-object indices ``[N, E]`` and scenario indices ``[N]``.
"""

from __future__ import annotations

import math

import torch

from closedloop.constants import DT
from closedloop.geometry import box_corners, rectangle_distance
from closedloop.metrics.scene import PolylineTable, WosacBatch

BIG = 1e10
CORNER_ROUNDING = 0.7
MAX_HEADING_DIFF = math.radians(75.0)
MAX_HEADING_DIFF_SMALL_OVERLAP = math.radians(10.0)
SMALL_OVERLAP = 0.5
MAX_TTC = 5.0
Z_STRETCH = 3.0
RED_STATES = (1, 4)  # LANE_STATE_ARROW_STOP, LANE_STATE_STOP (not flashing)
ROW_CHUNK = 64  # rows of pairwise work at a time, to bound memory


def take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Select objects per row: ``x`` ``[N, A, ...]``, ``index`` ``[N, E]`` -> ``[N, E, ...]``."""
    idx = index.reshape(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:])
    return torch.gather(x, 1, idx)


def _central_diff(t: torch.Tensor) -> torch.Tensor:
    pad = torch.full_like(t[..., :1], float("nan"))
    return torch.cat([pad, (t[..., 2:] - t[..., :-2]) / 2, pad], dim=-1)


def _wrap(angle: torch.Tensor) -> torch.Tensor:
    return torch.remainder(angle + math.pi, 2 * math.pi) - math.pi


def central_and(valid: torch.Tensor) -> torch.Tensor:
    """Validity of a central difference: both neighbours valid; the ends are invalid."""
    pad = torch.zeros_like(valid[..., :1])
    return torch.cat([pad, valid[..., 2:] & valid[..., :-2], pad], dim=-1)


def kinematics(xyzh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Linear speed and acceleration, angular speed and acceleration ``[..., T]`` from
    ``[..., T, 4]`` (x, y, z, heading), NaN where the differences are undefined."""
    dpos = _central_diff(xyzh[..., :3].movedim(-1, 0))
    speed = torch.linalg.norm(dpos, dim=0) / DT
    accel = _central_diff(speed) / DT
    dh_step = _wrap(_central_diff(xyzh[..., 3]) * 2) / 2
    d2h_step = _wrap(_central_diff(dh_step) * 2) / 2
    return speed, accel, dh_step / DT, d2h_step / (DT * DT)


def distance_to_nearest_object(
    xyzh: torch.Tensor, dims: torch.Tensor, valid: torch.Tensor, eval_index: torch.Tensor
) -> torch.Tensor:
    """Signed distance from each evaluated object to the nearest other valid object,
    between boxes with rounded corners (radius 0.35 x the smaller side).

    ``xyzh`` ``[N, A, T, 4]``, ``dims`` ``[N, A, T, 3]``, ``valid`` ``[N, A, T]``,
    ``eval_index`` ``[N, E]``. Returns ``[N, E, T]`` (1e10 with no other valid object).
    """
    out = []
    for n0 in range(0, xyzh.shape[0], ROW_CHUNK):
        rows = slice(n0, n0 + ROW_CHUNK)
        x, d, v, ev = xyzh[rows], dims[rows], valid[rows], eval_index[rows]
        length, width = d[..., 0], d[..., 1]
        shrink = torch.minimum(length, width) * CORNER_ROUNDING / 2
        box = (x[..., 0], x[..., 1], x[..., 3], length - 2 * shrink, width - 2 * shrink)
        mine = tuple(take(c, ev)[:, :, None] for c in box)  # [n, E, 1, T]
        others = tuple(c[:, None] for c in box)  # [n, 1, A, T]
        dist = rectangle_distance(mine, others) - take(shrink, ev)[:, :, None] - shrink[:, None]
        usable = take(v, ev)[:, :, None] & v[:, None]
        not_self = ev[:, :, None] != torch.arange(x.shape[1], device=x.device)
        usable &= not_self[..., None]
        out.append(torch.where(usable, dist, torch.full_like(dist, BIG)).amin(2))
    return torch.cat(out)


def time_to_collision(
    xyzh: torch.Tensor, dims: torch.Tensor, valid: torch.Tensor, eval_index: torch.Tensor
) -> torch.Tensor:
    """Seconds until each evaluated object reaches the object it follows at constant
    speeds, capped at 5 s. Shapes as in :func:`distance_to_nearest_object`."""
    out = []
    for n0 in range(0, xyzh.shape[0], ROW_CHUNK):
        rows = slice(n0, n0 + ROW_CHUNK)
        x, d, v, ev = xyzh[rows], dims[rows], valid[rows], eval_index[rows]
        planar = torch.cat([x[..., :2], torch.zeros_like(x[..., :1]), x[..., 3:]], -1)
        speed = kinematics(planar)[0]  # [n, A, T]
        length, width = d[..., 0][:, None], d[..., 1][:, None]  # [n, 1, A, T]
        ex, ey, eyaw = (take(x[..., k], ev)[:, :, None] for k in (0, 1, 3))
        el, ew = take(d[..., 0], ev)[:, :, None], take(d[..., 1], ev)[:, :, None]
        yaw_diff = torch.abs(x[..., 3][:, None] - eyaw)  # [n, E, A, T]
        cos_d, sin_d = torch.abs(torch.cos(yaw_diff)), torch.abs(torch.sin(yaw_diff))
        other_long = length / 2 * cos_d + width / 2 * sin_d
        other_lat = length / 2 * sin_d + width / 2 * cos_d
        dx, dy = x[..., 0][:, None] - ex, x[..., 1][:, None] - ey
        cos_e, sin_e = torch.cos(-eyaw), torch.sin(-eyaw)
        long_distance = dx * cos_e - dy * sin_e - el / 2 - other_long
        lat_overlap = torch.abs(dx * sin_e + dy * cos_e) - ew / 2 - other_lat
        following = (
            (long_distance > 0)
            & (yaw_diff <= MAX_HEADING_DIFF)
            & (lat_overlap < 0)
            & ((lat_overlap < -SMALL_OVERLAP) | (yaw_diff <= MAX_HEADING_DIFF_SMALL_OVERLAP))
        )
        masked = long_distance + (~(v[:, None] & following)).to(long_distance.dtype) * BIG
        ahead = masked.argmin(dim=2, keepdim=True)
        distance = masked.gather(2, ahead)[:, :, 0]
        ahead_speed = speed[:, None].expand_as(masked).gather(2, ahead)[:, :, 0]
        rel_speed = take(speed, ev) - ahead_speed
        ttc = torch.minimum(distance / rel_speed, torch.full_like(distance, MAX_TTC))
        out.append(torch.where(rel_speed > 0, ttc, torch.full_like(ttc, MAX_TTC)))
    return torch.cat(out)


# -- nearest segments ------------------------------------------------------------------------
def _projection(to_point: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """Parameter of the 2D projection onto segments; 0 for degenerate ones (divide_no_nan)."""
    norm2 = seg[..., 0] * seg[..., 0] + seg[..., 1] * seg[..., 1]
    t = to_point[..., 0] * seg[..., 0] + to_point[..., 1] * seg[..., 1]
    return torch.where(norm2 > 0, t / torch.where(norm2 > 0, norm2, torch.ones_like(norm2)), torch.zeros_like(t))


def _stretched_sq_distance(points: torch.Tensor, table: PolylineTable, index: torch.Tensor) -> torch.Tensor:
    """Squared distance to segments with z stretched 3x (the reference's segment choice).
    ``points`` ``[..., N, 3]``, ``index`` broadcastable to ``[..., N, K]``."""
    start, end = table.start[index], table.end[index]
    to_point = points[..., None, :] - start
    seg = end - start
    offset = to_point - seg * _projection(to_point, seg).clamp(0.0, 1.0)[..., None]
    return offset[..., 0] ** 2 + offset[..., 1] ** 2 + (Z_STRETCH * offset[..., 2]) ** 2


def _lane_match_sq_distance(points: torch.Tensor, table: PolylineTable, index: torch.Tensor) -> torch.Tensor:
    """The reference's squared lane-matching distance |(p - s) + (e - s) t|^2 (sic: a plus
    sign, so it is not the distance to the segment)."""
    start, end = table.start[index], table.end[index]
    to_point = points[..., None, :] - start
    seg = end - start
    offset = to_point + seg * _projection(to_point, seg).clamp(0.0, 1.0)[..., None]
    return offset[..., 0] ** 2 + offset[..., 1] ** 2


def _winding_sign(points: torch.Tensor, table: PolylineTable, index: torch.Tensor) -> torch.Tensor:
    start, end = table.start[index], table.end[index]
    to_point = points[..., None, :2] - start[..., :2]
    seg = end[..., :2] - start[..., :2]
    return torch.sign(to_point[..., 0] * seg[..., 1] - to_point[..., 1] * seg[..., 0])


BLOCK = 16  # consecutive segments searched together


def _blocks(table: PolylineTable, per_scene: int, valid: torch.Tensor, start_bound: bool):
    """Bounding boxes ``[B, P, 2]`` of blocks of BLOCK consecutive valid segments (of
    their start points with ``start_bound``) and whether a block has any valid segment."""
    start = table.start[:, :2]
    end = start if start_bound else table.end[:, :2]
    inf = torch.full_like(start, float("inf"))
    lo = torch.where(valid[:, None], torch.minimum(start, end), inf)
    hi = torch.where(valid[:, None], torch.maximum(start, end), -inf)
    pad = (-per_scene) % BLOCK
    B = valid.shape[0] // per_scene

    def blocked(x, fill):
        x = x.reshape(B, per_scene, *x.shape[1:])
        if pad:
            x = torch.cat([x, torch.full((B, pad, *x.shape[2:]), fill, dtype=x.dtype, device=x.device)], 1)
        return x.reshape(B, -1, BLOCK, *x.shape[2:])

    return (blocked(lo, float("inf")).amin(2), blocked(hi, float("-inf")).amax(2), blocked(valid, False).any(2))


def _candidates(points, mask, group_scene, table, per_scene, sq_distance, valid, blocks, initial: int = 4):
    """Per group of points, the segments (global indices, ascending) that provably contain
    each point's nearest ``valid`` segment: the blocks of segments whose bounding box lies
    within the worst best-distance of a first guess (the ``initial`` nearest blocks).
    ``points`` ``[G, N, D]``, ``mask`` ``[G, N]``, ``group_scene`` ``[G]``; the root of
    ``sq_distance`` must be at least the 2D distance to the blocks' boxes. Returns
    ``[G, K]`` and validity.
    """
    block_lo, block_hi, block_ok = blocks
    xy = points[..., :2]
    inf = torch.full_like(xy, float("inf"))
    lo = torch.where(mask[..., None], xy, inf).amin(1)
    hi = torch.where(mask[..., None], xy, -inf).amax(1)
    empty = ~mask.any(1)
    lo = torch.where(empty[:, None], torch.zeros_like(lo), lo)
    hi = torch.where(empty[:, None], torch.zeros_like(hi), hi)
    scene = group_scene
    gap = torch.maximum(block_lo[scene] - hi[:, None], lo[:, None] - block_hi[scene]).clamp_min(0)
    bound = torch.sqrt(gap[..., 0] ** 2 + gap[..., 1] ** 2)
    bound = torch.where(block_ok[scene], bound, torch.full_like(bound, float("inf")))  # [G, nb]

    def segments_of(block_index):  # [G, k] blocks -> [G, k * BLOCK] global segment indices
        local = block_index[..., None] * BLOCK + torch.arange(BLOCK, device=points.device)
        local = local.reshape(block_index.shape[0], -1)
        ok = local < per_scene
        return scene[:, None] * per_scene + local.clamp_max(per_scene - 1), ok

    first = bound.topk(min(initial, bound.shape[1]), dim=1, largest=False).indices.sort(1).values
    guess_index, guess_ok = segments_of(first)
    guess = sq_distance(points, table, guess_index[:, None, :])
    guess = guess.masked_fill(~(guess_ok & valid[guess_index])[:, None, :], BIG)
    worst = torch.where(mask, guess.amin(-1), torch.zeros_like(guess[..., 0])).amax(1).sqrt()
    keep = bound <= worst[:, None] + 1e-4  # [G, nb]
    # Compact the kept blocks to the left, in ascending order, without sorting.
    count = max(int(keep.sum(1).max()), 1)
    slot = torch.where(keep, keep.cumsum(1) - 1, torch.full_like(bound, count, dtype=torch.int64))
    order = torch.full((keep.shape[0], count + 1), keep.shape[1], dtype=torch.int64, device=points.device)
    order.scatter_(1, slot, torch.arange(keep.shape[1], device=points.device).expand_as(slot))
    order = order[:, :count]
    index, ok = segments_of(order.clamp_max(keep.shape[1] - 1))
    return index, ok & (order < keep.shape[1]).repeat_interleave(BLOCK, dim=1)


SPLIT_EXTENT = 10.0  # metres: groups of points spread wider are searched per rollout


def _nearest_segments(
    points,
    mask,
    group_scene,
    table,
    per_scene,
    sq_distance,
    valid,
    start_bound: bool = False,
    per_rollout: int = 1,
    chunk: int = 128,
) -> torch.Tensor:
    """Global index of the nearest ``valid`` segment for every point ``[G, N]`` (ties go to
    the lowest index, as an argmin over the scenario's whole table would).

    A group's points are ``N = R * per_rollout`` (rollout-major). Groups whose rollouts
    spread wider than ``SPLIT_EXTENT`` are searched one rollout at a time, so that every
    search covers a small area and has few candidate segments.
    """
    xy = points[..., :2]
    inf = torch.full_like(xy, float("inf"))
    extent = (torch.where(mask[..., None], xy, -inf).amax(1) - torch.where(mask[..., None], xy, inf).amin(1)).amax(-1)
    spread = extent > SPLIT_EXTENT
    blocks = _blocks(table, per_scene, valid, start_bound)
    out = torch.zeros(points.shape[:2], dtype=torch.int64, device=points.device)
    jobs = [(~spread, 1), (spread, points.shape[1] // per_rollout)]
    for which, parts in jobs:
        groups = torch.nonzero(which).squeeze(-1)
        if groups.numel() == 0:
            continue
        p = points[groups].reshape(groups.numel() * parts, -1, points.shape[-1])
        m = mask[groups].reshape(groups.numel() * parts, -1)
        scene = group_scene[groups].repeat_interleave(parts)
        found = torch.empty(p.shape[:2], dtype=torch.int64, device=points.device)
        for g0 in range(0, p.shape[0], chunk):
            g = slice(g0, g0 + chunk)
            idx, ok = _candidates(p[g], m[g], scene[g], table, per_scene, sq_distance, valid, blocks)
            d = sq_distance(p[g], table, idx[:, None, :])
            d = d.masked_fill(~(ok & valid[idx])[:, None, :], BIG)
            found[g] = idx.gather(1, d.argmin(-1))
        out[groups] = found.reshape(groups.numel(), -1)
    return out


def distance_to_road_edge(
    xyzh: torch.Tensor, dims: torch.Tensor, valid: torch.Tensor, eval_index: torch.Tensor, batch: WosacBatch
) -> torch.Tensor:
    """Signed distance from each evaluated box to the road edge (positive = off the road),
    the largest over the bottom corners. ``xyzh`` ``[B, R, A, T, 4]``, ``dims``
    ``[B, A, T, 3]``, ``valid`` ``[B, R or 1, A, T]``, ``eval_index`` ``[B, E]``.
    Returns ``[B, R, E, T]`` (-1e10 where invalid)."""
    B, R, _, T, _ = xyzh.shape
    edges = batch.road_edges
    E = eval_index.shape[1]
    box = take(xyzh.transpose(1, 2), eval_index).transpose(1, 2)  # [B, R, E, T, 4]
    d = take(dims, eval_index)[:, None]  # [B, 1, E, T, 3]
    corners = box_corners(box[..., 0], box[..., 1], box[..., 3], d[..., 0], d[..., 1])
    z = (box[..., 2] - d[..., 2] / 2)[..., None, None].expand(*corners.shape[:-1], 1)
    corners = torch.cat([corners, z], dim=-1)  # [B, R, E, T, 4, 3]
    v = take(valid.expand(-1, R, -1, -1).transpose(1, 2), eval_index).transpose(1, 2)  # [B, R, E, T]
    # Groups: one object at one step, its 4 corners in every rollout.
    points = corners.permute(0, 2, 3, 1, 4, 5).reshape(B * E * T, R * 4, 3)
    mask = v.permute(0, 2, 3, 1)[..., None].expand(-1, -1, -1, -1, 4).reshape(B * E * T, R * 4)
    group_scene = torch.arange(B, device=xyzh.device).repeat_interleave(E * T)
    if not bool(edges.valid.reshape(B, -1).any(1).all()):
        missing = [batch.scenario_id[b] for b in range(B) if not bool(edges.valid.reshape(B, -1)[b].any())]
        raise ValueError(f"scenarios {missing} have no road edges: distance to road edge is undefined")
    seg = _nearest_segments(
        points, mask, group_scene, edges, batch.edges_per_scene, _stretched_sq_distance, edges.valid, per_rollout=4
    )[..., None]
    start, end = edges.start[seg], edges.end[seg]
    to_point = points[..., None, :] - start
    direction = end - start
    t = _projection(to_point, direction)
    n = torch.sign(to_point[..., 0] * direction[..., 1] - to_point[..., 1] * direction[..., 0])
    offset = to_point - direction * t.clamp(0.0, 1.0)[..., None]
    d2 = torch.sqrt(offset[..., 0] ** 2 + offset[..., 1] ** 2)
    n_prior = _winding_sign(points, edges, edges.prior[seg])
    n_next = _winding_sign(points, edges, edges.next[seg])
    before = torch.where(edges.convex_before[seg], torch.maximum(n, n_prior), torch.minimum(n, n_prior))
    after = torch.where(edges.convex_after[seg], torch.maximum(n, n_next), torch.minimum(n, n_next))
    sign = torch.where((t < 0) & edges.prior_valid[seg], before, torch.where((t > 1) & edges.next_valid[seg], after, n))
    per_corner = (sign * d2)[..., 0].reshape(B, E, T, R, 4).permute(0, 3, 1, 2, 4)
    distance = per_corner.amax(-1)
    return torch.where(v, distance, torch.full_like(distance, -BIG))


def red_light_violation(
    xyzh: torch.Tensor, valid: torch.Tensor, eval_index: torch.Tensor, batch: WosacBatch
) -> torch.Tensor:
    """Whether each evaluated object crosses a red light's stop point at each step.
    Shapes as in :func:`distance_to_road_edge`; returns ``[B, R, E, T]`` booleans over
    all T steps (the first step is never a crossing).

    A violation needs a crossing of the stop point on red *and* the object's nearest lane
    being the signal's lane; crossings on red are rare, so the nearest lane is searched
    only for the points where one happens.
    """
    B, R, _, T, _ = xyzh.shape
    E = eval_index.shape[1]
    lanes = batch.lanes
    none = torch.zeros((B, R, E, T), dtype=torch.bool, device=xyzh.device)
    if not bool((batch.signal_lane >= 0).any()) or not bool(lanes.valid.any()):
        return none
    xy = take(xyzh[..., :2].transpose(1, 2), eval_index).transpose(1, 2)  # [B, R, E, T, 2]
    v = take(valid.expand(-1, R, -1, -1).transpose(1, 2), eval_index).transpose(1, 2)

    # The stop point's segment on the signal's lane, per scenario, step and signal.
    polys = batch.lane_id.shape[0] // B
    ids = batch.lane_id.reshape(B, polys)
    match = (ids[:, None, :] == batch.signal_lane[:, :, None]) & (batch.signal_lane[:, :, None] >= 0)
    lane_ok = match.any(-1)  # [B, S]
    first_lane = match.to(torch.int64).argmax(-1)  # [B, S]
    per_lane = batch.segments_per_lane  # [B]
    j = torch.arange(int(per_lane.max()), device=xy.device)
    local = first_lane[..., None] * per_lane[:, None, None] + j  # [B, S, L]
    in_lane = j < per_lane[:, None, None]
    segs = torch.arange(B, device=xy.device)[:, None, None] * batch.lanes_per_scene + local
    segs = torch.where(in_lane, segs, torch.zeros_like(segs))
    stops = batch.signal_stop  # [B, T, S, 2]
    segs_t = segs[:, None].expand(-1, T, -1, -1)  # [B, T, S, L]
    d = _lane_match_sq_distance(stops[..., None, :], lanes, segs_t[..., None, :])[..., 0, :]
    d = d.masked_fill(~(lanes.start_valid[segs_t] & in_lane[:, None]), BIG)
    fence = segs_t.gather(-1, d.argmin(-1, keepdim=True))[..., 0]  # [B, T, S]
    s0, s1 = lanes.start[fence], lanes.end[fence]  # [B, T, S, 2]
    direction = s1 - s0
    stop_t = _projection(stops - s0, direction)  # [B, T, S]
    obj_t = _projection(xy[..., None, :] - s0[:, None, None], direction[:, None, None])  # [B, R, E, T, S]
    behind, ahead = obj_t < stop_t[:, None, None], obj_t > stop_t[:, None, None]
    crossed = torch.zeros_like(behind)
    crossed[:, :, :, 1:] = behind[:, :, :, :-1] & ahead[:, :, :, 1:]
    state = batch.signal_state
    is_red = (state == RED_STATES[0]) | (state == RED_STATES[1])  # [B, T, S]
    suspect = v[..., None] & is_red[:, None, None] & lane_ok[:, None, None, None] & crossed
    where = torch.nonzero(suspect.any(-1))  # [P, 4] (b, r, e, t)
    if where.shape[0] == 0:
        return none
    b, r, e, t = where.unbind(1)
    # The reference keeps a lane segment when its start point is real, so each lane's last
    # point also starts a "segment" towards the zero padding; its distance is never below
    # the distance to the start point, which bounds the search.
    nearest = _nearest_segments(
        xy[b, r, e, t][:, None],
        torch.ones_like(b, dtype=torch.bool)[:, None],
        b,
        lanes,
        batch.lanes_per_scene,
        _lane_match_sq_distance,
        lanes.start_valid,
        start_bound=True,
    )[:, 0]
    lane_id = batch.lane_id[lanes.owner[nearest]]  # [P]
    hit = (suspect[b, r, e, t] & (lane_id[:, None] == batch.signal_lane[b])).any(-1)
    none[b, r, e, t] = hit
    return none


def displacement(xyzh: torch.Tensor, log_xyzh: torch.Tensor, log_valid: torch.Tensor) -> torch.Tensor:
    """Per-object average 3D displacement from the log over the logged-valid steps of the
    whole scenario (history included, where the error is zero). ``[..., E]``."""
    error = torch.linalg.norm(xyzh[..., :3] - log_xyzh[..., :3], dim=-1)
    error = torch.where(log_valid, error, torch.zeros_like(error))
    return error.sum(-1) / log_valid.sum(-1).to(error.dtype)
