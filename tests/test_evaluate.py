"""``closedloop evaluate``: rollouts, WOSAC metrics and event rates in one command."""

import json

import numpy as np
import pytest
import torch
from cli import run

from closedloop.constants import LIGHT_STOP
from closedloop.evaluate import RATES, evaluate_policy
from closedloop.metrics.rollouts import load_rollouts
from scenes import STEPS, make_scenario, straight

# A policy that draws from the episode's generator, so seeds matter.
JITTER = """
import torch
from closedloop.agents.policy import BasePolicy


class Jitter(BasePolicy):
    def act(self, state):
        speed = torch.linalg.norm(state.current[..., 3:5], dim=-1)
        noise = torch.randn(speed.shape, generator=self.generator, device=speed.device)
        actions = torch.zeros(*speed.shape, 3, device=speed.device)
        actions[..., 0] = speed * 0.1 * (1 + 0.2 * noise)
        actions[..., 2] = 0.01 * torch.randn(speed.shape, generator=self.generator, device=speed.device)
        return actions


policy = Jitter()
"""


@pytest.fixture(scope="module")
def town(tmp_path_factory):
    out = tmp_path_factory.mktemp("town")
    run("generate", "--out", out, "--num-scenarios", 2, "--seed", 5, "--agents", "8:12", "--quiet")
    return out


@pytest.fixture(scope="module")
def jitter(tmp_path_factory):
    path = tmp_path_factory.mktemp("policy") / "jitter.py"
    path.write_text(JITTER)
    return f"{path}:policy"


