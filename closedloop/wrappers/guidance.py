"""Ground-truth guidance as tensor functions: which candidate to execute, which token to learn.

CAT-K (Zhang et al., CVPR 2025) rolls a tokenized policy out in closed loop and keeps it
near the log: each agent's policy proposes its top-K tokens, the one whose box lands
closest to the logged box is executed, and the training target is the *recovery token*,
the token of the agent's whole vocabulary that brings it closest to the logged next poses
from where it actually is. These functions are the one implementation of both choices,
batched over scenarios, agents and candidates.

The distance between a candidate chunk and the log is the tokenizer's
(:func:`closedloop.agents.tokens.tokenize`): the mean, over the chunk's logged-valid steps
and the 4 corners of the agent's box, of the distance between the corners at the two poses.
So K = |V| from the tokenized start pose reproduces the log's tokenization exactly.
"""

from __future__ import annotations

import torch

from closedloop.agents.tokens import compose, step_corner_distance
from closedloop.constants import token_kind

VOCABULARY_BLOCK = 512  # tokens scored at once by recovery_tokens (bounds the memory)


def token_chunks(pose: torch.Tensor, tokens: torch.Tensor, table: torch.Tensor, kind: torch.Tensor) -> torch.Tensor:
    """The poses ``[B, N, K, steps, 3]`` of ``tokens [B, N, K]`` started at ``pose [B, N, 3]``,
    from the per-kind vocabulary ``table [kinds, V, steps, 3]`` and each agent's ``kind [B, N]``
    (token indices are clamped into the table)."""
    index = tokens.clamp(0, table.shape[1] - 1)
    local = table[kind.unsqueeze(-1).expand_as(index), index]  # [B, N, K, steps, 3]
    return compose(pose[:, :, None, :], local)


def chunk_distance(chunks: torch.Tensor, log: torch.Tensor, log_valid: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """``[B, N, K]``: the tokenizer's distance between candidate chunks ``[B, N, K, steps, 3]``
    and the logged poses ``log [B, N, steps, 3]`` (mean over the ``log_valid [B, N, steps]``
    steps and the 4 corners of ``box [B, N, 2]``; 0 where no step is valid)."""
    per_step = step_corner_distance(chunks, log.unsqueeze(2), box[:, :, None, None, :])  # [B, N, K, steps]
    weight = log_valid.to(per_step.dtype).unsqueeze(2)
    return (per_step * weight).sum(-1) / weight.sum(-1).clamp_min(1)


def catk_choice(distance: torch.Tensor, candidate_ok: torch.Tensor) -> torch.Tensor:
    """Index ``[B, N]`` of the nearest allowed candidate (``distance``, ``candidate_ok``
    ``[B, N, K]``): CAT-K's executed token among the policy's top-K."""
    return distance.masked_fill(~candidate_ok, float("inf")).argmin(-1)


def recovery_tokens(
    pose: torch.Tensor,
    log: torch.Tensor,
    log_valid: torch.Tensor,
    table: torch.Tensor,
    sizes: torch.Tensor,
    agent_type: torch.Tensor,
    box: torch.Tensor,
) -> torch.Tensor:
    """The token ``[B, N]`` of each agent's kind vocabulary whose chunk, started at ``pose
    [B, N, 3]``, is nearest the logged poses ``log [B, N, steps, 3]`` (``log_valid``):
    CAT-K's recovery target. ``table [kinds, V, steps, 3]``; ``sizes [kinds]`` real tokens
    per kind (a kind's padding rows are never chosen). Scored in blocks of the vocabulary."""
    kind = token_kind(agent_type)
    B, N = kind.shape
    limit = sizes.to(pose.device)[kind].unsqueeze(-1)  # [B, N, 1]
    best_distance = torch.full((B, N), float("inf"), device=pose.device)
    best = torch.zeros(B, N, dtype=torch.long, device=pose.device)
    for first in range(0, table.shape[1], VOCABULARY_BLOCK):
        tokens = torch.arange(first, min(first + VOCABULARY_BLOCK, table.shape[1]), device=pose.device)
        tokens = tokens.expand(B, N, -1)
        distance = chunk_distance(token_chunks(pose, tokens, table, kind), log, log_valid, box)
        distance = distance.masked_fill(tokens >= limit, float("inf"))
        value, index = distance.min(-1)
        better = value < best_distance
        best_distance = torch.where(better, value, best_distance)
        best = torch.where(better, tokens.gather(-1, index[..., None]).squeeze(-1), best)
    return best
