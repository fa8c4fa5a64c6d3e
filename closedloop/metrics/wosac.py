"""WOSAC realism metrics: per-scenario scores, dataset aggregation and buckets.

``score_scenario(scenario, object_ids, trajectories)`` returns the reference's
``SimAgentMetrics`` fields (see ``closedloop.metrics.config.FIELDS``) for rollouts
``[R, A, 80, 4]`` (x, y, z, heading for steps 11..90) of the objects valid at step 10.
All rollouts, objects and steps are scored at once with tensors on ``device``;
``score_scenarios`` scores many scenarios and ``aggregate`` averages them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from closedloop.constants import SIM_STEPS
from closedloop.data.scenario import TYPE_VEHICLE, Scenario
from closedloop.metrics import features as F
from closedloop.metrics.config import FEATURES, FIELDS, WosacConfig, get_config
from closedloop.metrics.estimators import bernoulli_log_likelihood, histogram_log_likelihood
from closedloop.metrics.scene import WosacBatch, WosacScene


class RolloutError(ValueError):
    """Rollouts that do not fit their scenario (objects, shapes, values)."""


def check_rollouts(
    scenario: Scenario, object_ids: np.ndarray, trajectories: np.ndarray, source: str = "rollouts"
) -> np.ndarray:
    """Validate rollouts against the scenario; return them reordered to track order.

    Raises :class:`RolloutError` naming the scenario and the objects at fault.
    """
    sid = scenario.scenario_id
    trajectories = np.asarray(trajectories)
    object_ids = np.asarray(object_ids).astype(np.int64).reshape(-1)
    if trajectories.ndim != 4 or trajectories.shape[2:] != (SIM_STEPS, 4):
        raise RolloutError(
            f"{source}: scenario {sid}: trajectories must have shape "
            f"[rollouts, objects, {SIM_STEPS}, 4], got {list(trajectories.shape)}"
        )
    if trajectories.shape[1] != len(object_ids):
        raise RolloutError(
            f"{source}: scenario {sid}: {len(object_ids)} object_ids but "
            f"trajectories hold {trajectories.shape[1]} objects"
        )
    if trajectories.shape[0] < 1:
        raise RolloutError(f"{source}: scenario {sid}: no rollouts")
    bad = ~np.isfinite(trajectories).all(axis=(0, 2, 3))
    if bad.any():
        raise RolloutError(
            f"{source}: scenario {sid}: non-finite values (NaN/inf) in the "
            f"trajectories of objects {object_ids[bad].tolist()[:10]}"
        )
    expected = scenario.track_id[scenario.valid_at_current()]
    if len(np.unique(object_ids)) != len(object_ids):
        raise RolloutError(f"{source}: scenario {sid}: repeated object ids")
    missing = np.setdiff1d(expected, object_ids)
    extra = np.setdiff1d(object_ids, expected)
    if len(missing) or len(extra):
        raise RolloutError(
            f"{source}: scenario {sid}: rollouts must cover exactly the {len(expected)} objects "
            f"valid at step {scenario.current_time_index}; missing {missing.tolist()[:10]}, "
            f"extra {extra.tolist()[:10]}"
        )
    order = np.argsort(object_ids)[np.searchsorted(np.sort(object_ids), expected)]
    return trajectories[:, order].astype(np.float32)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over valid entries of the last two dims; 0/0 gives NaN, as in the reference."""
    total = torch.where(mask, values, torch.zeros_like(values)).sum((-2, -1))
    return total / mask.sum((-2, -1)).to(values.dtype)


