"""Policy evaluation: planner plug-ins (three forms, three ways to load), failing planners
reported and skipped, the random-shooting planners, the statistics, the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from cli import run

from closedloop.agents.planners import (
    RANDOM_SHOOTING,
    PlannerError,
    UserPlanner,
    candidate_library,
    load_planner,
    load_planners,
)
from closedloop.agents.planners.random_shooting import ACCELERATIONS, DEPTHS, NUM_CANDIDATES
from closedloop.metrics.policy_eval import agreement, average_ranks, mean_absolute_error, spearman
from closedloop.policy_eval import evaluate_planners
from scenes import make_scenario

MODULE = __name__  # the toy planners below load as f"{MODULE}:name"


# Toy planners, one of each form.
def keep_speed(obs):
    """Callable form: hold the current speed and heading (bicycle [acceleration, curvature])."""
    return [0.0, 0.0]


class Cautious:
    """Object form with reset(seed): brake gently once faster than 8 m/s (the observation's
    first value is the speed / 20 m/s)."""

    def reset(self, seed):
        self.seed = seed

    def act(self, obs):
        return np.array([-1.0 if obs[0] * 20 > 8 else 0.5, 0.0], np.float32)


class FollowRoute:
    """Scene-view form: steer towards the route point 10 m ahead, cruise at 8 m/s."""

    scene_view = True

    def act(self, view):
        x, y, heading, vx, vy = view.states[view.sdc]
        ahead = view.route[np.linalg.norm(view.route - [x, y], axis=1).argmin() :]
        gone = np.cumsum(np.r_[0, np.linalg.norm(np.diff(ahead, axis=0), axis=1)])
        tx, ty = ahead[min(np.searchsorted(gone, 10.0), len(ahead) - 1)]
        turn = math.atan2(ty - y, tx - x) - heading
        turn = math.atan2(math.sin(turn), math.cos(turn))
        return np.array([8.0 - math.hypot(vx, vy), 2 * math.sin(turn) / 10.0])


class Raises:
    def act(self, obs):
        raise RuntimeError("planner exploded")


def returns_nan(obs):
    return [float("nan"), 0.0]


def wrong_shape(obs):
    return [0.0, 0.0, 0.0]


def wrong_type(obs):
    return "accelerate"


def straight_road(parked_at: float | None = 60.0, speed: float = 10.0, scenario_id: str = "road"):
    """A 300 m straight two-way road (edges at y = +-4 m); the SDC logged at ``speed``
    along y = 0 from x = 0 at step 10; optionally a parked car on its path."""
    steps = np.arange(91)
    sdc = {"xy": np.stack([(steps - 10) * speed * 0.1, np.zeros(91)], -1), "size": (4.5, 2.0, 1.5)}
    tracks = [sdc]
    if parked_at is not None:
        tracks.append({"xy": [parked_at, 0.0], "heading": 0.0, "size": (4.5, 2.0, 1.5)})
    lane = np.stack([np.arange(-50.0, 300.0, 1.0), np.zeros(350)], -1)
    edges = [
        np.stack([np.arange(-50.0, 300.0, 2.0), np.full(175, -4.0)], -1),
        np.stack([np.arange(300.0, -50.0, -2.0), np.full(175, 4.0)], -1),
    ]
    scenario = make_scenario(tracks, road_edges=edges, lanes=[lane], scenario_id=scenario_id)
    scenario.track_velocity[0, :, 0] = speed
    return scenario


@pytest.fixture(scope="module")
def scenes():
    return [straight_road(scenario_id="parked"), straight_road(None, speed=6.0, scenario_id="free")]


def test_spearman_and_mae_on_a_hand_computed_case():
    # ranks of x with a tie: [1, 2.5, 2.5, 4]; of y: [1, 3, 2, 4]; centred products sum to 4.5,
    # squares to 4.5 and 5: rho = 4.5 / sqrt(22.5) = sqrt(0.9).
    assert average_ranks([1, 2, 2, 4]).tolist() == [1, 2.5, 2.5, 4]
    assert spearman([1, 2, 2, 4], [10, 30, 20, 40]) == pytest.approx(math.sqrt(0.9), abs=1e-12)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert mean_absolute_error([1, 2, 2, 4], [2, 2, 5, 3]) == pytest.approx(1.25)
    values = {"a": {"log": 1.0, "cv": 2.0}, "b": {"log": 2.0, "cv": 2.0}, "c": {"log": 4.0, "cv": 5.0}}
    rho, mae = agreement(values, ["log", "cv"])
    assert rho["log"]["log"] == 1.0 and mae["log"]["log"] == 0.0
    assert rho["log"]["cv"] == rho["cv"]["log"] == pytest.approx(spearman([1, 2, 4], [2, 2, 5]))
    assert mae["log"]["cv"] == pytest.approx(2 / 3)


def test_the_random_shooting_family():
    assert len(RANDOM_SHOOTING) == len(set(RANDOM_SHOOTING)) == 64
    assert NUM_CANDIDATES[0] == 9 and NUM_CANDIDATES[-1] == 81 and len(set(NUM_CANDIDATES)) == 16
    assert DEPTHS == (6, 8, 12, 16)
    library = candidate_library()
    assert library.shape == (81, 2) and len({tuple(c) for c in library.tolist()}) == 81
    assert library[0].tolist() == [0.0, 0.0]  # straight on at the current speed comes first
    coarse = {tuple(c) for c in library[:9].tolist()}  # the first 9: the 3 x 3 grid
    assert {a for a, _ in coarse} == {ACCELERATIONS[0], 0.0, ACCELERATIONS[-1]} and len(coarse) == 9
    assert load_planners(["random_shooting", "rs_J5_D3"])[0][-1] == ("rs_J5_D3", 5, 3)
    with pytest.raises(ValueError, match="more than once"):
        load_planners(["random_shooting", "rs_J9_D6"])


def test_planners_of_every_form_are_evaluated_and_failing_ones_skipped(scenes):
    planners = [f"{MODULE}:{name}" for name in ("keep_speed", "Cautious", "FollowRoute")]
    failing = [f"{MODULE}:{name}" for name in ("Raises", "returns_nan", "wrong_shape", "wrong_type")]
    result = evaluate_planners(scenes[:1], ["rs_J81_D16", "rs_J9_D6", *planners, *failing], ["log"])
    assert set(result["values"]) == {"rs_J81_D16", "rs_J9_D6", *planners}
    failed = {(f["planner"], f["scenario_id"], f["sim_agent"]): f["error"] for f in result["failed"]}
    assert len(failed) == len(failing)
    errors = {spec: failed[(spec, "parked", "log")] for spec in failing}
    assert "RuntimeError: planner exploded" in errors[f"{MODULE}:Raises"]
    assert "NaN" in errors[f"{MODULE}:returns_nan"]
    assert "shape [3]" in errors[f"{MODULE}:wrong_shape"]
    assert "not real numbers" in errors[f"{MODULE}:wrong_type"]
    assert all(spec in error for (spec, _, _), error in failed.items())
    values = result["values"]
    # Keeping 10 m/s hits the parked car (-10 per step in collision); the random-shooting
    # planner sees it coming.
    assert values[f"{MODULE}:keep_speed"]["log"] < -10 < -1 < values["rs_J81_D16"]["log"]
    assert all(math.isfinite(v) for row in values.values() for v in row.values())
    assert result["spearman"]["log"]["log"] == 1.0 and result["mae"]["log"]["log"] == 0.0


def test_loading_by_module_file_and_entry_point(tmp_path, monkeypatch):
    code = "def plan(obs):\n    return [0.5, 0.0]\n"
    (tmp_path / "toy_planners.py").write_text(code)
    dist = tmp_path / "toy_planners-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-planners\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[closedloop.planners]\ntoy = toy_planners:plan\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for spec in ("toy_planners:plan", f"{tmp_path / 'toy_planners.py'}:plan", "toy"):
        planner = load_planner(spec)
        assert planner.name == spec and planner.act(np.zeros(3), _bicycle()).tolist() == [0.5, 0.0]
    with pytest.raises(ValueError, match="not of the form"):
        load_planner("no_such_planner")
    with pytest.raises(PlannerError, match="neither callable"):
        UserPlanner("x", 42)


def _bicycle():
    from closedloop.envs import make_dynamics

    return make_dynamics("bicycle")


def test_cli_policy_eval_tables_and_outputs(tmp_path, monkeypatch, scenes):
    from closedloop.data import write_scenarios

    write_scenarios(tmp_path / "scenes.tfrecord", scenes)
    monkeypatch.setenv("PYTHONPATH", str(__import__("pathlib").Path(__file__).parent))
    planners = f"rs_J9_D6,{MODULE}:keep_speed,{MODULE}:Raises"
    args = ["policy-eval", "--data", tmp_path / "scenes.tfrecord", "--planners", planners]
    proc = run(*args, "--sim-agents", "log,constant_velocity", "--out", tmp_path / "out", "--quiet")
    assert "| sim agents | Spearman vs log | MAE vs log |" in proc.stdout and "| rs_J9_D6 |" in proc.stdout
    assert "planner exploded" in proc.stderr and "scenario parked" in proc.stderr
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"policy_eval.json", "values.csv", "values.png"}
    result = json.loads((tmp_path / "out" / "policy_eval.json").read_text())
    assert set(result) >= {"values", "spearman", "mae", "failed"}
    assert set(result["values"]) == {"rs_J9_D6", f"{MODULE}:keep_speed"}
    assert {f["planner"] for f in result["failed"]} == {f"{MODULE}:Raises"}
    assert result["spearman"]["log"]["log"] == 1.0 and result["mae"]["log"]["log"] == 0.0
    assert set(result["spearman"]["log"]) == set(result["mae"]["constant_velocity"]) == {"log", "constant_velocity"}
    bad = run(*args[:4], "no_such_planner", check=False)
    assert bad.returncode == 2 and "no_such_planner" in bad.stderr


def test_rollout_with_an_ego_planner_writes_rollouts_that_render(tmp_path, monkeypatch, scenes):
    from closedloop.data import write_scenarios
    from closedloop.metrics.rollouts import load_rollouts

    write_scenarios(tmp_path / "scenes.tfrecord", scenes[:1])
    monkeypatch.setenv("PYTHONPATH", str(__import__("pathlib").Path(__file__).parent))
    data = ["--data", tmp_path / "scenes.tfrecord"]
    run(
        "rollout",
        *data,
        "--ego-planner",
        f"{MODULE}:FollowRoute",
        "--policy",
        "idm",
        "--num-rollouts",
        2,
        "--out",
        tmp_path / "runs",
        "--quiet",
    )
    rollouts = load_rollouts(tmp_path / "runs" / "parked.npz")
    assert rollouts.trajectories.shape == (2, 2, 80, 4)
    sdc_x = rollouts.trajectories[0, 0, :, 0]
    assert sdc_x[-1] > 20 and np.all(np.diff(sdc_x) > -1e-3)  # it drove forward
    run("render", *data, "--rollouts", tmp_path / "runs", "--out", tmp_path / "parked.gif", "--size", 64)
    assert (tmp_path / "parked.gif").stat().st_size > 0
    bad = run(
        "rollout",
        *data,
        "--ego-planner",
        f"{MODULE}:returns_nan",
        "--policy",
        "log",
        "--out",
        tmp_path / "x",
        check=False,
    )
    assert bad.returncode == 2 and "scenario parked" in bad.stderr and "NaN" in bad.stderr


def test_faces_host_a_planner_with_frames(scenes):
    from closedloop.agents.baselines import IDM
    from closedloop.agents.planners.host import host_planner
    from closedloop.envs import ego_env, parallel_env

    env = ego_env(scenes[1:], render_mode="rgb_array")  # the free road: no collision ends it early
    episode = host_planner(env, FollowRoute(), seed=0)
    assert episode.scenario_id == "free" and episode.steps == 80 and len(episode.frames) == 81
    assert episode.frames[0].ndim == 3
    env = parallel_env(scenes[:1], dynamics="bicycle", controlled="sdc", others=IDM(), render_mode="rgb_array")
    episode = host_planner(env, keep_speed, seed=0)
    assert episode.scenario_id == "parked" and episode.steps == 80 and len(episode.frames) == 81
    with pytest.raises(PlannerError, match="scenario parked, step 0"):
        host_planner(ego_env(scenes[:1]), returns_nan)


def test_a_stable_baselines3_model_plugs_in_through_one_line(scenes):
    sb3 = pytest.importorskip("stable_baselines3")
    from closedloop.envs import ego_env

    model = sb3.PPO("MlpPolicy", ego_env(scenes[:1]), n_steps=64, seed=0, device="cpu")
    planner = UserPlanner("ppo", lambda obs: model.predict(obs, deterministic=True)[0])
    obs = torch.zeros(392).numpy()
    assert planner.act(obs, _bicycle()).shape == (2,)


def test_the_episode_judges_the_sdc_as_the_simulator_does(scenes):
    """The episode's SDC-only collision and off-road checks equal the env core's events."""
    from closedloop.agents.planners.episode import PlannerEpisode, ego_dynamics, load_sim_agents
    from closedloop.data import collate_scenarios
    from closedloop.envs.events import EventTracker

    batch = collate_scenarios([scenes[0], scenes[0]])
    episode = PlannerEpisode(batch, load_sim_agents("constant_velocity"), ego_dynamics("bicycle"))
    tracker = EventTracker(episode.state)
    rows, seen = torch.arange(2), {"collision": 0, "offroad": 0}
    actions = torch.tensor([[0.0, 0.0], [1.0, 0.05]])  # straight into the parked car; curving off the road
    while not episode.done:
        previous = episode.state
        episode.step(actions)
        events = tracker(previous, episode.state)
        collision, offroad = episode.sdc_events()
        assert torch.equal(collision, events["collision"][rows, episode.sdc])
        assert torch.equal(offroad, events["offroad"][rows, episode.sdc])
        seen["collision"] += int(collision.sum())
        seen["offroad"] += int(offroad.sum())
    assert seen["collision"] > 0 and seen["offroad"] > 0


def test_idm_finds_the_same_lane_point_as_a_whole_roadgraph_search():
    """IDM's indexed lane search (kept fast for 512-row policy-evaluation batches) against
    the brute-force search over every lane point, for random probes and headings."""
    from closedloop.agents.baselines import IDM
    from closedloop.data import collate_scenarios
    from closedloop.data.synthetic import generate_scenarios
    from closedloop.envs import make_dynamics, reset

    batch = collate_scenarios(list(generate_scenarios(2, seed=3, town="cross", agents=(20, 30))))
    state = reset(batch)
    idm = IDM()
    idm.reset(state, make_dynamics("delta_global"))
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        heading = torch.rand(state.current.shape[:2], generator=g) * 6.3 - 3.15
        state.history.pose[:, :, state.t, 2] = heading
        probe = state.current[..., :2] + torch.randn(*heading.shape, 2, generator=g) * 8
        best, found = idm._lane_point(state, probe)
        d = torch.linalg.norm(probe[:, :, None] - batch.road_xyz[:, None, :, :2], dim=-1)
        d = d.masked_fill(~IDM._usable_lanes(state), float("inf")).min(-1)
        valid = state.valid_now
        assert torch.equal(found[valid], torch.isfinite(d.values)[valid])
        chosen = torch.linalg.norm(
            probe - torch.gather(batch.road_xyz[..., :2], 1, best[..., None].expand(-1, -1, 2)), dim=-1
        )
        assert torch.allclose(chosen[valid & found], d.values[valid & found], atol=1e-5)


def test_another_ego_dynamics(scenes):
    """With --ego-dynamics delta_local a planner returns [dx, dy, dyaw]; the random-shooting
    planners turn their chosen candidate into such an action (the dynamics' inverse)."""
    result = evaluate_planners(scenes[1:], ["rs_J9_D6", f"{MODULE}:wrong_shape"], ["log"], ego="delta_local")
    assert not result["failed"] and set(result["values"]) == {"rs_J9_D6", f"{MODULE}:wrong_shape"}
    assert result["values"]["rs_J9_D6"]["log"] > 0  # on the free road it only makes progress
    with pytest.raises(ValueError, match="unknown ego dynamics"):
        evaluate_planners(scenes[1:], ["rs_J9_D6"], ["log"], ego="tokens")


def test_rollout_with_an_ego_planner_names_a_file_without_scenarios(tmp_path):
    empty = tmp_path / "empty.tfrecord"
    empty.write_bytes(b"")
    proc = run("rollout", "--data", empty, "--ego-planner", "rs_J9_D6", "--policy", "log", "--out", tmp_path / "r",
               check=False)  # fmt: skip
    assert proc.returncode == 2 and "empty.tfrecord" in proc.stderr and "no records" in proc.stderr
