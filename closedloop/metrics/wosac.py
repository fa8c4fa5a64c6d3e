"""WOSAC realism metrics: per-scenario scores, dataset aggregation and buckets.

``score_scenario(scenario, object_ids, trajectories)`` returns the reference's
``SimAgentMetrics`` fields (see ``closedloop.metrics.config.FIELDS``) for rollouts
``[R, A, 80, 4]`` (x, y, z, heading for steps 11..90) of the objects valid at step 10.
All rollouts, objects and steps are scored at once with tensors on ``device``;
``score_scenarios`` scores many scenarios and ``aggregate`` averages them.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import torch

from closedloop.data.scenario import TYPE_VEHICLE, Scenario
from closedloop.metrics import features as F
from closedloop.metrics.config import FEATURES, FIELDS, WosacConfig, get_config
from closedloop.metrics.estimators import bernoulli_log_likelihood, histogram_log_likelihood
from closedloop.metrics.scene import SIM_STEPS, WosacScene


class RolloutError(ValueError):
    """Rollouts that do not fit their scenario (objects, shapes, values)."""


def check_rollouts(scenario: Scenario, object_ids: np.ndarray, trajectories: np.ndarray,
                   source: str = "rollouts") -> np.ndarray:
    """Validate rollouts against the scenario; return them reordered to track order.

    Raises :class:`RolloutError` naming the scenario and the objects at fault.
    """
    sid = scenario.scenario_id
    trajectories = np.asarray(trajectories)
    object_ids = np.asarray(object_ids).astype(np.int64).reshape(-1)
    if trajectories.ndim != 4 or trajectories.shape[2:] != (SIM_STEPS, 4):
        raise RolloutError(f"{source}: scenario {sid}: trajectories must have shape "
                           f"[rollouts, objects, {SIM_STEPS}, 4], got {list(trajectories.shape)}")
    if trajectories.shape[1] != len(object_ids):
        raise RolloutError(f"{source}: scenario {sid}: {len(object_ids)} object_ids but "
                           f"trajectories hold {trajectories.shape[1]} objects")
    if trajectories.shape[0] < 1:
        raise RolloutError(f"{source}: scenario {sid}: no rollouts")
    bad = ~np.isfinite(trajectories).all(axis=(0, 2, 3))
    if bad.any():
        raise RolloutError(f"{source}: scenario {sid}: non-finite values (NaN/inf) in the "
                           f"trajectories of objects {object_ids[bad].tolist()[:10]}")
    expected = scenario.track_id[scenario.valid_at_current()]
    if len(np.unique(object_ids)) != len(object_ids):
        raise RolloutError(f"{source}: scenario {sid}: repeated object ids")
    missing = np.setdiff1d(expected, object_ids)
    extra = np.setdiff1d(object_ids, expected)
    if len(missing) or len(extra):
        raise RolloutError(
            f"{source}: scenario {sid}: rollouts must cover exactly the {len(expected)} objects "
            f"valid at step {scenario.current_time_index}; missing {missing.tolist()[:10]}, "
            f"extra {extra.tolist()[:10]}")
    order = np.argsort(object_ids)[np.searchsorted(np.sort(object_ids), expected)]
    return trajectories[:, order].astype(np.float32)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over valid entries; 0/0 gives NaN, as in the reference."""
    return torch.where(mask, values, torch.zeros_like(values)).sum() / mask.sum().to(values.dtype)


class _Features(dict):
    pass


def _features(scene: WosacScene, xyzh: torch.Tensor, valid: torch.Tensor) -> _Features:
    """All features of trajectories ``[R, A, 91, 4]`` with validity ``[R or 1, A, 91]``,
    for the evaluated objects over the simulated steps: ``[R, E, 80]`` each."""
    cur = scene.current_time_index
    ev = scene.eval_index
    future = slice(cur + 1, None)
    speed, accel, ang_speed, ang_accel = F.kinematics(xyzh[:, ev])
    out = _Features(
        linear_speed=speed[..., future], linear_acceleration=accel[..., future],
        angular_speed=ang_speed[..., future], angular_acceleration=ang_accel[..., future],
    )
    dims = scene.dims
    out["distance_to_nearest_object"] = F.distance_to_nearest_object(
        xyzh[:, :, future], dims[:, future], valid[:, :, future], ev)
    out["time_to_collision"] = F.time_to_collision(xyzh, dims, valid, ev)[..., future]
    out["distance_to_road_edge"] = F.distance_to_road_edge(
        xyzh[:, :, future], dims[:, future], valid[:, :, future], ev, scene.road_edges)
    out["traffic_light_violation"] = F.red_light_violation(xyzh, valid, ev, scene)[..., future]
    out["ade"] = F.displacement(xyzh[:, ev], scene.log_xyzh[ev], scene.log_valid[ev])
    return out