def _rows(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def test_evaluate_equals_rollout_then_metrics(tmp_path, town, jitter):
    common = ("--data", town, "--policy", jitter, "--dynamics", "delta_local", "--num-rollouts", 3, "--seed", 7)
    out = tmp_path / "eval"
    rows = _rows(run("evaluate", *common, "--json", "--out", out).stdout)
    assert [r["scenario_id"] for r in rows][-1] == "ALL" and len(rows) == 3
    for row in rows:
        assert all(0 <= row[name] <= 1 for name in RATES.values()), row
        assert 0 < row["metametric"] < 1 and "kinematic" in row and "realism_meta_metric" in row
    # The same policy, seed and rollouts through the two separate commands.
    run("rollout", *common, "--out", tmp_path / "ro", "--quiet")
    metrics = _rows(run("metrics", "--data", town, "--rollouts", tmp_path / "ro", "--json").stdout)
    by_id = {r["scenario_id"]: r for r in metrics}
    for row in rows:
        expected = by_id[row["scenario_id"]]
        assert set(expected) <= set(row)
        for key, value in expected.items():
            if key != "scenario_id":
                assert row[key] == pytest.approx(value, abs=1e-6), key
    # --out: the rollout files are closedloop rollout's (which metrics read just now).
    files = sorted(p.name for p in (tmp_path / "ro").glob("*.npz"))
    assert files == sorted(p.name for p in out.glob("*.npz")) and len(files) == 2
    for name in files:
        mine, theirs = load_rollouts(out / name), load_rollouts(tmp_path / "ro" / name)
        assert mine.scenario_id == theirs.scenario_id and np.array_equal(mine.object_ids, theirs.object_ids)
        assert mine.trajectories.dtype == np.float32 and np.array_equal(mine.trajectories, theirs.trajectories)
    saved = json.loads((out / "evaluation.json").read_text())
    assert saved["scenarios"] == rows[:-1] and saved["all"] == rows[-1]
    assert saved["settings"] == {
        "policy": jitter,
        "num_rollouts": 3,
        "seed": 7,
        "dynamics": "delta_local",
        "batch_size": 8,
        "rollouts_together": 1,
        "config": "2025",
        "top_k": 48,
        "temperature": 1.0,
    }


def test_evaluate_table(town):
    proc = run("evaluate", "--data", town, "--policy", "constant_velocity", "--num-rollouts", 2, "--config", "2024")
    lines = proc.stdout.splitlines()
    assert lines[0].split() == [
        "scenario_id",
        "metametric",
        "minADE",
        "kinematic",
        "interactive",
        "map_based",
        "collision",
        "offroad",
        "red_light",
    ]
    assert len(lines[1].split()) == 9 and len(lines[2].split()) == 9
    assert "WOSAC 2024 metrics of constant_velocity (dynamics delta_global, 2 rollouts, seed 0)" in proc.stdout
    assert "mean over 2 scenarios" in proc.stdout and "collision_rate" in proc.stdout
    assert "evaluate" in proc.stderr and "2/2" in proc.stderr  # one progress bar over scenarios


def _hand_scenarios():
    """``crash``: car 0 runs a red light, cars 1 and 2 meet head on, car 3 is parked, car 4
    stands off the road; ``calm``: two cars driving side by side. The log is all of it."""
    lane = np.stack([np.linspace(0, 50, 51), np.zeros(51)], -1)
    edges = [  # a road between y = -10 and y = 110 (edges keep the road on their left)
        np.stack([np.linspace(-200, 200, 81), np.full(81, -10.0)], -1),
        np.stack([np.linspace(200, -200, 81), np.full(81, 110.0)], -1),
    ]
    cars = [
        {"xy": straight(-20.0, 0.0, 10.0)},
        {"xy": straight(-20.0, 30.0, 10.0)},
        {"xy": straight(20.0, 30.0, -10.0)},
        {"xy": [100.0, 100.0], "heading": 0.0},
        {"xy": [-100.0, -12.0], "heading": 0.0},
    ]
    lights = [(0, np.full(STEPS, LIGHT_STOP), (0.0, 0.0))]
    crash = make_scenario(cars, road_edges=edges, lanes=[lane], lights=lights, scenario_id="crash")
    calm = make_scenario(
        [{"xy": straight(0.0, 0.0, 5.0)}, {"xy": straight(0.0, 10.0, 5.0)}], road_edges=edges, scenario_id="calm"
    )
    return [crash, calm]


def test_event_rates_on_a_hand_made_scene(tmp_path):
    from closedloop.data import write_scenarios

    path = tmp_path / "hand.tfrecord"
    write_scenarios(path, _hand_scenarios())
    rows = {
        r["scenario_id"]: r
        for r in _rows(run("evaluate", "--data", path, "--policy", "log", "--num-rollouts", 2, "--json").stdout)
    }
    assert (rows["crash"]["collision_rate"], rows["crash"]["offroad_rate"], rows["crash"]["red_light_rate"]) == (
        pytest.approx(2 / 5),
        pytest.approx(1 / 5),
        pytest.approx(1 / 5),
    )
    assert (rows["calm"]["collision_rate"], rows["calm"]["offroad_rate"], rows["calm"]["red_light_rate"]) == (0, 0, 0)
    # ALL pools the 7 (agent, rollout) pairs of each rollout: 2/7, not the mean of 2/5 and 0.
    assert rows["ALL"]["collision_rate"] == pytest.approx(2 / 7)
    assert rows["ALL"]["offroad_rate"] == rows["ALL"]["red_light_rate"] == pytest.approx(1 / 7)
    # The SDC (car 0) runs the red light in each rollout of "crash" and nothing else.
    sdc = ("sdc_collision_rate", "sdc_offroad_rate", "sdc_red_light_rate")
    assert [rows["crash"][key] for key in sdc] == [0, 0, 1]
    assert [rows["calm"][key] for key in sdc] == [0, 0, 0]
    assert [rows["ALL"][key] for key in sdc] == [0, 0, pytest.approx(2 / 4)]  # 2 of 4 (scenario, rollout) pairs


def test_evaluate_policy_flags_agree_with_count_events():
    """Per agent, the library's flags are count_events' counts for that agent alone > 0."""
    from closedloop.agents.baselines import LogReplay
    from closedloop.data import collate_scenarios
    from closedloop.envs import make_dynamics, reset
    from closedloop.envs.rollout import EVENTS, count_events, rollout_scenarios

    scenarios = _hand_scenarios()
    dynamics = make_dynamics("delta_global")
    policy = LogReplay()
    results = list(rollout_scenarios(scenarios, policy, dynamics, num_rollouts=2, events=True))
    plain = list(rollout_scenarios(scenarios, policy, dynamics, num_rollouts=2))
    for scenario, (sid, ids, traj, flags), (_, _, plain_traj) in zip(scenarios, results, plain):
        assert np.array_equal(traj, plain_traj)  # events change nothing in the rollouts
        batch = collate_scenarios([scenario])
        slots = batch.agent_id[0].tolist()
        for a, object_id in enumerate(ids.tolist()):
            alone = torch.zeros_like(batch.agent_mask)
            alone[0, slots.index(object_id)] = True
            _, counts = count_events(reset(batch), policy, dynamics, alone)
            for key in EVENTS:
                assert flags[key].shape == (2, len(ids)) and flags[key].dtype == bool
                assert (flags[key][:, a] == (counts[key] > 0)).all(), (sid, object_id, key)


def test_evaluate_policy_library(capsys):
    """No printing, deterministic for a seed, the global RNG left as it was, any iterable."""
    from closedloop.envs import make_dynamics

    namespace = {}
    exec(JITTER, namespace)
    scenarios, dynamics = _hand_scenarios(), make_dynamics("delta_local")
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    first = evaluate_policy(scenarios, namespace["Jitter"](), dynamics, num_rollouts=2, seed=1, batch_size=1)
    assert torch.equal(torch.rand(4), expected)
    again = evaluate_policy(iter(scenarios), namespace["policy"], dynamics, num_rollouts=2, seed=1, batch_size=1)
    assert again == {**first, "settings": {**first["settings"], "policy": "Jitter"}}
    other = evaluate_policy(scenarios, namespace["policy"], dynamics, num_rollouts=2, seed=2, batch_size=1)
    assert other["all"]["metametric"] != first["all"]["metametric"]
    assert [r["scenario_id"] for r in first["scenarios"]] == ["crash", "calm"]
    assert first["all"]["scenario_id"] == "ALL"
    assert first["settings"] == {
        "policy": "Jitter",
        "num_rollouts": 2,
        "seed": 1,
        "dynamics": "delta_local",
        "batch_size": 1,
        "rollouts_together": 1,
        "config": "2025",
    }
    assert capsys.readouterr() == ("", "")


def test_top_k_and_temperature_reach_load_policy(monkeypatch, tmp_path, town):
    import closedloop.agents.policy
    from closedloop.cli import main

    seen = []
    real = closedloop.agents.policy.load_policy

    def spy(spec, **kwargs):
        seen.append(kwargs)
        return real(spec, **kwargs)

    monkeypatch.setattr(closedloop.agents.policy, "load_policy", spy)
    base = ("--data", str(town), "--policy", "constant_velocity", "--num-rollouts", "1", "--quiet")
    assert main(["rollout", *base, "--out", str(tmp_path / "ro"), "--top-k", "5", "--temperature", "0.5"]) == 0
    assert main(["evaluate", *base, "--json", "--top-k", "0", "--temperature", "2"]) == 0
    assert main(["evaluate", *base, "--json"]) == 0
    assert [(k["top_k"], k["temperature"]) for k in seen] == [(5, 0.5), (None, 2.0), (48, 1.0)]


@pytest.mark.parametrize(
    "args, message",
    [
        (("--policy", "warp"), "unknown policy 'warp'"),
        (("--policy", "model:tiny", "--dynamics", "bicycle"), "drives its own dynamics: leave out --dynamics"),
        (("--policy", "log", "--data", "MISSING"), "missing.tfrecord: no such file"),
    ],
)
def test_evaluate_errors_exit_2(tmp_path, town, args, message):
    data = town
    if "MISSING" in args:
        data = tmp_path / "missing.tfrecord"
        args = args[:-2]
    proc = run("evaluate", "--data", data, *args, "--num-rollouts", 1, "--out", tmp_path / "out", check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert proc.stdout == "" and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, message",
    [(("--temperature", "0"), "expected a positive number"), (("--top-k", "-1"), "expected an integer >= 0")],
)
def test_bad_sampling_flags_exit_2(capsys, args, message):
    from closedloop.cli import build_parser

    for command in ("rollout", "evaluate"):
        with pytest.raises(SystemExit) as exit:
            build_parser().parse_args([command, "--data", "x", "--out", "y", *args])
        assert exit.value.code == 2 and message in capsys.readouterr().err
