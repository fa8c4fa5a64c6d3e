"""A short seeded run of scripts/fuzz_reader.py: no crash, hang, over-allocation or lost record."""

import importlib.util
import random
import sys
from pathlib import Path

import pytest

from closedloop.data.tfrecord import encode_record

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fuzz_reader.py"


@pytest.fixture(scope="module")
def fuzz_reader():
    spec = importlib.util.spec_from_file_location("fuzz_reader", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_reader"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def seeds(fuzz_reader, example_file):
    # Cut-down seeds, quick to read; `fuzz_reader.py --cases 2000` covers the full-size files.
    return fuzz_reader.small_seeds(example_file.parent)


def test_independent_framing_walk(fuzz_reader):
    data = encode_record(b"one") + encode_record(b"two")
    assert fuzz_reader.intact_records(data) == [(b"one", True), (b"two", True)]
    assert fuzz_reader.intact_records(data[:-1]) == [(b"one", True)]
    flipped = bytearray(data)
    flipped[13] ^= 1
    assert fuzz_reader.intact_records(bytes(flipped)) == [(b"ooe", False), (b"two", True)]


def test_mutations_are_reproducible(fuzz_reader, seeds):
    first = [fuzz_reader.mutate(random.Random(f"0:{k}"), seeds[k % 2]) for k in range(20)]
    again = [fuzz_reader.mutate(random.Random(f"0:{k}"), seeds[k % 2]) for k in range(20)]
    assert [m.data for m in first] == [m.data for m in again]
    assert len({m.strategy for m in first}) >= 4


def test_seeded_fuzz_run_has_no_failures(fuzz_reader, seeds):
    results = fuzz_reader.fuzz(300, seed=1, seeds=seeds, time_limit=10.0)
    failures = [
        (r.seed, r.strategy, r.note, r.outcomes, r.details)
        for r in results
        if set(r.outcomes.values()) & set(fuzz_reader.FAILURES)
    ]
    assert failures == []
    counts = fuzz_reader.summary(results)
    assert counts["raise"]["TFRecordError"] and counts["raise"]["ScenarioDecodeError"]  # both paths exercised
    assert set(counts["skip"]) == {"ok"}
