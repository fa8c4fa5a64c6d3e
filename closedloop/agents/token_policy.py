"""The tokenized traffic model as a sim-agent policy of the simulator.

``TokenPolicy(model, vocabulary)`` drives every controlled agent with the ``tokens``
dynamics of its vocabulary (``token_dynamics(vocabulary)``), one token per 0.5 s:

- ``reset(state, dynamics, generator)`` tokenizes the logged history (steps 0..10: two
  tokens), encodes the map and runs the decoder over the history once;
- ``distribution(state)`` gives a :class:`TokenDistribution` ``[B, N, V]`` over each agent's
  kind vocabulary for the token starting at ``state``; when ``state`` is one token after
  the cache, the decoder first takes one incremental step with the tokens the agents
  actually executed (recovered exactly by the dynamics' inverse, so it is right whatever
  chose them: this policy, a CAT-K wrapper, or the log for agents that follow it);
- ``act(state)`` samples it (CAT-K's evaluation setting by default: the 48 most likely
  tokens at temperature 1.0) with the episode's generator.

Rollouts run the model in eval mode and without gradients (the incremental cache is
inference-only): ``distribution`` here is for acting and scoring; trainers get gradients
from the model's teacher-forced ``forward`` over the rollout's tokens.

The decoder cache follows one rollout. Acting on a state that is not the cached one or its
successor (an older state, another branch) raises :class:`SimulationError`; reset from
that state instead.
"""

from __future__ import annotations

import torch

from closedloop.agents.distributions import TokenDistribution
from closedloop.agents.map_tokens import map_tokens
from closedloop.agents.policy import LearnedPolicy
from closedloop.agents.smart import MODEL_SIZES, MapEncoding, SmartModel
from closedloop.agents.tokens import TOKEN_STEPS, MotionVocabulary, default_vocabulary, tokenize
from closedloop.data.batch import ScenarioBatch, select_scenarios
from closedloop.envs.core import SimState
from closedloop.envs.dynamics import Dynamics, Tokens
from closedloop.envs.errors import SimulationError

MAX_MAP_TOKENS = 1024  # map tokens kept per scenario, nearest the SDC


def token_dynamics(vocabulary: MotionVocabulary) -> Tokens:
    """The ``tokens`` dynamics of ``vocabulary`` (per-kind tables)."""
    return Tokens(vocabulary.table())


class TokenPolicy(LearnedPolicy):
    """See the module docstring."""

    def __init__(
        self,
        model: SmartModel,
        vocabulary: MotionVocabulary,
        temperature: float = 1.0,
        top_k: int | None = 48,
        max_map_tokens: int = MAX_MAP_TOKENS,
    ):
        self.model, self.vocabulary = model, vocabulary
        self.temperature, self.top_k, self.max_map_tokens = temperature, top_k, max_map_tokens
        self.table = vocabulary.table()
        self.sizes = vocabulary.sizes()

    @classmethod
    def untrained(cls, size: str, vocabulary: MotionVocabulary | None = None, seed: int = 0, **kwargs):
        """A model of ``size`` (``tiny``, ``mini``, ``nano``, ``micro``) with random weights
        drawn from ``seed``, and the default vocabulary unless another is given."""
        if size not in MODEL_SIZES:
            raise ValueError(f"unknown model size {size!r}; choose one of {', '.join(MODEL_SIZES)}")
        vocabulary = default_vocabulary() if vocabulary is None else vocabulary
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = SmartModel(size, vocabulary=vocabulary.table())
        return cls(model.eval(), vocabulary, **kwargs)

    def make_dynamics(self) -> Tokens:
        """The dynamics this policy's actions are for."""
        return token_dynamics(self.vocabulary)

    def reset(self, state: SimState, dynamics: Dynamics, generator: torch.Generator | None = None) -> None:
        if not isinstance(dynamics, Tokens) or dynamics.vocabulary.shape != self.table.shape:
            raise SimulationError(
                f"the token policy drives the tokens dynamics of its vocabulary {list(self.table.shape)} "
                f"(closedloop.agents.token_policy.token_dynamics), not {dynamics.name}"
            )
        if state.t < 2 * TOKEN_STEPS:
            raise SimulationError(
                f"the token policy needs {2 * TOKEN_STEPS} logged steps of history, state is at {state.t}"
            )
        super().reset(state, dynamics, generator)
        model, batch, device = self.model, state.batch, state.device
        model.to(device).eval()  # no dropout in rollouts (and the cache equals the teacher-forced pass)
        self.table, self.sizes = self.table.to(device), self.sizes.to(device)
        t0 = state.t - 2 * TOKEN_STEPS
        window = slice(t0, state.t + 1)
        history = tokenize(
            self.vocabulary,
            state.pose[:, :, window, :2],
            state.pose[:, :, window, 2],
            state.valid[:, :, window] & batch.agent_mask[..., None],
            batch.agent_type,
        )
        now = state.current[..., :3]
        poses = torch.cat([history.poses[:, :, :2], now[:, :, None]], dim=2)
        valid = torch.cat([history.token_valid, state.valid_now[..., None]], dim=2)
        steps = torch.arange(t0, state.t + 1, TOKEN_STEPS, device=device)
        self.mask = model.logit_mask(self.sizes, batch.agent_type)
        # The decoder's inputs before the first decision: a trainer's teacher-forced pass over
        # the rollout starts from the same ones (REINFORCE's log-probabilities).
        self.history = (history.tokens, poses, valid, steps)
        with torch.no_grad():
            roads = self._encode_map(batch)
            self.cache = model.start(
                history.tokens,
                poses,
                valid,
                batch.agent_type,
                roads.tokens,
                map_encoding=roads,
                steps=steps,
                vocabulary=self.table,
            )
        self._t, self._pose = state.t, now.clone()

    def _encode_map(self, batch: ScenarioBatch) -> MapEncoding:
        """The map encoding of ``batch``, each distinct scenario encoded once (rollouts of
        one scenario batched together share it)."""
        first: dict[str, int] = {}
        row_of = [first.setdefault(sid, len(first)) for sid in batch.scenario_id]
        unique = [batch.scenario_id.index(sid) for sid in first]
        distinct = select_scenarios(batch, unique)
        encoding = self.model.encode_map(map_tokens(distinct, max_tokens=self.max_map_tokens))
        rows = torch.tensor(row_of, device=encoding.features.device)
        return MapEncoding(encoding.features, encoding.tokens.select(rows), encoding.rows[rows])

    def distribution(self, state: SimState) -> TokenDistribution:
        if not hasattr(self, "cache"):
            raise RuntimeError("TokenPolicy: call reset(state, dynamics) before acting")
        if state.t == self._t + TOKEN_STEPS and torch.equal(state.pose[:, :, self._t, :3], self._pose):
            self._advance(state)
        elif state.t != self._t or not torch.equal(state.current[..., :3], self._pose):
            raise SimulationError(
                f"the token policy's decoder cache follows one rollout and is at step {self._t}; this state "
                f"(step {state.t}) is not on it (an older state or another branch): reset(state, ...) from it"
            )
        return TokenDistribution(self.cache.logits, self.mask)

    def _advance(self, state: SimState) -> None:
        """One decoder step with the tokens the agents executed since the cached state."""
        chunk = state.pose[:, :, self._t + 1 : state.t + 1]
        executed = self.dynamics.inverse(state.pose[:, :, self._t], chunk, state.batch.agent_type)
        now = state.current[..., :3]
        with torch.no_grad():
            self.model.step(self.cache, executed, now, state.valid_now, time_index=state.t)
        self._t, self._pose = state.t, now.clone()
