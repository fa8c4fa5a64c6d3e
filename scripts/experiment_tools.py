"""What the experiment scripts (``exp_bc.py``, ``exp_catk.py``) share: running
``closedloop`` as a user would, and evaluations that are kept and not redone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

COLUMNS = ("metametric", "min_average_displacement_error", "collision_rate", "offroad_rate", "red_light_rate")


def closedloop(*args) -> str:
    """Run ``closedloop ARGS`` (printing the command); return its stdout."""
    command = [sys.executable, "-m", "closedloop.cli", *map(str, args)]
    print("$", " ".join(command[2:]), flush=True)
    return subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout


def evaluate(policy: str, data: Path, out: Path, rollouts: int) -> dict:
    """``closedloop evaluate --json``'s ALL object for ``policy``, kept in ``out`` (an
    existing file is read instead of evaluating again)."""
    if not out.exists():
        lines = closedloop(
            "evaluate", "--policy", policy, "--data", data, "--num-rollouts", rollouts, "--json", "--quiet"
        ).splitlines()
        out.write_text(lines[-1] + "\n")
    return json.loads(out.read_text())


def summarize(results: dict[str, list[dict]], columns=COLUMNS) -> tuple[dict, list[str]]:
    """Mean, sample standard deviation and values over seeds of each method's ``columns``,
    and a markdown table of them (with the optimizer steps each seed's run reached)."""
    import statistics

    summary = {}
    table = ["| method | " + " | ".join(columns) + " | steps |", "|---" * (len(columns) + 2) + "|"]
    for name, rows in results.items():
        if not rows:
            continue
        summary[name] = {}
        cells = []
        for column in columns:
            values = [row[column] for row in rows]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            summary[name][column] = {"mean": statistics.fmean(values), "std": spread, "values": values}
            cells.append(f"{statistics.fmean(values):.4f} ± {spread:.4f}")
        table.append(f"| {name} | " + " | ".join(cells) + f" | {[row.get('steps') for row in rows]} |")
    return summary, table


def report(work: Path, name: str, args, results: dict[str, list[dict]], reference: str, label: str, columns=COLUMNS):
    """Write ``WORK/NAME.json`` and ``WORK/NAME.md`` and print the table: each method's mean
    and spread over seeds (:func:`summarize`) and, per seed, every other method minus the
    ``reference`` method (described as ``label`` in the table)."""
    summary, table = summarize(results, columns)
    differences = {
        method: {column: [r[column] - b[column] for r, b in zip(rows, results[reference])] for column in columns}
        for method, rows in results.items()
        if method != reference and rows
    }
    for method, values in differences.items():
        table.append("")
        table.append(
            f"per-seed {method} minus {label}: "
            + "; ".join(f"{column} {[round(d, 4) for d in diffs]}" for column, diffs in values.items())
        )
    settings = vars(args) | {"work": str(work)}
    (work / f"{name}.json").write_text(
        json.dumps({"settings": settings, "results": summary, "differences": differences}, indent=2, default=str)
    )
    (work / f"{name}.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
