"""Training data: scenarios from TFRecords or a ``prepare`` cache, turned once into examples.

Behaviour cloning reads every scenario many times, and the costly part of a batch is not
the scenario but what is derived from it (the tokenization of every agent's log, the map
tokens, the ego observations). So :func:`token_examples` and :func:`ego_examples` derive
that once per run, in groups of scenarios, and keep compact CPU tensors; a batch is then a
cheap padding of a few examples (:func:`collate_tokens`) or a slice (ego samples).

Each ``torch.distributed`` rank reads only its share of the scenarios
(:func:`load_scenarios`): whole shards or every ``world``-th record of TFRecords (see
:class:`~closedloop.data.dataset.WomdIterableDataset`), every ``world``-th scenario of a
cache.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from closedloop.agents.map_tokens import MapTokens, map_tokens
from closedloop.agents.tokens import MotionVocabulary, tokenize
from closedloop.data.batch import collate_scenarios
from closedloop.data.scenario import Scenario

GROUP = 16  # scenarios derived together
MAX_MAP_TOKENS = 1024  # the token policy's default: the map tokens nearest the SDC


def load_scenarios(
    paths: str | os.PathLike | Sequence[str | os.PathLike], rank: int = 0, world: int = 1
) -> list[Scenario]:
    """This rank's share of the scenarios in ``paths``: TFRecord files, directories or
    globs, or one ``closedloop prepare`` cache directory."""
    from closedloop.data.dataset import CachedScenarioDataset, WomdIterableDataset
    from closedloop.data.womd import expand_paths

    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if len(paths) == 1 and (Path(paths[0]) / "manifest.json").is_file():
        cache = CachedScenarioDataset(paths[0])
        return [cache[i] for i in range(rank, len(cache), world)]
    if not expand_paths(paths):
        raise FileNotFoundError(f"no TFRecord files or prepare cache in {' '.join(map(str, paths))}")
    return list(WomdIterableDataset(paths))  # shares by rank through reader_slot()


@dataclass
class TokenExample:
    """One scenario for teacher forcing: every agent's tokenized log (``tokens``,
    ``valid`` ``[N, S]``, ``poses`` ``[N, S + 1, 3]`` in the scenario's frame,
    ``agent_type`` ``[N]``), the logged poses of every step (``log_poses`` ``[N, T, 3]``,
    ``log_valid`` ``[N, T]``: what closed-loop guidance steers to) and its map tokens
    (``map``: fields of :class:`MapTokens` without the batch dimension, compacted to the
    real tokens; lights as uint8). A demonstration (a guided rollout, RoaD) has the
    executed tokens in ``tokens`` and learns only at ``target_valid`` ``[N, S]``; None:
    learn every valid token (the log)."""

    scenario_id: str
    tokens: torch.Tensor
    valid: torch.Tensor
    poses: torch.Tensor
    agent_type: torch.Tensor
    map: dict[str, torch.Tensor]
    log_poses: torch.Tensor
    log_valid: torch.Tensor
    target_valid: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.valid.sum())


@dataclass
class TokenBatch:
    """Padded :class:`TokenExample` s: what :meth:`SmartModel.forward` takes."""

    tokens: torch.Tensor  # [B, N, S] long
    valid: torch.Tensor  # [B, N, S] bool
    poses: torch.Tensor  # [B, N, S + 1, 3]
    agent_type: torch.Tensor  # [B, N]
    map: MapTokens
    log_poses: torch.Tensor  # [B, N, T, 3]
    log_valid: torch.Tensor  # [B, N, T]
    target_valid: torch.Tensor | None = None  # [B, N, S]: the tokens to learn (None: every valid one)

    def to(self, device: torch.device | str) -> TokenBatch:
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return TokenBatch(**{name: None if value is None else value.to(device) for name, value in moved.items()})


def _groups(scenarios: Sequence[Scenario], desc: str, progress: bool) -> Iterator[list[Scenario]]:
    bar = tqdm(total=len(scenarios), desc=desc, unit="scenario", disable=not progress, leave=False)
    for first in range(0, len(scenarios), GROUP):
        group = list(scenarios[first : first + GROUP])
        yield group
        bar.update(len(group))
    bar.close()


@torch.no_grad()
def token_examples(
    scenarios: Sequence[Scenario], vocabulary: MotionVocabulary, progress: bool = False
) -> list[TokenExample]:
    """Tokenize every agent of every scenario from step 0 (18 tokens of 0.5 s) and cut its
    map tokens: the teacher-forcing examples, computed once."""
    examples = []
    for group in _groups(scenarios, "tokenize", progress):
        batch = collate_scenarios(group)
        valid = batch.agent_valid & batch.agent_mask[..., None]
        tokenized = tokenize(vocabulary, batch.agent_xyz[..., :2], batch.agent_heading, valid, batch.agent_type)
        roads = map_tokens(batch, max_tokens=MAX_MAP_TOKENS)
        log_poses = torch.cat([batch.agent_xyz[..., :2], batch.agent_heading[..., None]], dim=-1)
        for row, scenario in enumerate(group):
            agents = batch.agent_mask[row]
            kept = roads.mask[row]
            map_fields = {
                "position": roads.position[row, kept],
                "heading": roads.heading[row, kept],
                "kind": roads.kind[row, kept],
                "subtype": roads.subtype[row, kept],
                "length": roads.length[row, kept],
                "light": roads.light[row, kept].to(torch.uint8),
                "feature_id": roads.feature_id[row, kept],
            }
            examples.append(
                TokenExample(
                    scenario.scenario_id,
                    tokenized.tokens[row, agents].clone(),
                    tokenized.token_valid[row, agents].clone(),
                    tokenized.poses[row, agents].clone(),
                    batch.agent_type[row, agents].clone(),
                    map_fields,
                    log_poses[row, agents].clone(),
                    valid[row, agents].clone(),
                )
            )
    return examples


def _pad(values: Sequence[torch.Tensor], length: int) -> torch.Tensor:
    """Stack tensors ``[n_i, ...]`` into ``[len, length, ...]`` with zeros after ``n_i``."""
    out = values[0].new_zeros((len(values), length, *values[0].shape[1:]))
    for row, value in enumerate(values):
        out[row, : value.shape[0]] = value
    return out


def collate_tokens(examples: Sequence[TokenExample]) -> TokenBatch:
    """Pad examples to the batch's largest agent and map-token counts."""
    N = max(max(e.tokens.shape[0] for e in examples), 1)
    M = max(max(e.map["position"].shape[0] for e in examples), 1)
    fields = {name: _pad([e.map[name] for e in examples], M) for name in examples[0].map}
    fields["light"] = fields["light"].long()
    mask = _pad([torch.ones(e.map["position"].shape[0], dtype=torch.bool) for e in examples], M)
    return TokenBatch(
        tokens=_pad([e.tokens for e in examples], N),
        valid=_pad([e.valid for e in examples], N),
        poses=_pad([e.poses for e in examples], N),
        agent_type=_pad([e.agent_type for e in examples], N),
        map=MapTokens(mask=mask, **fields),
        log_poses=_pad([e.log_poses for e in examples], N),
        log_valid=_pad([e.log_valid for e in examples], N),
        target_valid=None
        if any(e.target_valid is None for e in examples)
        else _pad([e.target_valid for e in examples], N),
    )


