"""WOSAC metric features, batched over rollouts, objects and steps (torch, any device).

Each function follows the definition of the reference implementation
(``waymo_open_dataset/wdl_limited/sim_agents_metrics``), including its conventions:
central differences with NaN padding, rounded-box distances, raw (unwrapped) heading
differences in time-to-collision, road-edge signs from the polyline winding with a 3x
vertical stretch to pick the segment, and the reference's lane-matching distance for
traffic lights. Inputs are ``[R, A, T, ...]`` trajectories (R rollouts; R = 1 for the log).
"""

from __future__ import annotations

import math

import torch

from closedloop.geometry import box_corners, rectangle_distance
from closedloop.metrics.scene import PolylineTable, WosacScene

DT = 0.1
BIG = 1e10
CORNER_ROUNDING = 0.7
MAX_HEADING_DIFF = math.radians(75.0)
MAX_HEADING_DIFF_SMALL_OVERLAP = math.radians(10.0)
SMALL_OVERLAP = 0.5
MAX_TTC = 5.0
Z_STRETCH = 3.0
RED_STATES = (1, 4)  # LANE_STATE_ARROW_STOP, LANE_STATE_STOP (not flashing)


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


def distance_to_nearest_object(xyzh: torch.Tensor, dims: torch.Tensor, valid: torch.Tensor,
                               eval_index: torch.Tensor) -> torch.Tensor:
    """Signed distance from each evaluated object to the nearest other valid object,
    between boxes with rounded corners (radius 0.35 x the smaller side).

    ``xyzh`` ``[R, A, T, 4]``, ``dims`` ``[A, T, 3]``, ``valid`` ``[R or 1, A, T]``.
    Returns ``[R, E, T]`` (1e10 when no other object is valid).
    """
    R, A, T, _ = xyzh.shape
    length, width = dims[..., 0][None], dims[..., 1][None]
    shrink = torch.minimum(length, width) * CORNER_ROUNDING / 2
    box = (xyzh[..., 0], xyzh[..., 1], xyzh[..., 3],
           (length - 2 * shrink).expand(R, -1, -1), (width - 2 * shrink).expand(R, -1, -1))
    mine = tuple(c[:, eval_index, None] for c in box)  # [R, E, 1, T]
    others = tuple(c[:, None] for c in box)  # [R, 1, A, T]
    d = rectangle_distance(mine, others) - shrink[:, eval_index, None] - shrink[:, None]
    v = valid.expand(R, -1, -1)
    usable = v[:, eval_index, None] & v[:, None]
    usable &= (eval_index[:, None] != torch.arange(A, device=xyzh.device))[None, :, :, None]
    return torch.where(usable, d, torch.full_like(d, BIG)).amin(2)


