"""Draw scenarios' maps and logged trajectories to PNG files.

python scripts/plot_scenario.py DATA... --out DIR [--limit 4] [--step 10]
"""

from __future__ import annotations

import argparse
from itertools import islice
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from closedloop.data import read_scenarios  # noqa: E402
from closedloop.paths import scenario_path  # noqa: E402
from closedloop.viz import plot_scenario  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="+")
    parser.add_argument("--out", required=True)
    parser.add_argument("--limit", type=int, default=4)
    parser.add_argument("--step", type=int, default=None)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for scenario in islice(read_scenarios(args.data), args.limit):
        fig, ax = plt.subplots(figsize=(9, 9))
        plot_scenario(scenario, ax, step=args.step)
        path = scenario_path(out, scenario.scenario_id, ".png")
        fig.savefig(path, dpi=90, bbox_inches="tight")
        plt.close(fig)
        print(path)


if __name__ == "__main__":
    main()
