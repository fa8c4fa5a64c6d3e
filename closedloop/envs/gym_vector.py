"""A Gymnasium ``VectorEnv`` of agent slots over the batched env: the SDCs of B scenarios
(``agents="sdc"``, env i is the SDC of scenario i) or every agent of B scenarios padded to
``max_agents`` slots each (``agents="all"``, env ``i`` is slot ``i % max_agents`` of
scenario ``i // max_agents``), stepped in one tensor call without subprocesses.

With ``agents="sdc"`` the semantics are those of :class:`closedloop.envs.faces.EgoEnv`
(same defaults: bicycle dynamics, ``RewardConfig(scale=0.1)``, termination on collision,
the other agents following the log or an ``others`` policy), so a policy trained on one
runs on the other; ``tests/test_ppo.py`` checks that both give the same observations and
rewards for the same actions.

**Ghost steps.** All B scenarios share the WOMD timeline (step 10 to 90), so the batch
can only restart when the log ends. An env whose agent finished early (it collided, with
``terminate_on_collision``) or whose slot holds no agent (padding with ``agents="all"``)
cannot start a new episode before that. Until then it is a *ghost*: every step it
returns its last observation (zeros for padding), reward 0, ``terminated=True`` and
``infos["ghost"][i] = True``; its actions are ignored (the agent stands still). To a
learner each ghost step is a one-step episode of return 0 that ends in a terminal state,
so no reward or bootstrap value leaks into a real episode, and because its action
changes nothing, it adds variance but no bias to a policy gradient. Count episode
returns only where ``ghost`` is false (the SB3 adapter's ``episode`` infos do).

**Auto-reset** is Gymnasium's next-step mode (``metadata["autoreset_mode"]``): the step
that reaches the end of the log returns ``truncated`` for every live agent (and ghosts
their usual ``terminated``); the next ``step`` ignores its actions, draws B new
scenarios and returns their first observations with reward 0 and no flags set.

Bad actions (wrong shape, NaN/inf) raise :class:`SimulationError` naming the env index
and the scenario id.
"""

from __future__ import annotations

from typing import Literal

import gymnasium
import numpy as np
import torch
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space

from closedloop.envs.dynamics import Dynamics
from closedloop.envs.env import EnvCore
from closedloop.envs.errors import SimulationError
from closedloop.envs.faces import action_space
from closedloop.envs.observation import ObservationConfig
from closedloop.envs.rewards import RewardConfig
from closedloop.envs.vector import BatchedEnv

EVENT_KEYS = ("collision", "offroad", "red_light", "distance_to_log", "clipped")


