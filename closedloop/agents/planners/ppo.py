"""A PPO policy trained by ``closedloop train ppo`` as an ego planner: spec ``ppo:RUN_DIR``
(its final ``policy.safetensors``) or ``ppo:FILE.safetensors`` (``RUN_DIR/init.safetensors``,
a checkpoint under ``RUN_DIR/checkpoints/``).

The weights are read from safetensors into a freshly built SB3 ``ActorCriticPolicy`` of
the architecture their header names: no pickle. The planner acts deterministically (the
Gaussian's mean), in the observation form of :mod:`closedloop.agents.planners.interface`,
and maps the learner's ``[-1, 1]`` actions onto the dynamics' bounds as in training.
Needs Stable-Baselines3 (``pip install 'closedloop[rl]'``).
"""

from __future__ import annotations

import os
from pathlib import Path

import gymnasium
import numpy as np
import torch

PREFIX = "ppo:"
MAX_BYTES = 1 << 30


class PPOPlanner:
    """The observation-form planner of a trained (or initial) PPO policy."""

    def __init__(self, path: str | os.PathLike):
        from closedloop.envs.dynamics import make_dynamics
        from closedloop.envs.faces import action_space
        from closedloop.envs.observation import ObservationConfig
        from closedloop.safetensors_io import read_safetensors
        from closedloop.trainers.ppo import WEIGHTS_FORMAT, policy_kwargs

        path = Path(path)
        if path.is_dir():
            path = path / "policy.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no PPO policy (a closedloop train ppo run directory or .safetensors)")
        tensors, header = read_safetensors(path, "a PPO policy", ValueError, MAX_BYTES, WEIGHTS_FORMAT)
        try:
            from stable_baselines3.common.policies import ActorCriticPolicy
        except ImportError as err:
            raise ImportError("the PPO planner needs Stable-Baselines3: pip install 'closedloop[rl]'") from err
        try:
            self.dynamics = make_dynamics(header["dynamics"])
            bounds = action_space(self.dynamics)
            size = ObservationConfig(**header["observation"]).size
            self.policy = ActorCriticPolicy(
                gymnasium.spaces.Box(-np.inf, np.inf, (size,), np.float32),
                gymnasium.spaces.Box(-1.0, 1.0, bounds.shape, np.float32),
                lambda _: 0.0,
                **policy_kwargs(header),
            )
            self.policy.load_state_dict(tensors, strict=True)
        except (KeyError, TypeError, RuntimeError) as err:  # a header or tensors of another kind
            raise ValueError(f"{path}: not a policy written by closedloop train ppo: {err!r}") from None
        self.low, self.high = bounds.low, bounds.high
        self.policy.eval()
        self.path, self.num_timesteps = path, int(header["num_timesteps"])

    def act_batch(self, obs: np.ndarray) -> np.ndarray:
        """Actions ``[B, *shape]`` in the dynamics' units for observations ``[B, D]``."""
        from closedloop.wrappers.sb3 import to_bounds

        with torch.no_grad():
            unit = self.policy._predict(torch.as_tensor(np.asarray(obs, np.float32)), deterministic=True)
        return to_bounds(unit.numpy(), self.low, self.high)

    def act(self, obs: np.ndarray) -> np.ndarray:
        """The action for one observation ``[D]``."""
        return self.act_batch(np.asarray(obs)[None])[0]

    def reset(self, seed: int) -> None:
        """Deterministic: nothing to reset."""
