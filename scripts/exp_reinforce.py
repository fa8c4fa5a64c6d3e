"""REINFORCE with collision weight lambda in {0, 2, 10}, from one BC checkpoint, same budget.

  python scripts/exp_reinforce.py [--work out/exp_bc] [--seeds 0 1 2] [--lambdas 0 2 10] [--steps 60]

Runs after ``scripts/exp_bc.py`` (same ``--work``): from the BC micro checkpoint
``runs/bc_micro_seed0`` (one pre-trained policy, as in Peng et al.), for each seed and each
lambda,

- ``closedloop train reinforce --init ... --collision-weight LAMBDA --steps 60 --batch-size 8
  --lr 1e-4 --seed S`` (the same number of sampled episodes for every arm: 480 scenarios,
  about one epoch of the 500 training scenarios);

then ``closedloop evaluate`` with 32 rollouts on the 16 held-out scenarios (other
generation seed). The BC checkpoint itself is evaluated once as the starting point.
Writes ``reinforce_results.json`` and ``reinforce_results.md`` (mean and spread over the
seeds; per-seed differences against lambda = 0). Every step is skipped when its output
exists, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from experiment_tools import closedloop, evaluate, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("out/exp_bc"))
    parser.add_argument("--init-seed", type=int, default=0, help="the BC checkpoint runs/bc_micro_seed{N}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 2.0, 10.0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rollouts", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training run (default 1)")
    args = parser.parse_args()
    work = args.work
    train, heldout = work / "data" / "train", work / "data" / "heldout"
    init = work / "runs" / f"bc_micro_seed{args.init_seed}"
    if not (init / "latest.json").exists():
        raise SystemExit(f"{init}: no BC checkpoint; run scripts/exp_bc.py --work {work} first")
    common = ["--init", init, "--data", train, "--steps", args.steps, "--batch-size", args.batch_size]
    common += ["--lr", args.lr, "--warmup-steps", max(args.steps // 10, 1), "--threads", args.threads, "--quiet"]
    bc = evaluate(f"ckpt:{init}", heldout, work / f"eval_bc_micro_seed{args.init_seed}.json", args.rollouts)
    results: dict[str, list[dict]] = {"bc": [], **{f"lambda_{value:g}": [] for value in args.lambdas}}
    for seed in args.seeds:
        results["bc"].append(bc | {"steps": 0})
        for value in args.lambdas:
            name = f"lambda_{value:g}"
            run_dir = work / "runs" / f"reinforce_{name}_seed{seed}"
            if not (run_dir / "summary.json").exists():
                closedloop("train", "reinforce", *common, "--collision-weight", value, "--out", run_dir, "--seed", seed)
            row = evaluate(f"ckpt:{run_dir}", heldout, work / f"eval_reinforce_{name}_seed{seed}.json", args.rollouts)
            row["steps"] = json.loads((run_dir / "summary.json").read_text())["step"]
            results[name].append(row)
    reference = f"lambda_{args.lambdas[0]:g}"
    report(work, "reinforce_results", args, results, reference, f"lambda = {args.lambdas[0]:g}")


if __name__ == "__main__":
    main()
