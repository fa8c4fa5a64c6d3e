"""The simulator's error type, in a module of its own so that dynamics, core and faces share it."""

from __future__ import annotations


class SimulationError(ValueError):
    """Invalid use of the simulator: bad actions (naming the scenario and track), stepping
    past the end or before a reset, invalid controlled masks."""
