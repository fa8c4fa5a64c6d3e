"""RoaD, plain-sampling and expert guidance as env wrappers, for the PettingZoo face and the
batched tensor env.

**RoaD** (Garcia-Cobo et al., "Rollouts as Demonstrations"): an agent's action becomes K
candidate motions sampled from its policy,

- with the ``tokens`` dynamics, K tokens (the horizon is the token's 5 steps);
- with the ``trajectory`` dynamics, K trajectories ``[K, H, 3]`` in the agent's frame, of
  a horizon ``H`` at least the dynamics' chunk (a policy that predicts 2 s proposes 20
  steps; the first chunk is executed).

The wrapper executes, for every agent whose log is valid where the chunk ends, the
candidate nearest the expert continuation (mean 4-corner distance over the horizon, steps
weighted by ``weights``); when even that one is farther than ``recovery_distance`` metres
it blends it linearly toward the expert over ``recovery_steps`` steps (recovery mode,
:func:`closedloop.wrappers.guidance.recovery_blend`). With tokens a blended chunk is
executed as the vocabulary token nearest to it. Other agents execute candidate 0. Infos
per agent: ``road_choice``, ``road_distance`` (m), ``recovery_mode``, ``road_guided`` and
the executed motion (``executed_token``, or ``executed_action`` ``[chunk, 3]``), so a
recorder keeps the executed rollout as a demonstration.

**Sampling** is the same interface without guidance (candidate 0, the policy's own sample,
is executed; the distance is still reported): the ablation that isolates the selection.
**Expert** replaces each agent's action by the one that follows the log (inverse dynamics;
where the log ends it keeps the agent's own), for the other end of the ablation.

:func:`road_select` is the one implementation of the choice for both faces; the RoaD
trainer calls :func:`closedloop.wrappers.guidance.road_choose` beneath it on the model's
own rollouts.
"""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium
import numpy as np
import torch
from pettingzoo.utils.env import ParallelEnv

from closedloop.agents.tokens import MotionVocabulary, compose, to_local
from closedloop.constants import token_kind
from closedloop.envs.core import SimState
from closedloop.envs.dynamics import Dynamics, Tokens, Trajectory
from closedloop.envs.errors import SimulationError
from closedloop.wrappers.base import BaseParallelWrapper, BatchedEnvWrapper
from closedloop.wrappers.guidance import recovery_tokens, road_choose, token_chunks


@dataclass(frozen=True)
class RoaDSettings:
    """RoaD's knobs (the paper's: K = 64 samples, a 2 s horizon, recovery beyond 3 m over
    30 steps). ``weights``: one per horizon step (uniform when None). ``select=False`` is
    plain sampling."""

    k: int = 64
    horizon: int | None = None  # trajectory dynamics: steps per candidate (default: the chunk)
    weights: tuple[float, ...] | None = None
    recovery_distance: float = 3.0
    recovery_steps: int = 30
    select: bool = True

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"RoaD needs k >= 1 candidates, not {self.k}")
        if self.recovery_steps < 1:
            raise ValueError(f"recovery_steps must be >= 1, not {self.recovery_steps}")
        if self.weights is not None and (len(self.weights) == 0 or min(self.weights) < 0 or sum(self.weights) <= 0):
            raise ValueError(f"RoaD weights must be non-negative and not all zero, got {self.weights}")


def _horizon(settings: RoaDSettings, dynamics: Dynamics) -> int:
    if isinstance(dynamics, Tokens):
        horizon = dynamics.chunk
        if settings.horizon not in (None, horizon):
            raise SimulationError(f"RoaD on tokens: the horizon is the token's {horizon} steps, not {settings.horizon}")
    elif isinstance(dynamics, Trajectory):
        horizon = settings.horizon or dynamics.chunk
        if horizon < dynamics.chunk:
            raise SimulationError(f"RoaD horizon {horizon} is shorter than the executed chunk ({dynamics.chunk})")
    else:
        raise SimulationError(f"RoaD guidance needs the tokens or trajectory dynamics, the env runs {dynamics.name}")
    if settings.weights is not None and len(settings.weights) != horizon:
        raise SimulationError(f"RoaD: {len(settings.weights)} weights for a horizon of {horizon} steps")
    return horizon


