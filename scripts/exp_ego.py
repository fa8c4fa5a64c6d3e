"""The GMM ego policy: BC, then CAT-K on its modes, RoaD on its samples, or more BC.

  python scripts/exp_ego.py [--work out/exp_bc] [--seeds 0 1 2] [--minutes 1]

Uses the synthetic data of ``scripts/exp_bc.py`` (same ``--work``: 500 training scenarios
from generation seed 1, 16 held-out scenarios from seed 1001). For each seed:

1. ``closedloop train bc --model gmm-ego`` (``--bc-steps`` steps of 256 ego samples);
2. from that checkpoint, the same budget (``--minutes`` of training each, same learning
   rate and seed) for ``train bc --init`` (continued BC), ``train catk --init --k 16``
   (CAT-K on the mixture's 16 modes, a fresh rollout of 16 scenarios per step) and
   ``train road --init --k 64 --temperature 0.8 --refresh-every E`` (RoaD on samples);
3. ``closedloop evaluate`` with 32 rollouts on the held-out scenarios of every checkpoint:
   the SDC's own collision and off-road rates (``sdc_collision_rate``,
   ``sdc_offroad_rate``: the fraction of rollouts in which the SDC had the event; the
   other agents follow the log), the meta-metric and minADE.

Writes ``ego_results.json`` and ``ego_results.md`` (mean and spread over the seeds, per-seed
differences against the BC checkpoint). Every step is skipped when its output exists.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from experiment_tools import closedloop, evaluate, report

EGO_COLUMNS = ("sdc_collision_rate", "sdc_offroad_rate", "metametric", "min_average_displacement_error")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("out/exp_bc"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--bc-steps", type=int, default=2000, help="about 5 ms each here")
    parser.add_argument("--minutes", type=float, default=1.0, help="training budget of each fine-tuning run")
    parser.add_argument(
        "--steps",
        type=int,
        nargs=3,
        default=[12000, 600, 2400],
        metavar=("BC", "CATK", "ROAD"),
        help="schedule lengths that fill the budget here (BC 5 ms, CAT-K 0.1 s, RoaD 5 ms + 3 s a collection)",
    )
    parser.add_argument("--refresh-every", type=int, default=5, help="RoaD: epochs (31 steps of 256) per collection")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--rollouts", type=int, default=32)
    args = parser.parse_args()
    work = args.work
    train, heldout = work / "data" / "train", work / "data" / "heldout"
    if not train.exists():
        raise SystemExit(f"{train}: no data; run scripts/exp_bc.py --work {work} first")
    budget = ["--lr", args.lr, "--warmup-steps", 20, "--time-budget", args.minutes, "--quiet"]
    arms = {
        "continued_bc": ["bc", "--steps", args.steps[0]],
        "catk": ["catk", "--k", 16, "--steps", args.steps[1], "--batch-size", 16],
        "road": [
            "road",
            "--k",
            64,
            "--temperature",
            0.8,
            "--refresh-every",
            args.refresh_every,
            "--steps",
            args.steps[2],
        ],
    }
    results: dict[str, list[dict]] = {"bc": [], **{name: [] for name in arms}}
    for seed in args.seeds:
        bc = work / "runs" / f"ego_bc_seed{seed}"
        if not (bc / "summary.json").exists():
            closedloop("train", "bc", "--model", "gmm-ego", "--data", train, "--out", bc, "--steps", args.bc_steps,
                       "--seed", seed, "--quiet")  # fmt: skip
        runs = {"bc": bc}
        for name, command in arms.items():
            run_dir = work / "runs" / f"ego_{name}_seed{seed}"
            if not (run_dir / "summary.json").exists():
                closedloop("train", *command, "--init", bc, "--data", train, "--out", run_dir, "--seed", seed, *budget)
            runs[name] = run_dir
        for name, run_dir in runs.items():
            row = evaluate(f"ckpt:{run_dir}", heldout, work / f"eval_ego_{name}_seed{seed}.json", args.rollouts)
            row["steps"] = json.loads((run_dir / "summary.json").read_text())["step"]
            results[name].append(row)

    report(work, "ego_results", args, results, "bc", "its BC checkpoint", EGO_COLUMNS)


if __name__ == "__main__":
    main()