def _features(batch: WosacBatch, xyzh: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """All features of trajectories ``[B, R, A, 91, 4]`` with validity ``[B, R or 1, A, 91]``
    for the evaluated objects over the simulated steps: ``[B, R, E, 80]`` each."""
    B, R, A, T, _ = xyzh.shape
    cur = batch.current_time_index
    future = slice(cur + 1, None)
    rows = xyzh.reshape(B * R, A, T, 4)
    row_valid = valid.expand(-1, R, -1, -1).reshape(B * R, A, T)
    row_dims = batch.dims[:, None].expand(-1, R, -1, -1, -1).reshape(B * R, A, T, 3)
    row_eval = batch.eval_index[:, None].expand(-1, R, -1).reshape(B * R, -1)
    E = row_eval.shape[1]

    def unrow(x):
        return x.reshape(B, R, E, -1)

    evaluated = F.take(rows, row_eval)  # [B * R, E, T, 4]
    speed, accel, ang_speed, ang_accel = (unrow(k) for k in F.kinematics(evaluated))
    out = {
        "linear_speed": speed[..., future],
        "linear_acceleration": accel[..., future],
        "angular_speed": ang_speed[..., future],
        "angular_acceleration": ang_accel[..., future],
        "distance_to_nearest_object": unrow(
            F.distance_to_nearest_object(rows[:, :, future], row_dims[:, :, future], row_valid[:, :, future], row_eval)
        ),
        "time_to_collision": unrow(F.time_to_collision(rows, row_dims, row_valid, row_eval))[..., future],
        "distance_to_road_edge": F.distance_to_road_edge(
            xyzh[:, :, :, future], batch.dims[:, :, future], valid[..., future], batch.eval_index, batch
        ),
        "traffic_light_violation": F.red_light_violation(xyzh, valid, batch.eval_index, batch)[..., future],
    }
    log_eval = F.take(batch.log_xyzh, batch.eval_index)[:, None]  # [B, 1, E, T, 4]
    log_eval_valid = F.take(batch.log_valid, batch.eval_index)[:, None]
    out["ade"] = F.displacement(evaluated.reshape(B, R, E, T, 4), log_eval, log_eval_valid)
    return out


def score_batch(
    batch: WosacBatch, trajectories: torch.Tensor, config: str | WosacConfig = "2025"
) -> list[dict[str, float]]:
    """Score rollouts ``[B, R, A, 80, 4]`` of B scenarios at once (objects in each
    scenario's track order, padded to A); one metrics dict per scenario."""
    config = get_config(config)
    device = batch.log_xyzh.device
    trajectories = torch.as_tensor(trajectories, dtype=torch.float32, device=device)
    cur = batch.current_time_index
    sim_xyzh, sim_valid = batch.simulated(trajectories)
    sim = _features(batch, sim_xyzh, sim_valid)
    log = _features(batch, batch.log_xyzh[:, None], batch.log_valid[:, None])
    eval_mask = batch.eval_mask[:, :, None]  # [B, E, 1]
    valid = F.take(batch.log_valid, batch.eval_index)[..., cur + 1 :] & eval_mask  # [B, E, 80]
    speed_valid = F.central_and(valid)
    accel_valid = F.central_and(speed_valid)
    is_vehicle = (F.take(batch.object_type, batch.eval_index) == TYPE_VEHICLE)[..., None]
    masks = {
        "linear_speed": speed_valid,
        "angular_speed": speed_valid,
        "linear_acceleration": accel_valid,
        "angular_acceleration": accel_valid,
        "distance_to_nearest_object": valid,
        "time_to_collision": valid & is_vehicle,
        "distance_to_road_edge": valid,
    }
    scores: dict[str, torch.Tensor] = {}
    for name, mask in masks.items():
        B, R, E, T = sim[name].shape
        sim_values = sim[name].permute(0, 2, 1, 3).reshape(B, E, R * T)
        ll = histogram_log_likelihood(log[name][:, 0], sim_values, config.estimators[name])
        scores[f"{name}_likelihood"] = torch.exp(_masked_mean(ll, mask))

    def indication(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return (values & mask[:, None]).any(-1)  # [B, R, E]

    sim_collision = indication(sim["distance_to_nearest_object"] < 0, valid)
    sim_offroad = indication(sim["distance_to_road_edge"] > 0, valid)
    tl_valid = valid & is_vehicle
    pairs = (
        ("collision_indication", sim_collision, indication(log["distance_to_nearest_object"] < 0, valid)),
        ("offroad_indication", sim_offroad, indication(log["distance_to_road_edge"] > 0, valid)),
        (
            "traffic_light_violation",
            indication(sim["traffic_light_violation"], tl_valid),
            indication(log["traffic_light_violation"], tl_valid),
        ),
    )
    objects = batch.eval_mask.sum(1).to(torch.float32)  # [B]
    for name, sim_ind, log_ind in pairs:
        ll = bernoulli_log_likelihood(
            log_ind[:, 0], sim_ind.transpose(1, 2), config.estimators[name].pseudocount
        )  # [B, E]
        mean = torch.where(batch.eval_mask, ll, torch.zeros_like(ll)).sum(1) / objects
        scores[f"{name}_likelihood"] = torch.exp(mean)

    rollouts = trajectories.shape[1]
    per_object = batch.eval_mask[:, None].to(torch.float32)  # [B, 1, E]
    ade = torch.where(batch.eval_mask[:, None], sim["ade"], torch.zeros_like(sim["ade"]))
    scores["average_displacement_error"] = ade.sum((1, 2)) / (objects * rollouts)
    scores["min_average_displacement_error"] = (ade.sum(2) / objects[:, None]).amin(1)

    def rate(indicator: torch.Tensor) -> torch.Tensor:
        return (indicator.to(torch.float32) * per_object).sum((1, 2)) / (objects * rollouts)

    scores["simulated_collision_rate"] = rate(sim_collision)
    scores["simulated_offroad_rate"] = rate(sim_offroad)
    scores["simulated_traffic_light_violation_rate"] = rate(indication(sim["traffic_light_violation"], valid))
    scores["metametric"] = sum(config.weights[n] * scores[f"{n}_likelihood"] for n in FEATURES)
    table = {k: v.double().cpu().tolist() for k, v in scores.items()}
    return [{"scenario_id": sid, **{k: table[k][b] for k in FIELDS}} for b, sid in enumerate(batch.scenario_id)]


def score_scenario(
    scenario: Scenario,
    object_ids: Sequence[int],
    trajectories: np.ndarray,
    config: str | WosacConfig = "2025",
    device: str | torch.device = "cpu",
) -> dict:
    """Score one scenario's rollouts; see the module docstring."""
    return score_scenarios([(scenario, object_ids, trajectories)], config, device)[0]


def score_scenarios(
    items: Iterable[tuple[Scenario, Sequence[int], np.ndarray]],
    config: str | WosacConfig = "2025",
    device: str | torch.device = "cpu",
    batch_size: int = 8,
) -> list[dict]:
    """Score many ``(scenario, object_ids, trajectories)``, ``batch_size`` scenarios per
    tensor batch (all with the same number of rollouts); one dict per scenario, in order."""
    results: list[dict] = []
    pending: list[tuple[WosacScene, np.ndarray]] = []

    def flush():
        if not pending:
            return
        batch = WosacBatch.from_scenes([scene for scene, _ in pending]).to(device)
        counts = {traj.shape[0] for _, traj in pending}
        if len(counts) > 1:
            raise RolloutError(f"scenarios batched together must have equal rollout counts, got {sorted(counts)}")
        A = batch.object_mask.shape[1]
        padded = np.zeros((len(pending), counts.pop(), A, SIM_STEPS, 4), np.float32)
        for b, (_, traj) in enumerate(pending):
            padded[b, :, : traj.shape[1]] = traj
        results.extend(score_batch(batch, torch.from_numpy(padded), config))
        pending.clear()

    for scenario, object_ids, trajectories in items:
        ordered = check_rollouts(scenario, np.asarray(object_ids), trajectories)
        if pending and ordered.shape[0] != pending[0][1].shape[0]:
            flush()
        pending.append((WosacScene.from_scenario(scenario), ordered))
        if len(pending) >= batch_size:
            flush()
    flush()
    return results


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