def expert_continuation(state: SimState, horizon: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The logged poses of the ``horizon`` steps after ``state.t`` ``[B, N, H, 3]`` and
    their validity ``[B, N, H]`` (False past the end of the log or where the agent is not
    valid now)."""
    start, stop = state.t + 1, min(state.t + 1 + horizon, state.num_steps)
    B, N = state.controlled.shape
    log = state.log_states(start, stop)[..., :3].nan_to_num(0.0)
    valid = state.batch.agent_valid[:, :, start:stop] & state.valid_now[..., None]
    if stop - start < horizon:
        pad = horizon - (stop - start)
        log = torch.cat([log, log.new_zeros(B, N, pad, 3)], dim=2)
        valid = torch.cat([valid, valid.new_zeros(B, N, pad)], dim=2)
    return log, valid


def road_select(
    state: SimState,
    candidates: torch.Tensor,
    dynamics: Dynamics,
    settings: RoaDSettings,
    vocabulary: MotionVocabulary | None = None,
) -> dict[str, torch.Tensor]:
    """RoaD's choice at ``state`` among ``candidates`` (``[B, N, K]`` tokens or ``[B, N, K,
    H, 3]`` local trajectories, see the module docstring): a dict of ``[B, N]`` tensors
    ``road_choice``, ``road_distance``, ``recovery_mode``, ``road_guided`` and the executed
    ``executed_token`` ``[B, N]`` or ``executed_action`` ``[B, N, chunk, 3]``."""
    horizon = _horizon(settings, dynamics)
    if state.t + dynamics.chunk > state.num_steps - 1:
        raise SimulationError(f"RoaD: no logged steps left after step {state.t}")
    batch, pose = state.batch, state.current[..., :3]
    expert, expert_ok = expert_continuation(state, horizon)
    guided = expert_ok[..., dynamics.chunk - 1]  # the log is valid where the executed chunk ends
    weights = None if settings.weights is None else torch.tensor(settings.weights, device=state.device)
    kind = token_kind(batch.agent_type)
    if isinstance(dynamics, Tokens):
        table = dynamics.vocabulary.to(state.device, torch.float32)
        table = table.expand(3, -1, -1, -1) if table.shape[0] == 1 else table  # one table for every kind
        if vocabulary is not None:
            box, sizes = vocabulary.boxes().to(state.device)[kind], vocabulary.sizes().to(state.device)
        else:
            box, sizes = state.dims[..., :2], torch.full((table.shape[0],), table.shape[1], device=state.device)
        chunks = token_chunks(pose, candidates, table, kind)
    else:
        box = state.dims[..., :2]
        chunks = compose(pose[:, :, None, :], candidates[..., :3].to(pose.dtype))
    chosen = road_choose(
        chunks,
        expert,
        expert_ok,
        box,
        guided,
        weights,
        settings.recovery_distance,
        settings.recovery_steps,
        settings.select,
    )
    out = {
        "road_choice": chosen.choice,
        "road_distance": chosen.distance,
        "recovery_mode": chosen.recovery,
        "road_guided": guided,
    }
    if isinstance(dynamics, Tokens):
        picked = candidates.gather(-1, chosen.choice[..., None]).squeeze(-1)
        ones = torch.ones_like(expert_ok)
        projected = recovery_tokens(pose, chosen.poses, ones, table, sizes, batch.agent_type, box)
        out["executed_token"] = torch.where(chosen.recovery, projected, picked)
    else:
        out["executed_action"] = to_local(pose, chosen.poses[:, :, : dynamics.chunk])
    return out


def _candidate_space(settings: RoaDSettings, dynamics: Dynamics) -> gymnasium.Space:
    if isinstance(dynamics, Tokens):
        return gymnasium.spaces.MultiDiscrete(np.full(settings.k, dynamics.spec.n))
    horizon = _horizon(settings, dynamics)
    low = np.broadcast_to(np.asarray(dynamics.spec.low, np.float32), (settings.k, horizon, 3))
    high = np.broadcast_to(np.asarray(dynamics.spec.high, np.float32), (settings.k, horizon, 3))
    return gymnasium.spaces.Box(low.copy(), high.copy(), dtype=np.float32)


def _executed_key(dynamics: Dynamics) -> str:
    return "executed_token" if isinstance(dynamics, Tokens) else "executed_action"


class RoaDParallel(BaseParallelWrapper):
    """RoaD (or plain sampling) on a PettingZoo :func:`~closedloop.envs.faces.parallel_env`:
    each agent's action is its K candidates (see the module docstring)."""

    def __init__(self, env: ParallelEnv, settings: RoaDSettings, vocabulary: MotionVocabulary | None = None):
        super().__init__(env)
        self.settings, self.vocabulary = settings, vocabulary
        self._space = _candidate_space(settings, env.dynamics)

    def action_space(self, agent) -> gymnasium.Space:
        return self._space

    def step(self, actions: dict):
        state, unwrapped, dynamics = self.sim_state, self.unwrapped, self.env.dynamics
        slot = {name: i for i, name in enumerate(unwrapped.names)}
        shape, discrete = self._space.shape, isinstance(dynamics, Tokens)
        candidates = torch.zeros(1, len(unwrapped.names), *shape, dtype=torch.long if discrete else torch.float32)
        for name, action in actions.items():
            if name not in slot:
                raise KeyError(f"scenario {unwrapped.scenario_id}: unknown agent {name!r}")
            array = np.asarray(action)
            kind_ok = array.dtype.kind in "iu" if discrete else array.dtype.kind in "fiu"
            if array.shape != shape or not kind_ok:
                raise SimulationError(f"agent {name}: RoaD takes candidates of shape {shape}, got {action!r}")
            if not discrete and not np.isfinite(array).all():
                raise SimulationError(f"agent {name}: RoaD candidates must be finite, got {action!r}")
            candidates[0, slot[name]] = torch.from_numpy(array.astype(np.int64 if discrete else np.float32))
        chosen = road_select(state, candidates.to(state.device), dynamics, self.settings, self.vocabulary)
        chosen = {key: value[0].cpu().numpy() for key, value in chosen.items()}
        key = _executed_key(dynamics)
        executed = {name: chosen[key][slot[name]] for name in actions}
        obs, rewards, terminated, truncated, infos = self.env.step(executed)
        for name in infos:
            i = slot[name]
            infos[name].update(
                road_choice=int(chosen["road_choice"][i]),
                road_distance=float(chosen["road_distance"][i]),
                recovery_mode=bool(chosen["recovery_mode"][i]),
                road_guided=bool(chosen["road_guided"][i]),
            )
            infos[name][key] = chosen[key][i] if key == "executed_action" else int(chosen[key][i])
        return obs, rewards, terminated, truncated, infos


