"""File names derived from scenario ids never leave the output directory."""

from pathlib import Path

import numpy as np
import pytest

from closedloop.paths import scenario_path


@pytest.mark.parametrize("scenario_id", ["637f20cafde22ff8", "s0_1", "a" * 200, "id with spaces", "ü-1"])
def test_ordinary_ids_name_files_in_the_directory(tmp_path, scenario_id):
    path = scenario_path(tmp_path, scenario_id, ".npz")
    assert path.parent == tmp_path and path.name == f"{scenario_id}.npz"


@pytest.mark.parametrize(
    "scenario_id", ["", ".", "..", "../../x", "/etc/passwd", "a/b", "a\\b", "a\0b", ".hidden", "a" * 201]
)
def test_unsafe_ids_are_rejected_naming_the_id(tmp_path, scenario_id):
    with pytest.raises(ValueError, match="scenario id") as err:
        scenario_path(tmp_path, scenario_id, ".npz")
    assert repr(scenario_id[:40]) in str(err.value)


def test_write_rollouts_refuses_to_leave_out(tmp_path):
    from closedloop.envs.rollout import write_rollouts

    out = tmp_path / "out"
    trajectories = np.zeros((1, 1, 80, 4), np.float32)
    with pytest.raises(ValueError, match=r"'\.\./escaped'"):
        write_rollouts([("../escaped", np.array([1]), trajectories)], out)
    assert not (tmp_path / "escaped.npz").exists() and not list(Path(tmp_path).rglob("*.npz"))


def test_demo_refuses_a_crafted_id(tmp_path, scenario_file, monkeypatch):
    import closedloop.demo as demo
    from closedloop.data import read_scenarios, write_scenarios

    (scenario,) = read_scenarios(scenario_file)
    data = tmp_path / "crafted.tfrecord"
    write_scenarios(data, [scenario.replace(scenario_id="../../pwned")])
    monkeypatch.setattr(demo, "_plot", lambda scenario, path: path.write_bytes(b"png"))
    with pytest.raises(ValueError, match=r"'\.\./\.\./pwned'"):
        demo.run_demo([str(data)], tmp_path / "a" / "b" / "out")
    assert not list(tmp_path.rglob("pwned*"))
