"""RoaD against CAT-K and continued behaviour cloning, from the same BC checkpoints, same budget.

  python scripts/exp_road.py [--work out/exp_bc] [--seeds 0 1 2] [--minutes 4] [--one-off]

Runs after ``scripts/exp_bc.py`` and ``scripts/exp_catk.py`` (same ``--work``): for each
seed's BC micro checkpoint ``runs/bc_micro_seed{S}``,

- ``closedloop train road --init ... --k 64 --temperature 0.8 --refresh-every 1``
  (RoaD refreshed: the demonstrations are collected again with the current policy every
  epoch of the 500 training scenarios; ``--one-off`` adds the collect-once variant),

for at most ``--minutes`` minutes of training, the learning rate, batch and seed of the
CAT-K and continued-BC runs (``--steps`` sized so that the schedule ends inside the budget:
two collections of about 58 s and 250 steps of about 0.47 s here); then ``closedloop
evaluate`` with 32 rollouts on the 16 held-out scenarios. The CAT-K and continued-BC
evaluations of ``exp_catk.py`` are read, not redone. Writes ``road_results.json`` and
``road_results.md`` (mean and spread over the seeds; per-seed RoaD minus CAT-K). Every step
is skipped when its output exists.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from experiment_tools import closedloop, evaluate, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("out/exp_bc"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--minutes", type=float, default=4.0)
    parser.add_argument("--road-steps", type=int, default=250, help="RoaD refreshed steps (2 collections fit)")
    parser.add_argument("--one-off", action="store_true", help="also run RoaD with one collection")
    parser.add_argument("--one-off-steps", type=int, default=380, help="RoaD one-off steps (1 collection fits)")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rollouts", type=int, default=32)
    args = parser.parse_args()
    work = args.work
    train, heldout = work / "data" / "train", work / "data" / "heldout"
    common = ["--data", train, "--batch-size", args.batch_size, "--lr", args.lr, "--warmup-steps", 20]
    common += ["--time-budget", args.minutes, "--k", args.k, "--temperature", args.temperature, "--quiet"]
    arms = {"road_refreshed": ["--refresh-every", 1, "--steps", args.road_steps]}
    if args.one_off:
        arms["road_one_off"] = ["--one-off", "--steps", args.one_off_steps]
    results: dict[str, list[dict]] = {"continued_bc": [], "catk": [], **{name: [] for name in arms}}
    for seed in args.seeds:
        init = work / "runs" / f"bc_micro_seed{seed}"
        if not (init / "latest.json").exists():
            raise SystemExit(f"{init}: no BC checkpoint; run scripts/exp_bc.py --work {work} first")
        for name in ("continued_bc", "catk"):
            run_dir, kept = work / "runs" / f"{name}_seed{seed}", work / f"eval_{name}_seed{seed}.json"
            if not kept.exists():
                raise SystemExit(f"{kept}: missing; run scripts/exp_catk.py --work {work} first")
            row = evaluate(f"ckpt:{run_dir}", heldout, kept, args.rollouts)
            row["steps"] = json.loads((run_dir / "summary.json").read_text())["step"]
            results[name].append(row)
        for name, flags in arms.items():
            run_dir = work / "runs" / f"{name}_seed{seed}"
            if not (run_dir / "summary.json").exists():
                closedloop("train", "road", *flags, "--init", init, "--out", run_dir, "--seed", seed, *common)
            row = evaluate(f"ckpt:{run_dir}", heldout, work / f"eval_{name}_seed{seed}.json", args.rollouts)
            row["steps"] = json.loads((run_dir / "summary.json").read_text())["step"]
            results[name].append(row)

    report(work, "road_results", args, results, "catk", "CAT-K")


if __name__ == "__main__":
    main()