class RoaDBatched(BatchedEnvWrapper):
    """RoaD (or plain sampling) on a :class:`~closedloop.envs.vector.BatchedEnv`:
    ``step(candidates [B, N, K, ...])``; info gains the tensors of :func:`road_select`
    (zeros on the step that only resets a finished batch)."""

    def __init__(self, env, settings: RoaDSettings, vocabulary: MotionVocabulary | None = None):
        super().__init__(env)
        self.settings, self.vocabulary = settings, vocabulary
        self.shape = _candidate_space(settings, env.dynamics).shape

    def step(self, candidates: torch.Tensor):
        state, dynamics = self.state, self.dynamics
        B, N = state.controlled.shape
        discrete = isinstance(dynamics, Tokens)
        candidates = torch.as_tensor(candidates, device=state.device)
        if candidates.shape != (B, N, *self.shape) or candidates.dtype.is_floating_point == discrete:
            kind = "integer" if discrete else "float"
            raise SimulationError(
                f"RoaD takes {kind} candidates {[B, N, *self.shape]}, got {list(candidates.shape)} {candidates.dtype}"
            )
        if not discrete and not bool(torch.isfinite(candidates).all()):
            raise SimulationError("RoaD candidates must be finite (NaN or inf found)")
        key = _executed_key(dynamics)
        if state.done:  # the env only resets on this step
            zeros = torch.zeros(B, N, device=state.device)
            chosen = {
                "road_choice": zeros.long(),
                "road_distance": zeros,
                "recovery_mode": zeros.bool(),
                "road_guided": zeros.bool(),
                key: candidates[:, :, 0, : dynamics.chunk] if not discrete else candidates[:, :, 0],
            }
        else:
            chosen = road_select(state, candidates, dynamics, self.settings, self.vocabulary)
        obs, rewards, terminated, truncated, info = self.env.step(chosen[key])
        info.update(chosen)
        return obs, rewards, terminated, truncated, info


