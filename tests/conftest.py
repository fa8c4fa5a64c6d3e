"""Shared fixtures: the real WOMD files in ../shared/womd and small shards made from them."""

from __future__ import annotations

from pathlib import Path

import pytest

WOMD_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "womd"
SCENARIO_FILE = WOMD_DIR / "motion_data_one_scenario.tfrecord"
LARGE_SCENARIO_FILE = WOMD_DIR / "womd_scenario_input.tfrecord"
EXAMPLE_FILE = WOMD_DIR / "motion_data_one_example.tfrecord"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real WOMD test file {path} is absent (expected in ../shared/womd)")
    return path


@pytest.fixture(scope="session")
def scenario_file() -> Path:
    return _require(SCENARIO_FILE)


@pytest.fixture(scope="session")
def large_scenario_file() -> Path:
    return _require(LARGE_SCENARIO_FILE)


@pytest.fixture(scope="session")
def example_file() -> Path:
    return _require(EXAMPLE_FILE)


@pytest.fixture(scope="session")
def real_scenarios(scenario_file, large_scenario_file):
    from closedloop.data import read_scenarios

    return {s.scenario_id: s for s in read_scenarios([scenario_file, large_scenario_file])}


@pytest.fixture(scope="session")
def many_shards(tmp_path_factory, real_scenarios):
    """5 shards of 3 scenarios each: the real ones with distinct ids."""
    from closedloop.data import write_scenarios

    root = tmp_path_factory.mktemp("shards")
    base = list(real_scenarios.values())
    for shard in range(5):
        copies = [base[i % len(base)].replace(scenario_id=f"s{shard}_{i}") for i in range(3)]
        write_scenarios(root / f"part-{shard:03d}.tfrecord", copies)
    return root
