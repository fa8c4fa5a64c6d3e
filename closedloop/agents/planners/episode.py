"""One episode of B scenarios with the SDC driven by a planner and the other agents by a
sim-agent model: what policy evaluation and ``closedloop rollout --ego-planner`` step.

The SDC and the sim agents may use different dynamics (a bicycle ego among token-model
sim agents, say), so each side computes its next states with its own model and the
simulator core executes both: the SDC every step, the sim agents one chunk of their
dynamics at a time (a token every 5 steps). Sim agents ``log`` (log playback) control
nobody: every agent but the SDC follows the log exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from closedloop.data.batch import ScenarioBatch
from closedloop.envs.core import check_actions, global_trajectories, reset, step
from closedloop.envs.dynamics import ActionSpec, Dynamics, make_dynamics, wrap_angle
from closedloop.envs.map_index import RoadEdges
from closedloop.envs.observation import ObservationConfig, Observer
from closedloop.geometry import box_corners, rectangles_overlap

from .scoring import OFFROUTE_DISTANCE, Route, planner_reward, sdc_slots

LOG_PLAYBACK = "log"
EGO_DYNAMICS = ("bicycle", "delta_local", "delta_global", "state")  # continuous, one step per action


@dataclass(frozen=True)
class SimAgents:
    """A sim-agent model by name: its policy and dynamics, or neither for log playback."""

    name: str
    policy: object | None = None
    dynamics: Dynamics | None = None


def load_sim_agents(
    spec: str, seed: int = 0, dynamics: str = "delta_global", top_k: int | None = 48, temperature: float = 1.0
) -> SimAgents:
    """``log`` (log playback), or any ``--policy`` spec of ``closedloop rollout``: a baseline
    (driving ``dynamics``), a checkpoint or weights (their own dynamics, sampled among the
    ``top_k`` most likely actions at ``temperature``), user code."""
    if spec == LOG_PLAYBACK:
        return SimAgents(spec)
    from closedloop.agents.policy import load_policy

    policy = load_policy(spec, seed=seed, top_k=top_k, temperature=temperature)
    model = policy.make_dynamics() if hasattr(policy, "make_dynamics") else make_dynamics(dynamics)
    return SimAgents(spec, policy, model)


def ego_dynamics(name: str) -> Dynamics:
    """The SDC's dynamics: one of :data:`EGO_DYNAMICS` (planners act every step)."""
    if name not in EGO_DYNAMICS:
        raise ValueError(f"unknown ego dynamics {name!r}; planners drive one of {', '.join(EGO_DYNAMICS)}")
    return make_dynamics(name)


class NextStates(Dynamics):
    """The action is the next state itself (x, y, heading, vx, vy): how the episode hands
    the core states that the SDC's and the sim agents' own models computed."""

    name, chunk = "next_state", 1
    spec = ActionSpec(
        (5,),
        (-1e6, -1e6, -math.pi, -1e3, -1e3),
        (1e6, 1e6, math.pi, 1e3, 1e3),
        angular=(False, False, True, False, False),
    )

    def forward(self, state, action, agent_type=None):
        return torch.cat([action[..., :2], wrap_angle(action[..., 2:3]), action[..., 3:]], -1)[..., None, :]

    def inverse(self, state, target, agent_type=None):
        return target[..., 0, :].clone()


NEXT_STATES = NextStates()


