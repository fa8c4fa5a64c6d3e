"""The ``closedloop`` command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from closedloop import __version__

EXIT_BAD_INPUT = 2


def _cmd_inspect(args: argparse.Namespace) -> int:
    from closedloop.data.womd import read_scenarios
    from closedloop.inspect import summarize, summary_line

    for scenario in read_scenarios(args.paths):
        summary = summarize(scenario)
        print(json.dumps(summary) if args.json else summary_line(summary), flush=True)
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from closedloop.data.cache import prepare_cache

    start = time.perf_counter()
    result = prepare_cache(args.data, args.out, workers=args.workers, on_error=args.on_error,
                           progress=not args.quiet)
    seconds = time.perf_counter() - start
    print(
        f"cache {args.out}: {result['scenarios']} scenarios from "
        f"{result['converted'] + result['reused']} shards ({result['converted']} converted now, "
        f"{result['reused']} already done, {result['skipped']} bad records skipped) "
        f"in {seconds:.1f} s"
    )
    return 0


def _parse_agents(text: str) -> tuple[int, int]:
    try:
        low, high = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX, e.g. 30:60, not {text!r}") from None
    if not 1 <= low <= high:
        raise argparse.ArgumentTypeError(f"need 1 <= MIN <= MAX, got {text!r}")
    return low, high


def _cmd_generate(args: argparse.Namespace) -> int:
    from closedloop.data.synthetic import generate_dataset

    start = time.perf_counter()
    paths = generate_dataset(args.out, args.num_scenarios, seed=args.seed, shards=args.shards,
                             town=args.town, agents=args.agents, workers=args.workers,
                             progress=not args.quiet)
    seconds = time.perf_counter() - start
    print(f"wrote {args.num_scenarios} {args.town} scenarios in {len(paths)} shards to {args.out} "
          f"in {seconds:.1f} s ({args.num_scenarios / seconds:.1f} scenarios/s)")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from closedloop.demo import run_demo

    run_demo(data=args.data, out=Path(args.out), seed=args.seed,
             num_scenarios=args.num_scenarios)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="closedloop",
        description="Closed-loop training and evaluation of traffic agents on WOMD scenarios.",
    )
    parser.add_argument("--version", action="version", version=f"closedloop {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="summarise the scenarios in WOMD TFRecord files")
    p.add_argument("paths", nargs="+", help="TFRecord files, directories or glob patterns")
    p.add_argument("--json", action="store_true", help="one JSON object per scenario")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("prepare", help="convert TFRecord shards into a fast, pickle-free cache")
    p.add_argument("--data", required=True, nargs="+", help="TFRecord files, dirs or globs")
    p.add_argument("--out", required=True, help="cache directory (resumable)")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes")
    p.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                   help="what to do with corrupt records (skip counts and reports them)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_prepare)

    from closedloop.data.synthetic import TOWNS

    p = sub.add_parser("generate", help="write synthetic WOMD-format scenarios (TFRecord shards)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num-scenarios", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--agents", type=_parse_agents, default=(30, 60), metavar="MIN:MAX",
                   help="range of the number of agents placed per scenario (default 30:60)")
    p.add_argument("--town", choices=TOWNS, default="grid")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("demo", help="run the pipeline end to end on the default data")
    p.add_argument("--data", nargs="+", help="WOMD TFRecords to use instead of synthetic data")
    p.add_argument("--out", default="closedloop_demo", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-scenarios", type=int, default=8,
                   help="synthetic scenarios to generate when --data is not given")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from closedloop.data.tfrecord import TFRecordError
    from closedloop.data.womd import ScenarioDecodeError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (TFRecordError, ScenarioDecodeError, FileNotFoundError, ValueError, KeyError) as err:
        print(f"closedloop {args.command}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
