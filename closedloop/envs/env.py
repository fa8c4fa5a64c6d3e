"""The env core: one transition (actions -> dynamics -> events -> rewards -> terminations)
and observations, for B scenarios at once.

Every way of stepping the simulator is a thin adapter of :class:`EnvCore`: the PettingZoo
face (one scenario, agents by name), the Gymnasium ego env (the SDC), ``BatchedEnv``
(B scenarios of tensors, auto-reset, for trainers) and the rollout functions. An
``EnvCore`` lives for one episode of one batch of scenarios: it holds the simulator state
and the per-rollout indexes (road-edge neighbourhoods, nearest road points, pending
red-light crossings) that make events and observations cheap.

Agents: the env *controls* (moves by the dynamics) the ``controlled`` agents; of those it
*exposes* the ``exposed`` ones to the caller, whose actions it reads. When a sim-agent
policy ``others`` is given, it drives the controlled agents that are not exposed. An
exposed agent is *active* until it terminates (collision / off-road, when configured)
or the episode ends; a terminated agent stands still and is no longer rewarded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from closedloop.constants import DT
from closedloop.data.batch import ScenarioBatch
from closedloop.envs.core import (
    Controlled,
    SimState,
    agent_slots,
    as_action_tensor,
    check_actions,
    controlled_mask,
    reset,
    step,
)
from closedloop.envs.dynamics import Dynamics
from closedloop.envs.errors import SimulationError
from closedloop.envs.events import EventTracker
from closedloop.envs.observation import ObservationConfig, Observer
from closedloop.envs.prepared import MapIndexes
from closedloop.envs.rewards import RewardConfig

MOVERS_FROM_SLOTS = 512  # agent slots from which an env core moves only its few controlled agents


@dataclass(frozen=True)
class EnvConfig:
    """What every face shares: dynamics, observations, rewards and when agents terminate."""

    dynamics: Dynamics
    observation: ObservationConfig = ObservationConfig()
    reward: RewardConfig = RewardConfig()
    terminate_on_collision: bool = False
    terminate_on_offroad: bool = False


@dataclass(frozen=True)
class Transition:
    """One step of B scenarios. Per-agent tensors are ``[B, N]``."""

    previous: SimState
    state: SimState
    dynamics: Dynamics
    actions: torch.Tensor  # the executed actions [B, N, ...] (bounded; agents not controlled hold 0)
    clipped: torch.Tensor  # controlled agents whose action was outside the bounds and clipped
    events: dict[str, torch.Tensor] = field(default_factory=dict)  # collision, offroad, red_light, distance_to_log
    rewards: torch.Tensor | None = None  # 0 for agents that were not active
    terminated: torch.Tensor | None = None  # active agents that collided / left the road (when configured)
    truncated: torch.Tensor | None = None  # active agents at the end of the log


@dataclass(frozen=True)
class Guidance:
    """The log ahead of a state, for imitation and guidance (never part of observations)."""

    log_next: torch.Tensor  # [B, N, k, 5] logged states of the next k steps (NaN where invalid)
    log_next_valid: torch.Tensor  # [B, N, k]
    expert_action: torch.Tensor  # [B, N, ...] the Expert policy's action (towards the log)


class EnvCore:
    """B scenarios from reset to the end of the log; see the module docstring.

    ``start``: a batch (reset here) or a state to go on from. ``track_events=False`` skips
    events and rewards (plain rollouts that only want trajectories); ``events_for=
    "exposed"`` computes the events of the exposed agents only (the others report none),
    which is all an ego env rewards and much cheaper with one exposed agent among many.
    ``maps_from``: an earlier core on the same batch whose roadgraph indexes (event
    tracker, observer) this one may reuse, saving their set-up (faces pass the previous
    episode's core when a scenario is drawn again). ``maps``: the batch's roadgraph
    indexes where the caller has them (stacked from prepared scenarios, say: see
    :mod:`closedloop.envs.prepared`); the core keeps its neighbourhoods in them."""

    def __init__(
        self,
        start: ScenarioBatch | SimState,
        config: EnvConfig,
        controlled: Controlled | None = None,
        exposed: Controlled | None = None,
        others=None,
        generator: torch.Generator | None = None,
        differentiable: bool | None = None,
        track_events: bool = True,
        events_for: str = "all",
        maps_from: EnvCore | None = None,
        maps: MapIndexes | None = None,
    ):
        self.config, self.dynamics = config, config.dynamics
        if isinstance(start, SimState):
            if controlled is not None or differentiable is not None:
                raise SimulationError(
                    "starting from a SimState, the state decides which agents are controlled and "
                    "whether steps are differentiable: pass neither"
                )
            self.state = start
        else:
            controlled = "wosac" if others is not None or controlled is None else controlled
            self.state = reset(start, controlled, differentiable=bool(differentiable))
        state = self.state
        if (state.num_steps - 1 - state.t) % self.dynamics.chunk:
            raise SimulationError(
                f"{self.dynamics.name} moves {self.dynamics.chunk} steps at a time, which does not "
                f"divide the {state.num_steps - 1 - state.t} steps left after step {state.t}"
            )
        self.exposed = state.controlled if exposed is None else controlled_mask(state.batch, exposed)
        if others is None and not torch.equal(self.exposed, state.controlled):
            raise SimulationError("without a sim-agent policy (others) every controlled agent must be exposed")
        if bool((self.exposed & ~state.controlled).any()):
            raise SimulationError("exposed agents must be controlled")
        self.active = self.exposed.clone()
        # Few controlled agents among many slots (the SDCs of a vector env): the dynamics
        # move those slots only. With one scenario, every eager operation costs the same
        # whatever its size, and selecting the slots would only add operations.
        self._movers = None
        if state.controlled.numel() >= MOVERS_FROM_SLOTS:
            slots, real = agent_slots(state.controlled)
            if 4 * slots.shape[1] <= state.controlled.shape[1]:
                self._movers = (slots, real)
        self._finished_possible = False
        self.others = None
        if others is not None:
            from closedloop.agents.policy import as_policy

            self.others = as_policy(others)
            self.others.reset(state, self.dynamics, generator)
        self._track_events = track_events
        if events_for not in ("all", "exposed"):
            raise ValueError(f"events_for must be 'all' or 'exposed', not {events_for!r}")
        self.tracker = None
        events_of = self.exposed if events_for == "exposed" else None
        self._events_key = (events_for, events_of)
        if maps is not None and maps.edges.features.shape[0] != state.batch.batch_size:
            rows, wanted = maps.edges.features.shape[0], state.batch.batch_size
            raise SimulationError(f"the roadgraph indexes are of {rows} scenarios, the batch of {wanted}")
        if maps_from is not None and maps_from._reusable_for(self):
            # The same scenarios and event agents: keep the previous episode's roadgraph
            # indexes (they stay exact whatever rollout they served before).
            self.tracker, self.observer = maps_from.tracker, maps_from.observer
        else:
            if track_events:
                edges, stop_lines = (None, None) if maps is None else (maps.edges, maps.stop_lines)
                self.tracker = EventTracker(self.state, events_of, edges, stop_lines)
            self.observer = Observer(config.observation, maps)

    def _reusable_for(self, other: EnvCore) -> bool:
        """Whether ``other`` (a new episode) may take over this core's event tracker and
        observer: same batch, observation config and event agents."""
        mine, theirs = self._events_key, other._events_key
        return (
            self.state.batch is other.state.batch
            and self.config.observation == other.config.observation
            and (self.tracker is None) == (other._track_events is False)
            and mine[0] == theirs[0]
            and (mine[1] is None) == (theirs[1] is None)
            and (mine[1] is None or torch.equal(mine[1], theirs[1]))
        )

    @property
    def done(self) -> bool:
        return self.state.done

    def observe(self, agents: torch.Tensor | None = None) -> torch.Tensor:
        """Observations ``[B, Q, D]`` of agent slots ``agents`` ``[B, Q]``, or by default
        ``[B, N, D]`` for every slot with zeros outside the exposed agents (only those are
        observed); see :mod:`closedloop.envs.observation`."""
        if agents is None:
            return self.observer(self.state, observed=self.exposed)
        return self.observer(self.state, agents)

    def hold(self) -> torch.Tensor:
        """Actions ``[B, N, ...]`` that bring every agent to a stand where it is."""
        cur = self.state.current
        target = cur.clone()
        target[..., 3:] = 0
        targets = target[..., None, :].expand(*cur.shape[:-1], self.dynamics.chunk, 5)
        return self.dynamics.inverse(cur, targets, self.state.batch.agent_type)

    def guidance(self, expert: bool = True) -> Guidance:
        """The logged next ``chunk`` states and, with ``expert``, the action that follows
        them (constant velocity where the log has no next state; a stand-still action once
        the episode has ended)."""
        state, k = self.state, self.dynamics.chunk
        start = state.t + 1
        stop = min(start + k, state.num_steps)
        B, N = state.controlled.shape
        log = state.log_states(start, stop)
        valid = state.batch.agent_valid[:, :, start:stop]
        if stop - start < k:  # past the end of the log
            pad = k - (stop - start)
            log = torch.cat([log, log.new_zeros(B, N, pad, 5)], dim=2)
            valid = torch.cat([valid, valid.new_zeros(B, N, pad)], dim=2)
        log_next = torch.where(valid[..., None], log, torch.full_like(log, float("nan")))
        if not expert:
            action = torch.empty(0)
        elif state.done:
            action = self.hold()
        else:
            action = self.dynamics.inverse(state.current, expert_targets(state, k), state.batch.agent_type)
        return Guidance(log_next, valid, action)

    def step(self, actions) -> Transition:
        """Advance by one action of the dynamics (``chunk`` steps). ``actions`` ``[B, N, ...]``
        for the exposed agents (the others' entries are ignored)."""
        previous = self.state
        if previous.done:
            raise SimulationError(f"the episode ended at step {previous.t}: reset before stepping again")
        finished = self.exposed & ~self.active if self._finished_possible else None
        if self.others is not None or finished is not None:
            actions = self._compose(actions, finished)
        checked = check_actions(previous, actions, self.dynamics)
        state = step(previous, checked, self.dynamics, hold=finished, movers=self._movers)
        self.state = state
        transition = Transition(previous, state, self.dynamics, checked.actions, checked.clipped)
        if self.tracker is None:
            return transition
        cfg = self.config
        active = self.active
        events = self.tracker(previous, state)
        transition = Transition(previous, state, self.dynamics, checked.actions, checked.clipped, events)
        rewards = cfg.reward(transition) * active
        terminated = torch.zeros_like(active)
        if cfg.terminate_on_collision:
            terminated |= events["collision"]
        if cfg.terminate_on_offroad:
            terminated |= events["offroad"]
        terminated &= active
        truncated = active & ~terminated if state.done else torch.zeros_like(active)
        self.active = active & ~terminated & ~truncated
        self._finished_possible |= cfg.terminate_on_collision or cfg.terminate_on_offroad
        return Transition(
            previous, state, self.dynamics, checked.actions, checked.clipped, events, rewards, terminated, truncated
        )

    def _compose(self, actions, finished: torch.Tensor | None) -> torch.Tensor:
        """The caller's actions for the active exposed agents, the sim-agent policy's for
        the other controlled agents, zeros for finished agents (the step holds them)."""
        state = self.state
        actions = as_action_tensor(actions, self.dynamics, state.device)
        if self.others is not None:
            theirs = as_action_tensor(self.others.act(state), self.dynamics, state.device)
            if theirs.shape != actions.shape:
                raise SimulationError(
                    f"the sim-agent policy returned actions of shape {list(theirs.shape)}, "
                    f"the caller {list(actions.shape)}"
                )
            actions = _where_agents(self.exposed, actions, theirs.to(actions.dtype))
        if finished is not None:
            actions = _where_agents(finished, torch.zeros((), dtype=actions.dtype, device=actions.device), actions)
        return actions


def constant_velocity_targets(current: torch.Tensor, k: int) -> torch.Tensor:
    """States ``[B, N, k, 5]`` reached by keeping the current velocity and heading."""
    steps = torch.arange(1, k + 1, device=current.device, dtype=current.dtype) * DT
    x = current[..., None, 0] + current[..., None, 3] * steps
    y = current[..., None, 1] + current[..., None, 4] * steps
    rest = current[..., None, 2:].expand(*current.shape[:-1], k, 3)
    return torch.cat([x[..., None], y[..., None], rest], dim=-1)


def expert_targets(state: SimState, k: int) -> torch.Tensor:
    """The logged next ``k`` states ``[B, N, k, 5]``, or constant-velocity ones where the
    log is invalid: what the Expert policy steers to."""
    if state.t + k > state.num_steps - 1:
        raise SimulationError(f"no logged states after step {state.t}: the episode has ended")
    window = slice(state.t + 1, state.t + 1 + k)
    log = state.log_states(window.start, window.stop)
    ok = state.batch.agent_valid[:, :, window].all(-1)
    fallback = constant_velocity_targets(state.current, k)
    return torch.where(ok[..., None, None], log, fallback)


def _where_agents(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a`` for the agents of ``mask`` ``[B, N]``, ``b`` for the others."""
    return torch.where(mask.view(*mask.shape, *([1] * (max(a.dim(), b.dim()) - 2))), a, b)
