"""The two faces people step: a PettingZoo ``ParallelEnv`` and a Gymnasium ego env.

Both wrap the batched core with one scenario at a time (B = 1), the scenario drawn from
the list handed in at each reset. Agents are named by their WOMD track id (a string).
Per-agent ``infos`` carry the logged next state (``log_next``: x, y, heading, vx, vy in the
scenario's frame, NaN where the log has none) for guidance wrappers, and the step's events.
"""

from __future__ import annotations

from typing import Callable, Sequence

import gymnasium
import numpy as np
import torch
from pettingzoo import ParallelEnv

from closedloop.data.batch import collate_scenarios
from closedloop.data.scenario import Scenario
from closedloop.envs.core import SimState, SimulationError, reset, step
from closedloop.envs.dynamics import Dynamics, make_dynamics
from closedloop.envs.events import EventTracker
from closedloop.envs.observation import ObservationConfig, Observer
from closedloop.envs.rewards import RewardConfig


def action_space(dynamics: Dynamics) -> gymnasium.Space:
    spec = dynamics.spec
    if spec.n is not None:
        return gymnasium.spaces.Discrete(spec.n)
    if spec.bins is not None:
        return gymnasium.spaces.MultiDiscrete(np.full(spec.shape, spec.bins))
    low = np.broadcast_to(np.array(spec.low, np.float32), spec.shape).copy()
    high = np.broadcast_to(np.array(spec.high, np.float32), spec.shape).copy()
    return gymnasium.spaces.Box(low, high, dtype=np.float32)


class _Episode:
    """One scenario's rollout: state, events, observations and rewards (shared by faces)."""

    def __init__(self, scenarios: Sequence[Scenario], dynamics: Dynamics, controlled, observation: ObservationConfig,
                 reward: RewardConfig, device: str):
        if not scenarios:
            raise ValueError("the environment needs at least one scenario")
        self.scenarios, self.dynamics, self.controlled = list(scenarios), dynamics, controlled
        self.observation, self.reward, self.device = observation, reward, device
        self.rng = np.random.default_rng()

    def reset(self, seed: int | None) -> SimState:
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        scenario = self.scenarios[int(self.rng.integers(len(self.scenarios)))]
        self.batch = collate_scenarios([scenario]).to(self.device)
        self.state = reset(self.batch, self.controlled)
        self.observer = Observer(self.observation)
        self.tracker = EventTracker(self.state)
        self.names = [str(int(i)) for i in self.batch.agent_id[0].tolist()]
        return self.state

    def hold(self) -> torch.Tensor:
        """Actions that keep every agent where it is (used for finished agents)."""
        cur = self.state.current
        target = cur.clone()
        target[..., 3:] = 0
        return self.dynamics.inverse(cur, target[..., None, :].expand(*cur.shape[:-1], self.dynamics.chunk, 5))

    def advance(self, actions: torch.Tensor):
        previous = self.state
        self.state = step(previous, actions, self.dynamics)
        events = self.tracker(previous, self.state)
        rewards = self.reward(previous, self.state, events)
        return events, rewards

    def log_next(self) -> np.ndarray:
        t = min(self.state.t + 1, self.state.num_steps - 1)
        log = self.state.log_states(t, t + 1)[0, :, 0]
        ok = self.batch.agent_valid[0, :, t]
        return torch.where(ok[:, None], log, torch.full_like(log, float("nan"))).cpu().numpy()


