"""Evaluation: WOSAC realism metrics and challenge submissions."""

from closedloop.metrics.config import BUCKETS, CONFIGS, FEATURES, FIELDS, get_config
from closedloop.metrics.wosac import RolloutError, aggregate, buckets, score_scenario, score_scenarios

__all__ = [
    "BUCKETS",
    "CONFIGS",
    "FEATURES",
    "FIELDS",
    "RolloutError",
    "aggregate",
    "buckets",
    "get_config",
    "score_scenario",
    "score_scenarios",
]
