"""A Gaussian-mixture ego policy: the SDC's next 0.5 s as a mixture of 16 Gaussians.

The scene encoder is light: an MLP over the SDC's ego-centric observation vector (own
state, nearest agents, roadgraph points and lights; :mod:`closedloop.envs.observation`).
The mixture is over the next ``chunk`` poses (x, y, heading) in the SDC's frame, which is
exactly the action of the ``trajectory`` dynamics, so the policy drives it directly.
Trained by negative log-likelihood of the logged chunk (behaviour cloning); samples,
modes, top-K means and log-probabilities serve RoaD and REINFORCE.
"""

from __future__ import annotations

import torch
from torch import nn

from closedloop.agents.distributions import GaussianMixture
from closedloop.agents.policy import LearnedPolicy
from closedloop.envs.core import SimState
from closedloop.envs.dynamics import Dynamics
from closedloop.envs.errors import SimulationError
from closedloop.envs.observation import ObservationConfig, Observer

MIN_LOG_STD, MAX_LOG_STD = -5.0, 2.0


class GMMEgoModel(nn.Module):
    """Observation ``[..., D]`` -> mixture weights ``[..., C]``, means and log-standard
    deviations ``[..., C, chunk, 3]`` of the next chunk in the agent's frame."""

    def __init__(
        self,
        observation: ObservationConfig = ObservationConfig(),
        components: int = 16,
        chunk: int = 5,
        hidden: int = 256,
        layers: int = 3,
    ):
        super().__init__()
        self.observation, self.components, self.chunk = observation, components, chunk
        self.hidden, self.layers = hidden, layers
        blocks: list[nn.Module] = []
        width = observation.size
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), nn.LayerNorm(hidden), nn.GELU()]
            width = hidden
        self.encoder = nn.Sequential(*blocks)
        self.head = nn.Linear(hidden, components * (1 + 2 * chunk * 3))

    def forward(self, obs: torch.Tensor) -> GaussianMixture:
        out = self.head(self.encoder(obs))
        C, event = self.components, (self.chunk, 3)
        logits, mean, log_std = out.split([C, C * self.chunk * 3, C * self.chunk * 3], dim=-1)
        mean = mean.view(*obs.shape[:-1], C, *event)
        log_std = log_std.view(*obs.shape[:-1], C, *event).clamp(MIN_LOG_STD, MAX_LOG_STD)
        return GaussianMixture(logits, mean, log_std)


class GMMEgoPolicy(LearnedPolicy):
    """Drives the SDC with a :class:`GMMEgoModel` through the ``trajectory`` dynamics; the
    other controlled agents follow the log (expert actions), so as a sim agent in
    ``closedloop rollout`` / ``evaluate`` it is an ego planner among logged traffic (in an
    env with ``others=policy`` the env drives them instead). ``distribution(state)`` is over
    the SDC of each scenario: ``[B, 1]``."""

    def __init__(self, model: GMMEgoModel, temperature: float = 1.0, top_k: int | None = None):
        self.model, self.temperature, self.top_k = model, temperature, top_k
        self.observer = Observer(model.observation)

    def make_dynamics(self) -> Dynamics:
        """The dynamics this policy's actions are for."""
        from closedloop.envs.dynamics import make_dynamics

        return make_dynamics("trajectory", chunk=self.model.chunk)

    def reset(self, state: SimState, dynamics: Dynamics, generator: torch.Generator | None = None) -> None:
        if dynamics.name != "trajectory" or dynamics.chunk != self.model.chunk:
            raise SimulationError(
                f"the GMM ego policy drives the trajectory dynamics with chunks of {self.model.chunk} steps, "
                f"not {dynamics.name} (chunk {dynamics.chunk})"
            )
        super().reset(state, dynamics, generator)
        self.observer = Observer(self.model.observation)
        is_sdc = state.batch.is_sdc & state.batch.agent_mask
        if not bool(is_sdc.any(-1).all()):
            raise SimulationError("every scenario needs an SDC for the GMM ego policy")
        self.sdc = is_sdc.long().argmax(-1, keepdim=True)  # [B, 1]

    def distribution(self, state: SimState) -> GaussianMixture:
        return self.model(self.observer(state, self.sdc))

    def to_actions(self, state: SimState, sample: torch.Tensor) -> torch.Tensor:
        from closedloop.envs.env import expert_targets

        actions = self.dynamics.inverse(state.current, expert_targets(state, self.model.chunk), state.batch.agent_type)
        actions = actions.to(sample.dtype)
        return actions.scatter(1, self.sdc.view(-1, 1, 1, 1).expand(-1, -1, *sample.shape[2:]), sample)

    def target(self, state: SimState) -> tuple[torch.Tensor, torch.Tensor]:
        """The logged next chunk of each SDC in its own frame ``[B, 1, chunk, 3]`` (the
        trajectory action that follows the log) and whether it is wholly valid ``[B, 1]``:
        the behaviour-cloning target."""
        k = self.model.chunk
        window = slice(state.t + 1, state.t + 1 + k)
        b = state.batch
        log = state.log_states(window.start, window.stop)
        current = state.current
        sdc = self.sdc
        pick = sdc.view(-1, 1, 1, 1)
        log_sdc = log.gather(1, pick.expand(-1, 1, log.shape[2], 5))
        now = current.gather(1, sdc[..., None].expand(-1, 1, 5))
        action = self.dynamics.inverse(now, log_sdc)
        valid = b.agent_valid[:, :, window].gather(1, sdc[..., None].expand(-1, 1, k)).all(-1)
        return action, valid
