"""WOSAC metrics: estimators by hand, features on constructed scenes, the reference."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from closedloop.agents.open_loop import BASELINES
from closedloop.data.scenario import LIGHT_GO, LIGHT_STOP
from closedloop.metrics import features as F
from closedloop.metrics.config import FIELDS, Histogram, get_config
from closedloop.metrics.estimators import bernoulli_log_likelihood, bin_index, histogram_log_likelihood
from closedloop.metrics.scene import WosacBatch, WosacScene
from closedloop.metrics.wosac import RolloutError, aggregate, buckets, score_scenario, score_scenarios
from scenes import make_scenario, straight

FIXTURE = Path(__file__).parent / "fixtures" / "wosac_reference.json"


# -- estimators ----------------------------------------------------------------------------
def test_histogram_estimate_by_hand():
    config = Histogram(0.0, 10.0, 5, pseudocount=0.5)  # bins of width 2
    sim = torch.tensor([[0.5, 1.0, 3.0, 9.9, 12.0, -4.0]])  # bins 0, 0, 1, 4, 4 (clipped), 0
    log = torch.tensor([[1.5, 5.0, 10.0]])  # bins 0, 2, 4
    ll = histogram_log_likelihood(log, sim, config)
    counts = np.array([3, 1, 0, 0, 2]) + 0.5
    expected = np.log(counts[[0, 2, 4]] / counts.sum())
    np.testing.assert_allclose(ll[0].numpy(), expected, rtol=1e-6)


def test_bins_edges_and_nan():
    config = Histogram(0.0, 25.0, 10)
    values = torch.tensor([0.0, 2.5, 2.4999, 25.0, 30.0, -1.0, float("nan")])
    assert bin_index(values, config).tolist() == [0, 1, 0, 9, 9, 0, 9]


def test_bernoulli_estimate_by_hand():
    sim = torch.tensor([[True, False, False, False]])
    ll = bernoulli_log_likelihood(torch.tensor([True]), sim, pseudocount=0.001)
    assert ll.item() == pytest.approx(math.log(1.001 / 4.002), rel=1e-6)


# -- features on constructed scenes -------------------------------------------------------
def _features(scenario):
    """The logged trajectories of a one-scenario batch as one rollout."""
    batch = WosacBatch.from_scenes([WosacScene.from_scenario(scenario)])
    return batch, batch.log_xyzh[:, None], batch.log_valid[:, None]


def _rows(batch, xyzh, valid):
    """The per-row view the pairwise features take (one scenario, one rollout)."""
    return xyzh[:, 0], batch.dims, valid[:, 0], batch.eval_index


def test_distance_between_two_boxes_at_a_known_gap():
    # Two 4 x 2 boxes side by side along x, 10 m between centres: a 6 m gap.
    scenario = make_scenario([{"xy": (0.0, 0.0), "heading": 0.0}, {"xy": (10.0, 0.0), "heading": 0.0}])
    batch, xyzh, valid = _features(scenario)
    d = F.distance_to_nearest_object(*_rows(batch, xyzh, valid))
    # Rounded corners do not change the gap between parallel faces.
    assert torch.allclose(d, torch.full_like(d, 6.0), atol=1e-5)


def test_time_to_collision_of_a_follower():
    # Follower at 10 m/s, leader 60 m ahead (centres) at 5 m/s: the gap between the 4 m
    # boxes is 56 m, closing at 5 m/s (0.5 m per step): the time to collision is capped at
    # 5 s until the gap falls below 25 m.
    follower = {"xy": straight(0.0, 0.0, 10.0)}
    leader = {"xy": straight(60.0, 0.0, 5.0)}
    beside = {"xy": straight(0.0, 10.0, 20.0)}  # in another lane: not followed
    batch, xyzh, valid = _features(make_scenario([follower, leader, beside]))
    ttc = F.time_to_collision(*_rows(batch, xyzh, valid))[0, 0]
    gap = 56.0 - 5.0 * np.arange(91) * 0.1
    np.testing.assert_allclose(ttc[1:-1].numpy(), np.minimum(gap / 5.0, 5.0)[1:-1], atol=1e-4)
    assert ttc[0] == 5.0 and ttc[-1] == 5.0  # speeds are undefined at the ends


def test_car_running_a_red_light():
    lane = np.stack([np.linspace(-50, 50, 201), np.zeros(201)], 1)
    state = np.full(91, LIGHT_GO)
    state[30:] = LIGHT_STOP
    runner = {"xy": straight(-40.5, 0.0, 10.0)}  # crosses x = 0 between steps 40 and 41
    scenario = make_scenario([runner], lanes=[lane], lights=[(0, state, (0.0, 0.0))])
    batch, xyzh, valid = _features(scenario)
    violation = F.red_light_violation(xyzh, valid, batch.eval_index, batch)[0, 0, 0]
    assert violation.nonzero().flatten().tolist() == [41]
    state[:] = LIGHT_GO  # the same drive on green is no violation
    scenario = make_scenario([runner], lanes=[lane], lights=[(0, state, (0.0, 0.0))])
    batch, xyzh, valid = _features(scenario)
    assert not F.red_light_violation(xyzh, valid, batch.eval_index, batch).any()


def test_car_parked_half_off_the_road_edge():
    # The road lies left of the edge running along +x at y = 0, i.e. at y > 0.
    edge = np.stack([np.linspace(-50, 50, 101), np.zeros(101), np.zeros(101)], 1)
    half_off = {"xy": (0.0, 0.0), "heading": 0.0, "size": (4.0, 2.0, 1.5)}  # centre on the edge
    inside = {"xy": (0.0, 5.0), "heading": 0.0, "size": (4.0, 2.0, 1.5)}
    scenario = make_scenario([half_off, inside], road_edges=[edge], predict=[1])
    batch, xyzh, valid = _features(scenario)
    d = F.distance_to_road_edge(xyzh, batch.dims, valid, batch.eval_index, batch)[0, 0]
    np.testing.assert_allclose(d[0].numpy(), 1.0, atol=1e-5)  # the far corners, 1 m off
    np.testing.assert_allclose(d[1].numpy(), -4.0, atol=1e-5)  # 5 m in, half width 1 m


def test_kinematics_of_constant_acceleration():
    t = np.arange(91) * 0.1
    xy = np.stack([0.5 * 2.0 * t**2, np.zeros(91)], 1)  # a = 2 m/s^2
    _, xyzh, _ = _features(make_scenario([{"xy": xy, "heading": 0.0}]))
    speed, accel, yaw_rate, _ = F.kinematics(xyzh[0, 0, 0])
    np.testing.assert_allclose(speed[1:-1].numpy(), 2.0 * t[1:-1], atol=1e-3)
    np.testing.assert_allclose(accel[2:-2].numpy(), 2.0, atol=5e-2)
    assert torch.isnan(speed[0]) and torch.isnan(accel[1])
    assert torch.all(yaw_rate[1:-1] == 0)


# -- against the reference ----------------------------------------------------------------
@pytest.fixture(scope="module")
def reference():
    if not FIXTURE.exists():
        pytest.skip(f"{FIXTURE} is missing; produce it with scripts/wosac_crosscheck.py")
    return json.loads(FIXTURE.read_text())


@pytest.mark.parametrize("rollout_set", sorted(BASELINES))
@pytest.mark.parametrize("config", ["2025", "2024"])
def test_matches_the_reference_implementation(real_scenarios, reference, rollout_set, config):
    scenario = real_scenarios["637f20cafde22ff8"]
    expected = reference[f"{rollout_set}/{config}"]
    ids, trajectories = BASELINES[rollout_set](scenario, 32)
    got = score_scenario(scenario, ids, trajectories, config=config)
    for field in FIELDS:
        if field.startswith("simulated_"):
            assert got[field] == pytest.approx(expected[field], abs=1e-6), field  # rates are exact
        else:
            assert got[field] == pytest.approx(expected[field], abs=1e-3), field


def test_log_replay_scores_and_aggregation(real_scenarios):
    scenario = real_scenarios["637f20cafde22ff8"]
    ids, trajectories = BASELINES["log_replay"](scenario, 32)
    score = score_scenario(scenario, ids, trajectories)
    assert score["min_average_displacement_error"] == pytest.approx(0.0, abs=1e-6)
    total = aggregate([score, score])
    assert total["scenario_id"] == "ALL" and total["metametric"] == pytest.approx(score["metametric"])
    b = buckets(score)
    weights = get_config("2025").weights
    kinematic = (
        sum(
            weights[n] * score[f"{n}_likelihood"]
            for n in ("linear_speed", "linear_acceleration", "angular_speed", "angular_acceleration")
        )
        / 0.2
    )
    assert b["kinematic"] == pytest.approx(kinematic)


# -- bad input ----------------------------------------------------------------------------
def test_rollouts_that_do_not_fit_are_clear_errors(real_scenarios):
    scenario = real_scenarios["637f20cafde22ff8"]
    ids, trajectories = BASELINES["constant_velocity"](scenario, 2)
    with pytest.raises(RolloutError, match=r"missing \[\d+"):
        score_scenario(scenario, ids[1:], trajectories[:, 1:])
    with pytest.raises(RolloutError, match=r"extra \[999999\]"):
        score_scenario(scenario, np.append(ids, 999999), np.concatenate([trajectories, trajectories[:, :1]], 1))
    with pytest.raises(RolloutError, match=r"shape"):
        score_scenario(scenario, ids, trajectories[:, :, :79])
    bad = trajectories.copy()
    bad[0, 3, 5, 0] = np.nan
    with pytest.raises(RolloutError, match=rf"objects \[{ids[3]}\]"):
        score_scenario(scenario, ids, bad)
    # Objects may come in any order.
    perm = np.random.default_rng(0).permutation(len(ids))
    a = score_scenario(scenario, ids, trajectories)
    b = score_scenario(scenario, ids[perm], trajectories[:, perm])
    assert a == b


def test_batched_scenarios_equal_one_at_a_time(real_scenarios):
    from closedloop.data.synthetic import generate_scenarios

    scenarios = list(generate_scenarios(2, seed=4, town="cross")) + [real_scenarios["637f20cafde22ff8"]]
    items = [(s, *BASELINES["noisy_log"](s, 4)) for s in scenarios]
    together = score_scenarios(items, batch_size=3)
    alone = [score_scenario(*item) for item in items]
    assert [r["scenario_id"] for r in together] == [s.scenario_id for s in scenarios]
    for a, b in zip(together, alone):
        for field in FIELDS:
            assert a[field] == pytest.approx(b[field], abs=1e-6, nan_ok=True), field
