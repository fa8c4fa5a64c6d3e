"""Base wrappers that forward everything they do not change.

``BaseParallelWrapper`` wraps a PettingZoo ``ParallelEnv`` the way PettingZoo's own base
wrapper does (``unwrapped``, the spaces, ``agents`` / ``possible_agents``, PettingZoo's
``state()``, ``render`` and ``close``) and also forwards closedloop's ``sim_state``,
``core`` and ``trajectories()``, so wrappers stack and a guidance wrapper can read the
simulator under any stack. ``BatchedEnvWrapper`` does the same for :class:`BatchedEnv`.
A subclass overrides ``reset`` / ``step`` (and the spaces where it changes them).
"""

from __future__ import annotations

from typing import Any

import gymnasium
from pettingzoo.utils.env import ParallelEnv

from closedloop.envs.core import SimState


class BaseParallelWrapper(ParallelEnv):
    def __init__(self, env: ParallelEnv):
        self.env = env
        self.metadata = getattr(env, "metadata", {})
        self.render_mode = getattr(env, "render_mode", None)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(f"accessing private attribute {name!r} through a wrapper is not allowed")
        return getattr(self.env, name)

    # PettingZoo's agent lists live on the wrapped env: reading and writing go through.
    @property
    def agents(self) -> list:
        return self.env.agents

    @agents.setter
    def agents(self, value: list) -> None:
        self.env.agents = value

    @property
    def possible_agents(self) -> list:
        return self.env.possible_agents

    @property
    def unwrapped(self) -> ParallelEnv:
        return self.env.unwrapped

    @property
    def sim_state(self) -> SimState:
        return self.env.sim_state

    def reset(self, seed: int | None = None, options: dict | None = None):
        return self.env.reset(seed=seed, options=options)

    def step(self, actions: dict):
        return self.env.step(actions)

    def observation_space(self, agent) -> gymnasium.Space:
        return self.env.observation_space(agent)

    def action_space(self, agent) -> gymnasium.Space:
        return self.env.action_space(agent)

    def state(self):
        return self.env.state()

    def render(self):
        return self.env.render()

    def close(self) -> None:
        return self.env.close()

    def __str__(self) -> str:
        return f"{type(self).__name__}<{self.env}>"


class BatchedEnvWrapper:
    """Forwards ``reset``, ``step`` and every attribute (``state``, ``core``, ``dynamics``,
    ...) to the wrapped :class:`~closedloop.envs.vector.BatchedEnv` (or wrapper)."""

    def __init__(self, env):
        self.env = env

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(f"accessing private attribute {name!r} through a wrapper is not allowed")
        return getattr(self.env, name)

    @property
    def unwrapped(self):
        return getattr(self.env, "unwrapped", self.env)

    @property
    def state(self) -> SimState:
        return self.env.state

    def reset(self, seed: int | None = None):
        return self.env.reset(seed=seed)

    def step(self, actions):
        return self.env.step(actions)
