"""Per-step events: collision, off-road, red-light violation, distance to the log."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from closedloop.constants import light_forbids_crossing
from closedloop.data.batch import ScenarioBatch, stacked_instance
from closedloop.envs.compiled import kernel
from closedloop.envs.core import SimState, agent_slots, collisions, distance_to_log, take_agents
from closedloop.envs.map_index import FAR, RoadEdges
from closedloop.geometry import box_corners

STOP_LINE_HALF_WIDTH = 1.75  # a lane
SIBLING_RADIUS = 0.5  # stop points nearer than this are one stop line
FOLLOW_DISTANCE = 1.0  # an agent this near a lane, and FOLLOW_MARGIN nearer than to its
FOLLOW_MARGIN = 1.0  # siblings, is following it
LEFT_LANES_DISTANCE = 5.0  # an agent this far from all the lanes of a stop line has left them


def agent_corners(state: SimState, t: int | None = None) -> torch.Tensor:
    t = state.t if t is None else t
    p = state.pose[:, :, t]
    return box_corners(p[..., 0], p[..., 1], p[..., 2], state.dims[..., 0], state.dims[..., 1])


class StopLines:
    """Each traffic-light lane's stop line: the stop point and the lane's direction there.

    Lanes leaving one stop line (a through lane and a left-turn lane, say) often have
    lights of their own, and the left arrow can be red while the through light is green.
    Such lights are *siblings*; each light's lane is kept as points so that a tracker can
    tell later which of the siblings an agent went on to follow.
    """

    def __init__(self, b: ScenarioBatch | SimState):
        """The stop lines of the scenarios of a batch (or of a state's batch)."""
        b = b.batch if isinstance(b, SimState) else b
        order = lane_point_indices(b.road_id, b.road_mask, b.light_lane_id)  # [B, L, M]
        P = b.road_id.shape[1]
        on_lane = order < P
        B, L, M = order.shape
        index = order.clamp_max(P - 1).flatten(1)[..., None]
        lane_xy = b.road_xyz[..., :2].gather(1, index.expand(-1, -1, 2)).view(B, L, M, 2)
        d = torch.linalg.norm(lane_xy - b.light_stop_point[:, :, None, :2], dim=-1).masked_fill(~on_lane, float("inf"))
        nearest = order.gather(-1, d.argmin(-1, keepdim=True))[..., 0].clamp_max(P - 1)  # [B, L]
        direction = torch.gather(b.road_dir[..., :2], 1, nearest[..., None].expand(-1, -1, 2))
        norm = torch.linalg.norm(direction, dim=-1, keepdim=True)
        self.direction = direction / norm.clamp_min(1e-6)
        self.point = b.light_stop_point[..., :2]
        self.valid = b.light_mask & on_lane.any(-1) & (norm[..., 0] > 1e-6)
        self.stop = light_forbids_crossing(b.light_state) & self.valid[..., None]  # [B, L, T] lights saying stop
        pair = (
            self.valid[:, :, None] & self.valid[:, None, :] & ~torch.eye(L, dtype=torch.bool, device=self.valid.device)
        )
        # Exact distances (cdist's matrix-product method, which it takes past 25 lights, is
        # off by centimetres, and a scenario's siblings must not depend on its batch).
        gap = torch.linalg.norm(self.point[:, :, None] - self.point[:, None], dim=-1)
        self.siblings = pair & (gap < SIBLING_RADIUS)  # [B, L, L]
        # Whether a sibling of each light may go at each step [B, L, T] (once, not per step):
        # a count of siblings not saying stop, by a product (no [B, L, L, T] table).
        self.sibling_may_go = torch.bmm(self.siblings.float(), (~self.stop).float()) > 0
        self.lane_points = lane_xy.masked_fill(~on_lane[..., None], FAR)  # each light's lane, padding far away
        self._derive()

    @classmethod
    def stack(cls, parts: Sequence[StopLines]) -> StopLines:
        """The stop lines of the scenarios of ``parts`` stacked in order (each built on its
        own scenario): what a batch of those scenarios gives, padded lights invalid."""
        padding = {"direction": 0.0, "point": 0.0, "lane_points": FAR}
        padding |= dict.fromkeys(("valid", "stop", "siblings", "sibling_may_go"), False)
        lines = stacked_instance(cls, parts, padding)
        lines._derive()
        return lines

    def _derive(self) -> None:
        """What the per-step tests read: whether any light says stop at each step (one
        synchronisation here instead of one per step), and the axes of every stop line."""
        self.any_stop = self.stop.any(1).any(0).tolist()  # [T]
        # Along-lane and lateral coordinates relative to each stop line are one product:
        # position @ axes - offsets, with axes [B, 2, 2L] (lane directions, then normals).
        direction = self.direction
        normal = torch.stack([-direction[..., 1], direction[..., 0]], -1)
        axes = torch.cat([direction, normal], dim=1)  # [B, 2L, 2]
        self.axes = axes.transpose(1, 2).contiguous()
        self.offsets = (torch.cat([self.point] * 2, dim=1) * axes).sum(-1)[:, None]  # [B, 1, 2L]

    def red(self, t: int) -> torch.Tensor:
        """Lights ``[B, L]`` that say stop at step ``t``."""
        return self.stop[:, :, t]

    def lane_distance(self, rows: torch.Tensor, positions: torch.Tensor, lights: torch.Tensor) -> torch.Tensor:
        """Distance ``[M, L]`` from M agents at ``positions`` ``[M, 2]`` in scenarios
        ``rows`` to the lanes of ``lights`` ``[M, L]`` (inf for the other lights)."""
        agent, light = torch.nonzero(lights, as_tuple=True)
        lane = self.lane_points[rows[agent], light]  # [Q, points, 2]
        distance = torch.full(lights.shape, float("inf"), device=positions.device)
        distance[agent, light] = torch.linalg.norm(lane - positions[agent, None], dim=-1).amin(-1)
        return distance


def lane_point_indices(road_id: torch.Tensor, road_mask: torch.Tensor, lane_id: torch.Tensor) -> torch.Tensor:
    """The roadgraph points ``[B, L, M]`` of each lane ``lane_id`` ``[B, L]`` among the
    points ``road_id`` / ``road_mask`` ``[B, P]``, in increasing index order, padded with
    ``P`` to the longest lane. One sort of each scenario's point ids and a binary search per
    lane: a dense ``[B, L, P]`` comparison cost most of an env reset at B = 16."""
    P = road_id.shape[1]
    never = torch.iinfo(torch.long).min  # masked points match no lane
    ids = torch.where(road_mask, road_id.long(), never)
    sorted_ids, perm = ids.sort(dim=-1, stable=True)
    lanes = lane_id.long().contiguous()
    first = torch.searchsorted(sorted_ids, lanes, side="left")
    count = torch.searchsorted(sorted_ids, lanes, side="right") - first
    M = max(int(count.max()), 1) if count.numel() else 1
    step = torch.arange(M, device=road_id.device)
    position = (first[..., None] + step).clamp_max(P - 1)  # [B, L, M]
    points = perm.gather(1, position.flatten(1)).view(*position.shape)
    return torch.where(step < count[..., None], points, P)


def scatter_agents(flags: torch.Tensor, slots: torch.Tensor, num_agents: int) -> torch.Tensor:
    """Per-slot booleans ``[B, Q, ...]`` back to ``[B, N, ...]`` (False elsewhere; a slot
    listed twice is True if either entry is)."""
    B, Q, *rest = flags.shape
    out = torch.zeros(B, num_agents, *rest, dtype=torch.uint8, device=flags.device)
    index = slots.view(B, Q, *([1] * len(rest))).expand_as(flags)
    return out.scatter_reduce_(1, index, flags.to(torch.uint8), reduce="amax").bool()


class EventTracker:
    """Computes the per-step events of a rollout, keeping its roadgraph neighbourhoods.

    A red-light violation is crossing a stop line whose light says stop, on the lane that
    light controls. Where all lights at that stop line say stop it is reported at the
    crossing step. Where a sibling lane may go (a green through light beside a red left
    arrow), the crossing stays pending until the agent is clearly on one of the lanes
    (within ``FOLLOW_DISTANCE`` of it and ``FOLLOW_MARGIN`` nearer than to its siblings):
    it is reported then if that lane's light was red at the crossing, and dropped if the
    agent follows a lane that could go or leaves them all.
    """

    def __init__(
        self,
        state: SimState,
        agents: torch.Tensor | None = None,
        edges: RoadEdges | None = None,
        stop_lines: StopLines | None = None,
    ):
        """``agents``: a ``[B, N]`` mask of the agents whose events are wanted (the others
        report none), or None for every agent. An ego env wants one agent of ~100: its
        collisions are then tested against the others (N pairs, not N^2 / 2), and only its
        box is measured against the road edges. ``edges`` and ``stop_lines``: the batch's
        indexes where the caller has them (built here otherwise); the tracker keeps its
        neighbourhoods in ``edges``."""
        self.edges = RoadEdges(state.batch) if edges is None else edges
        self.stop_lines = StopLines(state.batch) if stop_lines is None else stop_lines
        B, N = state.controlled.shape
        self.slots = self.slot_ok = None
        if agents is not None and not bool(agents.all()):
            self.slots, self.slot_ok = agent_slots(agents)
        Q = N if self.slots is None else self.slots.shape[1]
        self.pending = torch.zeros(B, Q, self.stop_lines.valid.shape[1], dtype=torch.bool, device=state.pose.device)
        self._maybe_pending = False  # False: no crossing pending (known without a synchronisation)
        self._t: int | None = None
        self._dims_of: torch.Tensor | None = None  # the dims tensor _slot_dims was taken from
        self._slot_dims: torch.Tensor | None = None

    def __call__(self, previous: SimState, state: SimState) -> dict[str, torch.Tensor]:
        """Events ``[B, N]`` at ``state.t`` (after a step from ``previous``)."""
        if previous.t != self._t and self._maybe_pending:  # a new rollout: forget pending crossings
            self.pending.zero_()
            self._maybe_pending = False
        self._t = state.t
        valid = state.valid[:, :, state.t] & state.batch.agent_mask
        slots = self.slots
        if slots is None:
            path = state.pose[:, :, previous.t :, :2]  # [B, N, k + 1, 2]
            pose, dims, present = state.current, state.dims, valid
            collision = collisions(state)
        else:  # the asked agents' poses over the step, in one gather
            path = take_agents(state.pose[:, :, previous.t :], slots)  # [B, Q, k + 1, 5]
            if self._dims_of is not state.dims:
                self._dims_of, self._slot_dims = state.dims, take_agents(state.dims, slots)
            pose, dims, present = path[:, :, -1], self._slot_dims, valid.gather(1, slots) & self.slot_ok
            collision = collisions(state, agents=slots)
        heading = pose[..., 2]
        offroad = (
            self.edges.box_signed_distance(
                pose[..., 0], pose[..., 1], torch.cos(heading), torch.sin(heading), dims[..., 0], dims[..., 1], present
            )
            > 0
        )
        red = torch.zeros_like(offroad)
        for i, t in enumerate(range(previous.t + 1, state.t + 1)):  # every step a chunked action covered
            red |= self._red_light(path[:, :, i, :2], path[:, :, i + 1, :2], t)
        if slots is not None:  # back to [B, N]: False for the agents not asked about
            flags = torch.stack([collision, offroad, red], -1) & self.slot_ok[..., None]
            collision, offroad, red = scatter_agents(flags, slots, valid.shape[1]).unbind(-1)
        return {
            "collision": collision & valid,
            "offroad": offroad & valid,
            "red_light": red & valid,
            "distance_to_log": distance_to_log(state),
        }

    def _red_light(self, before: torch.Tensor, after: torch.Tensor, t: int) -> torch.Tensor:
        lines = self.stop_lines
        if lines.any_stop[t]:
            violation, self.pending, waiting = _red_crossings(
                lines.offsets,
                lines.axes,
                lines.valid,
                lines.red(t),
                lines.sibling_may_go[:, :, t],
                before,
                after,
                self.pending,
            )
            self._maybe_pending = bool(waiting)
        else:
            violation = torch.zeros(before.shape[:2], dtype=torch.bool, device=before.device)
        if not self._maybe_pending:
            return violation
        b, n = torch.nonzero(self.pending.any(-1), as_tuple=True)
        self._maybe_pending = bool(b.numel())
        if b.numel():
            pending = self.pending[b, n]  # [M, L]
            siblings = lines.siblings[b]  # [M, L, L]
            group = pending | (siblings & pending[:, :, None]).any(1)  # pending lights and their siblings
            d = lines.lane_distance(b, after[b, n], group)  # [M, L]
            nearest_sibling = torch.where(siblings, d[:, None, :], float("inf")).amin(-1)
            follows = (d < FOLLOW_DISTANCE) & (d + FOLLOW_MARGIN < nearest_sibling)
            follows_sibling = (siblings & follows[:, None, :]).any(-1)
            left_them = torch.minimum(d, nearest_sibling) > LEFT_LANES_DISTANCE
            violation[b, n] |= (pending & follows).any(-1)
            self.pending[b, n] = pending & ~(follows | follows_sibling | left_them)
        return violation


def _crossings(
    offsets: torch.Tensor, axes: torch.Tensor, valid: torch.Tensor, before: torch.Tensor, after: torch.Tensor
) -> torch.Tensor:
    """Whether each agent's centre went from behind to past each stop line between
    positions ``before`` and ``after`` ``[B, N, 2]``: ``[B, N, L]``. Each position's
    along-lane and lateral coordinates relative to every stop line are
    ``x * axes_x + y * axes_y - offsets``."""
    L = valid.shape[1]
    ax, ay = axes[:, None, 0], axes[:, None, 1]  # [B, 1, 2L]
    rel0 = before[..., 0:1] * ax + before[..., 1:2] * ay - offsets  # [B, N, 2L]
    rel1 = after[..., 0:1] * ax + after[..., 1:2] * ay - offsets
    lateral = (rel0[..., L:] + rel1[..., L:]).abs() < 2 * STOP_LINE_HALF_WIDTH
    return (rel0[..., :L] < 0) & (rel1[..., :L] >= 0) & lateral & valid[:, None]


@kernel
def _red_crossings(
    offsets: torch.Tensor,
    axes: torch.Tensor,
    valid: torch.Tensor,
    red: torch.Tensor,
    sibling_may_go: torch.Tensor,
    before: torch.Tensor,
    after: torch.Tensor,
    pending: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The crossings of red lights' stop lines between ``before`` and ``after``
    ``[B, N, 2]`` (lights ``red`` ``[B, L]`` saying stop): violations now ``[B, N]`` (no
    sibling light may go: ``sibling_may_go`` ``[B, L]``), the ``pending`` crossings
    ``[B, N, L]`` with those where one may, and whether any is pending (one
    synchronisation for the caller)."""
    on_red = _crossings(offsets, axes, valid, before, after) & red[:, None]
    may_go = sibling_may_go[:, None]
    pending = pending | (on_red & may_go)
    return (on_red & ~may_go).any(-1), pending, pending.any()