def time_to_collision(xyzh: torch.Tensor, dims: torch.Tensor, valid: torch.Tensor,
                      eval_index: torch.Tensor) -> torch.Tensor:
    """Seconds until each evaluated object reaches the object it follows at constant
    speeds, capped at 5 s. Returns ``[R, E, T]``."""
    planar = torch.cat([xyzh[..., :2], torch.zeros_like(xyzh[..., :1]), xyzh[..., 3:]], -1)
    speed = kinematics(planar)[0]  # [R, A, T]
    x, y, yaw = xyzh[..., 0], xyzh[..., 1], xyzh[..., 3]
    length, width = dims[..., 0][None], dims[..., 1][None]
    ex, ey, eyaw = x[:, eval_index, None], y[:, eval_index, None], yaw[:, eval_index, None]
    el, ew = length[:, eval_index, None], width[:, eval_index, None]
    yaw_diff = torch.abs(yaw[:, None] - eyaw)  # [R, E, A, T]
    cos_d, sin_d = torch.abs(torch.cos(yaw_diff)), torch.abs(torch.sin(yaw_diff))
    other_long = length[:, None] / 2 * cos_d + width[:, None] / 2 * sin_d
    other_lat = length[:, None] / 2 * sin_d + width[:, None] / 2 * cos_d
    dx, dy = x[:, None] - ex, y[:, None] - ey
    cos_e, sin_e = torch.cos(-eyaw), torch.sin(-eyaw)
    rel_x = dx * cos_e - dy * sin_e
    rel_y = dx * sin_e + dy * cos_e
    long_distance = rel_x - el / 2 - other_long
    lat_overlap = torch.abs(rel_y) - ew / 2 - other_lat
    following = (long_distance > 0) & (yaw_diff <= MAX_HEADING_DIFF) & (lat_overlap < 0) & (
        (lat_overlap < -SMALL_OVERLAP) | (yaw_diff <= MAX_HEADING_DIFF_SMALL_OVERLAP))
    usable = valid[:, None] & following
    masked = long_distance + (~usable).to(long_distance.dtype) * BIG
    ahead = masked.argmin(dim=2, keepdim=True)
    distance = masked.gather(2, ahead)[:, :, 0]
    ahead_speed = speed[:, None].expand_as(masked).gather(2, ahead)[:, :, 0]
    rel_speed = speed[:, eval_index] - ahead_speed
    ttc = torch.minimum(distance / rel_speed, torch.full_like(distance, MAX_TTC))
    return torch.where(rel_speed > 0, ttc, torch.full_like(ttc, MAX_TTC))


def _segment_terms(points: torch.Tensor, table: PolylineTable, index: torch.Tensor):
    """For points ``[..., 3]`` against segments ``index`` ``[..., K]``: the 2D projection
    parameter, the winding sign, and the 3D (z-stretched) and 2D distances."""
    start, end = table.start[index], table.end[index]
    to_point = points[..., None, :] - start
    seg = end - start
    t = (to_point[..., :2] * seg[..., :2]).sum(-1)
    norm2 = (seg[..., :2] * seg[..., :2]).sum(-1)
    t = torch.where(norm2 > 0, t / torch.where(norm2 > 0, norm2, torch.ones_like(norm2)), torch.zeros_like(t))
    sign = torch.sign(to_point[..., 0] * seg[..., 1] - to_point[..., 1] * seg[..., 0])
    offset = to_point - seg * t.clamp(0.0, 1.0)[..., None]
    stretch = torch.tensor([1.0, 1.0, Z_STRETCH], dtype=points.dtype, device=points.device)
    return t, sign, torch.linalg.norm(offset * stretch, dim=-1), torch.linalg.norm(offset[..., :2], dim=-1)


def _stretched_sq_distance(points: torch.Tensor, table: PolylineTable, index: torch.Tensor) -> torch.Tensor:
    """Squared distance to segments with z stretched 3x (the reference's segment choice)."""
    start, end = table.start[index], table.end[index]
    to_point = points[..., None, :] - start
    seg = end - start
    norm2 = seg[..., 0] * seg[..., 0] + seg[..., 1] * seg[..., 1]
    t = (to_point[..., 0] * seg[..., 0] + to_point[..., 1] * seg[..., 1])
    t = torch.where(norm2 > 0, t / torch.where(norm2 > 0, norm2, torch.ones_like(norm2)), torch.zeros_like(t))
    offset = to_point - seg * t.clamp(0.0, 1.0)[..., None]
    return offset[..., 0] ** 2 + offset[..., 1] ** 2 + (Z_STRETCH * offset[..., 2]) ** 2


def _winding_sign(points: torch.Tensor, table: PolylineTable, index: torch.Tensor) -> torch.Tensor:
    start, end = table.start[index], table.end[index]
    to_point = points[..., None, :2] - start[..., :2]
    seg = end[..., :2] - start[..., :2]
    return torch.sign(to_point[..., 0] * seg[..., 1] - to_point[..., 1] * seg[..., 0])


