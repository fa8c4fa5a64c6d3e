"""The batched simulator core: ``reset(batch)`` and ``step(state, actions)``.

B scenarios x N agents, any device, no Python loop over agents or scenarios. The state
keeps the whole 91-step history (logged up to the current step, simulated after it), so
any feature can be computed afterwards. Controlled agents move by the dynamics model;
the others follow the log (agents that appear after the current step are injected from
the log when it makes them valid). Positions are in the batch's frame (relative to
``batch.origin``); :func:`global_trajectories` converts back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch

from closedloop.data.batch import ScenarioBatch
from closedloop.envs.dynamics import Dynamics, wrap_angle
from closedloop.geometry import rectangles_overlap

Controlled = Literal["wosac", "sdc", "all_valid"] | torch.Tensor


class SimulationError(ValueError):
    """Invalid use of the simulator: bad actions, stepping past the end."""


@dataclass(eq=False)
class _Timeline:
    """The pose buffer a chain of states shares, and the step it has been written to.

    Only the state at ``head`` may write new steps into it in place; stepping any other
    state of the chain (branching) copies the buffers first.
    """

    pose: torch.Tensor
    head: int


@dataclass(frozen=True)
class SimState:
    """One moment of B simulated scenarios.

    A state's history up to ``t`` never changes. Stepping the newest state of a rollout
    writes the new steps into the history buffers it shares with the states before it
    (no copy of the whole history per step); stepping an older state again copies them
    first, so branching from any state is safe. Entries after ``t`` are not part of a
    state's history (they hold the log, or a later step of its rollout).
    """

    batch: ScenarioBatch
    t: int  # the current step index
    pose: torch.Tensor  # [B, N, T, 5] x, y, heading, vx, vy
    z: torch.Tensor  # [B, N, T]
    valid: torch.Tensor  # [B, N, T]
    controlled: torch.Tensor  # [B, N]
    dims: torch.Tensor  # [B, N, 3] length, width, height of each agent's box
    timeline: _Timeline = dataclasses.field(repr=False)

    @property
    def num_steps(self) -> int:
        return self.pose.shape[2]

    @property
    def done(self) -> bool:
        return self.t >= self.num_steps - 1

    @property
    def current(self) -> torch.Tensor:
        """States ``[B, N, 5]`` at the current step."""
        return self.pose[:, :, self.t]

    def log_states(self, start: int, stop: int) -> torch.Tensor:
        """Logged states ``[B, N, stop - start, 5]`` (ground truth, for guidance and experts)."""
        b = self.batch
        return torch.cat([b.agent_xyz[:, :, start:stop, :2], b.agent_heading[:, :, start:stop, None],
                          b.agent_velocity[:, :, start:stop]], dim=-1)


def controlled_mask(batch: ScenarioBatch, controlled: Controlled) -> torch.Tensor:
    """``wosac``: every agent valid at the current step; ``sdc``: the SDC only; a boolean
    tensor ``[B, N]``: those agents (each must be valid at the current step)."""
    cur = batch.current_time_index
    valid_now = batch.agent_valid[:, :, cur] & batch.agent_mask
    if isinstance(controlled, torch.Tensor):
        if tuple(controlled.shape) != tuple(valid_now.shape) or controlled.dtype != torch.bool:
            raise SimulationError(f"a controlled mask is a bool tensor of shape {list(valid_now.shape)}")
        bad = torch.nonzero(controlled.to(valid_now.device) & ~valid_now)
        if bad.numel():
            raise SimulationError(f"controlled agents must be valid at step {cur}; not valid: "
                                  f"(scenario, agent) {bad[:5].tolist()}")
        return controlled.to(valid_now.device)
    if controlled in ("wosac", "all_valid"):
        return valid_now
    if controlled == "sdc":
        return valid_now & batch.is_sdc
    raise SimulationError(f"controlled must be 'wosac', 'sdc' or a mask, not {controlled!r}")


def box_dims(batch: ScenarioBatch) -> torch.Tensor:
    """Each agent's box ``[B, N, 3]``: as logged at the current step, or at its first valid
    step for agents that appear later (the log marks invalid steps with -1)."""
    valid = batch.agent_valid
    first = valid.to(torch.uint8).argmax(-1)  # [B, N]
    at_first = torch.gather(batch.agent_dims, 2, first[..., None, None].expand(-1, -1, 1, 3))[:, :, 0]
    cur = batch.current_time_index
    return torch.where(valid[:, :, cur, None], batch.agent_dims[:, :, cur], at_first)


def reset(batch: ScenarioBatch, controlled: Controlled = "wosac") -> SimState:
    """The state at the current step (index 10), with the logged history."""
    if not bool(batch.agent_mask.any()):
        raise SimulationError(f"scenarios {batch.scenario_id} have no agents")
    pose = torch.cat([batch.agent_xyz[..., :2], batch.agent_heading[..., None], batch.agent_velocity], dim=-1)
    mask = controlled_mask(batch, controlled)
    cur = batch.current_time_index
    valid = batch.agent_valid.clone()
    # Controlled agents stay valid from the current step on, whatever the log says.
    valid[:, :, cur:] |= mask[..., None]
    return SimState(batch=batch, t=cur, pose=pose, z=batch.agent_xyz[..., 2].clone(), valid=valid,
                    controlled=mask, dims=box_dims(batch), timeline=_Timeline(pose, cur))


def step(state: SimState, actions: torch.Tensor, dynamics: Dynamics) -> SimState:
    """Advance by ``dynamics.chunk`` steps. ``actions`` ``[B, N, *action_shape]``; only the
    controlled agents' actions are used (the others may hold anything finite)."""
    B, N = state.controlled.shape
    k = dynamics.chunk
    if state.t + k > state.num_steps - 1:
        raise SimulationError(f"the episode ends at step {state.num_steps - 1}: cannot step "
                              f"{k} from step {state.t}")
    actions = torch.as_tensor(actions, device=state.pose.device)
    dynamics.check_action(actions, (B, N))
    nxt = dynamics.forward(state.current, actions)  # [B, N, k, 5]
    window = slice(state.t + 1, state.t + 1 + k)
    timeline = state.timeline
    if timeline.pose is state.pose and timeline.head == state.t:
        pose, z = state.pose, state.z  # the newest state of its rollout: write in place
    else:
        pose, z = state.pose.clone(), state.z.clone()
        timeline = _Timeline(pose, state.t)
    ctrl = state.controlled[:, :, None, None]
    pose[:, :, window] = torch.where(ctrl, nxt, pose[:, :, window])  # the others keep the log
    pose[:, :, window, 2] = wrap_angle(pose[:, :, window, 2])
    # Controlled agents keep the logged ground height where the log has one, else hold.
    log_z = state.batch.agent_xyz[:, :, window, 2]
    held = torch.where(state.batch.agent_valid[:, :, window], log_z, z[:, :, state.t:state.t + 1].expand(-1, -1, k))
    z[:, :, window] = torch.where(state.controlled[..., None], held, log_z)
    timeline.head = state.t + k
    return dataclasses.replace(state, t=state.t + k, pose=pose, z=z, timeline=timeline)