class ClosedLoopParallelEnv(ParallelEnv):
    """PettingZoo parallel env over WOMD scenarios; see :func:`parallel_env`."""

    metadata = {"name": "closedloop_parallel_v0", "render_modes": ["rgb_array"], "is_parallelizable": True}

    def __init__(self, scenarios: Sequence[Scenario], dynamics: str | Dynamics = "delta_local",
                 controlled="wosac", observation: ObservationConfig = ObservationConfig(),
                 reward: RewardConfig = RewardConfig(), render_mode: str | None = None,
                 terminate_on_collision: bool = False, terminate_on_offroad: bool = False,
                 others: Callable | None = None, vocabulary: torch.Tensor | None = None, device: str = "cpu"):
        self.dynamics = dynamics if isinstance(dynamics, Dynamics) else make_dynamics(dynamics, vocabulary)
        # With a sim-agent policy for the others, the core simulates every agent valid at the
        # current step; the ``controlled`` ones are the agents people act for.
        self.others, self._exposed = others, controlled
        self.episode = _Episode(scenarios, self.dynamics, "wosac" if others else controlled, observation,
                                reward, device)
        self.render_mode = render_mode
        self.terminate_on = (terminate_on_collision, terminate_on_offroad)
        self._observation_space = gymnasium.spaces.Box(-np.inf, np.inf, (observation.size,), np.float32)
        self._action_space = action_space(self.dynamics)
        self.episode.reset(0)
        self.possible_agents = self._controlled_names()
        self.agents: list[str] = []

    def _controlled_names(self) -> list[str]:
        from closedloop.envs.core import controlled_mask

        mask = controlled_mask(self.episode.batch, self._exposed)[0].tolist()
        return [name for name, c in zip(self.episode.names, mask) if c]

    def observation_space(self, agent: str) -> gymnasium.Space:
        return self._observation_space

    def action_space(self, agent: str) -> gymnasium.Space:
        return self._action_space

    def _observations(self) -> dict[str, np.ndarray]:
        obs = self.episode.observer(self.episode.state)[0].cpu().numpy()
        return {a: obs[self._index[a]] for a in self.agents}

    def reset(self, seed: int | None = None, options: dict | None = None):
        self.episode.reset(seed)
        self.possible_agents = self._controlled_names()
        self.agents = list(self.possible_agents)
        self._index = {name: i for i, name in enumerate(self.episode.names)}
        log_next = self.episode.log_next()
        return self._observations(), {a: {"log_next": log_next[self._index[a]]} for a in self.agents}

    def step(self, actions: dict[str, np.ndarray]):
        if not self.agents:
            raise SimulationError("step() after the episode ended: call reset()")
        unknown = set(actions) - set(self.agents)
        if unknown:
            raise KeyError(f"unknown or finished agents {sorted(unknown)[:5]}; live agents are {self.agents[:5]}...")
        missing = set(self.agents) - set(actions)
        if missing:
            raise ValueError(f"no action for agents {sorted(missing)[:5]}")
        hold = self.episode.hold()
        batch_actions = hold if self.others is None else self.others(self.episode.state, self.dynamics)
        finished = [i for i, name in enumerate(self.episode.names)
                    if name in self.possible_agents and name not in self.agents]
        batch_actions[0, finished] = hold[0, finished]  # terminated agents stand still
        expected = tuple(batch_actions.shape[2:])
        for name, action in actions.items():
            if np.shape(action) != expected:
                raise ValueError(f"agent {name}: action shape {list(np.shape(action))}, expected {list(expected)}")
        if actions:
            slots = [self._index[name] for name in actions]
            values = np.stack([np.asarray(action) for action in actions.values()])
            batch_actions[0, slots] = torch.as_tensor(values, device=batch_actions.device).to(batch_actions.dtype)
        events, rewards = self.episode.advance(batch_actions)
        done = self.episode.state.done
        log_next = self.episode.log_next()
        terminated = events["collision"][0] & self.terminate_on[0]
        terminated |= events["offroad"][0] & self.terminate_on[1]
        obs = self._observations()
        # One transfer per tensor, then plain indexing per agent.
        rewards, terminated = rewards[0].cpu().numpy(), terminated.cpu().numpy()
        events = {k: v[0].float().cpu().numpy() for k, v in events.items()}
        slot = {a: self._index[a] for a in self.agents}
        rew = {a: float(rewards[i]) for a, i in slot.items()}
        term = {a: bool(terminated[i]) for a, i in slot.items()}
        trunc = {a: done for a in self.agents}
        infos = {a: {"log_next": log_next[i], **{k: float(v[i]) for k, v in events.items()}} for a, i in slot.items()}
        self.agents = [a for a in self.agents if not (term[a] or trunc[a])]
        return obs, rew, term, trunc, infos

    def render(self):
        if self.render_mode != "rgb_array":
            return None
        from closedloop.envs.render import render_state

        return render_state(self.episode.state)

    def close(self):
        self.agents = []


