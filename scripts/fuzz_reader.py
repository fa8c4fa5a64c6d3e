"""Fuzz the WOMD readers with corrupted real and synthetic TFRecord files.

  python scripts/fuzz_reader.py --cases 2000 --seed 0 [--womd ../shared/womd] [--no-real]
  python scripts/fuzz_reader.py --seed 0 --case 17        # rerun one case, saying what it did

Each case takes a seed file (the real WOMD files, a real mixed file, synthetic Scenario-proto
files), mutates it one way and reads it with ``read_scenarios`` in both modes:

  bit_flips       a few random bits anywhere (framing, checksums or payload)
  truncate        the file cut at a random byte or record boundary
  length          one record's length rewritten, its header CRC recomputed
  payload         one record's payload bytes flipped, overwritten, cut or grown, both CRCs
                  recomputed so the decoder sees the damage
  scenario_field  one Scenario proto field set out of range (indices, counts, ids), CRCs recomputed
  example_field   one tf.Example feature deleted, retyped, shortened, grown or given odd values
  splice          one record dropped, duplicated or replaced by random bytes

Outcomes per mode: ``ok``; the documented errors (``TFRecordError``, ``ScenarioDecodeError``,
raise mode only); ``crash`` (any other exception, also from summarising and batching what was
decoded); ``hang`` (over --time-limit); ``alloc>4x`` (tracemalloc peak above 4x the file size,
files under 64 KiB counted as 64 KiB for the reader's fixed overhead); ``lost`` (skip mode
returned fewer scenarios than the file has intact-framed records with unmodified, valid
payloads). Exits 1 if any case crashed, hung, over-allocated or lost records.

The mutation helpers are imported by tests/test_fuzz.py for a short seeded run.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import signal
import struct
import sys
import tempfile
import time
import traceback
import tracemalloc
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from closedloop.data.batch import collate_scenarios
from closedloop.data.tfexample import example_class
from closedloop.data.tfrecord import TFRecordError, encode_record, iter_records, masked_crc32c
from closedloop.data.womd import ScenarioDecodeError, parse_scenario, read_scenarios, scenario_to_proto
from closedloop.inspect import summarize

DEFAULT_WOMD = Path(__file__).resolve().parents[1].parent / "shared" / "womd"
ALLOC_FACTOR = 4
ALLOC_FLOOR = 64 * 1024
DOCUMENTED = (TFRecordError, ScenarioDecodeError)
FAILURES = ("crash", "hang", "alloc>4x", "lost")


@dataclass
class Seed:
    """A well-formed input: its records, each of which decodes."""

    name: str
    records: list[bytes]


@dataclass
class Mutant:
    data: bytes
    strategy: str
    note: str


@dataclass
class CaseResult:
    seed: str
    strategy: str
    note: str
    outcomes: dict[str, str] = field(default_factory=dict)  # mode -> outcome
    details: dict[str, str] = field(default_factory=dict)  # mode -> what went wrong
    peak_ratio: float = 0.0  # the larger mode's tracemalloc peak over the counted file size
    seconds: float = 0.0  # the slower mode's read time


# -- seeds ------------------------------------------------------------------------------------
def build_seeds(womd_dir: Path | None, synthetic_seed: int = 0) -> list[Seed]:
    """Real WOMD files (when ``womd_dir`` has them) and small synthetic Scenario-proto files."""
    from closedloop.data.synthetic import generate_scenarios

    seeds = []
    real = {}
    if womd_dir is not None and womd_dir.is_dir():
        for path in sorted(womd_dir.glob("*.tfrecord")):
            real[path.name] = list(iter_records(path))
            seeds.append(Seed(f"real:{path.name}", real[path.name]))
    example = real.get("motion_data_one_example.tfrecord")
    scenario = real.get("motion_data_one_scenario.tfrecord")
    if example and scenario:
        seeds.append(Seed("real:mixed", [example[0], scenario[0], example[0]]))
    cross = [
        scenario_to_proto(s).SerializeToString()
        for s in generate_scenarios(3, seed=synthetic_seed, town="cross", agents=(3, 6))
    ]
    seeds.append(Seed("synthetic:cross x3", cross))
    grid = [
        scenario_to_proto(s).SerializeToString()
        for s in generate_scenarios(2, seed=synthetic_seed, town="grid", agents=(3, 6))
    ]
    seeds.append(Seed("synthetic:grid x2", grid))
    for seed in seeds:  # every seed record must be valid, or "lost" would mean nothing
        for i, payload in enumerate(seed.records):
            parse_scenario(payload, seed.name, i)
    return seeds


def _shrink_scenario(payload: bytes, tracks: int = 6, features: int = 6, lights: int = 2) -> bytes:
    """A Scenario proto cut to its first tracks, map features and light states per step
    (SDC and tracks_to_predict kept valid)."""
    from waymo_open_dataset.protos import scenario_pb2

    proto = scenario_pb2.Scenario.FromString(payload)
    del proto.tracks[tracks:]
    del proto.map_features[features:]
    for dynamic in proto.dynamic_map_states:
        del dynamic.lane_states[lights:]
    proto.sdc_track_index = 0
    del proto.tracks_to_predict[:]
    proto.tracks_to_predict.add(track_index=1 % len(proto.tracks))
    return proto.SerializeToString()


def _shrink_example(payload: bytes, slots: int = 16, points: int = 1000) -> bytes:
    """A motion tf.Example cut to its first agent slots (the first marked SDC) and roadgraph samples."""
    example = example_class()()
    example.ParseFromString(payload)
    steps = {"past": 10, "current": 1, "future": 80}
    for name, feature in example.features.feature.items():
        values = getattr(feature, feature.WhichOneof("kind")).value
        part = name.split("/")
        if name.startswith("roadgraph_samples/"):
            del values[points * (3 if name.endswith(("xyz", "dir")) else 1) :]
        elif part[0] == "state":
            del values[slots * steps.get(part[1], 1) :]
    example.features.feature["state/is_sdc"].int64_list.value[0] = 1
    return example.SerializeToString()


def small_seeds(womd_dir: Path | None, synthetic_seed: int = 0) -> list[Seed]:
    """Seeds a few times faster to read than :func:`build_seeds`' (for a short run in the
    tests): three cut-down synthetic Scenario protos and two cut-down real tf.Examples."""
    from closedloop.data.synthetic import generate_scenarios

    scenarios = [
        _shrink_scenario(scenario_to_proto(s).SerializeToString())
        for s in generate_scenarios(3, seed=synthetic_seed, town="cross", agents=(3, 6))
    ]
    seeds = [Seed("small synthetic x3", scenarios)]
    example = (womd_dir / "motion_data_one_example.tfrecord") if womd_dir is not None else None
    if example is not None and example.exists():
        small = _shrink_example(next(iter_records(example)))
        seeds.append(Seed("small real tf.Example x2", [small, small]))
    for seed in seeds:
        for i, payload in enumerate(seed.records):
            parse_scenario(payload, seed.name, i)
    return seeds


def frame(records: list[bytes]) -> bytes:
    return b"".join(encode_record(r) for r in records)


def _spans(records: list[bytes]) -> list[int]:
    """Byte offset of each record in the framed file."""
    offsets, offset = [], 0
    for record in records:
        offsets.append(offset)
        offset += len(record) + 16
    return offsets


# -- mutations --------------------------------------------------------------------------------
def _bit_flips(rng: random.Random, seed: Seed) -> Mutant:
    data = bytearray(frame(seed.records))
    positions = [rng.randrange(len(data)) for _ in range(rng.randint(1, 8))]
    for pos in positions:
        data[pos] ^= 1 << rng.randrange(8)
    return Mutant(bytes(data), "bit_flips", f"bits at {positions}")


def _truncate(rng: random.Random, seed: Seed) -> Mutant:
    data = frame(seed.records)
    if rng.random() < 0.3:
        cut = rng.choice(_spans(seed.records) + [len(data)]) + rng.choice([-4, -1, 0, 1, 8, 12])
    else:
        cut = rng.randrange(len(data))
    cut = min(max(cut, 0), len(data) - 1)
    return Mutant(data[:cut], "truncate", f"cut at {cut} of {len(data)}")


def _length(rng: random.Random, seed: Seed) -> Mutant:
    data = bytearray(frame(seed.records))
    i = rng.randrange(len(seed.records))
    offset, size = _spans(seed.records)[i], len(seed.records[i])
    length = rng.choice(
        [
            0,
            1,
            size - 1,
            size + 1,
            size + rng.randint(-100, 100),
            rng.randrange(len(data)),
            len(data),
            2**31 - 1,
            2**32 + size,
            2**63,
            2**64 - 1,
            rng.getrandbits(64),
        ]
    )
    length = min(max(length, 0), 2**64 - 1)
    header = struct.pack("<Q", length)
    data[offset : offset + 12] = header + struct.pack("<I", masked_crc32c(header))
    return Mutant(bytes(data), "length", f"record {i} length {size} -> {length}")


def _mutate_bytes(rng: random.Random, payload: bytes) -> tuple[bytes, str]:
    data = bytearray(payload)
    op = rng.choice(["flip", "overwrite", "cut", "insert", "duplicate", "zero"])
    pos = rng.randrange(len(data)) if data else 0
    span = rng.randint(1, 64)
    if op == "flip":
        for _ in range(rng.randint(1, 16)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif op == "overwrite":
        data[pos : pos + span] = bytes(rng.getrandbits(8) for _ in range(span))
    elif op == "cut":
        del data[pos : pos + rng.randint(1, max(1, len(data) // 4))]
    elif op == "insert":
        data[pos:pos] = bytes(rng.getrandbits(8) for _ in range(span))
    elif op == "duplicate":
        data[pos:pos] = data[pos : pos + rng.randint(1, 4096)]
    else:
        data[pos : pos + span] = bytes(min(span, len(data) - pos))
    return bytes(data), f"{op} at {pos}"


def _payload(rng: random.Random, seed: Seed) -> Mutant:
    records = list(seed.records)
    i = rng.randrange(len(records))
    records[i], note = _mutate_bytes(rng, records[i])
    return Mutant(frame(records), "payload", f"record {i}: {note}")


def _scenario_edit(rng: random.Random, proto) -> str:
    """One out-of-range or inconsistent edit of a Scenario proto, described."""
    tracks, steps = len(proto.tracks), len(proto.timestamps_seconds)
    big = rng.choice([-1, -(2**31), 2**31 - 1, 10**9])
    lanes = [f.lane for f in proto.map_features if f.WhichOneof("feature_data") == "lane"]
    edits = {
        "sdc_track_index": lambda: setattr(proto, "sdc_track_index", rng.choice([tracks, big])),
        "current_time_index": lambda: setattr(proto, "current_time_index", rng.choice([steps, big])),
        "tracks_to_predict": lambda: proto.tracks_to_predict.add(track_index=rng.choice([tracks, big])),
        "state count": lambda: proto.tracks[rng.randrange(tracks)].states.add() if tracks else None,
        "timestamps": lambda: proto.timestamps_seconds.extend([9.1] * rng.randint(1, 3)),
        "no tracks": lambda: proto.ClearField("tracks"),
        "dynamic states": lambda: [proto.dynamic_map_states.add() for _ in range(rng.randint(1, 150))],
        "light": lambda: (
            proto.dynamic_map_states[rng.randrange(len(proto.dynamic_map_states))].lane_states.add(
                lane=rng.getrandbits(63), state=rng.randrange(9)
            )
            if proto.dynamic_map_states
            else None
        ),
        "empty feature": lambda: proto.map_features.add(id=rng.getrandbits(40)),
        "scenario_id": lambda: setattr(proto, "scenario_id", rng.choice(["../../x", "/abs", ".", "a" * 500])),
        "nan state": lambda: (
            setattr(proto.tracks[rng.randrange(tracks)].states[0], "center_x", float("nan")) if tracks else None
        ),
        "huge values": lambda: (
            setattr(proto.tracks[rng.randrange(tracks)].states[0], "length", 1e308) if tracks else None
        ),
    }
    if lanes:
        lane = rng.choice(lanes)
        n = len(lane.polyline)
        edits.update(
            {
                "neighbor index": lambda: lane.left_neighbors.add(
                    feature_id=rng.getrandbits(20),
                    self_start_index=rng.choice([0, -1]),
                    self_end_index=rng.choice([n, big]),
                    neighbor_start_index=big,
                    neighbor_end_index=big,
                ),
                "boundary index": lambda: lane.right_boundaries.add(
                    lane_start_index=rng.choice([-1, 0]),
                    lane_end_index=rng.choice([n, big]),
                    boundary_feature_id=rng.getrandbits(20),
                ),
                "entry lanes": lambda: lane.entry_lanes.extend([rng.getrandbits(62), -1]),
                "empty polyline": lambda: lane.ClearField("polyline"),
            }
        )
    name = rng.choice(sorted(edits))
    edits[name]()
    return name


def _scenario_field(rng: random.Random, seed: Seed) -> Mutant | None:
    from waymo_open_dataset.protos import scenario_pb2

    records = list(seed.records)
    candidates = []
    for i, payload in enumerate(records):
        proto = scenario_pb2.Scenario()
        try:
            proto.ParseFromString(payload)
        except Exception:  # a tf.Example does not always parse as a Scenario
            continue
        if proto.scenario_id and proto.timestamps_seconds:
            candidates.append((i, proto))
    if not candidates:
        return None
    i, proto = rng.choice(candidates)
    name = _scenario_edit(rng, proto)
    records[i] = proto.SerializeToString()
    return Mutant(frame(records), "scenario_field", f"record {i}: {name}")


def _example_field(rng: random.Random, seed: Seed) -> Mutant | None:
    records = list(seed.records)
    candidates = []
    for i, payload in enumerate(records):
        example = example_class()()
        try:
            example.ParseFromString(payload)
        except Exception:  # a Scenario proto is not always a parseable tf.Example
            continue
        if "state/id" in example.features.feature:
            candidates.append((i, example))
    if not candidates:
        return None
    i, example = rng.choice(candidates)
    features = example.features.feature
    name = rng.choice(sorted(features.keys()))
    feature = features[name]
    kind = feature.WhichOneof("kind")
    values = list(getattr(feature, kind).value) if kind else []
    op = rng.choice(["delete", "to_bytes", "to_float", "to_int", "shorten", "grow", "empty", "odd values"])
    if op == "delete":
        del features[name]
    elif op == "to_bytes":
        feature.bytes_list.value[:] = [str(v).encode() for v in values[:50000]]
    elif op == "to_float":
        feature.float_list.value[:] = [rng.random() for _ in values]
    elif op == "to_int":
        feature.int64_list.value[:] = [rng.randrange(-5, 5) for _ in values]
    elif op in ("shorten", "grow", "empty") and kind:
        target = getattr(feature, kind).value
        if op == "empty":
            del target[:]
        elif op == "shorten":
            del target[rng.randrange(len(target) + 1) :]
        else:
            target.extend(target[: rng.randint(1, 2000)] if len(target) else [])
    elif kind in ("float_list", "int64_list") and values:
        target = getattr(feature, kind).value
        odd = (
            [float("nan"), float("inf"), 0.5, 1e30, -1e30]
            if kind == "float_list"
            else [-1, 2**62, -(2**63), 2**31, 127, 128, 17, 99]
        )
        for _ in range(rng.randint(1, 8)):
            target[rng.randrange(len(target))] = rng.choice(odd)
    records[i] = example.SerializeToString()
    return Mutant(frame(records), "example_field", f"record {i}: {op} {name!r} ({kind})")


def _splice(rng: random.Random, seed: Seed) -> Mutant:
    records = list(seed.records)
    i = rng.randrange(len(records))
    op = rng.choice(["drop", "duplicate", "random", "empty"])
    if op == "drop" and len(records) > 1:
        del records[i]
    elif op == "duplicate":
        records.insert(i, records[i])
    elif op == "empty":
        records[i] = b""
    else:
        records[i] = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 2000)))
    return Mutant(frame(records), "splice", f"record {i}: {op}")


STRATEGIES = {
    "bit_flips": _bit_flips,
    "truncate": _truncate,
    "length": _length,
    "payload": _payload,
    "scenario_field": _scenario_field,
    "example_field": _example_field,
    "splice": _splice,
}


def mutate(rng: random.Random, seed: Seed) -> Mutant:
    """One mutant of ``seed``; structure-aware strategies fall back to byte payload edits
    when the seed has no record of their kind."""
    strategy = rng.choice(sorted(STRATEGIES))
    mutant = STRATEGIES[strategy](rng, seed)
    return mutant if mutant is not None else _payload(rng, seed)


# -- expectations -----------------------------------------------------------------------------
def intact_records(data: bytes) -> list[tuple[bytes, bool]]:
    """``(payload, payload CRC ok)`` of each record before the framing breaks, walked
    independently of the reader under test."""
    out, offset = [], 0
    while len(data) - offset >= 12:
        length, crc = struct.unpack_from("<QI", data, offset)
        if masked_crc32c(data[offset : offset + 8]) != crc or length + 16 > len(data) - offset:
            break
        payload = data[offset + 12 : offset + 12 + length]
        (footer,) = struct.unpack_from("<I", data, offset + 12 + length)
        out.append((payload, masked_crc32c(payload) == footer))
        offset += 16 + length
    return out


def digest(payload: bytes) -> bytes:
    return hashlib.sha256(payload).digest()


# -- running ----------------------------------------------------------------------------------
class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang()


def read_case(path: Path, mode: str, time_limit: float) -> tuple[list, BaseException | None, int, float]:
    """Read ``path`` in ``mode``: (scenarios, exception or None, tracemalloc peak, seconds)."""
    scenarios: list = []
    error = None
    previous = signal.signal(signal.SIGALRM, _alarm)
    tracemalloc.start()
    start = time.perf_counter()
    signal.setitimer(signal.ITIMER_REAL, time_limit)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for scenario in read_scenarios(path, on_error=mode):
                scenarios.append(scenario)
    except BaseException as err:  # noqa: BLE001 - classifying every failure is the point
        if isinstance(err, KeyboardInterrupt):
            raise
        error = err
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        signal.signal(signal.SIGALRM, previous)
    return scenarios, error, peak, seconds


def run_case(rng: random.Random, seeds: list[Seed], good: set[bytes], workdir: Path, time_limit: float) -> CaseResult:
    seed = rng.choice(seeds)
    mutant = mutate(rng, seed)
    path = workdir / "case.tfrecord"
    path.write_bytes(mutant.data)
    intact = intact_records(mutant.data)
    expected = sum(ok and digest(p) in good for p, ok in intact)
    mutated = sum(ok and digest(p) not in good for p, ok in intact)
    limit = ALLOC_FACTOR * max(len(mutant.data), ALLOC_FLOOR)
    result = CaseResult(seed.name, mutant.strategy, mutant.note)
    for mode in ("raise", "skip"):
        scenarios, error, peak, seconds = read_case(path, mode, time_limit)
        result.peak_ratio = max(result.peak_ratio, peak / max(len(mutant.data), ALLOC_FLOOR))
        result.seconds = max(result.seconds, seconds)
        if isinstance(error, _Hang) or seconds > time_limit:
            outcome, detail = "hang", f"{seconds:.1f} s"
        elif error is not None and not (mode == "raise" and isinstance(error, DOCUMENTED)):
            outcome = "crash"
            detail = "".join(traceback.format_exception(type(error), error, error.__traceback__)[-3:])
        elif peak > limit:
            outcome, detail = "alloc>4x", f"peak {peak} bytes for a {len(mutant.data)}-byte file"
        elif mode == "skip" and not expected <= len(scenarios) <= expected + mutated:
            outcome, detail = "lost", f"{len(scenarios)} scenarios, expected {expected} (+{mutated} mutated)"
        else:
            outcome, detail = (type(error).__name__ if error is not None else "ok"), ""
            if mutated:  # what the reader accepted must be usable downstream
                try:
                    with warnings.catch_warnings():  # float32 overflow of absurd values is not a crash
                        warnings.simplefilter("ignore")
                        for scenario in scenarios:
                            summarize(scenario)
                            collate_scenarios([scenario])
                except Exception as err:  # noqa: BLE001
                    outcome = "crash"
                    detail = "downstream: " + "".join(traceback.format_exception_only(type(err), err))
        result.outcomes[mode] = outcome
        if detail:
            result.details[mode] = detail
    return result


def fuzz(
    cases: int, seed: int, seeds: list[Seed], time_limit: float = 10.0, first: int = 0, on_result=None
) -> list[CaseResult]:
    """Run cases ``first .. first + cases - 1``; case ``k`` is reproducible from (seed, k)."""
    good = {digest(r) for s in seeds for r in s.records}
    results = []
    with tempfile.TemporaryDirectory(prefix="fuzz_reader.") as tmp:
        for case in range(first, first + cases):
            result = run_case(random.Random(f"{seed}:{case}"), seeds, good, Path(tmp), time_limit)
            results.append(result)
            if on_result is not None:
                on_result(case, result)
    return results


def summary(results: list[CaseResult]) -> dict[str, Counter]:
    return {mode: Counter(r.outcomes[mode] for r in results) for mode in ("raise", "skip")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--case", type=int, help="run only this case, printing what it did")
    parser.add_argument("--womd", type=Path, default=DEFAULT_WOMD, help="folder of real WOMD files")
    parser.add_argument("--no-real", action="store_true", help="synthetic seeds only")
    parser.add_argument("--time-limit", type=float, default=10.0, help="seconds per case and mode")
    args = parser.parse_args()

    seeds = build_seeds(None if args.no_real else args.womd, args.seed)
    print(f"seeds: {', '.join(f'{s.name} ({len(s.records)} records)' for s in seeds)}", flush=True)
    failures: list[tuple[int, CaseResult]] = []

    def report(case: int, result: CaseResult) -> None:
        if args.case is not None:
            print(f"case {case}: {result.seed}: {result.strategy}: {result.note}: {result.outcomes}")
        if any(o in FAILURES for o in result.outcomes.values()):
            failures.append((case, result))
            print(
                f"case {case} FAILED: {result.seed}: {result.strategy}: {result.note}: {result.outcomes}\n"
                + "\n".join(f"  {m}: {d}" for m, d in result.details.items()),
                flush=True,
            )

    start = time.perf_counter()
    first, cases = (args.case, 1) if args.case is not None else (0, args.cases)
    results = fuzz(cases, args.seed, seeds, args.time_limit, first, report)
    print(f"{len(results)} cases (seed {args.seed}) in {time.perf_counter() - start:.0f} s")
    print("strategies: " + ", ".join(f"{k} {v}" for k, v in sorted(Counter(r.strategy for r in results).items())))
    for mode, counts in summary(results).items():
        print(f"{mode:>5}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print(
        f"largest tracemalloc peak: {max(r.peak_ratio for r in results):.2f}x the file size; "
        f"slowest read: {max(r.seconds for r in results):.2f} s"
    )
    bad = Counter(o for r in results for o in r.outcomes.values() if o in FAILURES)
    print(
        "failures: " + (", ".join(f"{k} {bad[k]}" for k in FAILURES) if bad else ", ".join(f"{k} 0" for k in FAILURES))
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
