"""Configurable per-agent rewards from a transition's events and actions.

The default is the RL fine-tuning paper's ``r = -||pos - pos_log|| - lambda * collision``
(Peng et al.); every term has its own weight, and ``scale`` multiplies the sum.

Scale: with the default weights a policy that drifts 20 m from the log collects about
-1,000 over an 80-step episode. REINFORCE-style trainers that normalise returns do not
care; value-based learners (PPO's critic) learn faster on returns of order 1 to 100, so
the Gymnasium ego env defaults to ``scale=0.1`` (see ``EgoEnv``), or wrap the env in
Stable-Baselines3's ``VecNormalize``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from closedloop.envs.env import Transition


@dataclass(frozen=True)
class RewardConfig:
    distance_to_log: float = -1.0  # times metres from the logged position (0 where no log)
    collision: float = -1.0  # lambda
    offroad: float = 0.0
    red_light: float = 0.0
    progress: float = 0.0  # times metres travelled this step
    action: float = 0.0  # times the squared norm of the action in units of its bounds (continuous dynamics)
    scale: float = 1.0  # multiplies the sum of the terms

    def __call__(self, transition: Transition) -> torch.Tensor:
        """Rewards ``[B, N]`` for the step ``transition.previous -> transition.state``."""
        events = transition.events
        terms = {  # each term's weight and how to compute it; terms weighted 0 are skipped
            "distance_to_log": (self.distance_to_log, lambda: torch.nan_to_num(events["distance_to_log"], nan=0.0)),
            "collision": (self.collision, lambda: events["collision"].float()),
            "offroad": (self.offroad, lambda: events["offroad"].float()),
            "red_light": (self.red_light, lambda: events["red_light"].float()),
            "progress": (self.progress, lambda: _travelled(transition)),
            "action": (self.action, lambda: _action_size(transition)),
        }
        reward = torch.zeros(transition.state.controlled.shape, device=transition.state.device)
        for weight, value in terms.values():
            if weight:
                reward = reward + weight * value()
        return reward * self.scale if self.scale != 1.0 else reward


def _travelled(transition: Transition) -> torch.Tensor:
    """Metres ``[B, N]`` each agent moved over the step."""
    now, before = transition.state.current[..., :2], transition.previous.current[..., :2]
    return torch.linalg.norm(now - before, dim=-1)


def _action_size(transition: Transition) -> torch.Tensor:
    """Squared norm ``[B, N]`` of each action, each dimension divided by its bound."""
    spec = transition.dynamics.spec
    if spec.discrete:
        raise ValueError(f"RewardConfig.action needs continuous actions; {transition.dynamics.name} is discrete")
    actions = transition.actions.float()
    low, high = transition.dynamics.limits(actions)
    size = (actions / torch.maximum(high.abs(), low.abs())).square()
    return size.flatten(2).sum(-1)
