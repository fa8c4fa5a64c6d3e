"""The batched tensor env trainers use: B scenarios stepped together, auto-reset.

Where the PettingZoo and Gymnasium faces serve one scenario to people, this env serves
tensors to training loops: observations ``[B, N, D]``, actions ``[B, N, ...]``, rewards,
``terminated`` and ``truncated`` ``[B, N]``, with ``N = max_agents`` fixed and masks in
``info`` for padding and for which agents are controlled.

**Shapes.** ``terminated`` and ``truncated`` are per agent, ``[B, N]`` like the rewards:
an agent can terminate (collision / off-road, when configured) while the others of its
scenario go on, and one shape for all three lets a trainer write ``done = terminated |
truncated`` and mask rewards without broadcasting. An agent's episode ends at the first
step where either is set; afterwards it stands still and its rewards are 0.

**Auto-reset.** All B scenarios share the WOMD timeline (step 10 to 90), so they end
together: the step that reaches step 90 returns ``truncated`` for every agent still
active. The *next* ``step`` ignores its actions, draws B new scenarios from the source
and returns their first observation, zero rewards, all-false ``terminated`` and
``truncated`` and ``info["reset"] = True`` (Gymnasium's "next-step" auto-reset).

**Guidance.** ``info`` carries the ground truth that imitation and guidance methods need,
so they never reach into the simulator: ``log_next`` ``[B, N, k, 5]`` (the logged states of
the next ``k = dynamics.chunk`` steps, NaN where invalid), ``log_next_valid`` ``[B, N, k]``
and ``expert_action`` ``[B, N, ...]`` (the Expert policy's action for this env's dynamics).

**Sources.** A list or tuple, a map-style ``Dataset`` (``__len__`` and ``__getitem__``,
e.g. ``CachedScenarioDataset``) or any re-iterable of ``Scenario`` (e.g.
``WomdIterableDataset``), read again at every epoch. Sized sources are shuffled each
epoch with the env's ``torch.Generator`` (``reset(seed=...)`` seeds it); iterables are
read in order. One-shot iterators (generators) are refused: they cannot start a second
epoch.

**Prepared scenarios.** The env keeps the ``cached_scenarios`` scenarios it drew last
collated and indexed (:mod:`closedloop.envs.prepared`) and starts a batch by stacking
them: with a list of up to that many scenarios, resets after the first epoch stack
instead of collating and indexing anew. Episodes are the same either way. The default
(``None``) keeps every scenario of a list or tuple of up to 128 (about 2 MB each) and none
otherwise: a dataset that reads scenarios from disk hands out new objects, which are never
found again, and of a longer list reshuffled every epoch a few are found again.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from closedloop.data.scenario import Scenario
from closedloop.envs.core import Controlled, SimState
from closedloop.envs.dynamics import Dynamics, make_dynamics
from closedloop.envs.env import EnvConfig, EnvCore
from closedloop.envs.errors import SimulationError
from closedloop.envs.observation import ObservationConfig
from closedloop.envs.prepared import PreparedScenarios
from closedloop.envs.rewards import RewardConfig

CACHED_SCENARIOS = 128  # lists up to this long are kept prepared by default


class ScenarioSource:
    """Draws scenarios epoch after epoch from a list, a Dataset or a re-iterable."""

    def __init__(self, scenarios, shuffle: bool = True):
        from torch.utils.data import IterableDataset

        if isinstance(scenarios, Iterator):
            raise TypeError(
                "the scenario source is a one-shot iterator (a generator?), which cannot start a "
                "second epoch: pass a list, a Dataset or a re-iterable such as WomdIterableDataset"
            )
        # torch's Dataset base defines __getitem__, so an IterableDataset is told apart first.
        sized = (
            not isinstance(scenarios, IterableDataset)
            and hasattr(scenarios, "__len__")
            and hasattr(scenarios, "__getitem__")
        )
        if not sized and not isinstance(scenarios, Iterable):
            raise TypeError(f"the scenario source must be a list, a Dataset or an iterable, not {type(scenarios)}")
        self.scenarios, self.sized, self.shuffle = scenarios, sized, shuffle
        self.epoch = 0
        self._current: Iterator[Scenario] | None = None

    def _epoch(self, generator: torch.Generator) -> Iterator[Scenario]:
        if self.sized:
            n = len(self.scenarios)
            order = torch.randperm(n, generator=generator).tolist() if self.shuffle else range(n)
            return (self.scenarios[i] for i in order)
        return iter(self.scenarios)

    def restart(self) -> None:
        """Begin a new epoch at the next draw."""
        self._current = None

    def draw(self, count: int, generator: torch.Generator) -> list[Scenario]:
        drawn: list[Scenario] = []
        fresh_epoch = False
        while len(drawn) < count:
            if self._current is None:
                self._current, fresh_epoch = self._epoch(generator), True
                self.epoch += 1
            item = next(self._current, None)
            if item is None:
                if fresh_epoch:
                    raise ValueError("the scenario source is empty")
                self._current = None
                continue
            fresh_epoch = False
            drawn.append(item)
        return drawn


class BatchedEnv:
    """See the module docstring. ``controlled`` picks the agents the caller acts for
    (``"wosac"``: every agent valid at step 10; ``"sdc"``; or a ``[B, N]`` mask);
    ``others`` (a policy) drives the remaining valid agents, which otherwise follow the log.
    ``events_for="exposed"`` computes the events (and so the event terms of the rewards) of
    the agents the caller acts for only; the others report none (cheaper when they are
    few, e.g. the SDC). ``cached_scenarios``: how many drawn scenarios to keep prepared
    (see the module docstring)."""

    def __init__(
        self,
        scenarios,
        batch_size: int = 8,
        max_agents: int = 128,
        dynamics: str | Dynamics = "delta_local",
        controlled: Controlled = "wosac",
        observation: ObservationConfig = ObservationConfig(),
        reward: RewardConfig = RewardConfig(),
        terminate_on_collision: bool = False,
        terminate_on_offroad: bool = False,
        others=None,
        guidance: bool = True,
        shuffle: bool = True,
        differentiable: bool = False,
        device: str = "cpu",
        vocabulary: torch.Tensor | None = None,
        events_for: str = "all",
        cached_scenarios: int | None = None,
    ):
        if events_for not in ("all", "exposed"):
            raise ValueError(f"events_for must be 'all' or 'exposed', not {events_for!r}")
        self.events_for = events_for
        self.source = ScenarioSource(scenarios, shuffle=shuffle)
        self.batch_size, self.max_agents = batch_size, max_agents
        self.dynamics = dynamics if isinstance(dynamics, Dynamics) else make_dynamics(dynamics, vocabulary)
        self.config = EnvConfig(self.dynamics, observation, reward, terminate_on_collision, terminate_on_offroad)
        self.observation, self.reward = observation, reward
        self.controlled, self.others, self.with_guidance, self.device = controlled, others, guidance, device
        self.differentiable = differentiable
        if cached_scenarios is None:
            listed = isinstance(scenarios, (list, tuple)) and len(scenarios) <= CACHED_SCENARIOS
            cached_scenarios = len(scenarios) if listed else 0
        self.prepared = PreparedScenarios(max_agents, observation.road_candidates, device, cached_scenarios)
        self.generator = torch.Generator()
        self.generator.seed()  # a fresh, non-deterministic seed per env until reset(seed=...)
        self.core: EnvCore | None = None

    @property
    def unwrapped(self) -> BatchedEnv:
        return self

    @property
    def state(self) -> SimState:
        """The simulator state of the current batch (after :meth:`reset`)."""
        if self.core is None:
            raise SimulationError("call reset() before using the env")
        return self.core.state

    def reset(self, seed: int | None = None) -> tuple[torch.Tensor, dict]:
        """Draw B scenarios and return their first observations ``[B, N, D]`` and info.
        ``seed`` reseeds the env's generator (scenario order and the ``others`` policy's
        sampling) and starts a new epoch."""
        self.restart(seed)
        core = self.core
        # The same keys as every step's info: no events, nothing clipped, yet.
        none = torch.zeros_like(core.exposed)
        events = {key: none for key in ("collision", "offroad", "red_light", "clipped")}
        events["distance_to_log"] = torch.full(none.shape, float("nan"), device=none.device)
        info = {**events, "reset": True, "scenario_id": core.state.batch.scenario_id, "t": core.state.t}
        return core.observe(), self._info(info)

    def restart(self, seed: int | None = None) -> None:
        """:meth:`reset` without the observations and info: draw B scenarios and start
        their episodes (for wrappers that observe only some agents)."""
        if seed is not None:
            self.generator.manual_seed(seed)
            self.source.restart()
        scenarios = self.source.draw(self.batch_size, self.generator)
        batch, maps = self.prepared.batch(scenarios)
        policy_generator = torch.Generator(device=self.device).manual_seed(
            int(torch.randint(0, 2**62, (1,), generator=self.generator))
        )
        exposed = self.controlled if self.others is not None else None
        self.core = EnvCore(
            batch,
            self.config,
            controlled=self.controlled,
            exposed=exposed,
            others=self.others,
            generator=policy_generator,
            differentiable=self.differentiable,
            events_for=self.events_for,
            maps=maps,
        )

    def _info(self, info: dict) -> dict:
        core = self.core
        info.update(controlled=core.exposed, active=core.active, agent_mask=core.state.batch.agent_mask)
        if self.with_guidance:
            guidance = core.guidance()
            info.update(
                log_next=guidance.log_next, log_next_valid=guidance.log_next_valid, expert_action=guidance.expert_action
            )
        return info

    def step(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """Observations ``[B, N, D]``, rewards, terminated, truncated ``[B, N]`` and info
        (events ``[B, N]``, ``clipped`` ``[B, N]``, masks, guidance); see the module docstring."""
        if self.core is None:
            raise SimulationError("call reset() before step()")
        if self.core.done:
            obs, info = self.reset()
            none = torch.zeros_like(self.core.exposed)
            return obs, torch.zeros(none.shape, device=none.device), none, none.clone(), info
        transition = self.core.step(actions)
        info = {
            **transition.events,
            "clipped": transition.clipped,
            "reset": False,
            "scenario_id": transition.state.batch.scenario_id,
            "t": transition.state.t,
        }
        return (self.core.observe(), transition.rewards, transition.terminated, transition.truncated, self._info(info))
