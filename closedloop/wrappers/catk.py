"""CAT-K guidance as env wrappers, for the PettingZoo face and for the batched tensor env.

The wrapped env runs the ``tokens`` dynamics. An agent's action becomes its policy's K
candidate tokens (most likely first); the wrapper executes, for every agent whose log is
valid where the token would end, the candidate whose box stays closest to the logged boxes
over the token's steps, and the first candidate for the others. It reports, per agent,

- ``catk_choice``: the index of the executed candidate among the K;
- ``executed_token``: the token executed;
- ``recovery_token``: the token of the agent's whole kind vocabulary that, from where the
  agent actually is, stays closest to the log (CAT-K's training target), and
  ``recovery_valid``: whether the log gives one.

The choice and the recovery token are :mod:`closedloop.wrappers.guidance`'s, the ones the
CAT-K trainer uses. Boxes: each kind's reference box of ``vocabulary`` when given (the
tokenizer's, as the trainer does), else each agent's own box.

``CatK(env, k)`` wraps either kind of env: :class:`CatKParallel` (actions
``MultiDiscrete([V] * k)`` per agent, infos per agent) or :class:`CatKBatched` (actions
``[B, N, k]``, info tensors ``[B, N]``).
"""

from __future__ import annotations

import gymnasium
import numpy as np
import torch
from pettingzoo.utils.env import ParallelEnv

from closedloop.agents.tokens import MotionVocabulary
from closedloop.constants import token_kind
from closedloop.envs.core import SimState
from closedloop.envs.dynamics import Tokens
from closedloop.envs.errors import SimulationError
from closedloop.wrappers.base import BaseParallelWrapper, BatchedEnvWrapper
from closedloop.wrappers.guidance import catk_choice, chunk_distance, recovery_tokens, token_chunks


def catk_select(
    state: SimState, candidates: torch.Tensor, dynamics: Tokens, vocabulary: MotionVocabulary | None = None
) -> dict[str, torch.Tensor]:
    """CAT-K's choice among ``candidates [B, N, K]`` (token indices) at ``state``: a dict of
    ``[B, N]`` tensors ``catk_choice``, ``executed_token``, ``recovery_token``,
    ``recovery_valid`` (see the module docstring)."""
    table = dynamics.vocabulary.to(state.device, torch.float32)
    if table.shape[0] == 1:  # one table for every kind
        table = table.expand(3, -1, -1, -1)
    steps = table.shape[2]
    batch, t = state.batch, state.t
    if t + steps > state.num_steps - 1:
        raise SimulationError(f"CAT-K: no logged steps left after step {t}")
    kind = token_kind(batch.agent_type)
    if vocabulary is not None:
        box = vocabulary.boxes().to(state.device)[kind]
        sizes = vocabulary.sizes().to(state.device)
    else:
        box = state.dims[..., :2]
        sizes = torch.full((table.shape[0],), table.shape[1], device=state.device)
    log = state.log_states(t + 1, t + 1 + steps)[..., :3]
    log_ok = batch.agent_valid[:, :, t + 1 : t + 1 + steps] & state.valid_now[..., None]
    guided = log_ok[..., -1]
    pose = state.current[..., :3]
    in_range = (candidates >= 0) & (candidates < sizes[kind].unsqueeze(-1))
    chunks = token_chunks(pose, candidates, table, kind)
    nearest = catk_choice(chunk_distance(chunks, log, log_ok, box), in_range)
    choice = torch.where(guided, nearest, 0)
    executed = candidates.gather(-1, choice[..., None]).squeeze(-1)
    recovery = recovery_tokens(pose, log, log_ok, table, sizes, batch.agent_type, box)
    return {"catk_choice": choice, "executed_token": executed, "recovery_token": recovery, "recovery_valid": guided}


def _tokens_dynamics(env) -> Tokens:
    dynamics = env.dynamics
    if not isinstance(dynamics, Tokens):
        raise SimulationError(f"CAT-K guidance needs the tokens dynamics, the env runs {dynamics.name}")
    return dynamics


