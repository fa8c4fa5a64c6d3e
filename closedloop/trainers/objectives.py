"""What a training step minimises, separate from the loop that minimises it.

An objective builds its examples from scenarios once (``examples``), draws a batch
(``batch``) and returns the *summed* loss of a batch with the count it sums over
(``loss``): the loop divides by the count over all ranks, so a distributed step gives the
gradient of the mean over the global batch, exactly as one process would. The next issues'
objectives (CAT-K, RoaD, REINFORCE) plug into the same loop.

- :class:`TokenBC`: teacher forcing of the tokenized model on logged tokens,
  cross-entropy over each agent's kind vocabulary with label smoothing (CAT-K: 0.1)
  spread over that vocabulary only.
- :class:`EgoBC`: negative log-likelihood of the logged next chunk under the GMM ego model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from closedloop.agents.tokens import MotionVocabulary
from closedloop.data.scenario import Scenario
from closedloop.trainers.data import EgoSamples, TokenBatch, collate_tokens, ego_examples, token_examples


@dataclass
class StepLoss:
    """A batch's summed loss (with gradient), the number of terms it sums (agent-tokens
    or samples) and other summed statistics (``correct``: argmax hits)."""

    total: torch.Tensor
    count: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


def smoothed_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, allowed: torch.Tensor, smoothing: float
) -> torch.Tensor:
    """Per-row cross-entropy ``[...]`` of ``logits [..., V]`` against ``target [...]``,
    where only the ``allowed [..., V]`` classes exist: ``(1 - smoothing)`` on the target and
    ``smoothing`` spread evenly over the allowed classes (spreading it over padding classes,
    as ``F.cross_entropy(label_smoothing=)`` would, puts mass on -inf logits)."""
    log_p = torch.log_softmax(logits.float().masked_fill(~allowed, float("-inf")), dim=-1)
    nll = -log_p.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    if smoothing == 0:
        return nll
    uniform = -log_p.masked_fill(~allowed, 0).sum(-1) / allowed.sum(-1).clamp_min(1)
    return (1 - smoothing) * nll + smoothing * uniform


class TokenBC:
    """Behaviour cloning of the tokenized traffic model (see the module docstring)."""

    def __init__(self, vocabulary: MotionVocabulary, label_smoothing: float = 0.1):
        self.vocabulary, self.label_smoothing = vocabulary, label_smoothing
        self.sizes = vocabulary.sizes()

    def examples(self, scenarios: Sequence[Scenario], model, progress: bool = False) -> list:
        return token_examples(scenarios, self.vocabulary, progress)

    def batch(self, examples: list, rows: torch.Tensor, device: torch.device) -> TokenBatch:
        return collate_tokens([examples[i] for i in rows.tolist()]).to(device)

    def loss(self, model, batch: TokenBatch) -> StepLoss:
        logits = model(batch.tokens, batch.poses, batch.valid, batch.agent_type, batch.map)  # [B, N, S, V]
        where = batch.valid if batch.target_valid is None else batch.target_valid & batch.valid
        return self.token_loss(model, logits, batch.tokens, where, batch.agent_type)

    def token_loss(
        self, model, logits: torch.Tensor, targets: torch.Tensor, where: torch.Tensor, agent_type: torch.Tensor
    ) -> StepLoss:
        """Smoothed cross-entropy of ``logits [B, N, S, V]`` against ``targets [B, N, S]``
        at the ``where`` elements, each over its agent's kind vocabulary; also counts the
        argmax hits (``correct``)."""
        allowed = model_logit_mask(model, self.sizes.to(logits.device), agent_type)  # [B, N, V]
        allowed = allowed.unsqueeze(2).expand(-1, -1, where.shape[2], -1)[where]  # [K, V]
        logits, target = logits[where], targets[where]  # [K, V], [K]
        losses = smoothed_cross_entropy(logits, target, allowed, self.label_smoothing)
        correct = (logits.detach().masked_fill(~allowed, float("-inf")).argmax(-1) == target).sum()
        count = torch.tensor(float(target.numel()), device=logits.device)
        return StepLoss(losses.sum(), count, {"correct": correct.float()})


def model_logit_mask(model, sizes: torch.Tensor, agent_type: torch.Tensor) -> torch.Tensor:
    """The kind-vocabulary mask of a model, through a DistributedDataParallel wrapper."""
    return getattr(model, "module", model).logit_mask(sizes, agent_type)


class EgoBC:
    """Behaviour cloning of the GMM ego policy by negative log-likelihood."""

    def examples(self, scenarios: Sequence[Scenario], model, progress: bool = False) -> EgoSamples:
        return ego_examples(scenarios, model, progress)

    def batch(self, examples: EgoSamples, rows: torch.Tensor, device: torch.device) -> EgoSamples:
        return EgoSamples(examples.obs[rows].to(device), examples.target[rows].to(device))

    def loss(self, model, batch: EgoSamples) -> StepLoss:
        mixture = model(batch.obs)
        nll = -mixture.log_prob(batch.target)
        count = torch.tensor(float(len(batch)), device=nll.device)
        # Distance of the most likely component's mean: an interpretable companion to the NLL.
        error = torch.linalg.norm(mixture.mode()[..., :2] - batch.target[..., :2], dim=-1).mean(-1)
        return StepLoss(nll.sum(), count, {"mode_error_m": error.detach().sum()})


def check_finite(loss: StepLoss, step: int) -> None:
    """Stop with a clear error (before the weights are touched) when the loss is NaN/inf."""
    if not bool(torch.isfinite(loss.total.detach())):
        raise FloatingPointError(
            f"step {step}: the training loss is {float(loss.total)}: lower --lr, or check the data"
        )
