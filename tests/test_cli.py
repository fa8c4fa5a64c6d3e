"""The command line, run the way a user runs it: as a subprocess."""

import json

import numpy as np
import pytest
from cli import run

from closedloop.data.tfrecord import encode_record, iter_records


def test_inspect_json_on_all_real_files(scenario_file):
    folder = scenario_file.parent
    proc = run("inspect", *sorted(folder.glob("*.tfrecord")), "--json")
    rows = {r["scenario_id"]: r for r in map(json.loads, proc.stdout.splitlines())}
    small = rows["637f20cafde22ff8"]
    assert small["num_tracks"] == 83 and small["num_map_features"] == 301
    assert small["track_types"] == {"vehicle": 70, "pedestrian": 10, "cyclist": 3, "other": 0}
    assert small["num_steps"] == 91 and small["sdc_track_index"] == 82
    assert small["num_valid_at_current"] == 50 and small["current_time_index"] == 10
    assert small["objects_of_interest"] == [] and small["tracks_to_predict"] == [72, 43, 42]
    assert rows["ee519cf571686d19"]["num_tracks"] == 257
    assert rows["ee519cf571686d19"]["num_valid_at_current"] == 84
    assert "driveway" not in small["map_feature_types"]  # zero counts are omitted
    assert "a3bb37c25ce56418" in rows  # the tf.Example file


def test_inspect_text_line(scenario_file):
    out = run("inspect", scenario_file).stdout
    assert out.startswith("637f20cafde22ff8: 83 tracks (70 veh, 10 ped, 3 cyc")


@pytest.mark.parametrize(
    "kind, pattern",
    [
        ("payload", r"record 1 at byte offset \d+: CRC mismatch in the payload"),
        ("length", r"record 1 at byte offset \d+: CRC mismatch in the length"),
        ("truncated", r"record 1 at byte offset \d+: truncated"),
        ("empty", r"record 0 at byte offset 0: empty file"),
        ("text", r"record 0 at byte offset 0: CRC mismatch in the length header \(corrupt, or not a TFRecord"),
    ],
)
def test_inspect_corrupt_file_exits_2(tmp_path, scenario_file, kind, pattern):
    good = next(iter_records(scenario_file))
    data = bytearray(encode_record(good) * 2)
    second = len(encode_record(good))
    if kind == "payload":
        data[second + 500] ^= 0xFF
    elif kind == "length":
        data[second + 1] ^= 0xFF
    elif kind == "truncated":
        data = data[:-1000]
    elif kind == "empty":
        data = b""
    else:
        data = b"scenario_id,x,y\n1,2,3\n" * 10
    path = tmp_path / f"{kind}.tfrecord"
    path.write_bytes(bytes(data))
    proc = run("inspect", path, "--json", check=False)
    assert proc.returncode == 2
    assert str(path) in proc.stderr
    assert __import__("re").search(pattern, proc.stderr), proc.stderr
    if kind in ("payload", "length", "truncated"):  # the good first record was still printed
        assert json.loads(proc.stdout.splitlines()[0])["scenario_id"] == "637f20cafde22ff8"


def test_inspect_missing_file(tmp_path):
    proc = run("inspect", tmp_path / "missing.tfrecord", check=False)
    assert proc.returncode == 2 and "missing.tfrecord" in proc.stderr


def test_prepare_cli_resumes(tmp_path, many_shards):
    out = tmp_path / "cache"
    first = run("prepare", "--data", str(many_shards / "*.tfrecord"), "--out", out, "--workers", 2)
    assert "15 scenarios from 5 shards (5 converted now" in first.stdout
    again = run("prepare", "--data", str(many_shards / "*.tfrecord"), "--out", out, "--quiet")
    assert "(0 converted now, 5 already done" in again.stdout


