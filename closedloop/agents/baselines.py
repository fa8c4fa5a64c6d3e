"""Baseline sim agents for the batched core: log replay, expert, constant velocity.

Each is a callable ``policy(state, dynamics) -> actions [B, N, ...]`` for every agent
(the simulator uses the controlled agents' actions). Where the log has no next state
(the agent leaves the log), the log-based policies keep the agent's current velocity.
"""

from __future__ import annotations

import torch

from closedloop.envs.core import SimState, SimulationError
from closedloop.envs.dynamics import DT, Dynamics


def _constant_velocity_targets(current: torch.Tensor, k: int) -> torch.Tensor:
    """States ``[B, N, k, 5]`` reached by keeping the current velocity and heading."""
    steps = torch.arange(1, k + 1, device=current.device, dtype=current.dtype) * DT
    x = current[..., None, 0] + current[..., None, 3] * steps
    y = current[..., None, 1] + current[..., None, 4] * steps
    rest = current[..., None, 2:].expand(*current.shape[:-1], k, 3)
    return torch.cat([x[..., None], y[..., None], rest], dim=-1)


def _log_targets(state: SimState, k: int) -> torch.Tensor:
    """The logged next ``k`` states, or constant-velocity ones where the log is invalid."""
    if state.t + k > state.num_steps - 1:
        raise SimulationError(f"no logged states after step {state.t}: the episode has ended")
    window = slice(state.t + 1, state.t + 1 + k)
    log = state.log_states(window.start, window.stop)
    ok = state.batch.agent_valid[:, :, window].all(-1)
    fallback = _constant_velocity_targets(state.current, k)
    return torch.where(ok[..., None, None], log, fallback)


class LogReplay:
    """Open loop: the action that takes the *logged* current state to the logged next
    one (with a lossy model such as the bicycle, errors accumulate)."""

    def __call__(self, state: SimState, dynamics: Dynamics) -> torch.Tensor:
        log_now = state.log_states(state.t, state.t + 1)[:, :, 0]
        now = torch.where(state.batch.agent_valid[:, :, state.t, None], log_now, state.current)
        return dynamics.inverse(now, _log_targets(state, dynamics.chunk))


class Expert:
    """Closed loop: the action from the *simulated* state towards the logged next state,
    so it corrects its own drift."""

    def __call__(self, state: SimState, dynamics: Dynamics) -> torch.Tensor:
        return dynamics.inverse(state.current, _log_targets(state, dynamics.chunk))


class ConstantVelocity:
    """Keep the current velocity and heading."""

    def __call__(self, state: SimState, dynamics: Dynamics) -> torch.Tensor:
        return dynamics.inverse(state.current, _constant_velocity_targets(state.current, dynamics.chunk))


POLICIES = {"log": LogReplay, "expert": Expert, "constant_velocity": ConstantVelocity}