class CatKParallel(BaseParallelWrapper):
    """CAT-K on a PettingZoo :func:`~closedloop.envs.faces.parallel_env` (see the module
    docstring): each agent's action is ``k`` candidate tokens."""

    def __init__(self, env: ParallelEnv, k: int, vocabulary: MotionVocabulary | None = None):
        super().__init__(env)
        if k < 1:
            raise ValueError(f"CAT-K needs k >= 1, not {k}")
        self.k, self.vocabulary = k, vocabulary
        self.tokens = _tokens_dynamics(env)
        self._candidates_space = gymnasium.spaces.MultiDiscrete(np.full(k, self.tokens.spec.n))

    def action_space(self, agent) -> gymnasium.Space:
        return self._candidates_space

    def step(self, actions: dict):
        state, unwrapped = self.sim_state, self.unwrapped
        slot = {name: i for i, name in enumerate(unwrapped.names)}
        candidates = torch.zeros(1, len(unwrapped.names), self.k, dtype=torch.long)
        for name, action in actions.items():
            if name not in slot:
                raise KeyError(f"scenario {unwrapped.scenario_id}: unknown agent {name!r}")
            array = np.asarray(action)
            if array.shape != (self.k,) or array.dtype.kind not in "iu":
                raise SimulationError(f"agent {name}: CAT-K takes {self.k} integer candidate tokens, got {action!r}")
            candidates[0, slot[name]] = torch.from_numpy(array.astype(np.int64))
        chosen = {
            key: value[0].cpu().numpy()
            for key, value in catk_select(state, candidates.to(state.device), self.tokens, self.vocabulary).items()
        }
        executed = {name: np.int64(chosen["executed_token"][slot[name]]) for name in actions}
        obs, rewards, terminated, truncated, infos = self.env.step(executed)
        for name in infos:
            i = slot[name]
            infos[name].update(
                catk_choice=int(chosen["catk_choice"][i]),
                executed_token=int(chosen["executed_token"][i]),
                recovery_token=int(chosen["recovery_token"][i]),
                recovery_valid=bool(chosen["recovery_valid"][i]),
            )
        return obs, rewards, terminated, truncated, infos


class CatKBatched(BatchedEnvWrapper):
    """CAT-K on a :class:`~closedloop.envs.vector.BatchedEnv`: ``step(candidates [B, N, k])``
    executes the chosen tokens; info gains the ``[B, N]`` tensors of the module docstring
    (zeros on the step that only resets a finished batch)."""

    def __init__(self, env, k: int, vocabulary: MotionVocabulary | None = None):
        super().__init__(env)
        if k < 1:
            raise ValueError(f"CAT-K needs k >= 1, not {k}")
        self.k, self.vocabulary = k, vocabulary
        self.tokens = _tokens_dynamics(env)

    def step(self, candidates: torch.Tensor):
        state = self.state
        B, N = state.controlled.shape
        candidates = torch.as_tensor(candidates, device=state.device)
        if candidates.shape != (B, N, self.k) or candidates.dtype.is_floating_point:
            raise SimulationError(
                f"CAT-K takes integer candidates [B, N, k] = [{B}, {N}, {self.k}], got {list(candidates.shape)} "
                f"{candidates.dtype}"
            )
        if state.done:  # the env only resets on this step
            chosen = {
                key: torch.zeros(B, N, dtype=torch.long, device=state.device)
                for key in ("catk_choice", "executed_token", "recovery_token")
            }
            chosen["recovery_valid"] = torch.zeros(B, N, dtype=torch.bool, device=state.device)
        else:
            chosen = catk_select(state, candidates.long(), self.tokens, self.vocabulary)
        obs, rewards, terminated, truncated, info = self.env.step(chosen["executed_token"])
        info.update(chosen)
        return obs, rewards, terminated, truncated, info


def CatK(env, k: int, vocabulary: MotionVocabulary | None = None):  # noqa: N802 (reads as a wrapper class)
    """CAT-K guidance around ``env``: :class:`CatKParallel` for a PettingZoo env,
    :class:`CatKBatched` for a batched tensor env."""
    if isinstance(env, ParallelEnv):
        return CatKParallel(env, k, vocabulary)
    return CatKBatched(env, k, vocabulary)
