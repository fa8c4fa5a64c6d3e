"""Synthetic-town generation speed: scenarios/s per town, 1 worker vs all cores.

  python scripts/bench_generate.py [--scenarios 24]
Prints a table and one JSON line; the ratio column is the multi-worker speed-up measured
in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from closedloop.data.synthetic import TOWNS, generate_dataset


def _rate(town: str, count: int, workers: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        generate_dataset(tmp, count, seed=123, shards=2, town=town, workers=workers, progress=False)
        return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", type=int, default=24)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    results = {"cores": cores, "scenarios": args.scenarios, "towns": {}}
    print(f"{'town':<10}{'1 worker':>12}{f'{cores} workers':>14}{'ratio':>8}   (scenarios/s)")
    for town in TOWNS:
        one = _rate(town, args.scenarios, 1)
        many = _rate(town, args.scenarios, cores)
        results["towns"][town] = {"one_worker": round(one, 2), "all_cores": round(many, 2)}
        print(f"{town:<10}{one:>12.2f}{many:>14.2f}{many / one:>8.2f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
