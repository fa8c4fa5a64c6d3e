"""The two faces people step: a PettingZoo ``ParallelEnv`` and a Gymnasium ego env.

Both are thin adapters of the env core (:class:`closedloop.envs.env.EnvCore`) with one
scenario at a time (B = 1), drawn from the list handed in at each reset; neither
simulates anything before the first ``reset``. Agents are named by their WOMD track id
(a string). Infos carry the logged next state (``log_next``: x, y, heading, vx, vy in the
scenario's frame, NaN where the log has none) for guidance wrappers, the step's events
and whether the action was clipped. After an episode, ``env.trajectories()`` gives the
simulated world trajectories in the ``closedloop rollout`` layout.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import gymnasium
import numpy as np
import torch
from pettingzoo import ParallelEnv

from closedloop.agents.policy import as_policy
from closedloop.data.batch import collate_scenarios
from closedloop.data.scenario import Scenario
from closedloop.envs.core import SimState, global_trajectories
from closedloop.envs.dynamics import Dynamics, make_dynamics
from closedloop.envs.env import EnvConfig, EnvCore
from closedloop.envs.errors import SimulationError
from closedloop.envs.observation import ObservationConfig
from closedloop.envs.rewards import RewardConfig

CACHED_CORES = 8  # scenarios whose batch and roadgraph indexes an env keeps for later episodes


def action_space(dynamics: Dynamics) -> gymnasium.Space:
    spec = dynamics.spec
    if spec.n is not None:
        return gymnasium.spaces.Discrete(spec.n)
    if spec.bins is not None:
        return gymnasium.spaces.MultiDiscrete(np.full(spec.shape, spec.bins))
    low = np.broadcast_to(np.array(spec.low, np.float32), spec.shape).copy()
    high = np.broadcast_to(np.array(spec.high, np.float32), spec.shape).copy()
    return gymnasium.spaces.Box(low, high, dtype=np.float32)


def _face_controlled(controlled) -> str:
    if isinstance(controlled, str) and controlled in ("wosac", "all_valid", "sdc"):
        return controlled
    raise SimulationError(
        f"the faces take controlled='wosac' or 'sdc', not {controlled!r} (a mask tensor "
        "only makes sense for one batch: use BatchedEnv or EnvCore)"
    )


def _exposed_ids(scenario: Scenario, controlled: str) -> np.ndarray:
    """The track ids the env exposes in ``scenario``, in track order."""
    if controlled == "sdc":
        return scenario.track_id[[scenario.sdc_track_index]]
    return scenario.track_id[scenario.valid_at_current()]


def agent_action(name: str, action, dynamics: Dynamics) -> np.ndarray:
    """One agent's action as a numpy array, refusing what the dynamics cannot take
    (naming the agent): complex, string, object or bool arrays, floats for discrete
    dynamics (no silent truncation), wrong shapes. Values are checked by the core."""
    try:
        array = np.asarray(action)
    except (TypeError, ValueError) as err:
        raise SimulationError(f"agent {name}: the action is not an array: {err}") from None
    spec = dynamics.spec
    allowed = "iu" if spec.discrete else "fiu"
    if array.dtype.kind not in allowed:
        wanted = "integer" if spec.discrete else "real"
        raise SimulationError(f"agent {name}: {dynamics.name} takes {wanted} actions, not {array.dtype} ({action!r})")
    if array.shape != tuple(spec.shape):
        raise SimulationError(f"agent {name}: action shape {list(array.shape)}, expected {list(spec.shape)}")
    return array


class _Face:
    """What both faces share: the scenario draw, the env core of the current episode,
    track-id names, trajectories and rendering."""

    def _setup(
        self,
        scenarios: Sequence[Scenario],
        dynamics: str | Dynamics,
        vocabulary,
        observation,
        reward,
        terminate_on_collision: bool,
        terminate_on_offroad: bool,
        others,
        device: str,
    ):
        self.scenarios = list(scenarios)
        if not self.scenarios:
            raise ValueError("the environment needs at least one scenario")
        self.dynamics = dynamics if isinstance(dynamics, Dynamics) else make_dynamics(dynamics, vocabulary)
        self.config = EnvConfig(self.dynamics, observation, reward, terminate_on_collision, terminate_on_offroad)
        self.others = as_policy(others) if others is not None else None
        self.device = device
        self._rng = np.random.default_rng()
        self.core: EnvCore | None = None
        # The latest episode's core of each scenario drawn, newest last: an episode never
        # writes into its batch, so a scenario drawn again reuses the batch and the core's
        # roadgraph indexes (collating and indexing cost as much as ~40 steps).
        self._cores: OrderedDict[int, EnvCore] = OrderedDict()

    def _start(self, seed: int | None, exposed: str, events_for: str = "all") -> None:
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        index = int(self._rng.integers(len(self.scenarios)))
        scenario = self.scenarios[index]
        previous = self._cores.pop(index, None)
        batch = previous.state.batch if previous is not None else collate_scenarios([scenario]).to(self.device)
        generator = torch.Generator(device=self.device).manual_seed(int(self._rng.integers(2**62)))
        self.core = EnvCore(
            batch,
            self.config,
            controlled=exposed,
            exposed=exposed,
            others=self.others,
            generator=generator,
            events_for=events_for,
            maps_from=previous,
        )
        self._cores[index] = self.core
        if len(self._cores) > CACHED_CORES:
            self._cores.popitem(last=False)
        self.scenario_id = scenario.scenario_id
        self.names = [str(int(i)) for i in batch.agent_id[0].tolist()]
        self._index = {name: i for i, name in enumerate(self.names)}

    @property
    def sim_state(self) -> SimState:
        """The simulator state of the current episode (B = 1)."""
        if self.core is None:
            raise SimulationError("call reset() first")
        return self.core.state

    def _log_next(self, slot: int | None = None) -> np.ndarray:
        """The logged next state ``[N, 5]`` of every agent, or ``[5]`` of agent ``slot``
        (NaN where the log has none or the episode has ended)."""
        state = self.core.state
        nxt = state.t + 1
        if slot is None:
            return self.core.guidance(expert=False).log_next[0, :, 0].cpu().numpy()
        if nxt >= state.num_steps or not bool(state.batch.agent_valid[0, slot, nxt]):
            return np.full(5, np.nan, np.float32)
        return state.log_states(nxt, nxt + 1)[0, slot, 0].cpu().numpy()

    def trajectories(self) -> tuple[np.ndarray, np.ndarray]:
        """``(object_ids [A], trajectories [A, S, 4])``: world x, y, z, heading of every
        object valid at the current time index (the objects WOSAC scores, in track order)
        over the S steps simulated so far. Stack R episodes' ``trajectories`` into
        ``[R, A, 80, 4]`` for :func:`closedloop.metrics.rollouts.save_rollouts`."""
        state = self.sim_state
        cur = state.batch.current_time_index
        objects = state.batch.agent_valid[0, :, cur] & state.batch.agent_mask[0]
        traj = global_trajectories(state, cur + 1, state.t + 1)[0, objects].cpu().numpy()
        return state.batch.agent_id[0, objects].cpu().numpy(), traj

    def render(self):
        if self.render_mode != "rgb_array" or self.core is None:
            return None
        from closedloop.envs.render import render_state

        return render_state(self.core.state)


class ClosedLoopParallelEnv(_Face, ParallelEnv):
    """PettingZoo parallel env over WOMD scenarios; see :func:`parallel_env`.

    Agents are named by WOMD track id. ``possible_agents`` is, before the first reset, the
    union of the exposed agents of every scenario handed in and, from each reset on, the
    exposed agents of the episode's scenario (every WOMD scenario has its own agents;
    PettingZoo's API test requires the agents that finish an episode to be exactly
    ``possible_agents``). Infos carry ``log_next`` (the logged next state: x, y, heading,
    vx, vy in the scenario's frame, NaN where the log has none; ground truth for guidance,
    never part of observations), the step's events and ``clipped`` (whether the action
    was outside the dynamics' bounds and clipped).
    """

    metadata = {"name": "closedloop_parallel_v0", "render_modes": ["rgb_array"], "is_parallelizable": True}

    def __init__(
        self,
        scenarios: Sequence[Scenario],
        dynamics: str | Dynamics = "delta_local",
        controlled: str = "wosac",
        observation: ObservationConfig = ObservationConfig(),
        reward: RewardConfig = RewardConfig(),
        render_mode: str | None = None,
        terminate_on_collision: bool = False,
        terminate_on_offroad: bool = False,
        others=None,
        vocabulary: torch.Tensor | None = None,
        device: str = "cpu",
    ):
        self._setup(
            scenarios,
            dynamics,
            vocabulary,
            observation,
            reward,
            terminate_on_collision,
            terminate_on_offroad,
            others,
            device,
        )
        self._exposed = _face_controlled(controlled)
        self.render_mode = render_mode
        self._observation_space = gymnasium.spaces.Box(-np.inf, np.inf, (observation.size,), np.float32)
        self._action_space = action_space(self.dynamics)
        union = dict.fromkeys(str(int(i)) for s in self.scenarios for i in _exposed_ids(s, self._exposed))
        self.possible_agents = list(union)
        self.agents: list[str] = []

    def observation_space(self, agent: str) -> gymnasium.Space:
        return self._observation_space

    def action_space(self, agent: str) -> gymnasium.Space:
        return self._action_space

    def _observations(self) -> dict[str, np.ndarray]:
        if not self.agents:
            return {}
        slots = torch.tensor([[self._index[a] for a in self.agents]], device=self.core.state.device)
        obs = self.core.observe(slots)[0].cpu().numpy()
        return dict(zip(self.agents, obs))

    def reset(self, seed: int | None = None, options: dict | None = None):
        self._start(seed, self._exposed)
        exposed = self.core.exposed[0].tolist()
        self.possible_agents = [name for name, e in zip(self.names, exposed) if e]
        self.agents = list(self.possible_agents)
        log_next = self._log_next()
        return self._observations(), {a: {"log_next": log_next[self._index[a]]} for a in self.agents}

    def step(self, actions: dict[str, np.ndarray]):
        if self.core is None:
            raise SimulationError("call reset() before step()")
        if not self.agents:
            raise SimulationError("step() after the episode ended: call reset()")
        unknown = set(actions) - set(self.agents)
        if unknown:
            finished = sorted(unknown & set(self.possible_agents))
            raise KeyError(
                f"scenario {self.scenario_id}: unknown or finished agents {sorted(unknown)[:5]}"
                + (f" ({len(finished)} of them finished)" if finished else "")
                + f"; live agents are {self.agents[:5]}..."
            )
        missing = set(self.agents) - set(actions)
        if missing:
            raise ValueError(f"scenario {self.scenario_id}: no action for agents {sorted(missing)[:5]}")
        spec = self.dynamics.spec
        dtype = np.int64 if spec.discrete else np.float32
        batch_actions = np.zeros((1, len(self.names), *spec.shape), dtype)
        for name, action in actions.items():
            batch_actions[0, self._index[name]] = agent_action(name, action, self.dynamics)
        transition = self.core.step(torch.from_numpy(batch_actions))
        obs_agents = self.agents
        # One transfer per tensor, then plain indexing per agent.
        rewards = transition.rewards[0].cpu().numpy()
        terminated, truncated = transition.terminated[0].cpu().numpy(), transition.truncated[0].cpu().numpy()
        events = {k: v[0].float().cpu().numpy() for k, v in transition.events.items()}
        events["clipped"] = transition.clipped[0].float().cpu().numpy()
        log_next = self._log_next()
        slot = {a: self._index[a] for a in obs_agents}
        rew = {a: float(rewards[i]) for a, i in slot.items()}
        term = {a: bool(terminated[i]) for a, i in slot.items()}
        trunc = {a: bool(truncated[i]) for a, i in slot.items()}
        infos = {a: {"log_next": log_next[i], **{k: float(v[i]) for k, v in events.items()}} for a, i in slot.items()}
        obs = self._observations()
        self.agents = [a for a in obs_agents if not (term[a] or trunc[a])]
        return obs, rew, term, trunc, infos

    def close(self):
        self.agents = []


def parallel_env(scenarios: Sequence[Scenario], **kwargs) -> ClosedLoopParallelEnv:
    """A PettingZoo ``ParallelEnv`` over ``scenarios`` (see :class:`ClosedLoopParallelEnv`)."""
    return ClosedLoopParallelEnv(scenarios, **kwargs)


class EgoEnv(_Face, gymnasium.Env):
    """Gymnasium env driving the SDC; the other agents follow the log, or ``others`` (a
    policy, see :mod:`closedloop.agents.policy`) when given, which then drives every
    agent valid at the current step except the SDC. Rewards default to the RL
    fine-tuning paper's terms scaled by 0.1 (see :mod:`closedloop.envs.rewards`)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(
        self,
        scenarios: Sequence[Scenario] | None = None,
        dynamics: str | Dynamics = "bicycle",
        observation: ObservationConfig = ObservationConfig(),
        reward: RewardConfig = RewardConfig(scale=0.1),
        others=None,
        render_mode: str | None = None,
        terminate_on_collision: bool = True,
        terminate_on_offroad: bool = False,
        vocabulary: torch.Tensor | None = None,
        device: str = "cpu",
    ):
        if scenarios is None:
            from closedloop.data.synthetic import generate_scenarios

            scenarios = list(generate_scenarios(4, seed=0, town="cross"))
        self._setup(
            scenarios,
            dynamics,
            vocabulary,
            observation,
            reward,
            terminate_on_collision,
            terminate_on_offroad,
            others,
            device,
        )
        self.observation_space = gymnasium.spaces.Box(-np.inf, np.inf, (observation.size,), np.float32)
        self.action_space = action_space(self.dynamics)
        self.render_mode = render_mode

    def _observe_sdc(self) -> np.ndarray:
        return self.core.observe(self._sdc_slot)[0, 0].cpu().numpy()

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        # Only the SDC's events are rewarded and reported: the others' are not computed.
        self._start(seed if seed is not None else int(self.np_random.integers(2**31)), "sdc", events_for="exposed")
        self._sdc = int(torch.nonzero(self.core.state.batch.is_sdc[0])[0])
        self._sdc_slot = torch.tensor([[self._sdc]], device=self.core.state.device)
        return self._observe_sdc(), {"log_next": self._log_next(self._sdc)}

    def step(self, action):
        if self.core is None:
            raise SimulationError("call reset() before step()")
        if self.core.done:
            raise SimulationError("step() after the episode ended: call reset()")
        spec = self.dynamics.spec
        actions = np.zeros((1, len(self.names), *spec.shape), np.int64 if spec.discrete else np.float32)
        actions[0, self._sdc] = agent_action(self.names[self._sdc], action, self.dynamics)
        transition = self.core.step(torch.from_numpy(actions))
        sdc = self._sdc
        info = {
            "log_next": self._log_next(sdc),
            "clipped": bool(transition.clipped[0, sdc]),
            **{k: float(v[0, sdc]) for k, v in transition.events.items()},
        }
        terminated = bool(transition.terminated[0, sdc])
        return (self._observe_sdc(), float(transition.rewards[0, sdc]), terminated, self.core.done, info)


def ego_env(scenarios: Sequence[Scenario] | None = None, **kwargs) -> EgoEnv:
    """A Gymnasium env for the SDC (registered as ``closedloop/Ego-v0``)."""
    return EgoEnv(scenarios, **kwargs)


def register() -> None:
    """Register ``closedloop/Ego-v0`` with Gymnasium (done by ``import closedloop.envs``)."""
    if "closedloop/Ego-v0" not in gymnasium.registry:
        gymnasium.register(id="closedloop/Ego-v0", entry_point="closedloop.envs.faces:EgoEnv", max_episode_steps=80)