class AgentVectorEnv(gymnasium.vector.VectorEnv):
    """See the module docstring. ``num_scenarios`` (B) scenarios are simulated at once;
    ``num_envs`` is B (``agents="sdc"``) or B x ``max_agents`` (``agents="all"``).
    ``cached_scenarios``: drawn scenarios kept collated and indexed for later batches
    (:class:`closedloop.envs.vector.BatchedEnv`)."""

    metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP, "render_modes": []}

    def __init__(
        self,
        scenarios,
        num_scenarios: int = 16,
        agents: Literal["sdc", "all"] = "sdc",
        dynamics: str | Dynamics = "bicycle",
        observation: ObservationConfig = ObservationConfig(),
        reward: RewardConfig = RewardConfig(scale=0.1),
        others=None,
        terminate_on_collision: bool = True,
        terminate_on_offroad: bool = False,
        max_agents: int = 128,
        shuffle: bool = True,
        device: str = "cpu",
        vocabulary: torch.Tensor | None = None,
        cached_scenarios: int | None = None,
    ):
        if agents not in ("sdc", "all"):
            raise ValueError(f"agents must be 'sdc' or 'all', not {agents!r}")
        self.agents = agents
        self.env = BatchedEnv(
            scenarios,
            batch_size=num_scenarios,
            max_agents=max_agents,
            dynamics=dynamics,
            controlled="sdc" if agents == "sdc" else "wosac",
            observation=observation,
            reward=reward,
            terminate_on_collision=terminate_on_collision,
            terminate_on_offroad=terminate_on_offroad,
            others=others,
            guidance=False,
            shuffle=shuffle,
            device=device,
            vocabulary=vocabulary,
            events_for="exposed",  # only the envs' agents are rewarded and reported
            cached_scenarios=cached_scenarios,
        )
        self.dynamics = self.env.dynamics
        self.num_scenarios = num_scenarios
        self.slots_per_scenario = 1 if agents == "sdc" else max_agents
        self.num_envs = num_scenarios * self.slots_per_scenario
        self.single_observation_space = gymnasium.spaces.Box(-np.inf, np.inf, (observation.size,), np.float32)
        self.single_action_space = action_space(self.dynamics)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self._slots: torch.Tensor | None = None  # [B, K] agent slot of each env
        self._obs: torch.Tensor | None = None  # [B, K, D] the last observations
        self._restart_next = False

    @property
    def core(self) -> EnvCore:
        if self.env.core is None:
            raise SimulationError("call reset() before step()")
        return self.env.core

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Draw B scenarios (``seed`` reseeds the scenario order and the ``others`` policy)
        and return the first observations ``[num_envs, D]`` and infos."""
        super().reset(seed=seed)
        self.env.restart(seed=seed)  # observed below, at the envs' slots only
        self._restart_next = False
        state = self.core.state
        B, N = state.controlled.shape
        if self.agents == "sdc":
            exposed = self.core.exposed
            missing = [state.batch.scenario_id[b] for b in torch.nonzero(~exposed.any(1)).flatten().tolist()]
            if missing:
                raise SimulationError(f"scenarios {missing[:5]}: the SDC is not valid at the current step")
            self._slots = exposed.float().argmax(1, keepdim=True)  # the SDC's slot per scenario
        else:
            self._slots = torch.arange(N, device=state.device).expand(B, N)
        self._obs = self._observe()
        return self._numpy(self._obs), self._infos({}, ghost=self._flat(~self._live()), reset=True)

    def step(self, actions):
        """One step of every env; see the module docstring for ghosts and auto-reset."""
        if self._restart_next:
            obs, infos = self.reset()
            zeros = np.zeros(self.num_envs, bool)
            return obs, np.zeros(self.num_envs, np.float32), zeros, zeros.copy(), infos
        core = self.core
        live = self._live()
        transition = core.step(self._batch_actions(actions))
        take = self._take
        rewards = take(transition.rewards)
        terminated = take(transition.terminated) | ~live
        truncated = take(transition.truncated)
        obs = self._observe()
        self._obs = torch.where(live[..., None], obs, self._obs)  # ghosts keep their last observation
        self._restart_next = core.done
        infos = self._infos(self._events(transition), ghost=self._flat(~live), reset=False)
        return (
            self._numpy(self._obs),
            self._flat(rewards).astype(np.float32),
            self._flat(terminated),
            self._flat(truncated),
            infos,
        )

    @property
    def log_ended(self) -> bool:
        """The last step reached the end of the log: the next ``step`` restarts the batch."""
        return self._restart_next

    def scenario_of(self, index: int) -> str:
        """The scenario id env ``index`` is simulating."""
        return self.core.state.batch.scenario_id[index // self.slots_per_scenario]

    def _live(self) -> torch.Tensor:
        """``[B, K]`` envs whose agent is exposed and has not finished."""
        return self._take(self.core.active)

    def _take(self, values: torch.Tensor) -> torch.Tensor:
        """Per-agent ``[B, N, ...]`` values at the envs' slots: ``[B, K, ...]``."""
        index = self._slots.view(*self._slots.shape, *([1] * (values.dim() - 2)))
        return values.gather(1, index.expand(*self._slots.shape, *values.shape[2:]))

    def _observe(self) -> torch.Tensor:
        core = self.core
        # "all": zeros in the slots of no exposed agent (padding), only the others are observed.
        return core.observe() if self.agents == "all" else core.observe(self._slots)

    def _batch_actions(self, actions) -> torch.Tensor:
        """``[num_envs, *shape]`` actions as the core's ``[B, N, *shape]`` (checked)."""
        spec = self.dynamics.spec
        dtype = np.int64 if spec.discrete else np.float32
        if isinstance(actions, torch.Tensor):
            actions = actions.detach().cpu().numpy()
        array = np.asarray(actions)
        if array.shape != (self.num_envs, *spec.shape):
            raise SimulationError(
                f"actions of shape {list(array.shape)}; {self.num_envs} envs of {self.dynamics.name} dynamics take "
                f"{[self.num_envs, *spec.shape]}"
            )
        if array.dtype.kind not in "fiu":
            raise SimulationError(f"actions of dtype {array.dtype}, not numbers")
        bad = ~np.isfinite(array.reshape(self.num_envs, -1)).all(1)
        if bad.any():
            index = int(np.flatnonzero(bad)[0])
            raise SimulationError(
                f"env {index} (scenario {self.scenario_of(index)}): non-finite action {array[index].tolist()}"
                + (f" and {int(bad.sum()) - 1} more envs" if bad.sum() > 1 else "")
            )
        state = self.core.state
        B, N = state.controlled.shape
        mine = torch.from_numpy(array.astype(dtype, copy=False)).to(state.device)
        mine = mine.view(B, self.slots_per_scenario, *spec.shape)
        full = torch.zeros(B, N, *spec.shape, dtype=mine.dtype, device=state.device)
        index = self._slots.view(B, -1, *([1] * len(spec.shape))).expand_as(mine)
        return full.scatter(1, index, mine)

    def _events(self, transition) -> dict[str, np.ndarray]:
        """The step's events and ``clipped`` at the envs' slots, flat: one gather and one
        copy to numpy for all of them (floats, the flags cast back to bool)."""
        keys = [key for key in EVENT_KEYS if key in transition.events or key == "clipped"]
        per_agent = [transition.clipped if key == "clipped" else transition.events[key] for key in keys]
        dtype = torch.float64 if any(v.dtype == torch.float64 for v in per_agent) else torch.float32
        values = self._flat(self._take(torch.stack([v.to(dtype) for v in per_agent], -1)))
        return {
            key: values[:, i] if v.is_floating_point() else values[:, i].astype(bool)
            for i, (key, v) in enumerate(zip(keys, per_agent))
        }

    def _flat(self, values: torch.Tensor) -> np.ndarray:
        return values.reshape(self.num_envs, *values.shape[2:]).cpu().numpy()

    def _numpy(self, obs: torch.Tensor) -> np.ndarray:
        """A copy: the caller may write into it without touching the ghosts' kept observations."""
        return self._flat(obs).astype(np.float32, copy=True)

    def _infos(self, values: dict[str, np.ndarray], ghost: np.ndarray, reset: bool) -> dict:
        """Gymnasium's vector infos: one array per key and a ``_key`` mask (all set)."""
        scenario_ids = np.repeat(np.array(self.core.state.batch.scenario_id, dtype=object), self.slots_per_scenario)
        infos = {**values, "ghost": ghost, "scenario_id": scenario_ids, "reset": np.full(self.num_envs, reset)}
        every = np.ones(self.num_envs, bool)
        return infos | {f"_{key}": every for key in list(infos)}


def ego_vector_env(scenarios, num_envs: int = 16, **kwargs) -> AgentVectorEnv:
    """The SDCs of ``num_envs`` scenarios at a time (env i: the SDC of scenario i)."""
    return AgentVectorEnv(scenarios, num_scenarios=num_envs, agents="sdc", **kwargs)


def agents_vector_env(scenarios, num_scenarios: int = 2, max_agents: int = 64, **kwargs) -> AgentVectorEnv:
    """Every agent valid at the current step of ``num_scenarios`` scenarios, ``max_agents``
    slots per scenario (for shared-parameter multi-agent training)."""
    return AgentVectorEnv(scenarios, num_scenarios=num_scenarios, agents="all", max_agents=max_agents, **kwargs)