def collisions(state: SimState, t: int | None = None) -> torch.Tensor:
    """Whether each agent's box overlaps another valid agent's at step ``t`` ``[B, N]``.

    Only pairs whose bounding circles meet get the exact separating-axis test."""
    t = state.t if t is None else t
    p = state.pose[:, :, t]
    dims = state.dims
    valid = state.valid[:, :, t] & state.batch.agent_mask
    N = valid.shape[1]
    # Invalid agents get a negative radius, so no pair with them passes the circle test.
    radius = torch.where(valid, torch.hypot(dims[..., 0], dims[..., 1]) / 2, -1e4)
    x, y = p[..., 0:1], p[..., 1:2]
    dx, dy = x - x.transpose(1, 2), y - y.transpose(1, 2)  # [B, N, N]
    reach = radius[:, :, None] + radius[:, None, :]
    near = dx.mul_(dx).addcmul_(dy, dy) < reach.clamp_(min=0).square_()
    near &= torch.ones(N, N, dtype=torch.bool, device=near.device).triu(1)
    bi, i, j = torch.nonzero(near, as_tuple=True)
    hit = torch.zeros_like(valid)
    if bi.numel():
        box_i = (p[bi, i, 0], p[bi, i, 1], p[bi, i, 2], dims[bi, i, 0], dims[bi, i, 1])
        box_j = (p[bi, j, 0], p[bi, j, 1], p[bi, j, 2], dims[bi, j, 0], dims[bi, j, 1])
        overlap = rectangles_overlap(box_i, box_j)
        hit[bi[overlap], i[overlap]] = True
        hit[bi[overlap], j[overlap]] = True
    return hit


def distance_to_log(state: SimState, t: int | None = None) -> torch.Tensor:
    """Distance from each agent to its logged position at step ``t`` (NaN where the log
    is invalid) ``[B, N]``."""
    t = state.t if t is None else t
    b = state.batch
    d = torch.linalg.norm(state.pose[:, :, t, :2] - b.agent_xyz[:, :, t, :2], dim=-1)
    return torch.where(b.agent_valid[:, :, t], d, torch.full_like(d, float("nan")))


def global_trajectories(state: SimState, start: int, stop: int) -> torch.Tensor:
    """x, y, z, heading ``[B, N, stop - start, 4]`` in world coordinates (float64)."""
    origin = state.batch.origin.to(state.pose.device)
    xy = state.pose[:, :, start:stop, :2].double() + origin[:, None, None, :]
    return torch.cat([xy, state.z[:, :, start:stop, None].double(),
                      state.pose[:, :, start:stop, 2:3].double()], dim=-1)