class PlannerEpisode:
    """B scenarios from the current step to the end of the log. ``step(ego_actions)``
    moves the SDC by the ego dynamics and the others by ``sim_agents``, checks the SDC's
    events and returns the planner-evaluation reward ``[B]`` (``returns`` sums it)."""

    def __init__(
        self, batch: ScenarioBatch, sim_agents: SimAgents, ego: Dynamics, generator: torch.Generator | None = None
    ):
        if ego.chunk != 1 or ego.spec.discrete:
            raise ValueError(f"planners drive continuous one-step dynamics, not {ego.name}")
        self.sim_agents, self.ego = sim_agents, ego
        self.state = reset(batch, "sdc" if sim_agents.policy is None else "wosac")
        self.sdc = sdc_slots(batch)
        self.rows = torch.arange(batch.batch_size, device=self.state.device)
        self.route = Route.from_log(batch)
        self.edges = RoadEdges(batch)
        if sim_agents.policy is not None:
            sim_agents.policy.reset(self.state, sim_agents.dynamics, generator)
        self._plan: torch.Tensor | None = None  # the sim agents' next states [B, N, k, 5]
        self._used = 0
        self._observer: Observer | None = None
        self._arc = self.route.project(self.sdc_state()[:, None, :2])[1][:, 0]
        self.returns = torch.zeros(batch.batch_size, device=self.state.device)

    @property
    def done(self) -> bool:
        return self.state.done

    def sdc_state(self) -> torch.Tensor:
        """The SDC's current state ``[B, 5]``."""
        return self.state.current[self.rows, self.sdc]

    def observe(self, config: ObservationConfig = ObservationConfig()) -> torch.Tensor:
        """The SDC's observation ``[B, D]``, as the ego env gives it."""
        if self._observer is None:
            self._observer = Observer(config)
        return self._observer(self.state, self.sdc[:, None])[:, 0]

    def _others(self) -> torch.Tensor:
        """Every agent's next state ``[B, N, 5]`` (only the controlled ones are used)."""
        state, sim = self.state, self.sim_agents
        if sim.policy is None:
            return state.current.clone()
        if self._plan is None or self._used == self._plan.shape[2]:
            checked = check_actions(state, sim.policy.act(state), sim.dynamics)
            self._plan = sim.dynamics.forward(state.current, checked.actions, state.batch.agent_type)
            self._used = 0
        self._used += 1
        return self._plan[:, :, self._used - 1].clone()

    def step(self, ego_actions) -> torch.Tensor:
        """Advance one step; ``ego_actions`` ``[B, *ego.spec.shape]`` (finite, checked by
        the caller; clipped into the ego dynamics' bounds). Returns the rewards ``[B]``."""
        previous = self.state
        actions = torch.as_tensor(ego_actions, device=previous.device).to(previous.current.dtype)
        bounded, _ = self.ego.bound(actions)
        nxt = self._others()
        nxt[self.rows, self.sdc] = self.ego.forward(self.sdc_state(), bounded)[:, 0]
        self.state = step(previous, nxt, NEXT_STATES)
        collision, offroad = self.sdc_events()
        distance, arc = self.route.project(self.sdc_state()[:, None, :2])
        reward = planner_reward(collision, offroad, distance[:, 0] > OFFROUTE_DISTANCE, arc[:, 0] - self._arc)
        self._arc = arc[:, 0]
        self.returns += reward
        return reward

    def sdc_events(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Whether the SDC collides and is off the road now, ``[B]`` each: the simulator's
        own checks (:func:`closedloop.envs.core.collisions`' oriented-box test against every
        other valid agent, :mod:`closedloop.envs.events`' road-edge index), for the SDC alone."""
        state, rows = self.state, self.rows
        pose, dims = state.current, state.dims
        me, mine = pose[rows, self.sdc], dims[rows, self.sdc]
        radius = torch.hypot(dims[..., 0], dims[..., 1]) / 2
        gap = torch.linalg.norm(pose[..., :2] - me[:, None, :2], dim=-1)
        near = state.valid_now & ~state.batch.is_sdc & (gap < radius + radius[rows, self.sdc][:, None])
        b, n = torch.nonzero(near, as_tuple=True)
        collision = torch.zeros_like(self.sdc, dtype=torch.bool)
        if b.numel():
            box = (me[b, 0], me[b, 1], me[b, 2], mine[b, 0], mine[b, 1])
            other = (pose[b, n, 0], pose[b, n, 1], pose[b, n, 2], dims[b, n, 0], dims[b, n, 1])
            collision[b[rectangles_overlap(box, other)]] = True
        corners = box_corners(me[:, 0], me[:, 1], me[:, 2], mine[:, 0], mine[:, 1])[:, None]  # [B, 1, 4, 2]
        return collision, self.edges.signed_distance(corners)[:, 0] > 0

    def trajectories(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(objects [B, N] bool, trajectories [B, N, S, 4])``: the objects valid at the
        current time index (the rollout-file objects) and everyone's world x, y, z,
        heading over the steps simulated so far."""
        state = self.state
        cur = state.batch.current_time_index
        objects = state.batch.agent_valid[:, :, cur] & state.batch.agent_mask
        return objects, global_trajectories(state, cur + 1, state.t + 1)
