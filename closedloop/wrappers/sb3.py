"""Stable-Baselines3 adapter: the batched agent-slot env (:mod:`closedloop.envs.gym_vector`)
as an SB3 ``VecEnv``, so PPO and friends step B scenarios per call without subprocesses.

SB3's conventions, on top of the Gymnasium vector env's next-step auto-reset:

- a done env's returned observation is the first of its next episode and its
  ``infos[i]["terminal_observation"]`` the last of the finished one; when the log ends
  the batch restarts inside the same ``step_wait`` (SB3 auto-resets in place);
- ``infos[i]["TimeLimit.truncated"]`` is true where the episode ended at the end of the
  log (so PPO bootstraps from the terminal observation's value), false on collision;
- ``infos[i]["episode"] = {"r", "l", "t"}`` (return, length, seconds since the adapter
  started) at the end of every real episode, so SB3's ``ep_rew_mean`` and
  ``ep_len_mean`` need no ``VecMonitor``; ghost steps (an env whose agent finished
  before the log ended, or a padding slot, see :mod:`closedloop.envs.gym_vector`) are
  done at every step but never report an ``episode``.

The envs share one batched simulator, so ``get_attr``/``set_attr``/``env_method`` act on
that simulator (an attribute is the same for every index; a method runs once).

Stable-Baselines3 is optional: ``pip install 'closedloop[rl]'``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import gymnasium
import numpy as np

try:
    from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("closedloop's PPO baselines need Stable-Baselines3: pip install 'closedloop[rl]'") from err

from closedloop.envs.gym_vector import AgentVectorEnv


class SB3VecEnv(VecEnv):
    """SB3 ``VecEnv`` over an :class:`AgentVectorEnv`; see the module docstring."""

    def __init__(self, venv: AgentVectorEnv):
        self.venv = venv
        super().__init__(venv.num_envs, venv.single_observation_space, venv.single_action_space)
        self._actions: np.ndarray | None = None
        self._returns = np.zeros(self.num_envs, np.float64)
        self._lengths = np.zeros(self.num_envs, np.int64)
        self._start = time.perf_counter()

    def reset(self) -> np.ndarray:
        seed = self._seeds[0]
        obs, infos = self.venv.reset(seed=seed)
        self._reset_seeds()
        self.reset_infos = self._split(infos)
        self._returns[:], self._lengths[:] = 0.0, 0
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = actions

    def step_wait(self):
        obs, rewards, terminated, truncated, infos = self.venv.step(self._actions)
        ghost = infos["ghost"]
        dones = terminated | truncated
        live = ~ghost
        self._returns[live] += rewards[live]
        self._lengths[live] += 1
        split = self._split(infos)
        for i in np.flatnonzero(dones):
            split[i]["terminal_observation"] = obs[i]
            split[i]["TimeLimit.truncated"] = bool(truncated[i] and not terminated[i])
            if live[i]:
                split[i]["episode"] = {
                    "r": float(self._returns[i]),
                    "l": int(self._lengths[i]),
                    "t": round(time.perf_counter() - self._start, 6),
                }
                self._returns[i], self._lengths[i] = 0.0, 0
        if self.venv.log_ended:  # SB3 resets in place: restart the batch now
            obs, _ = self.venv.reset()
        return obs, rewards, dones, split

    def close(self) -> None:
        self.venv.close()

    def _indices(self, indices) -> Sequence[int]:
        if indices is None:
            return range(self.num_envs)
        if isinstance(indices, int):
            return [indices]
        return indices

    def get_attr(self, attr_name: str, indices=None) -> list[Any]:
        return [getattr(self.venv, attr_name) for _ in self._indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices=None) -> None:
        setattr(self.venv, attr_name, value)

    def env_method(self, method_name: str, *method_args, indices=None, **method_kwargs) -> list[Any]:
        result = getattr(self.venv, method_name)(*method_args, **method_kwargs)
        return [result for _ in self._indices(indices)]

    def env_is_wrapped(self, wrapper_class, indices=None) -> list[bool]:
        return [False for _ in self._indices(indices)]

    def _split(self, infos: dict) -> list[dict]:
        """Gymnasium's dict of arrays as SB3's list of per-env dicts."""
        keys = [k for k in infos if not k.startswith("_")]
        return [{k: _item(infos[k][i]) for k in keys} for i in range(self.num_envs)]


def _item(value):
    return value.item() if isinstance(value, np.generic) else value


class UnitActions(VecEnvWrapper):
    """The learner acts in ``[-1, 1]`` per action dimension, mapped affinely onto the
    env's Box bounds (the bicycle model's +-6 m/s^2 and +-0.3 1/m): SB3's Gaussian policies
    start at mean 0 and std 1, which would otherwise clip most curvature samples. Works
    over any SB3 ``VecEnv`` with a Box action space (batched, dummy or subprocess)."""

    def __init__(self, venv: VecEnv):
        space = venv.action_space
        if not isinstance(space, gymnasium.spaces.Box):
            raise TypeError(f"UnitActions needs a Box action space, not {space}")
        self.low, self.high = space.low.astype(np.float32), space.high.astype(np.float32)
        unit = gymnasium.spaces.Box(-1.0, 1.0, space.shape, np.float32)
        super().__init__(venv, action_space=unit)

    def step_async(self, actions: np.ndarray) -> None:
        self.venv.step_async(to_bounds(actions, self.low, self.high))

    def reset(self) -> np.ndarray:
        return self.venv.reset()

    def step_wait(self):
        return self.venv.step_wait()


def to_bounds(unit: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Actions in ``[-1, 1]`` (clipped there first) as actions in ``[low, high]``."""
    unit = np.clip(np.asarray(unit, np.float32), -1.0, 1.0)
    return low + (unit + 1.0) * 0.5 * (high - low)
