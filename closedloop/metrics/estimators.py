"""Histogram and Bernoulli log-likelihood estimators, batched.

As in the reference: values are clipped to the histogram range; the simulated samples of
one object (all rollouts x all steps, "independent timesteps") form a histogram with an
additive pseudocount per bin; each logged value scores the log-probability of its bin.
NaN values fall in the last bin, as TensorFlow Probability's binning puts them there.
"""

from __future__ import annotations

import torch

from closedloop.metrics.config import Histogram


def bin_edges(config: Histogram, dtype=torch.float32, device=None) -> torch.Tensor:
    """The ``num_bins + 1`` edges in float32, computed the way ``tf.linspace`` does."""
    n = config.num_bins
    start = torch.tensor(config.min_val, dtype=torch.float32)
    step = (torch.tensor(config.max_val, dtype=torch.float32) - start) / n
    edges = start + torch.arange(n + 1, dtype=torch.float32) * step
    edges[-1] = config.max_val
    return edges.to(dtype=dtype, device=device)


def bin_index(values: torch.Tensor, config: Histogram) -> torch.Tensor:
    """Histogram bin of each value: left-closed bins, the last one closed; NaN -> last."""
    edges = bin_edges(config, values.dtype, values.device)
    clipped = values.clamp(config.min_val, config.max_val)
    index = torch.searchsorted(edges, clipped.contiguous(), right=True) - 1
    index = index.clamp(0, config.num_bins - 1)
    return torch.where(torch.isnan(values), config.num_bins - 1, index)


def histogram_log_likelihood(
    log_values: torch.Tensor, sim_values: torch.Tensor, config: Histogram, sim_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Log-likelihood of each logged value under the histogram of the simulated ones.

    ``log_values``: ``[..., n]``; ``sim_values``: ``[..., m]`` (the same leading dims),
    every one of the ``m`` samples counted unless ``sim_mask`` excludes it.
    Returns ``[..., n]``.
    """
    sim_bins = bin_index(sim_values, config)
    weight = torch.ones_like(sim_values) if sim_mask is None else sim_mask.to(sim_values.dtype)
    counts = torch.zeros((*sim_values.shape[:-1], config.num_bins), dtype=sim_values.dtype, device=sim_values.device)
    counts.scatter_add_(-1, sim_bins, weight)
    counts = counts + config.pseudocount
    log_probs = torch.log(counts) - torch.log(counts.sum(-1, keepdim=True))
    return torch.gather(log_probs, -1, bin_index(log_values, config))


def bernoulli_log_likelihood(
    log_values: torch.Tensor, sim_values: torch.Tensor, pseudocount: float = 0.001
) -> torch.Tensor:
    """Log-likelihood of boolean ``log_values`` ``[...]`` under boolean ``sim_values``
    ``[..., m]`` (a two-bin histogram with an additive pseudocount)."""
    config = Histogram(-0.5, 1.5, 2, pseudocount)
    return histogram_log_likelihood(log_values.to(torch.float32)[..., None], sim_values.to(torch.float32), config)[
        ..., 0
    ]