def test_generate_is_deterministic_and_inspectable(tmp_path):
    for name in ("a", "b"):
        run(
            "generate",
            "--out",
            tmp_path / name,
            "--num-scenarios",
            3,
            "--seed",
            5,
            "--shards",
            2,
            "--town",
            "cross",
            "--agents",
            "20:30",
            "--quiet",
        )
    files = sorted((tmp_path / "a").glob("*.tfrecord"))
    assert len(files) == 2
    assert all(f.read_bytes() == (tmp_path / "b" / f.name).read_bytes() for f in files)
    rows = [json.loads(x) for x in run("inspect", *files, "--json").stdout.splitlines()]
    assert len(rows) == 3 and all(r["num_steps"] == 91 for r in rows)


def test_generate_rejects_bad_agents(tmp_path):
    proc = run("generate", "--out", tmp_path, "--num-scenarios", 1, "--agents", "9:3", check=False)
    assert proc.returncode == 2 and "MIN <= MAX" in proc.stderr


def test_demo_runs_with_no_data_arguments(tmp_path):
    proc = run("demo", "--out", tmp_path / "demo", "--num-scenarios", 2)
    assert "generated 2 synthetic WOMD scenarios" in proc.stdout
    assert "read back identical: True" in proc.stdout
    assert list((tmp_path / "demo").glob("*.png"))


@pytest.fixture(scope="module")
def rollout_dir(tmp_path_factory, real_scenarios):
    from closedloop.agents.open_loop import constant_velocity
    from closedloop.metrics.rollouts import save_rollouts

    root = tmp_path_factory.mktemp("rollouts")
    scenario = real_scenarios["637f20cafde22ff8"]
    ids, traj = constant_velocity(scenario, 32)
    save_rollouts(root / f"{scenario.scenario_id}.npz", scenario.scenario_id, ids, traj)
    return root


def test_metrics_cli_json_and_table(rollout_dir, scenario_file):
    rows = [
        json.loads(x)
        for x in run("metrics", "--data", scenario_file, "--rollouts", rollout_dir, "--json").stdout.splitlines()
    ]
    assert [r["scenario_id"] for r in rows] == ["637f20cafde22ff8", "ALL"]
    assert 0 < rows[0]["metametric"] < 1 and rows[1]["metametric"] == rows[0]["metametric"]
    table = run("metrics", "--data", scenario_file, "--rollouts", rollout_dir, "--config", "2024").stdout
    assert "WOSAC 2024 metrics, mean over 1 scenarios" in table and "metametric" in table


def _bad_rollouts(tmp_path, real_scenarios, **change):
    from closedloop.agents.open_loop import constant_velocity

    scenario = real_scenarios["637f20cafde22ff8"]
    ids, traj = constant_velocity(scenario, 2)
    data = {"scenario_id": np.array(scenario.scenario_id), "object_ids": ids, "trajectories": traj}
    data.update(change)
    path = tmp_path / "bad.npz"
    np.savez(path, **data)
    return path


@pytest.mark.parametrize(
    "case, pattern",
    [
        ("missing", r"missing \["),
        ("extra", r"extra \[4242\]"),
        ("shape", r"trajectories must be"),
        ("nan", r"non-finite"),
        ("scenario", r"scenario nope is not in --data"),
        ("keys", r"missing trajectories"),
        ("empty", r"empty file"),
        ("npy", r"a single .npy array"),
        ("complex", r"must be real floating point, got complex"),
        ("huge", r"beyond the plausible"),
    ],
)
def test_metrics_cli_bad_rollouts(tmp_path, real_scenarios, scenario_file, case, pattern):
    from closedloop.agents.open_loop import constant_velocity

    ids, traj = constant_velocity(real_scenarios["637f20cafde22ff8"], 2)
    change = {
        "missing": {"object_ids": ids[1:], "trajectories": traj[:, 1:]},
        "extra": {"object_ids": np.append(ids, 4242), "trajectories": np.concatenate([traj, traj[:, :1]], 1)},
        "shape": {"trajectories": traj[:, :, :70]},
        "nan": {"trajectories": np.where(np.arange(80)[None, None, :, None] == 7, np.nan, traj)},
        "scenario": {"scenario_id": np.array("nope")},
        "complex": {"trajectories": traj + 1j},
        "huge": {"trajectories": np.where(np.arange(80)[None, None, :, None] == 7, 1e30, traj)},
    }.get(case, {})
    path = _bad_rollouts(tmp_path, real_scenarios, **change)
    if case == "keys":
        np.savez(path, scenario_id=np.array("x"), object_ids=ids)
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "npy":
        with open(path, "wb") as handle:
            np.save(handle, traj)
    proc = run("metrics", "--data", scenario_file, "--rollouts", path, check=False)
    assert proc.returncode == 2, proc.stderr
    assert __import__("re").search(pattern, proc.stderr), proc.stderr
    assert "bad.npz" in proc.stderr and "Traceback" not in proc.stderr


