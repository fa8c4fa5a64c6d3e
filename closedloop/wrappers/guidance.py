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

RoaD (Garcia-Cobo et al., "Rollouts as Demonstrations") generalises the choice to any
candidate motions: K samples of the policy, each a trajectory over a horizon; the one
nearest the expert continuation under a step-weighted version of the same distance is
executed, and when even that one is farther than ``recovery_distance`` it is blended
toward the expert (:func:`recovery_blend`). :func:`road_choose` is that choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


def chunk_distance(
    chunks: torch.Tensor,
    log: torch.Tensor,
    log_valid: torch.Tensor,
    box: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B, N, K]``: the tokenizer's distance between candidate chunks ``[B, N, K, steps, 3]``
    and the logged poses ``log [B, N, steps, 3]`` (mean over the ``log_valid [B, N, steps]``
    steps and the 4 corners of ``box [B, N, 2]``; 0 where no step is valid). ``weights
    [steps]`` makes it a weighted mean over the steps (RoaD's distance)."""
    per_step = step_corner_distance(chunks, log.unsqueeze(2), box[:, :, None, None, :])  # [B, N, K, steps]
    weight = log_valid.to(per_step.dtype).unsqueeze(2)
    if weights is not None:
        weight = weight * weights.to(per_step)
    return (per_step * weight).sum(-1) / weight.sum(-1).clamp_min(1e-12)


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


def recovery_blend(chosen: torch.Tensor, expert: torch.Tensor, expert_valid: torch.Tensor, steps: int) -> torch.Tensor:
    """RoaD's recovery mode: the trajectory ``chosen [..., H, 3]`` blended linearly toward
    ``expert [..., H, 3]`` over ``steps`` steps. At horizon step ``j = 1..H`` the weight
    of the expert is ``w_j = min(j / steps, 1)``: positions ``(1 - w_j) * chosen_j + w_j *
    expert_j``, headings ``chosen_j + w_j * wrap(expert_j - chosen_j)`` (along the shorter
    arc). Where the expert step is not valid (``expert_valid [..., H]``) the chosen pose is
    kept. The ramp belongs to one decision: a policy that replans every chunk starts it
    again each time (see the README's RoaD section)."""
    H = chosen.shape[-2]
    ramp = torch.arange(1, H + 1, device=chosen.device, dtype=chosen.dtype) / steps
    w = ramp.clamp(max=1.0) * expert_valid.to(chosen.dtype)  # [..., H]
    xy = chosen[..., :2] + w[..., None] * (expert[..., :2] - chosen[..., :2])
    turn = torch.remainder(expert[..., 2] - chosen[..., 2] + math.pi, 2 * math.pi) - math.pi
    heading = torch.remainder(chosen[..., 2] + w * turn + math.pi, 2 * math.pi) - math.pi
    return torch.cat([xy, heading[..., None]], dim=-1)


@dataclass
class RoaDChoice:
    """RoaD's choice for ``[B, N]`` agents: ``choice`` (index of the executed candidate),
    ``distance`` (its weighted distance to the expert, m), ``recovery`` (blended toward the
    expert), ``poses`` ``[B, N, H, 3]`` the executed trajectory in world coordinates."""

    choice: torch.Tensor
    distance: torch.Tensor
    recovery: torch.Tensor
    poses: torch.Tensor


def road_choose(
    candidates: torch.Tensor,
    expert: torch.Tensor,
    expert_valid: torch.Tensor,
    box: torch.Tensor,
    guided: torch.Tensor,
    weights: torch.Tensor | None = None,
    recovery_distance: float = 3.0,
    recovery_steps: int = 30,
    select: bool = True,
) -> RoaDChoice:
    """RoaD's choice among ``candidates [B, N, K, H, 3]`` (world poses over the horizon) given
    the expert continuation ``expert [B, N, H, 3]`` (``expert_valid [B, N, H]``): for the
    ``guided [B, N]`` agents the candidate nearest the expert (:func:`chunk_distance` with
    step ``weights [H]``), blended by :func:`recovery_blend` when its distance exceeds
    ``recovery_distance``; the others execute candidate 0 (the policy's own sample).
    ``select=False`` is plain sampling: candidate 0 for every agent, no recovery (the
    distance is still reported)."""
    distance = chunk_distance(candidates, expert, expert_valid, box, weights)  # [B, N, K]
    if select:
        choice = torch.where(guided, distance.argmin(-1), 0)
    else:
        choice = torch.zeros(guided.shape, dtype=torch.long, device=candidates.device)
    H = candidates.shape[3]
    chosen = candidates.gather(2, choice[:, :, None, None, None].expand(-1, -1, 1, H, 3)).squeeze(2)
    chosen_distance = distance.gather(-1, choice[..., None]).squeeze(-1)
    recovery = guided & (chosen_distance > recovery_distance) if select else torch.zeros_like(guided)
    blended = recovery_blend(chosen, expert.nan_to_num(0.0), expert_valid, recovery_steps)
    poses = torch.where(recovery[..., None, None], blended, chosen)
    return RoaDChoice(choice, torch.where(guided, chosen_distance, 0.0), recovery, poses)
