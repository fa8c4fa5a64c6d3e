"""CAT-K: closed-loop supervised fine-tuning of the tokenized traffic model.

Every step draws a fresh closed-loop rollout of the current policy on the batch's
scenarios and fine-tunes on it (Zhang et al., CVPR 2025; details from NVlabs/catk):

1. **Rollout** (no gradient, eval mode, incremental decoding,
   :func:`closedloop.trainers.guided.guided_token_rollout`): the agents present at the
   current step (10) start from the tokenized log of steps 0..10 (two tokens). Every
   0.5 s each agent's policy proposes its top-K tokens; the one whose box stays closest to
   the logged boxes over the token's 5 steps is executed
   (:func:`closedloop.wrappers.guidance.catk_choice`, the tokenizer's distance with its
   reference box per agent kind). An agent
   whose log is invalid where the token ends takes a sample among its top-K at
   ``rollout_temperature`` (CAT-K: 1e-5, i.e. its most likely token).
2. **Targets**: at each step the *recovery token*, the token of the agent's whole
   vocabulary that from where it actually is stays closest to the log
   (:func:`closedloop.wrappers.guidance.recovery_tokens`); only where the log is valid at
   the token's end.
3. **Loss**: a teacher-forced pass of the model over the *executed* tokens and the
   rolled-out poses, cross-entropy (label smoothing as in BC) on the recovery tokens of
   steps 10..85. Agents absent at step 10 take no part (CAT-K controls the agents present
   at the current step).

K = 1 is a plain greedy policy rollout; K = |V| follows the log as closely as the
vocabulary can: the executed tokens and the targets are then the log's own tokenization,
and CAT-K is BC (tested).
"""

from __future__ import annotations

import torch

from closedloop.agents.tokens import MotionVocabulary
from closedloop.trainers.data import TokenBatch
from closedloop.trainers.guided import Decision, Rollout, StepContext, guided_token_rollout
from closedloop.trainers.objectives import StepLoss, TokenBC
from closedloop.wrappers.guidance import catk_choice, chunk_distance, recovery_tokens, token_chunks


class CatK(TokenBC):
    """The CAT-K objective (see the module docstring) for the shared training loop: BC's
    examples and loss, on a fresh guided rollout's tokens and recovery targets."""

    def __init__(
        self, vocabulary: MotionVocabulary, k: int = 32, rollout_temperature: float = 1e-5, label_smoothing=0.1
    ):
        if k < 1:
            raise ValueError(f"CAT-K needs k >= 1 candidates, not {k}")
        super().__init__(vocabulary, label_smoothing)
        self.k, self.temperature = k, rollout_temperature

    def rollout(self, model, batch: TokenBatch) -> Rollout:
        """One CAT-K-guided closed-loop rollout of ``model`` on ``batch`` (no gradient)."""
        return guided_token_rollout(model, batch, self.vocabulary, self.decide)

    def decide(self, step: StepContext) -> Decision:
        """Execute the top-K token nearest the log; learn the recovery token."""
        scores, candidates = step.logits.topk(min(self.k, step.table.shape[1]), dim=-1)
        kind = step.kind
        chunks = token_chunks(step.pose, candidates, step.table, kind)  # [B, N, K, steps, 3]
        nearest = catk_choice(chunk_distance(chunks, step.log, step.log_ok, step.box), scores > float("-inf"))
        choice = torch.where(step.guided, nearest, self._fallback(scores))
        executed = candidates.gather(-1, choice[..., None]).squeeze(-1)
        reached = chunks[:, :, :, -1].gather(2, choice[..., None, None].expand(-1, -1, 1, 3)).squeeze(2)
        target = recovery_tokens(step.pose, step.log, step.log_ok, step.table, step.sizes, step.agent_type, step.box)
        return Decision(executed, reached, target)

    def _fallback(self, scores: torch.Tensor) -> torch.Tensor:
        """Candidate index ``[B, N]`` for agents without a logged next pose: a sample among
        the top-K at the rollout temperature (the most likely one below 1e-4)."""
        if self.temperature < 1e-4:
            return torch.zeros(scores.shape[:-1], dtype=torch.long, device=scores.device)
        probs = torch.softmax(scores.float() / self.temperature, dim=-1).nan_to_num(0.0)
        probs[..., 0] += probs.sum(-1) == 0  # agents with no allowed token at all: index 0
        return torch.multinomial(probs.flatten(0, -2), 1).view(scores.shape[:-1])

    def loss(self, model, batch: TokenBatch) -> StepLoss:
        rollout = self.rollout(getattr(model, "module", model), batch)
        logits = model(rollout.tokens, rollout.poses, rollout.valid, batch.agent_type, batch.map)
        loss = self.token_loss(model, logits, rollout.targets, rollout.target_valid, batch.agent_type)
        loss.stats["rollout_error_m"] = rollout.error[rollout.target_valid].sum()
        return loss
