"""The behaviour-cloning experiment of the README: BC micro against the baselines.

  python scripts/exp_bc.py [--work out/exp_bc] [--seeds 0 1 2] [--minutes 10]

1. Synthetic data: 500 training scenarios (grid town, generation seed 1) and 16 held-out
   scenarios from another seed (1001), written once under ``--work``.
2. ``closedloop train bc --model micro`` for each training seed, at most ``--minutes``
   minutes each (``--steps`` is the schedule's length; the budget stops it early if the
   machine is slow), a checkpoint at the end.
3. ``closedloop evaluate`` with 32 rollouts on the 16 held-out scenarios for every trained
   checkpoint and for ``log``, ``constant_velocity`` and ``idm``.
4. ``results.json`` and ``results.md``: per policy the WOSAC meta-metric, minADE and event
   rates (mean and spread over the training seeds for BC).

Every step is skipped when its output exists, so a stopped run resumes where it was.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from experiment_tools import COLUMNS, closedloop, evaluate

BASELINES = ("log", "constant_velocity", "idm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("out/exp_bc"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--steps", type=int, default=1100)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--train-scenarios", type=int, default=500)
    parser.add_argument("--rollouts", type=int, default=32)
    args = parser.parse_args()
    work = args.work
    train, heldout = work / "data" / "train", work / "data" / "heldout"
    if not train.exists():
        closedloop(
            "generate", "--out", train, "--num-scenarios", args.train_scenarios, "--seed", 1, "--shards", 4, "--quiet"
        )
    if not heldout.exists():
        closedloop("generate", "--out", heldout, "--num-scenarios", 16, "--seed", 1001, "--quiet")

    results: dict[str, list[dict]] = {}
    for seed in args.seeds:
        run_dir = work / "runs" / f"bc_micro_seed{seed}"
        if not (run_dir / "summary.json").exists():
            closedloop(
                "train",
                "bc",
                "--data",
                train,
                "--model",
                "micro",
                "--out",
                run_dir,
                "--steps",
                args.steps,
                "--batch-size",
                args.batch_size,
                "--lr",
                args.lr,
                "--seed",
                seed,
                "--time-budget",
                args.minutes,
                "--quiet",
            )
        row = evaluate(f"ckpt:{run_dir}", heldout, work / f"eval_bc_micro_seed{seed}.json", args.rollouts)
        row["steps"] = json.loads((run_dir / "summary.json").read_text())["step"]
        results.setdefault("bc_micro", []).append(row)
    for name in BASELINES:
        results[name] = [evaluate(name, heldout, work / f"eval_{name}.json", args.rollouts)]

    table = ["| policy | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    summary = {}
    for name, rows in results.items():
        cells, summary[name] = [], {}
        for column in COLUMNS:
            values = [row[column] for row in rows]
            mean = statistics.fmean(values)
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            summary[name][column] = {"mean": mean, "std": spread, "values": values}
            cells.append(f"{mean:.4f} ± {spread:.4f}" if len(values) > 1 else f"{mean:.4f}")
        table.append(f"| {name} | " + " | ".join(cells) + " |")
    (work / "results.json").write_text(
        json.dumps({"settings": vars(args) | {"work": str(work)}, "results": summary}, indent=2)
    )
    (work / "results.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