def _aabb_gap(lo: torch.Tensor, hi: torch.Tensor, seg_lo: torch.Tensor, seg_hi: torch.Tensor) -> torch.Tensor:
    """2D distance between boxes ``[G, 2]`` and segment boxes ``[S, 2]`` -> ``[G, S]``."""
    gap = torch.maximum(seg_lo[None] - hi[:, None], lo[:, None] - seg_hi[None]).clamp_min(0)
    return torch.linalg.norm(gap, dim=-1)


def _candidates(points: torch.Tensor, mask: torch.Tensor, table: PolylineTable,
                exact_fn, lower_bound_pad: torch.Tensor | None = None, initial: int = 32):
    """Segment candidates per group of points that provably contain each point's nearest
    valid segment: those whose box lies within the worst best-distance of a first guess.

    ``points`` ``[G, N, D]`` with ``mask`` ``[G, N]``; ``exact_fn(points, index)`` gives the
    squared distance used for the argmin, whose root is bounded below by the 2D box gap (minus
    ``lower_bound_pad`` per segment). Returns ``index`` ``[G, K]`` (ascending) and its
    validity ``[G, K]``.
    """
    valid_segments = torch.nonzero(table.valid).squeeze(-1)
    xy = points[..., :2]
    big = torch.full_like(xy, float("inf"))
    lo = torch.where(mask[..., None], xy, big).amin(1)
    hi = torch.where(mask[..., None], xy, -big).amax(1)
    empty = ~mask.any(1)
    lo = torch.where(empty[:, None], torch.zeros_like(lo), lo)
    hi = torch.where(empty[:, None], torch.zeros_like(hi), hi)
    s0, s1 = table.start[valid_segments, :2], table.end[valid_segments, :2]
    bound = _aabb_gap(lo, hi, torch.minimum(s0, s1), torch.maximum(s0, s1))
    if lower_bound_pad is not None:
        bound = bound - lower_bound_pad[valid_segments][None]
    first = bound.topk(min(initial, bound.shape[1]), dim=1, largest=False).indices
    guess = exact_fn(points, valid_segments[first][:, None, :])
    worst = torch.where(mask, guess.min(-1).values, torch.zeros_like(guess[..., 0])).amax(1).sqrt()
    keep = bound <= worst[:, None] + 1e-4
    count = int(keep.sum(1).max())
    order = torch.sort(torch.where(keep, torch.arange(keep.shape[1], device=keep.device)[None],
                                   torch.full_like(keep, keep.shape[1], dtype=torch.int64)), dim=1).values
    order = order[:, :count]
    ok = order < keep.shape[1]
    index = valid_segments[order.clamp_max(keep.shape[1] - 1)]
    return index, ok


STEPS_PER_GROUP = 1


