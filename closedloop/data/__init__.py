"""Scenario records, WOMD TFRecord I/O without TensorFlow, batches, datasets and caches."""

from closedloop.data.batch import ScenarioBatch, collate_scenarios, select_agents
from closedloop.data.cache import CacheError, ScenarioCache, prepare_cache
from closedloop.data.dataset import CachedScenarioDataset, WomdIterableDataset
from closedloop.data.scenario import Scenario
from closedloop.data.tfrecord import TFRecordError, iter_records, write_records
from closedloop.data.womd import (
    ScenarioDecodeError,
    SkipCounter,
    read_scenarios,
    scenario_from_proto,
    scenario_to_proto,
    write_scenarios,
)

__all__ = [
    "CacheError",
    "CachedScenarioDataset",
    "Scenario",
    "ScenarioBatch",
    "ScenarioCache",
    "ScenarioDecodeError",
    "SkipCounter",
    "TFRecordError",
    "WomdIterableDataset",
    "collate_scenarios",
    "iter_records",
    "prepare_cache",
    "read_scenarios",
    "scenario_from_proto",
    "scenario_to_proto",
    "select_agents",
    "write_records",
    "write_scenarios",
]
