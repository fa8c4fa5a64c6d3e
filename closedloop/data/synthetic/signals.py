"""Fixed-time signal plans: which traffic-light state each connector shows at time t.

Every signalised intersection runs the same five-phase plan with its own offset: protected
left arrows and through/right movements per axis, each followed by yellow and all-red, then
an all-way pedestrian walk phase in which no vehicle movement has green. Movements that
share a phase never conflict, so compliant traffic cannot collide inside an intersection.
"""

from __future__ import annotations

import numpy as np

from closedloop.data.scenario import (
    LIGHT_ARROW_CAUTION,
    LIGHT_ARROW_GO,
    LIGHT_ARROW_STOP,
    LIGHT_CAUTION,
    LIGHT_GO,
    LIGHT_STOP,
)
from closedloop.data.synthetic.roads import ALL_RED, SIGNAL_PHASES, YELLOW, signal_cycle

GREEN, AMBER, RED = 0, 1, 2


def _timeline() -> list[tuple[str, float, float, float]]:
    """(phase, green start, yellow start, all-red start) within one cycle."""
    rows, t = [], 0.0
    for name, green in SIGNAL_PHASES:
        yellow = 0.0 if name == "walk" else YELLOW
        rows.append((name, t, t + green, t + green + yellow))
        t += green + yellow + ALL_RED
    return rows


TIMELINE = _timeline()
CYCLE = signal_cycle()


def phase_of(direction: int, maneuver: str) -> str:
    """The phase serving a connector entered travelling ``direction`` (0 E, 1 N, 2 W, 3 S)."""
    axis = "ew" if direction % 2 == 0 else "ns"
    return f"{axis}_left" if maneuver == "left" else f"{axis}_through"


def aspect(phase: str, t: np.ndarray | float) -> np.ndarray:
    """GREEN / AMBER / RED of ``phase`` at cycle-relative times ``t`` (seconds, any shape)."""
    t = np.mod(np.asarray(t, dtype=float), CYCLE)
    name, green, yellow, red = next(row for row in TIMELINE if row[0] == phase)
    out = np.full(t.shape, RED)
    out[(t >= green) & (t < yellow)] = GREEN
    out[(t >= yellow) & (t < red)] = AMBER
    return out


def light_state(phase: str, arrow: bool, t: np.ndarray | float) -> np.ndarray:
    """WOMD lane states (TrafficSignalLaneState.State) of a connector at times ``t``."""
    table = (
        np.array([LIGHT_ARROW_GO, LIGHT_ARROW_CAUTION, LIGHT_ARROW_STOP])
        if arrow
        else np.array([LIGHT_GO, LIGHT_CAUTION, LIGHT_STOP])
    )
    return table[aspect(phase, t)]


def walk_elapsed(t: float) -> float | None:
    """Seconds since the walk phase began, or None outside it."""
    t = float(np.mod(t, CYCLE))
    _, start, end, _ = next(row for row in TIMELINE if row[0] == "walk")
    return t - start if start <= t < end else None


def walk_remaining(t: float) -> float:
    t = float(np.mod(t, CYCLE))
    _, start, end, _ = next(row for row in TIMELINE if row[0] == "walk")
    return end - t if start <= t < end else 0.0
