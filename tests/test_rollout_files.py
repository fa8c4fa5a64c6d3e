"""Rollout files are checked on load: every error names the file."""

import numpy as np
import pytest

from closedloop.metrics.rollouts import RolloutFileError, load_rollouts, save_rollouts
from closedloop.metrics.submission import submission_problem

IDS = np.array([3, 7], np.int64)
TRAJ = np.zeros((2, 2, 80, 4), np.float32)


def _write(tmp_path, **change):
    data = {"scenario_id": np.array("abc"), "object_ids": IDS, "trajectories": TRAJ, **change}
    path = tmp_path / "r.npz"
    np.savez(path, **data)
    return path


def test_a_saved_file_loads(tmp_path):
    save_rollouts(tmp_path / "ok.npz", "abc", IDS, TRAJ)
    rollouts = load_rollouts(tmp_path / "ok.npz")
    assert rollouts.scenario_id == "abc" and rollouts.trajectories.shape == (2, 2, 80, 4)


@pytest.mark.parametrize(
    "change, pattern",
    [
        ({"trajectories": TRAJ.astype(str)}, r"real floating point, got <U"),
        ({"trajectories": TRAJ + 0j}, r"real floating point, got complex"),
        ({"trajectories": TRAJ.astype(np.int32)}, r"real floating point, got int32"),
        ({"trajectories": np.full_like(TRAJ, 1e30)}, r"values up to 1e\+30, beyond the plausible"),
        (
            {"trajectories": np.where(np.arange(4) == 3, np.inf, TRAJ)},
            r"non-finite .* rollout 0, object 3, step 0, channel h",
        ),
        ({"trajectories": TRAJ[:0]}, r"rollouts >= 1"),
        ({"object_ids": IDS.astype(np.float64)}, r"object_ids must be a 1-D integer array"),
        ({"scenario_id": np.array([1, 2])}, r"scenario_id must be one string"),
    ],
)
def test_bad_contents_are_named(tmp_path, change, pattern):
    path = _write(tmp_path, **change)
    with pytest.raises(RolloutFileError, match=pattern) as err:
        load_rollouts(path)
    assert str(err.value).startswith(str(path))


@pytest.mark.parametrize(
    "data, pattern",
    [
        (b"", r"empty file"),
        (b"PK\x03\x04 not really a zip", r"not a readable rollout .npz"),
        (b"\x93NUMPY junk" * 20, r"not a readable rollout .npz"),
    ],
)
def test_unreadable_files_are_named(tmp_path, data, pattern):
    path = tmp_path / "r.npz"
    path.write_bytes(data)
    with pytest.raises(RolloutFileError, match=rf"r.npz: {pattern}"):
        load_rollouts(path)


def test_submission_problem_names_what_submit_refuses(tmp_path):
    rollouts = load_rollouts(_write(tmp_path))
    assert submission_problem(rollouts) == "2 rollouts, the challenge needs exactly 32"
    assert submission_problem(rollouts, num_rollouts=2) is None
    repeated = load_rollouts(_write(tmp_path, object_ids=np.array([3, 3])))
    assert submission_problem(repeated, num_rollouts=2) == "repeated object ids"
