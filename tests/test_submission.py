"""Submission packing and the reference validator's rules."""

import numpy as np
import pytest

from closedloop.agents.open_loop import constant_velocity
from closedloop.metrics.rollouts import Rollouts
from closedloop.metrics.submission import (
    SubmissionError,
    read_submission,
    scenario_rollouts,
    validate,
    write_submission,
)


def _rollouts(scenario, count=32):
    ids, traj = constant_velocity(scenario, count)
    return Rollouts(scenario.scenario_id, ids, traj, "r.npz")


def test_valid_rollouts_pass_and_pack(tmp_path, real_scenarios):
    scenario = real_scenarios["637f20cafde22ff8"]
    validate(scenario_rollouts(_rollouts(scenario)), scenario)
    out = tmp_path / "s.tar.gz"
    result = write_submission(
        [_rollouts(scenario)],
        out,
        method_name="m",
        authors=["a"],
        account="a@b.c",
        scenarios={scenario.scenario_id: scenario},
    )
    assert result == {"scenarios": 1, "shards": ["submission.binproto-00000-of-00001"]}
    (shard,) = read_submission(out)
    assert shard.scenario_rollouts[0].joint_scenes[5].simulated_trajectories[0].center_x[0] == pytest.approx(
        float(_rollouts(scenario).trajectories[5, 0, 0, 0])
    )


def test_validator_rules(real_scenarios):
    scenario = real_scenarios["637f20cafde22ff8"]
    good = _rollouts(scenario)
    missing = scenario_rollouts(Rollouts(good.scenario_id, good.object_ids[1:], good.trajectories[:, 1:]))
    with pytest.raises(SubmissionError, match=rf"sim agents \[{good.object_ids[0]}\] are missing"):
        validate(missing, scenario)
    extra = scenario_rollouts(
        Rollouts(
            good.scenario_id,
            np.append(good.object_ids, 77777),
            np.concatenate([good.trajectories, good.trajectories[:, :1]], 1),
        )
    )
    with pytest.raises(SubmissionError, match=r"objects \[77777\] are not sim agents"):
        validate(extra, scenario)
    short = scenario_rollouts(good)
    del short.joint_scenes[3].simulated_trajectories[2].center_y[-1]
    with pytest.raises(SubmissionError, match="rollout 3: object .* has 79 center_y values"):
        validate(short, scenario)
    with pytest.raises(SubmissionError, match="1 rollouts, the challenge needs exactly 32"):
        validate(scenario_rollouts(_rollouts(scenario, 1)), scenario)


def test_writer_refuses_duplicates_nan_and_missing_fields(tmp_path, real_scenarios):
    scenario = real_scenarios["637f20cafde22ff8"]
    kwargs = dict(method_name="m", authors=["a"], account="a@b.c")
    with pytest.raises(SubmissionError, match="appears twice"):
        write_submission([_rollouts(scenario), _rollouts(scenario)], tmp_path / "a.tar.gz", **kwargs)
    bad = _rollouts(scenario)
    bad.trajectories[0, 0, 0, 0] = np.nan
    with pytest.raises(SubmissionError, match="non-finite"):
        write_submission([bad], tmp_path / "b.tar.gz", **kwargs)
    with pytest.raises(SubmissionError, match="--method-name and --account"):
        write_submission([_rollouts(scenario)], tmp_path / "c.tar.gz", method_name="", authors=[], account="")
    assert not list(tmp_path.glob("*.tar.gz"))