def test_metrics_warns_about_files_submit_would_refuse(tmp_path, real_scenarios, scenario_file):
    path = _bad_rollouts(tmp_path, real_scenarios)  # 2 rollouts: scored, with a warning
    proc = run("metrics", "--data", scenario_file, "--rollouts", path, "--json")
    assert "warning: " in proc.stderr and "bad.npz: 2 rollouts, the challenge needs exactly 32" in proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["scenario_id"] == "ALL"


def test_inspect_empty_directory(tmp_path):
    proc = run("inspect", tmp_path, check=False)
    assert proc.returncode == 2 and f"{tmp_path}: the directory has no TFRecord files" in proc.stderr


def test_inspect_malformed_tf_example_exits_2(tmp_path, example_file):
    from closedloop.data.tfexample import example_class

    example = example_class()()
    example.ParseFromString(next(iter_records(example_file)))
    del example.features.feature["scenario/id"].bytes_list.value[:]
    path = tmp_path / "bad.tfrecord"
    path.write_bytes(encode_record(example.SerializeToString()))
    proc = run("inspect", path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "bad.tfrecord: record 0: malformed scenario: feature 'scenario/id' has 0 values" in proc.stderr


def test_prepare_rebuilds_a_corrupt_shard(tmp_path, many_shards):
    out = tmp_path / "cache"
    run("prepare", "--data", str(many_shards / "part-000.tfrecord"), "--out", out, "--quiet")
    (shard,) = (out / "shards").glob("*.npz")
    shard.write_bytes(shard.read_bytes()[:1000])
    again = run("prepare", "--data", str(many_shards / "part-000.tfrecord"), "--out", out, "--quiet")
    assert "(1 converted now (1 rebuilt: corrupt or changed), 0 already done" in again.stdout


def test_submit_cli_packs_and_validates(tmp_path, rollout_dir, scenario_file, real_scenarios):
    from closedloop.metrics.submission import read_submission

    out = tmp_path / "sub.tar.gz"
    proc = run(
        "submit",
        "--rollouts",
        rollout_dir,
        "--out",
        out,
        "--method-name",
        "cv",
        "--authors",
        "A. Author",
        "B. Author",
        "--account",
        "me@example.com",
        "--data",
        scenario_file,
    )
    assert "1 scenarios in 1 shards, checked against --data" in proc.stdout
    (shard,) = read_submission(out)
    assert shard.unique_method_name == "cv" and list(shard.authors) == ["A. Author", "B. Author"]
    (rollouts,) = shard.scenario_rollouts
    assert rollouts.scenario_id == "637f20cafde22ff8" and len(rollouts.joint_scenes) == 32
    scene = rollouts.joint_scenes[0]
    assert len(scene.simulated_trajectories) == real_scenarios["637f20cafde22ff8"].valid_at_current().sum()
    assert len(scene.simulated_trajectories[0].center_x) == 80
    # 31 rollouts are refused, naming the file.
    from closedloop.agents.open_loop import constant_velocity

    ids, traj = constant_velocity(real_scenarios["637f20cafde22ff8"], 31)
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    np.savez(bad_dir / "x.npz", scenario_id=np.array("637f20cafde22ff8"), object_ids=ids, trajectories=traj)
    proc = run(
        "submit",
        "--rollouts",
        bad_dir,
        "--out",
        tmp_path / "b.tar.gz",
        "--method-name",
        "m",
        "--authors",
        "a",
        "--account",
        "a@b.c",
        check=False,
    )
    assert proc.returncode == 2 and "31 rollouts" in proc.stderr and "x.npz" in proc.stderr
    assert not (tmp_path / "b.tar.gz").exists()


def test_rollout_then_metrics(tmp_path, scenario_file):
    out = tmp_path / "rollouts"
    proc = run(
        "rollout",
        "--data",
        scenario_file,
        "--policy",
        "expert",
        "--dynamics",
        "bicycle",
        "--num-rollouts",
        2,
        "--out",
        out,
        "--quiet",
    )
    assert "wrote 1 rollout files" in proc.stdout
    rows = [
        json.loads(x) for x in run("metrics", "--data", scenario_file, "--rollouts", out, "--json").stdout.splitlines()
    ]
    assert rows[0]["min_average_displacement_error"] < 0.2
    proc = run("rollout", "--data", scenario_file, "--dynamics", "tokens", "--out", out, check=False)
    assert proc.returncode == 2 and "vocabulary" in proc.stderr


def test_render_cli_writes_a_gif(tmp_path, scenario_file):
    import imageio.v2 as imageio

    out = tmp_path / "ro"
    run(
        "rollout",
        "--data",
        scenario_file,
        "--policy",
        "constant_velocity",
        "--num-rollouts",
        1,
        "--out",
        out,
        "--quiet",
    )
    gif = tmp_path / "movie.gif"
    proc = run("render", "--data", scenario_file, "--rollouts", out, "--out", gif, "--size", 96)
    assert "81 frames" in proc.stdout
    frames = imageio.mimread(gif)
    assert len(frames) == 81 and frames[0].shape[:2] == (96, 96)
    bad = run("render", "--data", scenario_file, "--rollouts", out, "--out", gif, "--rollout", 5, check=False)
    assert bad.returncode == 2 and "has 1 rollouts" in bad.stderr


def test_readme_custom_policy_rolls_out_32_times_and_scores(tmp_path, scenario_file):
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("```python\n# my_policy.py", 1)[1].split("```", 1)[0]
    (tmp_path / "my_policy.py").write_text("# my_policy.py" + block)
    out = tmp_path / "runs"
    proc = run(
        "rollout",
        "--data",
        scenario_file,
        "--policy",
        tmp_path / "my_policy.py:policy",
        "--dynamics",
        "delta_local",
        "--num-rollouts",
        32,
        "--out",
        out,
        "--quiet",
    )
    assert "wrote 1 rollout files (32 rollouts, policy" in proc.stdout
    traj = np.load(out / "637f20cafde22ff8.npz")["trajectories"]
    assert traj.shape[0] == 32 and not np.array_equal(traj[0], traj[1])  # sampled with the generator
    rows = [
        json.loads(x) for x in run("metrics", "--data", scenario_file, "--rollouts", out, "--json").stdout.splitlines()
    ]
    assert 0 < rows[-1]["metametric"] < 1 and rows[-1]["scenario_id"] == "ALL"
    bad = run("rollout", "--data", scenario_file, "--policy", "warp", "--out", out, check=False)
    assert bad.returncode == 2 and "unknown policy 'warp'" in bad.stderr
    bad = run("rollout", "--data", scenario_file, "--policy", "nowhere.py:policy", "--out", out, check=False)
    assert bad.returncode == 2 and "nowhere.py: no such file" in bad.stderr


def test_threads_flag_sets_torch_threads_and_keeps_the_results(tmp_path, scenario_file):
    import numpy as np
    import torch

    from closedloop.cli import main

    before = torch.get_num_threads()
    common = ["rollout", "--data", str(scenario_file), "--dynamics", "bicycle", "--num-rollouts", "1", "--quiet"]
    try:
        assert main([*common, "--out", str(tmp_path / "two"), "--threads", "2"]) == 0
        assert torch.get_num_threads() == 2
        assert main([*common, "--out", str(tmp_path / "one")]) == 0  # the simulating commands' default
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    (one,), (two,) = (sorted((tmp_path / name).glob("*.npz")) for name in ("one", "two"))
    with np.load(one) as a, np.load(two) as b:
        assert all(np.array_equal(a[key], b[key]) for key in a.files)
    proc = run(*common, "--out", tmp_path / "x", "--threads", 0, check=False)
    assert proc.returncode == 2 and "--threads" in proc.stderr
