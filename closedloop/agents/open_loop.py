"""Open-loop rollout baselines in the ``closedloop rollout`` format, straight from the log.

They need no simulator: each returns ``(object_ids [A], trajectories [R, A, 80, 4])`` for the
objects valid at the current step (track order), x, y, z, heading for steps 11..90. They
are the reference points of the WOSAC metrics (log replay scores the log against itself)
and the rollout sets the metric tests cross-check against the reference implementation.
"""

from __future__ import annotations

import numpy as np

from closedloop.constants import DT, SIM_STEPS
from closedloop.data.scenario import Scenario


def _simulated(scenario: Scenario) -> np.ndarray:
    return np.flatnonzero(scenario.valid_at_current())


def _held_log(scenario: Scenario) -> np.ndarray:
    """Logged future ``[A, 80, 4]``; an invalid step repeats the last valid pose."""
    sim = _simulated(scenario)
    cur = scenario.current_time_index
    pose = np.concatenate([scenario.track_xyz[sim], scenario.track_heading[sim, :, None]], -1)
    valid = scenario.track_valid[sim]
    # Index of the last valid step at or before each step (the current step is valid).
    steps = np.where(valid, np.arange(valid.shape[1]), 0)
    last = np.maximum.accumulate(steps, axis=1)
    held = np.take_along_axis(pose, last[..., None], axis=1)
    return held[:, cur + 1 : cur + 1 + SIM_STEPS]


def log_replay(scenario: Scenario, num_rollouts: int = 32):
    """Every rollout is the logged future (held at the last valid pose where invalid)."""
    future = _held_log(scenario)
    return scenario.track_id[_simulated(scenario)], np.repeat(future[None], num_rollouts, 0).astype(np.float32)


def constant_velocity(scenario: Scenario, num_rollouts: int = 32):
    """Each object keeps its logged velocity and heading from the current step."""
    sim = _simulated(scenario)
    cur = scenario.current_time_index
    t = DT * np.arange(1, SIM_STEPS + 1)
    xyz = scenario.track_xyz[sim, cur]
    vel = scenario.track_velocity[sim, cur].astype(np.float64)
    x = xyz[:, None, 0] + vel[:, None, 0] * t
    y = xyz[:, None, 1] + vel[:, None, 1] * t
    z = np.broadcast_to(xyz[:, None, 2], x.shape)
    h = np.broadcast_to(scenario.track_heading[sim, cur][:, None], x.shape)
    future = np.stack([x, y, z, h], -1)
    return scenario.track_id[sim], np.repeat(future[None], num_rollouts, 0).astype(np.float32)


def noisy_log(
    scenario: Scenario,
    num_rollouts: int = 32,
    seed: int = 0,
    position_sigma: float = 0.05,
    heading_sigma: float = 0.005,
):
    """The held log plus a per-rollout random walk in position and heading (seeded)."""
    rng = np.random.default_rng(seed)
    future = _held_log(scenario)
    shape = (num_rollouts, *future.shape[:2])
    drift_xy = np.cumsum(rng.normal(0, position_sigma, (*shape, 2)), axis=2)
    drift_h = np.cumsum(rng.normal(0, heading_sigma, shape), axis=2)
    out = np.repeat(future[None], num_rollouts, 0).copy()
    out[..., :2] += drift_xy
    out[..., 3] += drift_h
    return scenario.track_id[_simulated(scenario)], out.astype(np.float32)


def random_motion(scenario: Scenario, num_rollouts: int = 32, seed: int = 0):
    """Constant speed and yaw rate drawn per rollout and object around the current state:
    a crude random policy whose rollouts spread, collide and leave the road."""
    rng = np.random.default_rng(seed)
    sim = _simulated(scenario)
    cur = scenario.current_time_index
    speed0 = np.linalg.norm(scenario.track_velocity[sim, cur], axis=-1)
    shape = (num_rollouts, len(sim))
    speed = speed0 * rng.uniform(0.5, 1.5, shape) + rng.uniform(0, 1, shape)
    yaw_rate = rng.normal(0, 0.15, shape)
    t = DT * np.arange(1, SIM_STEPS + 1)
    heading = scenario.track_heading[sim, cur][None, :, None] + yaw_rate[..., None] * t
    step = speed[..., None] * DT
    x = scenario.track_xyz[sim, cur, 0][None, :, None] + np.cumsum(step * np.cos(heading), -1)
    y = scenario.track_xyz[sim, cur, 1][None, :, None] + np.cumsum(step * np.sin(heading), -1)
    z = np.broadcast_to(scenario.track_xyz[sim, cur, 2][None, :, None], x.shape)
    future = np.stack([x, y, z, heading], -1)
    return scenario.track_id[sim], future.astype(np.float32)


BASELINES = {
    "log_replay": log_replay,
    "constant_velocity": constant_velocity,
    "noisy_log": noisy_log,
    "random_motion": random_motion,
}
