"""The batched simulator core: ``reset(batch)`` and ``step(state, actions, dynamics)``.

B scenarios x N agents, any device, no Python loop over agents or scenarios. A state keeps
the history of its rollout up to its current step ``t`` (logged up to the current time
index, simulated after it), so any feature can be computed afterwards. Controlled agents
move by the dynamics model; the others follow the log (agents that appear after the
current step are injected from the log when it makes them valid). Positions are in the
batch's frame (relative to ``batch.origin``); :func:`global_trajectories` converts back.

**History.** A state exposes steps ``0..t`` only (``state.pose`` is ``[B, N, t + 1, 5]``):
what a rollout does after a state can never show through it, so replay buffers may keep
states. Stepping the newest state of a rollout writes the new steps into a buffer it
shares with the states before it (no copy of the history per step); stepping an older
state again (branching) copies first. ``state.snapshot()`` gives a compact, independent
copy. ``reset(..., differentiable=True)`` never writes in place, so gradients flow
through any number of steps into the actions (the price: one history copy per step).

**Actions.** ``actions [B, N, *spec.shape]``: only the controlled agents' actions are
read; the others (padding slots included) are ignored and may hold anything. Continuous
actions outside the dynamics' bounds are clipped (angles wrapped) and counted;
NaN/inf, out-of-range discrete actions, wrong dtypes and shapes raise
:class:`SimulationError` naming the scenario id and WOMD track id.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch

from closedloop.data.batch import ScenarioBatch
from closedloop.envs.compiled import kernel
from closedloop.envs.dynamics import Dynamics
from closedloop.envs.errors import SimulationError
from closedloop.geometry import box_separation

Controlled = Literal["wosac", "sdc", "all_valid"] | torch.Tensor


@dataclass(eq=False)
class History:
    """The buffers a chain of states shares: poses and heights ``[B, N, T, ...]`` (steps
    after the head hold the log), validity, and the step the buffers are written up to.

    Only the state at ``head`` may write new steps in place (unless ``differentiable``,
    where every step makes new tensors); stepping any other state copies first.
    """

    pose: torch.Tensor  # [B, N, T, 5] x, y, heading, vx, vy
    z: torch.Tensor  # [B, N, T]
    valid: torch.Tensor  # [B, N, T] (never written after reset)
    head: int
    differentiable: bool = False


@dataclass(frozen=True)
class SimState:
    """One moment of B simulated scenarios: its history is steps ``0..t``."""

    batch: ScenarioBatch
    t: int  # the current step index
    controlled: torch.Tensor  # [B, N] agents moved by the dynamics
    dims: torch.Tensor  # [B, N, 3] length, width, height of each agent's box
    history: History = dataclasses.field(repr=False)

    @property
    def pose(self) -> torch.Tensor:
        """States ``[B, N, t + 1, 5]``: x, y, heading, vx, vy at steps ``0..t``."""
        return self.history.pose[:, :, : self.t + 1]

    @property
    def z(self) -> torch.Tensor:
        """Ground heights ``[B, N, t + 1]``."""
        return self.history.z[:, :, : self.t + 1]

    @property
    def valid(self) -> torch.Tensor:
        """Which agents exist ``[B, N, t + 1]`` (controlled agents stay valid from the
        current time index on)."""
        return self.history.valid[:, :, : self.t + 1]

    @property
    def num_steps(self) -> int:
        """Steps in a whole episode (91 for WOMD)."""
        return self.history.pose.shape[2]

    @property
    def done(self) -> bool:
        return self.t >= self.num_steps - 1

    @property
    def device(self) -> torch.device:
        return self.history.pose.device

    @property
    def current(self) -> torch.Tensor:
        """States ``[B, N, 5]`` at the current step."""
        return self.history.pose[:, :, self.t]

    @property
    def valid_now(self) -> torch.Tensor:
        """Real agents that exist at the current step ``[B, N]``."""
        return self.history.valid[:, :, self.t] & self.batch.agent_mask

    def log_states(self, start: int, stop: int) -> torch.Tensor:
        """Logged states ``[B, N, stop - start, 5]`` (ground truth, for guidance and experts)."""
        b = self.batch
        return torch.cat(
            [
                b.agent_xyz[:, :, start:stop, :2],
                b.agent_heading[:, :, start:stop, None],
                b.agent_velocity[:, :, start:stop],
            ],
            dim=-1,
        )

    def snapshot(self) -> SimState:
        """An independent copy (detached from autograd) whose buffers hold this state's
        steps ``0..t`` and the log after them, nothing of the rollout's later steps: for
        consumers that keep states apart from the rollout that made them."""
        t, b = self.t, self.batch
        log_after = self.log_states(t + 1, self.num_steps)  # what the steps after t hold at reset
        pose = torch.cat([self.pose.detach(), log_after.to(self.history.pose.dtype)], dim=2)
        z = torch.cat([self.z.detach(), b.agent_xyz[:, :, t + 1 :, 2]], dim=2)
        history = History(pose=pose, z=z, valid=self.history.valid, head=t, differentiable=self.history.differentiable)
        return dataclasses.replace(self, history=history)


def controlled_mask(batch: ScenarioBatch, controlled: Controlled) -> torch.Tensor:
    """``wosac``: every agent valid at the current step; ``sdc``: the SDC only; a boolean
    tensor ``[B, N]``: those agents (each must be valid at the current step)."""
    cur = batch.current_time_index
    valid_now = batch.agent_valid[:, :, cur] & batch.agent_mask
    if isinstance(controlled, torch.Tensor):
        if tuple(controlled.shape) != tuple(valid_now.shape) or controlled.dtype != torch.bool:
            raise SimulationError(f"a controlled mask is a bool tensor of shape {list(valid_now.shape)}")
        bad = controlled.to(valid_now.device) & ~valid_now
        if bool(bad.any()):
            raise SimulationError(
                f"controlled agents must be valid at step {cur}; not valid: {describe_agents(batch, bad)}"
            )
        return controlled.to(valid_now.device)
    if controlled in ("wosac", "all_valid"):
        return valid_now
    if controlled == "sdc":
        return valid_now & batch.is_sdc
    raise SimulationError(f"controlled must be 'wosac', 'sdc' or a mask, not {controlled!r}")


def describe_agents(batch: ScenarioBatch, mask: torch.Tensor, limit: int = 5) -> str:
    """The first ``limit`` agents of ``mask`` ``[B, N]`` by scenario id and WOMD track id."""
    b, n = torch.nonzero(mask, as_tuple=True)
    ids = batch.agent_id[b, n].tolist()
    names = [f"scenario {batch.scenario_id[i]} track {track}" for i, track in zip(b.tolist(), ids)]
    more = len(names) - limit
    return ", ".join(names[:limit]) + (f" and {more} more" if more > 0 else "")


def box_dims(batch: ScenarioBatch) -> torch.Tensor:
    """Each agent's box ``[B, N, 3]``: as logged at the current step, or at its first valid
    step for agents that appear later (the log marks invalid steps with -1)."""
    valid = batch.agent_valid
    first = valid.to(torch.uint8).argmax(-1)  # [B, N]
    at_first = torch.gather(batch.agent_dims, 2, first[..., None, None].expand(-1, -1, 1, 3))[:, :, 0]
    cur = batch.current_time_index
    return torch.where(valid[:, :, cur, None], batch.agent_dims[:, :, cur], at_first)


def reset(batch: ScenarioBatch, controlled: Controlled = "wosac", differentiable: bool = False) -> SimState:
    """The state at the current step (index 10), with the logged history.

    ``differentiable``: steps never write in place, so autograd can run through them."""
    if not bool(batch.agent_mask.any()):
        raise SimulationError(f"scenarios {batch.scenario_id} have no agents")
    pose = torch.cat([batch.agent_xyz[..., :2], batch.agent_heading[..., None], batch.agent_velocity], dim=-1)
    mask = controlled_mask(batch, controlled)
    cur = batch.current_time_index
    valid = batch.agent_valid.clone()
    # Controlled agents stay valid from the current step on, whatever the log says.
    valid[:, :, cur:] |= mask[..., None]
    history = History(
        pose=pose, z=batch.agent_xyz[..., 2].clone(), valid=valid, head=cur, differentiable=differentiable
    )
    return SimState(batch=batch, t=cur, controlled=mask, dims=box_dims(batch), history=history)


def log_state(batch: ScenarioBatch, t: int | None = None) -> SimState:
    """The log itself as a state at step ``t`` (default: the last step), no agent
    controlled: for the events and features of the logged behaviour."""
    start = reset(batch, controlled=torch.zeros_like(batch.agent_mask))
    t = start.num_steps - 1 if t is None else t
    if not 0 <= t < start.num_steps:
        raise SimulationError(f"step {t} is not in the log (steps 0..{start.num_steps - 1})")
    start.history.head = t
    return dataclasses.replace(start, t=t)


@dataclass(frozen=True)
class CheckedActions:
    """Actions that passed :func:`check_actions`: within bounds (NaN where an action is
    NaN/inf, so that it shows in the next state); which controlled agents' actions were
    clipped ``[B, N]``; and, for discrete dynamics, which were out of range ``[B, N]``.
    :func:`step` checks both in one device synchronisation."""

    actions: torch.Tensor
    clipped: torch.Tensor
    out_of_range: torch.Tensor | None = None


def as_action_tensor(actions, dynamics: Dynamics, device: torch.device) -> torch.Tensor:
    """``actions`` as a tensor on ``device``; :class:`SimulationError` for what cannot be one."""
    if not isinstance(actions, torch.Tensor):
        try:
            actions = torch.as_tensor(actions)
        except (TypeError, ValueError, RuntimeError) as err:
            raise SimulationError(f"{dynamics.name} actions must be a numeric array: {err}") from None
    return actions.to(device)


def check_actions(state: SimState, actions, dynamics: Dynamics) -> CheckedActions:
    """Validate dtype and shape and bound the values (see the module docstring)."""
    actions = as_action_tensor(actions, dynamics, state.device)
    ctrl = state.controlled
    dynamics.check_action(actions, tuple(ctrl.shape))
    out_of_range = None
    if dynamics.spec.discrete:
        bounded, outside = dynamics.bound(actions)
        out_of_range, clipped = outside & ctrl, torch.zeros_like(ctrl)
    else:
        bounded, outside = dynamics.bound(actions.to(state.history.pose.dtype))
        clipped = outside & ctrl
    if state.history.differentiable:
        # Ignored entries may hold NaN: keep them out of the graph (0 * NaN gradients).
        keep = ctrl.view(*ctrl.shape, *([1] * (bounded.dim() - 2)))
        bounded = torch.where(keep, bounded, torch.zeros((), dtype=bounded.dtype, device=bounded.device))
    else:
        bounded = bounded.detach()  # the in-place fast path keeps no autograd graph
    return CheckedActions(bounded, clipped, out_of_range)


def agent_slots(agents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The slot indices ``[B, Q]`` of the agents of mask ``agents`` ``[B, N]`` (Q: the most
    in a scenario; shorter rows repeat their first slot) and which are real ``[B, Q]``."""
    count = agents.sum(1)
    Q = max(int(count.max()), 1)
    order = torch.sort(agents.int(), dim=1, descending=True, stable=True).indices[:, :Q]
    slot_ok = torch.arange(Q, device=agents.device) < count[:, None]
    return torch.where(slot_ok, order, order[:, :1]), slot_ok


