"""CAT-K against continued behaviour cloning, from the same BC checkpoints, same budget.

  python scripts/exp_catk.py [--work out/exp_bc] [--seeds 0 1 2] [--minutes 4]

Runs after ``scripts/exp_bc.py`` (same ``--work``): for each seed's BC micro checkpoint
``runs/bc_micro_seed{S}``,

- ``closedloop train bc --init ...`` (continued BC: fresh optimizer and schedule), and
- ``closedloop train catk --init ... --k 32``

each for at most ``--minutes`` minutes of training (``--steps`` sized from the measured step
costs so both schedules end inside the budget; the budget stops either one early on a
slower machine), the same learning rate, batch and seed; then ``closedloop evaluate`` with
32 rollouts on the 16 held-out scenarios. Writes ``catk_results.json`` and
``catk_results.md`` (mean and spread over the seeds; per-seed differences CAT-K minus
continued BC). Every step is skipped when its output exists.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from experiment_tools import COLUMNS, closedloop, evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("out/exp_bc"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--minutes", type=float, default=4.0)
    parser.add_argument("--bc-steps", type=int, default=480, help="continued BC steps (about 0.47 s each here)")
    parser.add_argument("--catk-steps", type=int, default=270, help="CAT-K steps (about 0.85 s each here)")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rollouts", type=int, default=32)
    args = parser.parse_args()
    work = args.work
    train, heldout = work / "data" / "train", work / "data" / "heldout"
    common = [
        "--data",
        train,
        "--batch-size",
        args.batch_size,
        "--lr",
        args.lr,
        "--warmup-steps",
        20,
        "--time-budget",
        args.minutes,
        "--quiet",
    ]
    results: dict[str, list[dict]] = {"continued_bc": [], "catk": []}
    for seed in args.seeds:
        init = work / "runs" / f"bc_micro_seed{seed}"
        if not (init / "latest.json").exists():
            raise SystemExit(f"{init}: no BC checkpoint; run scripts/exp_bc.py --work {work} first")
        runs = {
            "continued_bc": (["train", "bc", "--steps", args.bc_steps], work / "runs" / f"continued_bc_seed{seed}"),
            "catk": (["train", "catk", "--k", args.k, "--steps", args.catk_steps], work / "runs" / f"catk_seed{seed}"),
        }
        for name, (command, run_dir) in runs.items():
            if not (run_dir / "summary.json").exists():
                closedloop(*command, "--init", init, "--out", run_dir, "--seed", seed, *common)
            row = evaluate(f"ckpt:{run_dir}", heldout, work / f"eval_{name}_seed{seed}.json", args.rollouts)
            row["steps"] = json.loads((run_dir / "summary.json").read_text())["step"]
            results[name].append(row)

    summary, table = {}, ["| method | " + " | ".join(COLUMNS) + " | steps |", "|---" * (len(COLUMNS) + 2) + "|"]
    for name, rows in results.items():
        summary[name] = {}
        cells = []
        for column in COLUMNS:
            values = [row[column] for row in rows]
            summary[name][column] = {
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values),
                "values": values,
            }
            cells.append(f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}")
        table.append(f"| {name} | " + " | ".join(cells) + f" | {[row['steps'] for row in rows]} |")
    differences = {
        column: [c[column] - b[column] for c, b in zip(results["catk"], results["continued_bc"])] for column in COLUMNS
    }
    table.append("")
    table.append(
        "per-seed CAT-K minus continued BC: "
        + "; ".join(f"{column} {[round(d, 4) for d in values]}" for column, values in differences.items())
    )
    (work / "catk_results.json").write_text(
        json.dumps(
            {"settings": vars(args) | {"work": str(work)}, "results": summary, "differences": differences}, indent=2
        )
    )
    (work / "catk_results.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
