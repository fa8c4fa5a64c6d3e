"""The batched tensor env trainers use: B scenarios stepped together, auto-reset.

Where the PettingZoo and Gymnasium faces serve one scenario to people, this env serves
tensors to training loops: observations ``[B, N, D]``, actions ``[B, N, ...]``, rewards
and events ``[B, N]``, with ``N = max_agents`` fixed and masks for padding and for which
agents are controlled. All B scenarios share the WOMD timeline (step 10 to 90), so they
end together; the next ``step`` after the end draws B new scenarios from the source
(a list, a Dataset, or any iterable of ``Scenario``, cycled) and returns their first
observation, with ``info["reset"] = True``.
"""

from __future__ import annotations

from itertools import cycle
from typing import Iterable, Iterator

import torch

from closedloop.data.batch import collate_scenarios
from closedloop.data.scenario import Scenario
from closedloop.envs.core import SimState, reset, step
from closedloop.envs.dynamics import Dynamics, make_dynamics
from closedloop.envs.events import EventTracker
from closedloop.envs.observation import ObservationConfig, Observer
from closedloop.envs.rewards import RewardConfig


class BatchedEnv:
    """See the module docstring."""

    def __init__(self, scenarios: Iterable[Scenario], batch_size: int = 8, max_agents: int = 128,
                 dynamics: str | Dynamics = "delta_local", controlled="wosac",
                 observation: ObservationConfig = ObservationConfig(), reward: RewardConfig = RewardConfig(),
                 device: str = "cpu", vocabulary: torch.Tensor | None = None):
        self.source: Iterator[Scenario] = cycle(scenarios) if isinstance(scenarios, (list, tuple)) else iter(scenarios)
        self.batch_size, self.max_agents = batch_size, max_agents
        self.dynamics = dynamics if isinstance(dynamics, Dynamics) else make_dynamics(dynamics, vocabulary)
        self.controlled, self.observation, self.reward, self.device = controlled, observation, reward, device
        self.state: SimState | None = None

    def _load(self) -> SimState:
        scenarios = [next(self.source) for _ in range(self.batch_size)]
        batch = collate_scenarios(scenarios, max_agents=self.max_agents, pad_agents=True).to(self.device)
        self.state = reset(batch, self.controlled)
        self.observer = Observer(self.observation)
        self.tracker = EventTracker(self.state)
        return self.state

    def reset(self) -> tuple[torch.Tensor, dict]:
        state = self._load()
        return self.observer(state), {"controlled": state.controlled, "scenario_id": state.batch.scenario_id,
                                      "reset": True}

    def step(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """Returns observations, rewards ``[B, N]``, terminated ``[B, N]`` (events never
        end an episode here: use the event tensors), truncated ``[B]`` and infos."""
        if self.state is None:
            raise RuntimeError("call reset() first")
        if self.state.done:
            obs, info = self.reset()
            zeros = torch.zeros_like(self.state.controlled, dtype=torch.float32)
            return obs, zeros, torch.zeros_like(self.state.controlled), torch.zeros(self.batch_size, dtype=torch.bool), info
        previous = self.state
        self.state = step(previous, actions, self.dynamics)
        events = self.tracker(previous, self.state)
        rewards = self.reward(previous, self.state, events) * self.state.controlled
        truncated = torch.full((self.batch_size,), self.state.done, dtype=torch.bool, device=rewards.device)
        info = {**events, "controlled": self.state.controlled, "t": self.state.t, "reset": False}
        return self.observer(self.state), rewards, torch.zeros_like(self.state.controlled), truncated, info
