"""Policy-evaluation statistics: how well one sim-agent model's planner values agree with
another's (the RL fine-tuning paper's Tables 3 and 4).

Spearman's rank correlation (ties get their average rank; NaN when either side has no
spread) says whether a sim-agent model ranks planners as the ground truth does; the mean
absolute error says whether it values them as the ground truth does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks 1..n of ``values``, tied values sharing the mean of the ranks they span."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    sorted_x = x[order]
    start = 0
    while start < len(x):
        stop = start + 1
        while stop < len(x) and sorted_x[stop] == sorted_x[start]:
            stop += 1
        ranks[order[start:stop]] = (start + stop + 1) / 2  # mean of ranks start+1 .. stop
        start = stop
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho: the Pearson correlation of the average ranks; NaN for fewer than
    two values or when either side's ranks are all equal."""
    if len(x) != len(y):
        raise ValueError(f"spearman needs paired values, got {len(x)} and {len(y)}")
    if len(x) < 2:
        return float("nan")
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / denominator) if denominator > 0 else float("nan")


def mean_absolute_error(x: Sequence[float], y: Sequence[float]) -> float:
    """Mean of ``|x - y|`` over paired values."""
    if len(x) != len(y) or not len(x):
        raise ValueError(f"mean_absolute_error needs paired values, got {len(x)} and {len(y)}")
    return float(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).mean())


def agreement(
    values: Mapping[str, Mapping[str, float]], sim_agents: Sequence[str]
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """``(spearman, mae)``: ``[a][b]`` compares the values of every planner under sim-agent
    model ``a`` with its values under ``b``; ``values[planner][sim_agent]``."""
    planners = list(values)
    table = {a: [values[p][a] for p in planners] for a in sim_agents}
    rho = {a: {b: spearman(table[a], table[b]) for b in sim_agents} for a in sim_agents}
    mae = {
        a: {b: mean_absolute_error(table[a], table[b]) if planners else float("nan") for b in sim_agents}
        for a in sim_agents
    }
    return rho, mae