def _group_steps(x: torch.Tensor) -> torch.Tensor:
    """``[E, T, N, ...]`` -> ``[E * ceil(T / k), k * N, ...]`` (steps padded by repetition)."""
    E, T = x.shape[:2]
    k = STEPS_PER_GROUP
    pad = (-T) % k
    if pad:
        x = torch.cat([x, x[:, -1:].expand(-1, pad, *x.shape[2:])], dim=1)
    return x.reshape(E * ((T + pad) // k), k * x.shape[2], *x.shape[3:])


def _ungroup_steps(x: torch.Tensor, E: int, T: int) -> torch.Tensor:
    """Inverse of :func:`_group_steps` for per-point results ``[G, k * N]`` -> ``[E, T, N]``."""
    k = STEPS_PER_GROUP
    steps = -(-T // k) * k
    return x.reshape(E, steps, -1)[:, :T]


def _nearest_segments(points: torch.Tensor, mask: torch.Tensor, table: PolylineTable,
                      distance_fn, lower_bound_pad: torch.Tensor | None = None,
                      chunk: int = 256) -> torch.Tensor:
    """Index of the nearest valid segment (by ``distance_fn``) for every point ``[G, N]``.

    ``points`` ``[G, N, D]`` are grouped (one object at one step, all rollouts), so each
    group's candidate segments are few; ties go to the lowest index, as ``argmin`` over
    the full table would. Masked points get an arbitrary (but valid) index.
    """
    index, ok = _candidates(points, mask, table, distance_fn, lower_bound_pad)
    out = torch.empty(points.shape[:2], dtype=torch.int64, device=points.device)
    for g0 in range(0, points.shape[0], chunk):
        idx = index[g0:g0 + chunk]
        d = distance_fn(points[g0:g0 + chunk], idx[:, None, :])  # segments broadcast over points
        d = d.masked_fill(~ok[g0:g0 + chunk, None, :], BIG)
        out[g0:g0 + chunk] = idx.gather(1, d.argmin(-1))
    return out


def distance_to_road_edge(xyzh: torch.Tensor, dims: torch.Tensor, valid: torch.Tensor,
                          eval_index: torch.Tensor, edges: PolylineTable) -> torch.Tensor:
    """Signed distance from each evaluated box to the road edge (positive = off the road),
    the largest over the bottom corners. Returns ``[R, E, T]`` (-1e10 where invalid)."""
    R, _, T, _ = xyzh.shape
    if not bool(edges.valid.any()):
        raise ValueError("the scenario has no road edges: distance to road edge is undefined")
    box = xyzh[:, eval_index]
    d = dims[eval_index].expand(R, -1, -1, -1)
    corners = box_corners(box[..., 0], box[..., 1], box[..., 3], d[..., 0], d[..., 1])
    z = (box[..., 2] - d[..., 2] / 2)[..., None, None].expand(*corners.shape[:-1], 1)
    corners = torch.cat([corners, z], dim=-1)  # [R, E, T, 4, 3]
    v = (valid if valid.shape[0] == R else valid.expand(R, -1, -1))[:, eval_index]
    E = corners.shape[1]
    # Groups: one object over STEPS_PER_GROUP steps, its 4 corners in every rollout.
    points = _group_steps(corners.permute(1, 2, 0, 3, 4).reshape(E, T, R * 4, 3))
    mask = _group_steps(v.permute(1, 2, 0)[..., None].expand(-1, -1, -1, 4).reshape(E, T, R * 4))

    def distance_3d(p, index):
        return _stretched_sq_distance(p, edges, index).masked_fill(~edges.valid[index], BIG)

    seg = _nearest_segments(points, mask, edges, distance_3d)[..., None]  # [G, N, 1]
    t, n, _, d2 = _segment_terms(points, edges, seg)
    n_prior = _winding_sign(points, edges, edges.prior[seg])
    n_next = _winding_sign(points, edges, edges.next[seg])
    before = torch.where(edges.convex_before[seg], torch.maximum(n, n_prior), torch.minimum(n, n_prior))
    after = torch.where(edges.convex_after[seg], torch.maximum(n, n_next), torch.minimum(n, n_next))
    sign = torch.where((t < 0) & edges.prior_valid[seg], before,
                       torch.where((t > 1) & edges.next_valid[seg], after, n))
    per_corner = _ungroup_steps((sign * d2)[..., 0], E, T).reshape(E, T, R, 4).permute(2, 0, 1, 3)
    distance = per_corner.amax(-1)
    return torch.where(v, distance, torch.full_like(distance, -BIG))


def _lane_match_sq_distance(points: torch.Tensor, table: PolylineTable, index: torch.Tensor) -> torch.Tensor:
    """The reference's squared lane-matching distance |(p - s) + (e - s) t|^2 (sic: a plus
    sign, so it is not the distance to the segment)."""
    start, end = table.start[index], table.end[index]
    to_point = points[..., None, :] - start
    seg = end - start
    norm2 = (seg * seg).sum(-1)
    t = (to_point * seg).sum(-1)
    t = torch.where(norm2 > 0, t / torch.where(norm2 > 0, norm2, torch.ones_like(norm2)), torch.zeros_like(t))
    offset = to_point + seg * t.clamp(0.0, 1.0)[..., None]
    return offset[..., 0] ** 2 + offset[..., 1] ** 2


def red_light_violation(xyzh: torch.Tensor, valid: torch.Tensor, eval_index: torch.Tensor,
                        scene: WosacScene) -> torch.Tensor:
    """Whether each evaluated object crosses a red light's stop point at each step.
    Returns ``[R, E, T]`` over all T steps (the first step is never a crossing)."""
    R, _, T, _ = xyzh.shape
    E = eval_index.shape[0]
    lanes = scene.lanes
    if scene.signal_lane.numel() == 0 or not bool(lanes.valid.any()):
        return torch.zeros((R, E, T), dtype=torch.bool, device=xyzh.device)
    xy = xyzh[:, eval_index, :, :2]  # [R, E, T, 2]
    v = (valid if valid.shape[0] == R else valid.expand(R, -1, -1))[:, eval_index]
    points = _group_steps(xy.permute(1, 2, 0, 3))
    mask = _group_steps(v.permute(1, 2, 0))
    seg_len = torch.linalg.norm(lanes.end - lanes.start, dim=-1)

    def distance(p, index):
        return _lane_match_sq_distance(p, lanes, index).masked_fill(~lanes.valid[index], BIG)

    nearest = _nearest_segments(points, mask, lanes, distance, lower_bound_pad=seg_len)
    nearest_lane = lanes.owner[_ungroup_steps(nearest, E, T)].reshape(E, T, R).permute(2, 0, 1)
    lane_id = scene.lane_id[nearest_lane]  # [R, E, T]

    # The stop point's segment on the signal's lane, per step and signal.
    match = scene.lane_id[None, :] == scene.signal_lane[:, None]  # [S, lanes]
    lane_ok = match.any(1)
    signal_lane_index = match.to(torch.int64).argmax(1)
    segs_per_lane = lanes.start.shape[0] // max(scene.lane_id.shape[0], 1)
    seg_index = signal_lane_index[:, None] * segs_per_lane + torch.arange(segs_per_lane, device=xy.device)
    stops = scene.signal_stop  # [91, S, 2]
    all_segs = seg_index.repeat(stops.shape[0], 1)  # [T * S, segments], step-major
    d = _lane_match_sq_distance(stops.reshape(-1, 2), lanes, all_segs)
    d = d.masked_fill(~lanes.valid[all_segs], BIG)
    fence = all_segs.gather(-1, d.argmin(-1, keepdim=True))[:, 0]
    fence = fence.reshape(stops.shape[0], -1)  # [T, S]
    s0, s1 = lanes.start[fence], lanes.end[fence]  # [T, S, 2]
    direction = s1 - s0
    len2 = (direction * direction).sum(-1)
    safe = torch.where(len2 > 0, len2, torch.ones_like(len2))
    stop_t = torch.where(len2 > 0, ((stops - s0) * direction).sum(-1) / safe, torch.zeros_like(len2))
    obj_t = ((xy[..., None, :] - s0) * direction).sum(-1)  # [R, E, T, S]
    obj_t = torch.where(len2 > 0, obj_t / safe, torch.zeros_like(obj_t))
    behind, ahead = obj_t < stop_t, obj_t > stop_t
    crossed = torch.zeros_like(behind)
    crossed[:, :, 1:] = behind[:, :, :-1] & ahead[:, :, 1:]
    is_red = (scene.signal_state == RED_STATES[0]) | (scene.signal_state == RED_STATES[1])  # [T, S]
    on_lane = lane_id[..., None] == scene.signal_lane
    return (v[..., None] & on_lane & is_red & lane_ok & crossed).any(-1)


def displacement(xyzh: torch.Tensor, log_xyzh: torch.Tensor, log_valid: torch.Tensor) -> torch.Tensor:
    """Per-object average 3D displacement from the log over the logged-valid steps of the
    whole scenario (history included, where the error is zero). ``[R, E]``."""
    error = torch.linalg.norm(xyzh[..., :3] - log_xyzh[..., :3], dim=-1)
    error = torch.where(log_valid, error, torch.zeros_like(error))
    return error.sum(-1) / log_valid.sum(-1).to(error.dtype)