def score_scene(scene: WosacScene, trajectories: torch.Tensor,
                config: str | WosacConfig = "2025") -> dict[str, float]:
    """Score rollouts ``[R, A, 80, 4]`` (objects in the scene's track order)."""
    config = get_config(config)
    device = scene.log_xyzh.device
    trajectories = torch.as_tensor(trajectories, dtype=torch.float32, device=device)
    cur = scene.current_time_index
    ev = scene.eval_index
    sim_xyzh, sim_valid = scene.simulated(trajectories)
    sim = _features(scene, sim_xyzh, sim_valid[None])
    log = _features(scene, scene.log_xyzh[None], scene.log_valid[None])
    valid = scene.log_valid[ev, cur + 1:]  # [E, 80]
    speed_valid = F.central_and(valid)
    accel_valid = F.central_and(speed_valid)
    is_vehicle = (scene.object_type[ev] == TYPE_VEHICLE)[:, None]
    masks = {
        "linear_speed": speed_valid, "angular_speed": speed_valid,
        "linear_acceleration": accel_valid, "angular_acceleration": accel_valid,
        "distance_to_nearest_object": valid, "time_to_collision": valid & is_vehicle,
        "distance_to_road_edge": valid,
    }
    result: dict[str, float] = {}
    for name, mask in masks.items():
        estimator = config.estimators[name]
        R, E, T = sim[name].shape
        sim_values = sim[name].permute(1, 0, 2).reshape(E, R * T)
        ll = histogram_log_likelihood(log[name][0], sim_values, estimator)
        result[f"{name}_likelihood"] = float(torch.exp(_masked_mean(ll, mask)))

    def indication(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return (values & mask).any(-1)

    sim_collision = indication(sim["distance_to_nearest_object"] < 0, valid)  # [R, E]
    sim_offroad = indication(sim["distance_to_road_edge"] > 0, valid)
    tl_valid = valid & is_vehicle
    pairs = (
        ("collision_indication", sim_collision,
         indication(log["distance_to_nearest_object"] < 0, valid)[0]),
        ("offroad_indication", sim_offroad, indication(log["distance_to_road_edge"] > 0, valid)[0]),
        ("traffic_light_violation", indication(sim["traffic_light_violation"], tl_valid),
         indication(log["traffic_light_violation"], tl_valid)[0]),
    )
    for name, sim_ind, log_ind in pairs:
        ll = bernoulli_log_likelihood(log_ind, sim_ind.T, config.estimators[name].pseudocount)
        result[f"{name}_likelihood"] = float(torch.exp(ll.mean()))

    result["metametric"] = sum(config.weights[n] * result[f"{n}_likelihood"] for n in FEATURES)
    ade = sim["ade"]  # [R, E]
    result["average_displacement_error"] = float(ade.mean())
    result["min_average_displacement_error"] = float(ade.mean(1).min())
    result["simulated_collision_rate"] = float(sim_collision.float().mean())
    result["simulated_offroad_rate"] = float(sim_offroad.float().mean())
    result["simulated_traffic_light_violation_rate"] = float(
        indication(sim["traffic_light_violation"], valid).float().mean())
    return {"scenario_id": scene.scenario_id, **{k: result[k] for k in FIELDS}}


def score_scenario(scenario: Scenario, object_ids: Sequence[int], trajectories: np.ndarray,
                   config: str | WosacConfig = "2025", device: str | torch.device = "cpu") -> dict:
    """Score one scenario's rollouts; see the module docstring."""
    ordered = check_rollouts(scenario, np.asarray(object_ids), trajectories)
    scene = WosacScene.from_scenario(scenario).to(device)
    return score_scene(scene, torch.from_numpy(ordered), config)


def score_scenarios(items: Iterable[tuple[Scenario, Sequence[int], np.ndarray]],
                    config: str | WosacConfig = "2025",
                    device: str | torch.device = "cpu") -> list[dict]:
    """Score many ``(scenario, object_ids, trajectories)``; one dict per scenario."""
    return [score_scenario(s, ids, traj, config, device) for s, ids, traj in items]


def aggregate(scores: Sequence[dict]) -> dict:
    """Dataset-level metrics: the mean of every field over scenarios (``"ALL"``)."""
    if not scores:
        raise ValueError("no scenario scores to aggregate")
    return {"scenario_id": "ALL", **{k: float(np.mean([s[k] for s in scores])) for k in FIELDS}}


def buckets(metrics: dict, config: str | WosacConfig = "2025") -> dict[str, float]:
    """The leaderboard buckets (kinematic, interactive, map-based) of a metrics dict."""
    out = get_config(config).bucket_scores(metrics)
    out["realism_meta_metric"] = metrics["metametric"]
    return out


def is_finite_score(value: float) -> bool:
    return not math.isnan(value)
