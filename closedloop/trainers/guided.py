"""Guided closed-loop rollouts of the tokenized model, shared by CAT-K and RoaD.

Both methods unroll the policy from the log's history with incremental decoding (no
gradient, eval mode) and let ground-truth guidance decide, every 0.5 s and for every agent,
which token is executed and what the training target is. Only that decision differs, so
it is a function handed to :func:`guided_token_rollout`:

- CAT-K: the top-K token nearest the log; the target is the recovery token;
- RoaD: the nearest of K samples (blended toward the log when far); the target is the
  executed token itself (the rollout is the demonstration).

The agents present at the current step (10) start from the tokenized log of steps 0..10
(two tokens) and are driven; agents absent then take no part.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from closedloop.agents.tokens import MotionVocabulary
from closedloop.constants import token_kind
from closedloop.trainers.data import TokenBatch

HISTORY = 2  # tokens before the current step (steps 0..10)


@dataclass
class StepContext:
    """What guidance sees at one decision for ``[B, N]`` agents: the model's ``logits``
    ``[B, N, V]`` (``-inf`` outside each kind's vocabulary), the ``pose`` ``[B, N, 3]``
    where the token starts, the logged poses of the token's steps ``log`` ``[B, N, steps,
    3]`` and their validity ``log_ok``, ``guided`` (the log is valid where the token ends),
    the vocabulary ``table`` ``[kinds, V, steps, 3]``, ``sizes`` ``[kinds]``, each agent's
    ``agent_type`` and reference ``box`` ``[B, N, 2]``."""

    logits: torch.Tensor
    pose: torch.Tensor
    log: torch.Tensor
    log_ok: torch.Tensor
    guided: torch.Tensor
    table: torch.Tensor
    sizes: torch.Tensor
    agent_type: torch.Tensor
    box: torch.Tensor

    @property
    def kind(self) -> torch.Tensor:
        return token_kind(self.agent_type)


@dataclass
class Decision:
    """Guidance's answer: the ``executed`` token ``[B, N]``, the pose it ``reached`` ``[B, N,
    3]``, the training ``target`` token ``[B, N]`` and per-agent statistics ``[B, N]``."""

    executed: torch.Tensor
    reached: torch.Tensor
    target: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Rollout:
    """A guided rollout in the layout of :meth:`SmartModel.forward`: ``tokens`` ``[B, N, S]``
    executed (history: the log's), ``poses`` ``[B, N, S + 1, 3]`` where each token started
    (and the last one ended), ``valid`` ``[B, N, S]`` the elements the model sees,
    ``targets`` / ``target_valid`` ``[B, N, S]`` the training targets, ``error`` ``[B, N, S]``
    the distance (m) of each rolled-out pose after token ``s`` from the log's, and the
    decisions' statistics ``stats`` (each ``[B, N, S]``, zero where no target)."""

    tokens: torch.Tensor
    poses: torch.Tensor
    valid: torch.Tensor
    targets: torch.Tensor
    target_valid: torch.Tensor
    error: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


Guide = Callable[[StepContext], Decision]


@torch.no_grad()
def guided_token_rollout(model, batch: TokenBatch, vocabulary: MotionVocabulary, guide: Guide) -> Rollout:
    """Unroll ``model`` on ``batch`` from the log's history, ``guide`` choosing every token."""
    was_training = model.training
    model.eval()
    B, N, S = batch.tokens.shape
    device = batch.tokens.device
    table, sizes = vocabulary.table().to(device), vocabulary.sizes().to(device)
    steps = table.shape[2]
    box = vocabulary.boxes().to(device)[token_kind(batch.agent_type)]  # the tokenizer's reference boxes
    now = HISTORY * steps
    active = batch.log_valid[:, :, now]  # present at the current step: the agents that are driven
    tokens, poses = batch.tokens.clone(), batch.poses.clone()  # history: the log's tokenization
    valid = torch.zeros_like(batch.valid)
    valid[:, :, :HISTORY] = batch.valid[:, :, :HISTORY] & active[..., None]
    valid[:, :, HISTORY:] = active[..., None]
    targets, target_valid = torch.zeros_like(tokens), torch.zeros_like(batch.valid)
    error = torch.zeros(B, N, S, device=device)
    stats: dict[str, torch.Tensor] = {}
    allowed = model.logit_mask(sizes, batch.agent_type)
    cache = model.start(
        tokens[:, :, :HISTORY],
        poses[:, :, : HISTORY + 1],
        torch.cat([valid[:, :, :HISTORY], active[..., None]], dim=2),
        batch.agent_type,
        batch.map,
        vocabulary=table,
    )
    for s in range(HISTORY, S):
        window = slice(s * steps + 1, (s + 1) * steps + 1)
        log, log_ok = batch.log_poses[:, :, window], batch.log_valid[:, :, window] & active[..., None]
        guided = log_ok[..., -1]  # the log is valid where the token ends: a target (as in tokenize)
        context = StepContext(
            cache.logits.masked_fill(~allowed, float("-inf")),
            poses[:, :, s],
            log,
            log_ok,
            guided,
            table,
            sizes,
            batch.agent_type,
            box,
        )
        decision = guide(context)
        targets[:, :, s] = decision.target
        target_valid[:, :, s] = guided
        for name, value in decision.stats.items():
            stats.setdefault(name, torch.zeros(B, N, S, device=device))[:, :, s] = torch.where(guided, value, 0)
        tokens[:, :, s] = torch.where(active, decision.executed, tokens[:, :, s])
        poses[:, :, s + 1] = torch.where(active[..., None], decision.reached, poses[:, :, s + 1])
        gap = torch.linalg.vector_norm(decision.reached[..., :2] - log[:, :, -1, :2], dim=-1)
        error[:, :, s] = torch.where(guided, gap, 0)
        if s + 1 < S:
            model.step(cache, decision.executed, decision.reached, active)
    model.train(was_training)
    return Rollout(tokens, poses, valid, targets, target_valid, error, stats)
