"""Action distributions of learned policies, batched over B scenarios x N agents.

Every learned policy returns one of these from ``policy.distribution(state)``; the
fine-tuning methods use them as follows:

- ``top_k(k)``: the K most likely actions per agent and their log-probabilities (CAT-K
  executes the candidate nearest the log);
- ``sample(temperature, generator=..., top_k=...)``: K samples for RoaD, plain rollouts, and
  CAT-K's evaluation (top-48 sampling at temperature 1.0);
- ``log_prob(action)``: the log-probability of what was executed (REINFORCE, RoaD's
  imitation loss);
- ``mode()``: the most likely action.

Randomness comes only from the ``torch.Generator`` passed in (the policy's, from
``reset``), so rollouts reproduce from a seed.
"""

from __future__ import annotations

import math

import torch


class TokenDistribution:
    """A categorical distribution over each agent's token vocabulary.

    ``logits`` ``[B, N, V]``; ``mask`` ``[B, N, V]`` marks the tokens an agent may take (its
    kind's vocabulary may be smaller than V): masked tokens get probability 0."""

    def __init__(self, logits: torch.Tensor, mask: torch.Tensor | None = None):
        if mask is not None:
            empty = ~mask.any(-1)
            if bool(empty.any()):
                raise ValueError(f"token mask leaves no token at all for rows {torch.nonzero(empty)[:5].tolist()}")
            logits = logits.masked_fill(~mask, -math.inf)
        self.logits = logits
        self._log_probs: torch.Tensor | None = None

    @property
    def log_probs(self) -> torch.Tensor:
        """``[B, N, V]`` (computed on first use: sampling the top-k does not need it)."""
        if self._log_probs is None:
            self._log_probs = torch.log_softmax(self.logits.float(), dim=-1)
        return self._log_probs

    def log_prob(self, tokens: torch.Tensor) -> torch.Tensor:
        """Log-probabilities ``[B, N]`` of ``tokens`` ``[B, N]``."""
        return self.log_probs.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)

    def mode(self) -> torch.Tensor:
        return self.log_probs.argmax(-1)

    def top_k(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` most likely tokens ``[B, N, k]`` (most likely first) and their log-probabilities."""
        top = self.log_probs.topk(min(k, self.log_probs.shape[-1]), dim=-1)
        return top.indices, top.values

    def entropy(self) -> torch.Tensor:
        p = self.log_probs.exp()
        return -(p * self.log_probs.nan_to_num(neginf=0.0)).sum(-1)

    def sample(
        self, temperature: float = 1.0, generator: torch.Generator | None = None, top_k: int | None = None
    ) -> torch.Tensor:
        """Tokens ``[B, N]`` drawn at ``temperature`` (0 means the mode), optionally from the
        ``top_k`` most likely only."""
        if temperature <= 0:
            return self.mode()
        logits = self.logits.float()
        candidates = None
        if top_k is not None and top_k < logits.shape[-1]:  # draw among the k most likely only
            top = logits.topk(top_k, dim=-1)
            logits, candidates = top.values, top.indices
        probs = torch.softmax(logits / temperature, dim=-1).flatten(0, -2)
        drawn = torch.multinomial(probs, 1, generator=generator).view(*logits.shape[:-1], 1)
        if candidates is not None:
            drawn = candidates.gather(-1, drawn)
        return drawn.squeeze(-1)


class GaussianMixture:
    """A mixture of C diagonal Gaussians per agent over an action of shape ``event``.

    ``logits`` ``[..., C]`` (mixture weights; any batch dimensions, ``[B, N]`` for a policy),
    ``mean`` and ``log_std`` ``[..., C, *event]``."""

    def __init__(self, logits: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor):
        self.weights = torch.log_softmax(logits.float(), dim=-1)
        self.mean, self.log_std = mean, log_std
        self.event_dims = mean.dim() - logits.dim()

    def _component_log_prob(self, action: torch.Tensor) -> torch.Tensor:
        """``[B, N, C]``: the log-density of ``action`` under each component."""
        x = action.unsqueeze(self.weights.dim() - 1)
        z = (x - self.mean) / self.log_std.exp()
        dims = tuple(range(-self.event_dims, 0))
        return (-0.5 * z.square() - self.log_std - 0.5 * math.log(2 * math.pi)).sum(dims)

    def log_prob(self, action: torch.Tensor) -> torch.Tensor:
        """Log-densities ``[B, N]`` of ``action`` ``[B, N, *event]``."""
        return torch.logsumexp(self.weights + self._component_log_prob(action), dim=-1)

    def mode(self) -> torch.Tensor:
        """The mean of the most likely component ``[B, N, *event]``."""
        return self._means(self.weights.argmax(-1, keepdim=True)).squeeze(self.weights.dim() - 1)

    def top_k(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The means of the ``k`` heaviest components ``[B, N, k, *event]`` and their
        log-densities under the mixture ``[B, N, k]``."""
        index = self.weights.topk(min(k, self.weights.shape[-1]), dim=-1).indices
        means = self._means(index)
        dim = self.weights.dim() - 1
        log_probs = torch.stack([self.log_prob(m) for m in means.unbind(dim)], dim=-1)
        return means, log_probs

    def sample(
        self, temperature: float = 1.0, generator: torch.Generator | None = None, top_k: int | None = None
    ) -> torch.Tensor:
        """Actions ``[B, N, *event]``: a component drawn from the weights at ``temperature``
        (optionally among the ``top_k`` heaviest), then a point with its spread scaled by
        ``temperature`` (0 gives the mode)."""
        if temperature <= 0:
            return self.mode()
        logits = self.weights / temperature
        if top_k is not None and top_k < logits.shape[-1]:
            kth = logits.topk(top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        probs = torch.softmax(logits, dim=-1).flatten(0, -2)
        component = torch.multinomial(probs, 1, generator=generator).view(*logits.shape[:-1], 1)
        dim = self.weights.dim() - 1
        mean = self._means(component).squeeze(dim)
        std = self._pick(self.log_std, component).squeeze(dim).exp()
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + temperature * std * noise

    def _pick(self, values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``values [..., C, *event]`` at component indices ``index [..., k]``."""
        dim = self.weights.dim() - 1
        shape = (*index.shape, *values.shape[dim + 1 :])
        expanded = index.view(*index.shape, *([1] * self.event_dims)).expand(shape)
        return values.gather(dim, expanded)

    def _means(self, index: torch.Tensor) -> torch.Tensor:
        return self._pick(self.mean, index)
