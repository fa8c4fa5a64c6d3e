"""The simulator: batched core, dynamics, events and rollouts."""

from closedloop.envs.core import SimState, SimulationError, collisions, distance_to_log, reset, step
from closedloop.envs.dynamics import DYNAMICS, make_dynamics

__all__ = ["DYNAMICS", "SimState", "SimulationError", "collisions", "distance_to_log", "make_dynamics",
           "reset", "step"]