def RoaD(  # noqa: N802 (reads as a wrapper class)
    env,
    k: int = 64,
    horizon: int | None = None,
    weights=None,
    recovery_distance: float = 3.0,
    recovery_steps: int = 30,
    vocabulary: MotionVocabulary | None = None,
):
    """RoaD guidance around ``env`` (see the module docstring): :class:`RoaDParallel` for a
    PettingZoo env, :class:`RoaDBatched` for a batched tensor env."""
    weights = None if weights is None else tuple(float(w) for w in weights)
    settings = RoaDSettings(k, horizon, weights, recovery_distance, recovery_steps)
    if isinstance(env, ParallelEnv):
        return RoaDParallel(env, settings, vocabulary)
    return RoaDBatched(env, settings, vocabulary)


def Sampling(env, k: int = 1, horizon: int | None = None, vocabulary: MotionVocabulary | None = None):  # noqa: N802
    """Plain sampling with RoaD's interface: candidate 0 is executed, nothing is guided."""
    settings = RoaDSettings(k, horizon, select=False)
    if isinstance(env, ParallelEnv):
        return RoaDParallel(env, settings, vocabulary)
    return RoaDBatched(env, settings, vocabulary)


class ExpertParallel(BaseParallelWrapper):
    """Expert guidance on the PettingZoo face: every agent whose log covers the next chunk
    executes the action that follows it; ``infos[agent]["expert_used"]`` says which."""

    def step(self, actions: dict):
        unwrapped = self.unwrapped
        guidance = unwrapped.core.guidance(expert=True)
        follows = guidance.log_next_valid.all(-1)[0].cpu().numpy() & unwrapped.core.state.valid_now[0].cpu().numpy()
        expert = guidance.expert_action[0].cpu().numpy()
        slot = {name: i for i, name in enumerate(unwrapped.names)}
        for name in actions:
            if name not in slot:
                raise KeyError(f"scenario {unwrapped.scenario_id}: unknown agent {name!r}")
        executed = {name: expert[slot[name]] if follows[slot[name]] else action for name, action in actions.items()}
        obs, rewards, terminated, truncated, infos = self.env.step(executed)
        for name in infos:
            infos[name]["expert_used"] = bool(follows[slot[name]])
        return obs, rewards, terminated, truncated, infos


class ExpertBatched(BatchedEnvWrapper):
    """Expert guidance on a :class:`~closedloop.envs.vector.BatchedEnv` (info
    ``expert_used`` ``[B, N]``)."""

    def step(self, actions: torch.Tensor):
        core = self.unwrapped.core
        if core is None or core.done:
            return self.env.step(actions)
        guidance = core.guidance(expert=True)
        follows = guidance.log_next_valid.all(-1) & core.state.valid_now
        actions = torch.as_tensor(actions, device=core.state.device)
        if actions.shape != guidance.expert_action.shape:
            raise SimulationError(
                f"actions of shape {list(actions.shape)}, the env takes {list(guidance.expert_action.shape)}"
            )
        mask = follows.view(*follows.shape, *([1] * (actions.dim() - 2)))
        executed = torch.where(mask, guidance.expert_action.to(actions.dtype), actions)
        obs, rewards, terminated, truncated, info = self.env.step(executed)
        info["expert_used"] = follows
        return obs, rewards, terminated, truncated, info


def Expert(env):  # noqa: N802 (reads as a wrapper class)
    """Expert guidance around ``env``: :class:`ExpertParallel` or :class:`ExpertBatched`."""
    if isinstance(env, ParallelEnv):
        return ExpertParallel(env)
    return ExpertBatched(env)