@dataclass
class EgoSamples:
    """Behaviour-cloning samples of the ego (SDC) policy: ``obs`` ``[K, D]`` observations
    of the SDC on the log every ``chunk`` steps from the current step, ``target``
    ``[K, chunk, 3]`` the logged next chunk in the SDC's frame (the trajectory action that
    follows the log); only chunks logged valid throughout are kept."""

    obs: torch.Tensor
    target: torch.Tensor

    def __len__(self) -> int:
        return self.obs.shape[0]


@torch.no_grad()
def ego_examples(scenarios: Sequence[Scenario], model, progress: bool = False) -> EgoSamples:
    """The :class:`EgoSamples` of ``scenarios`` for the GMM ego ``model`` (its observation
    config and chunk length)."""
    from closedloop.agents.gmm import GMMEgoPolicy
    from closedloop.envs.core import log_state
    from closedloop.envs.dynamics import make_dynamics

    policy = GMMEgoPolicy(model)
    dynamics = make_dynamics("trajectory", chunk=model.chunk)
    obs, target = [], []
    for group in _groups(scenarios, "observe", progress):
        batch = collate_scenarios(group)
        start = batch.current_time_index
        policy.reset(log_state(batch, start), dynamics)
        for t in range(start, batch.agent_valid.shape[-1] - model.chunk, model.chunk):
            state = log_state(batch, t)
            action, ok = policy.target(state)
            ok &= state.valid_now.gather(1, policy.sdc)
            observation = policy.observer(state, policy.sdc)
            obs.append(observation[ok])
            target.append(action[ok])
    if not obs:
        raise ValueError("no scenario has an SDC with a valid logged chunk to learn from")
    return EgoSamples(torch.cat(obs), torch.cat(target))


class EpochSampler:
    """Batches of example indices, a fresh permutation each epoch drawn from ``seed`` and
    the epoch number, so the order is reproducible and a run resumes at ``(epoch, index)``."""

    def __init__(self, num_examples: int, batch_size: int, seed: int):
        if num_examples < 1:
            raise ValueError("no training examples")
        self.num_examples, self.batch_size, self.seed = num_examples, min(batch_size, num_examples), seed
        self.epoch, self.index = 0, 0

    def _order(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.num_examples, generator=generator)

    def next(self) -> torch.Tensor:
        """The next batch of indices (an epoch's last partial batch is dropped)."""
        if self.index + self.batch_size > self.num_examples:
            self.epoch, self.index = self.epoch + 1, 0
        rows = self._order()[self.index : self.index + self.batch_size]
        self.index += self.batch_size
        return rows

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