def parallel_env(scenarios: Sequence[Scenario], **kwargs) -> ClosedLoopParallelEnv:
    """A PettingZoo ``ParallelEnv`` over ``scenarios`` (see :class:`ClosedLoopParallelEnv`)."""
    return ClosedLoopParallelEnv(scenarios, **kwargs)


class EgoEnv(gymnasium.Env):
    """Gymnasium env driving the SDC; the other agents follow the log, or ``others``
    (a policy ``(state, dynamics) -> actions``) when given, which then drives every agent
    valid at the current step except the SDC."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, scenarios: Sequence[Scenario] | None = None, dynamics: str | Dynamics = "bicycle",
                 observation: ObservationConfig = ObservationConfig(), reward: RewardConfig = RewardConfig(),
                 others: Callable | None = None, render_mode: str | None = None,
                 terminate_on_collision: bool = True, terminate_on_offroad: bool = False,
                 vocabulary: torch.Tensor | None = None, device: str = "cpu"):
        if scenarios is None:
            from closedloop.data.synthetic import generate_scenarios

            scenarios = list(generate_scenarios(4, seed=0, town="cross"))
        self.dynamics = dynamics if isinstance(dynamics, Dynamics) else make_dynamics(dynamics, vocabulary)
        self.others = others
        self.episode = _Episode(scenarios, self.dynamics, "wosac" if others else "sdc", observation, reward, device)
        self.observation_space = gymnasium.spaces.Box(-np.inf, np.inf, (observation.size,), np.float32)
        self.action_space = action_space(self.dynamics)
        self.render_mode = render_mode
        self.terminate_on = (terminate_on_collision, terminate_on_offroad)

    def _sdc(self) -> int:
        return int(torch.nonzero(self.episode.batch.is_sdc[0])[0])

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.episode.reset(seed if seed is not None else int(self.np_random.integers(2**31)))
        sdc = self._sdc()
        obs = self.episode.observer(self.episode.state)[0, sdc].cpu().numpy()
        return obs, {"log_next": self.episode.log_next()[sdc]}

    def step(self, action):
        if self.episode.state.done:
            raise SimulationError("step() after the episode ended: call reset()")
        sdc = self._sdc()
        actions = self.episode.hold()
        if self.others is not None:
            actions = self.others(self.episode.state, self.dynamics)
        value = torch.as_tensor(np.asarray(action), dtype=actions.dtype, device=actions.device)
        if tuple(value.shape) != tuple(actions.shape[2:]):
            raise ValueError(f"action shape {list(value.shape)}, expected {list(actions.shape[2:])}")
        actions[0, sdc] = value
        events, rewards = self.episode.advance(actions)
        obs = self.episode.observer(self.episode.state)[0, sdc].cpu().numpy()
        terminated = bool(events["collision"][0, sdc] & self.terminate_on[0]) or bool(
            events["offroad"][0, sdc] & self.terminate_on[1])
        info = {"log_next": self.episode.log_next()[sdc], **{k: float(v[0, sdc]) for k, v in events.items()}}
        return obs, float(rewards[0, sdc]), terminated, self.episode.state.done, info

    def render(self):
        if self.render_mode != "rgb_array":
            return None
        from closedloop.envs.render import render_state

        return render_state(self.episode.state)


def ego_env(scenarios: Sequence[Scenario] | None = None, **kwargs) -> EgoEnv:
    """A Gymnasium env for the SDC (registered as ``closedloop/Ego-v0``)."""
    return EgoEnv(scenarios, **kwargs)


def register() -> None:
    if "closedloop/Ego-v0" not in gymnasium.registry:
        gymnasium.register(id="closedloop/Ego-v0", entry_point="closedloop.envs.faces:EgoEnv",
                           max_episode_steps=80)
