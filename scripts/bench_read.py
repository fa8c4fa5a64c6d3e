"""Reading speed: scenarios/s for TFRecord read+decode and for the prepared cache.

Builds shards of many scenarios (synthetic town scenarios when available with --synthetic,
else the real WOMD test scenarios repeated), then times, in one run:
  framing  - TFRecord framing + both CRC32C checks only (MB/s)
  decode   - framing + protobuf parse + conversion to Scenario records
  cache    - random access to the same scenarios through `closedloop prepare`'s cache
and prints a table plus one JSON line. Usage:
  python scripts/bench_read.py [--scenarios 200] [--shards 4] [--source real|synthetic]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from closedloop.data import ScenarioCache, prepare_cache, read_scenarios, write_scenarios
from closedloop.data.tfrecord import iter_records

WOMD = Path(__file__).resolve().parents[2] / "shared" / "womd"


def _source_scenarios(source: str, count: int, seed: int):
    if source == "synthetic":
        from closedloop.data.synthetic import generate_scenarios

        return list(generate_scenarios(count, seed=seed))
    base = list(read_scenarios([WOMD / "motion_data_one_scenario.tfrecord", WOMD / "womd_scenario_input.tfrecord"]))
    return [base[i % len(base)].replace(scenario_id=f"r{i:06d}") for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", type=int, default=200)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--source", choices=("real", "synthetic"), default="real")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    scenarios = _source_scenarios(args.source, args.scenarios, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        per = -(-len(scenarios) // args.shards)
        files = []
        for k in range(args.shards):
            files.append(tmp / f"part-{k:03d}.tfrecord")
            write_scenarios(files[-1], scenarios[k * per : (k + 1) * per])
        total_bytes = sum(f.stat().st_size for f in files)

        start = time.perf_counter()
        n_records = sum(1 for f in files for _ in iter_records(f))
        framing_s = time.perf_counter() - start

        start = time.perf_counter()
        n_decoded = sum(1 for _ in read_scenarios(files))
        decode_s = time.perf_counter() - start

        start = time.perf_counter()
        prepare_cache(files, tmp / "cache", progress=False)
        prepare_s = time.perf_counter() - start

        cache = ScenarioCache(tmp / "cache")
        start = time.perf_counter()
        for i in range(len(cache)):
            cache[i]
        cache_s = time.perf_counter() - start

    results = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "source": args.source,
        "scenarios": n_decoded,
        "shards": args.shards,
        "mb_per_scenario": round(total_bytes / n_records / 1e6, 3),
        "framing_mb_per_s": round(total_bytes / 1e6 / framing_s, 1),
        "decode_scenarios_per_s": round(n_decoded / decode_s, 1),
        "prepare_scenarios_per_s": round(n_decoded / prepare_s, 1),
        "cache_scenarios_per_s": round(n_decoded / cache_s, 1),
    }
    results["cache_speedup_vs_decode"] = round(decode_s / cache_s, 2)
    print(f"{'stage':<28}{'rate':>14}")
    print(f"{'framing + CRC (MB/s)':<28}{results['framing_mb_per_s']:>14}")
    print(f"{'read + decode (scen/s)':<28}{results['decode_scenarios_per_s']:>14}")
    print(f"{'prepare, 1 worker (scen/s)':<28}{results['prepare_scenarios_per_s']:>14}")
    print(f"{'cache read (scen/s)':<28}{results['cache_scenarios_per_s']:>14}")
    print(f"{'cache / decode speed-up':<28}{results['cache_speedup_vs_decode']:>14}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
