"""PPO for the SDC against its initialisation and the constant-velocity ego, over seeds.

  OMP_NUM_THREADS=1 python scripts/exp_ppo.py [--train DIR --heldout DIR] [--seeds 0 1 2]
      [--timesteps 60000] [--work out/exp_ppo] [--results results/ppo] [PPO FLAGS...]

Without ``--train``/``--heldout`` it generates ``WORK/data/train`` (500 grid scenarios,
seed 1, 4 shards) and ``WORK/data/heldout`` (16, seed 1001): the BC experiment's
scenarios (``scripts/exp_bc.py``; generation is byte-identical for a seed), so its data
directories may be passed instead. Trains ``closedloop train ppo`` once per seed on
``--train`` (the others follow the log)
and reads each run's ``eval.json`` (held-out scenarios, one deterministic episode each, in
the training env): mean episode return and SDC collision / off-road / red-light rates of
the trained policy (``ppo``), the same seed's untrained policy (``init``, saved before the
first update) and the constant-velocity ego (zero acceleration and curvature; the same
for every seed). Writes ``RESULTS/ppo.json`` and ``RESULTS/ppo.md``: mean and spread over
seeds, and per seed ``ppo`` minus ``init`` and minus ``constant_velocity``. Runs already
in ``--work`` with an ``eval.json`` are kept. Unknown flags go to ``train ppo``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from experiment_tools import closedloop, report

COLUMNS = ("mean_return", "collision_rate", "offroad_rate", "red_light_rate")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=Path, help="training scenarios (default: generate WORK/data/train)")
    parser.add_argument("--heldout", type=Path, help="held-out scenarios (default: generate WORK/data/heldout)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--timesteps", type=int, default=60_000)
    parser.add_argument("--work", type=Path, default=Path("out/exp_ppo"))
    parser.add_argument("--results", type=Path, default=Path("results/ppo"))
    args, extra = parser.parse_known_args()
    args.train_flags = extra
    if args.train is None:
        args.train = args.work / "data" / "train"
        if not args.train.exists():
            closedloop("generate", "--out", args.train, "--num-scenarios", 500, "--seed", 1, "--shards", 4, "--quiet")
    if args.heldout is None:
        args.heldout = args.work / "data" / "heldout"
        if not args.heldout.exists():
            closedloop("generate", "--out", args.heldout, "--num-scenarios", 16, "--seed", 1001, "--quiet")
    results: dict[str, list[dict]] = {"ppo": [], "init": [], "constant_velocity": []}
    for seed in args.seeds:
        run = args.work / f"seed{seed}"
        if not (run / "eval.json").is_file():
            closedloop(
                "train", "ppo", "--data", args.train, "--eval-data", args.heldout, "--out", run,
                "--timesteps", args.timesteps, "--seed", seed, "--quiet", *extra,
            )  # fmt: skip
        evaluation = json.loads((run / "eval.json").read_text())
        for name in results:
            results[name].append({**evaluation[name], "steps": args.timesteps})
    args.results.mkdir(parents=True, exist_ok=True)
    report(args.results, "ppo", args, results, "init", "its initialisation (init)", COLUMNS)
    cv = {"ppo": results["ppo"], "constant_velocity": results["constant_velocity"]}
    report(args.work, "ppo_vs_cv", args, cv, "constant_velocity", "the constant-velocity ego", COLUMNS)
    extra_md = (args.work / "ppo_vs_cv.md").read_text().split("\n\n", 1)[-1]
    with (args.results / "ppo.md").open("a") as handle:
        handle.write("\n" + extra_md)


if __name__ == "__main__":
    main()