def take_agents(values: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``values`` ``[B, N, ...]`` of the agents ``slots`` ``[B, Q]``: ``[B, Q, ...]``."""
    index = slots.view(*slots.shape, *([1] * (values.dim() - 2))).expand(*slots.shape, *values.shape[2:])
    return values.gather(1, index)


def step(
    state: SimState,
    actions: torch.Tensor | CheckedActions,
    dynamics: Dynamics,
    hold: torch.Tensor | None = None,
    movers: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> SimState:
    """Advance by ``dynamics.chunk`` steps. ``actions`` ``[B, N, *action_shape]`` (or the
    result of :func:`check_actions`); only the controlled agents' actions are used. Agents
    in ``hold`` ``[B, N]`` stand still whatever their action (finished agents).
    ``movers``: the controlled agents' slots ``[B, Q]`` and which are real, as
    :func:`agent_slots` gives them for ``state.controlled``, where the caller keeps them:
    the dynamics then run on those Q agents only, not on all N (the SDCs of a vector env).
    They are not checked: a controlled agent missing from them would keep its logged pose."""
    k = dynamics.chunk
    if state.t + k > state.num_steps - 1:
        raise SimulationError(f"the episode ends at step {state.num_steps - 1}: cannot step {k} from step {state.t}")
    checked = actions if isinstance(actions, CheckedActions) else check_actions(state, actions, dynamics)
    ctrl = state.controlled
    t, window = state.t, slice(state.t + 1, state.t + 1 + k)
    history = state.history
    if not history.differentiable and history.head != t:  # an older state stepped again: branch on a copy
        history = History(history.pose.clone(), history.z.clone(), history.valid, t)
    nxt = None  # the dynamics' next states [B, N, k, 5], where computed for all agents
    if movers is not None and not history.differentiable:
        _move_some(state, history.pose[:, :, window], checked.actions, dynamics, hold, movers)
    else:
        nxt = _next_states(state.current, checked.actions, dynamics, state.batch.agent_type, hold)
    # Controlled agents keep the logged ground height where the log has one, else hold.
    log_z = state.batch.agent_xyz[:, :, window, 2]
    held = torch.where(state.batch.agent_valid[:, :, window], log_z, history.z[:, :, t : t + 1].expand(-1, -1, k))
    ctrl4 = ctrl[:, :, None, None]
    if history.differentiable:
        moved = torch.where(ctrl4, nxt, history.pose[:, :, window])  # the others keep the log
        pose = torch.cat([history.pose[:, :, : t + 1], moved, history.pose[:, :, t + 1 + k :]], dim=2)
        new_z = torch.where(ctrl[..., None], held, log_z)
        z = torch.cat([history.z[:, :, : t + 1], new_z, history.z[:, :, t + 1 + k :]], dim=2)
        history = History(pose, z, history.valid, t + k, differentiable=True)
    else:  # written in place; the others keep the log that is there
        moved = history.pose[:, :, window]
        if nxt is not None:
            torch.where(ctrl4, nxt, moved, out=moved)
        torch.where(ctrl[..., None], held, log_z, out=history.z[:, :, window])
    # One synchronisation for every value check: the sum of the new states is non-finite
    # when one of them is, which NaN/inf actions make sure of (see Dynamics.bound).
    probe = moved.detach().sum()
    if checked.out_of_range is not None:
        probe = probe + torch.where(checked.out_of_range, math.nan, 0.0).sum()
    if not bool(torch.isfinite(probe)):
        if nxt is None:
            nxt = _next_states(state.current, checked.actions, dynamics, state.batch.agent_type, hold)
        _raise_bad_values(state, dynamics, checked, nxt)  # before the head moves: the state stays steppable
    if not history.differentiable:
        history.head = t + k
    return dataclasses.replace(state, t=t + k, history=history)


def _next_states(
    current: torch.Tensor,
    actions: torch.Tensor,
    dynamics: Dynamics,
    agent_type: torch.Tensor,
    hold: torch.Tensor | None,
) -> torch.Tensor:
    """The dynamics' next ``k`` states ``[B, N, k, 5]`` (agents in ``hold`` stand where
    they are, velocity zero)."""
    nxt = dynamics.forward(current, actions, agent_type)
    if hold is not None:
        standing = torch.cat([current[..., :3], torch.zeros_like(current[..., 3:])], -1)
        nxt = torch.where(hold[:, :, None, None], standing[:, :, None], nxt)
    return nxt


def _move_some(
    state: SimState,
    moved: torch.Tensor,
    actions: torch.Tensor,
    dynamics: Dynamics,
    hold: torch.Tensor | None,
    movers: tuple[torch.Tensor, torch.Tensor],
) -> None:
    """Write the next states of the agents ``movers`` into ``moved`` ``[B, N, k, 5]`` (the
    log's window, in place). The padding entries of ``movers`` repeat their row's first
    slot, so each writes what that slot gets: its mover's state, or where the row has no
    mover, the log unchanged (a scatter's duplicate writes must agree)."""
    slots, real = movers
    mine = _next_states(
        take_agents(state.current, slots),
        take_agents(actions, slots),
        dynamics,
        state.batch.agent_type.gather(1, slots),
        None if hold is None else hold.gather(1, slots),
    )
    index = slots[:, :, None, None].expand_as(mine)
    first = torch.where(real[:, :1, None, None], mine[:, :1], moved.gather(1, index[:, :1]))
    moved.scatter_(1, index, torch.where(real[:, :, None, None], mine, first))


def _raise_bad_values(state: SimState, dynamics: Dynamics, checked: CheckedActions, nxt: torch.Tensor) -> None:
    ctrl = state.controlled
    if checked.out_of_range is not None:
        bad_action = checked.out_of_range
    else:
        bad_action = ~torch.isfinite(checked.actions).flatten(2).all(-1) & ctrl
    if bool(bad_action.any()):
        what = f"out of [0, {dynamics.spec.levels})" if dynamics.spec.discrete else "NaN/inf"
        raise SimulationError(
            f"{dynamics.name} actions {what} at step {state.t} for {describe_agents(state.batch, bad_action)}"
        )
    bad_state = ~torch.isfinite(nxt).flatten(2).all(-1) & ctrl
    raise SimulationError(
        f"{dynamics.name} made non-finite states at step {state.t} for "
        f"{describe_agents(state.batch, bad_state)} (their current states: "
        f"{state.current[bad_state][:3].tolist()})"
    )


# Agent pairs up to which a compiled collision check tests every pair: its [B, N, N]
# temporaries stay within a few tens of MB, and beyond that (thousands of agent slots)
# selecting the near pairs first costs less than testing them all.
ALL_PAIRS = 1 << 21


def collisions(state: SimState, t: int | None = None, agents: torch.Tensor | None = None) -> torch.Tensor:
    """Whether each agent's box overlaps another valid agent's at step ``t`` ``[B, N]``;
    with ``agents`` (slot indices ``[B, Q]``), of those agents only ``[B, Q]``.

    Eagerly, only pairs whose bounding circles meet get the exact separating-axis test;
    compiled (and up to ``ALL_PAIRS`` pairs), one kernel tests every pair: the same
    answer, since boxes that overlap have overlapping circles."""
    t = state.t if t is None else t
    p = state.pose[:, :, t]
    dims = state.dims
    valid = state.valid[:, :, t] & state.batch.agent_mask
    B, N = valid.shape
    # Heading cosines and sines eagerly: compiled ones round differently in the last bit.
    cos, sin = torch.cos(p[..., 2]), torch.sin(p[..., 2])
    if agents is not None and _agents_collisions.active:
        return _agents_collisions(p, cos, sin, dims, valid, agents)
    if agents is None and _all_collisions.active and B * N * N <= ALL_PAIRS:
        return _all_collisions(p, cos, sin, dims, valid)
    # Invalid agents get a negative radius, so no pair with them passes the circle test.
    radius = torch.where(valid, torch.hypot(dims[..., 0], dims[..., 1]) / 2, -1e4)
    x, y = p[..., 0:1], p[..., 1:2]
    if agents is None:
        dx, dy = x - x.transpose(1, 2), y - y.transpose(1, 2)  # [B, N, N]
        reach = radius[:, :, None] + radius[:, None, :]
        near = dx.mul_(dx).addcmul_(dy, dy) < reach.clamp_(min=0).square_()
        near &= torch.ones(N, N, dtype=torch.bool, device=near.device).triu(1)
    else:  # the asked agents against every agent: [B, Q, N]
        index = agents[..., None]
        qx, qy, q_radius = x.gather(1, index), y.gather(1, index), radius.gather(1, agents)
        dx, dy = qx - x.transpose(1, 2), qy - y.transpose(1, 2)
        reach = q_radius[:, :, None] + radius[:, None, :]
        near = dx.mul_(dx).addcmul_(dy, dy) < reach.clamp_(min=0).square_()
        near &= agents[..., None] != torch.arange(N, device=near.device)
    bi, i, j = torch.nonzero(near, as_tuple=True)
    hit = torch.zeros(near.shape[:2], dtype=torch.bool, device=near.device)
    if bi.numel():
        a = i if agents is None else agents[bi, i]
        boxes = _box_table(p, cos, sin, dims).flatten(0, 1)  # one row lookup per box: cheaper than 2-D indexing
        mine, theirs = boxes.index_select(0, bi * N + a).unbind(-1), boxes.index_select(0, bi * N + j).unbind(-1)
        overlap = box_separation(mine, theirs) < 0
        hit[bi[overlap], i[overlap]] = True
        if agents is None:
            hit[bi[overlap], j[overlap]] = True
    return hit


def _box_table(pose: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dims: torch.Tensor) -> torch.Tensor:
    """Boxes ``[B, N, 6]`` as :func:`closedloop.geometry.box_separation` reads them: x, y,
    heading cosine and sine, half length, half width."""
    return torch.stack([pose[..., 0], pose[..., 1], cos, sin, dims[..., 0] / 2, dims[..., 1] / 2], -1)


def _any_overlap(separation: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """Whether any of the ``pairs`` (a mask over the last dimension) overlaps; a NaN box
    overlaps nothing."""
    return torch.where(pairs, separation, float("inf")).nan_to_num(nan=float("inf")).amin(-1) < 0


@kernel
def _agents_collisions(
    p: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dims: torch.Tensor, valid: torch.Tensor, agents: torch.Tensor
) -> torch.Tensor:
    """:func:`collisions` of a few agents ``agents`` ``[B, Q]`` as one compiled kernel:
    every pair against every agent, no selection. Eager, selecting the near pairs costs
    less."""
    N = valid.shape[1]
    table = _box_table(p, cos, sin, dims)
    index = agents[..., None]
    mine = table.gather(1, index.expand(-1, -1, table.shape[-1]))[:, :, None]  # [B, Q, 1, 6]
    separation = box_separation(mine.unbind(-1), table[:, None].unbind(-1))  # [B, Q, N]
    pairs = valid.gather(1, agents)[..., None] & valid[:, None, :] & (index != torch.arange(N, device=table.device))
    return _any_overlap(separation, pairs)


@kernel
def _all_collisions(
    p: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dims: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """:func:`collisions` of every agent as one compiled kernel: every pair, no selection."""
    N = valid.shape[1]
    table = _box_table(p, cos, sin, dims)
    separation = box_separation(table[:, :, None].unbind(-1), table[:, None].unbind(-1))  # [B, N, N]
    others = torch.arange(N, device=table.device)
    pairs = valid[:, :, None] & valid[:, None, :] & (others[:, None] != others)
    return _any_overlap(separation, pairs)


def distance_to_log(state: SimState, t: int | None = None) -> torch.Tensor:
    """Distance from each agent to its logged position at step ``t`` (NaN where the log
    is invalid) ``[B, N]``."""
    t = state.t if t is None else t
    b = state.batch
    d = torch.linalg.norm(state.pose[:, :, t, :2] - b.agent_xyz[:, :, t, :2], dim=-1)
    return torch.where(b.agent_valid[:, :, t], d, torch.full_like(d, float("nan")))


def global_trajectories(state: SimState, start: int, stop: int) -> torch.Tensor:
    """x, y, z, heading ``[B, N, stop - start, 4]`` in world coordinates (float64), for
    steps up to the state's current step."""
    if not 0 <= start <= stop <= state.t + 1:
        raise SimulationError(f"steps {start}..{stop - 1} are not in the state's history (steps 0..{state.t})")
    origin = state.batch.origin.to(state.pose.device)
    xy = state.pose[:, :, start:stop, :2].double() + origin[:, None, None, :]
    return torch.cat([xy, state.z[:, :, start:stop, None].double(), state.pose[:, :, start:stop, 2:3].double()], dim=-1)
