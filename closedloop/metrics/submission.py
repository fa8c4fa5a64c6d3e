"""Pack rollouts as a Waymo Open Sim Agents Challenge submission.

The challenge takes a ``.tar.gz`` of binary ``SimAgentsChallengeSubmission`` protos
(``submission.binproto-00000-of-0000N``), each holding some scenarios' ``ScenarioRollouts``
(32 ``JointScene`` s of 80-step trajectories for every object valid at step 10). Each
scenario is checked by the reference validator's rules before it is written.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from waymo_open_dataset.protos import sim_agents_submission_pb2 as pb

from closedloop._atomic import atomic_write
from closedloop.constants import SIM_STEPS
from closedloop.data.scenario import Scenario
from closedloop.metrics.rollouts import Rollouts

NUM_ROLLOUTS = 32


class SubmissionError(ValueError):
    """Rollouts that the challenge would reject."""


def scenario_rollouts(rollouts: Rollouts) -> pb.ScenarioRollouts:
    """The ``ScenarioRollouts`` proto of one scenario's rollouts."""
    traj = rollouts.trajectories
    scenes = []
    for r in range(traj.shape[0]):
        scenes.append(
            pb.JointScene(
                simulated_trajectories=[
                    pb.SimulatedTrajectory(
                        center_x=traj[r, a, :, 0],
                        center_y=traj[r, a, :, 1],
                        center_z=traj[r, a, :, 2],
                        heading=traj[r, a, :, 3],
                        object_id=int(object_id),
                    )
                    for a, object_id in enumerate(rollouts.object_ids)
                ]
            )
        )
    return pb.ScenarioRollouts(scenario_id=rollouts.scenario_id, joint_scenes=scenes)


def submission_problem(rollouts: Rollouts, num_rollouts: int = NUM_ROLLOUTS) -> str | None:
    """Why :func:`write_submission` would refuse these rollouts for their shape alone, or None.

    The array-level form of :func:`validate`'s rollout count and repeated-id rules (the
    objects themselves are checked against the scenario by whoever holds it), cheap enough
    for ``closedloop metrics`` to run on every file and warn about debug-sized runs.
    """
    if rollouts.trajectories.shape[0] != num_rollouts:
        return f"{rollouts.trajectories.shape[0]} rollouts, the challenge needs exactly {num_rollouts}"
    if len(np.unique(rollouts.object_ids)) != len(rollouts.object_ids):
        return "repeated object ids"
    return None


def validate(proto: pb.ScenarioRollouts, scenario: Scenario | None = None, num_rollouts: int = NUM_ROLLOUTS) -> None:
    """The reference validator's checks: a scenario id, ``num_rollouts`` joint scenes,
    80 steps for x, y, z and heading, and (given the scenario) exactly the objects valid
    at the current step. Raises :class:`SubmissionError` naming the scenario."""
    sid = proto.scenario_id
    if not proto.HasField("scenario_id") or not sid:
        raise SubmissionError("scenario rollouts without a scenario_id")
    if len(proto.joint_scenes) != num_rollouts:
        raise SubmissionError(
            f"scenario {sid}: {len(proto.joint_scenes)} rollouts, the challenge needs exactly {num_rollouts}"
        )
    expected = None
    if scenario is not None:
        if scenario.scenario_id != sid:
            raise SubmissionError(f"rollouts for {sid} checked against scenario {scenario.scenario_id}")
        expected = set(scenario.track_id[scenario.valid_at_current()].tolist())
    for k, scene in enumerate(proto.joint_scenes):
        ids = []
        for trajectory in scene.simulated_trajectories:
            for field in ("center_x", "center_y", "center_z", "heading"):
                n = len(getattr(trajectory, field))
                if n != SIM_STEPS:
                    raise SubmissionError(
                        f"scenario {sid}: rollout {k}: object {trajectory.object_id} "
                        f"has {n} {field} values, expected {SIM_STEPS}"
                    )
            ids.append(trajectory.object_id)
        if len(set(ids)) != len(ids):
            raise SubmissionError(f"scenario {sid}: rollout {k}: repeated object ids")
        if expected is not None:
            extra, missing = set(ids) - expected, expected - set(ids)
            if extra:
                raise SubmissionError(f"scenario {sid}: rollout {k}: objects {sorted(extra)[:10]} are not sim agents")
            if missing:
                raise SubmissionError(f"scenario {sid}: rollout {k}: sim agents {sorted(missing)[:10]} are missing")


def write_submission(
    rollouts: Iterable[Rollouts],
    out: str | os.PathLike,
    *,
    method_name: str,
    authors: list[str],
    account: str,
    affiliation: str = "",
    description: str = "",
    method_link: str = "",
    num_model_parameters: str = "",
    scenarios: Mapping[str, Scenario] | None = None,
    scenarios_per_shard: int = 1000,
) -> dict:
    """Validate and pack rollouts into ``out`` (``.tar.gz``), written atomically.

    Returns a summary: number of scenarios and shard names.
    """
    if not method_name or not account:
        raise SubmissionError("a submission needs --method-name and --account")
    header = pb.SimAgentsChallengeSubmission(
        submission_type=pb.SimAgentsChallengeSubmission.SIM_AGENTS_SUBMISSION,
        account_name=account,
        unique_method_name=method_name,
        authors=authors,
        affiliation=affiliation,
        description=description,
        method_link=method_link,
        num_model_parameters=num_model_parameters,
        acknowledge_complies_with_closed_loop_requirement=True,
    ).SerializeToString()
    shards: list[bytes] = []
    current = io.BytesIO()
    count, seen = 0, set()
    for item in rollouts:
        if item.scenario_id in seen:
            raise SubmissionError(f"{item.path}: scenario {item.scenario_id} appears twice")
        seen.add(item.scenario_id)
        if not np.isfinite(item.trajectories).all():
            raise SubmissionError(f"{item.path}: scenario {item.scenario_id}: non-finite trajectory values")
        scenario = None
        if scenarios is not None:
            if item.scenario_id not in scenarios:
                raise SubmissionError(f"{item.path}: scenario {item.scenario_id} is not in --data")
            scenario = scenarios[item.scenario_id]
        proto = scenario_rollouts(item)
        try:
            validate(proto, scenario)
        except SubmissionError as err:
            raise SubmissionError(f"{item.path}: {err}") from None
        if current.tell() == 0:
            current.write(header)
        # Serialized messages concatenate into one message with the repeated field appended.
        current.write(pb.SimAgentsChallengeSubmission(scenario_rollouts=[proto]).SerializeToString())
        count += 1
        if count % scenarios_per_shard == 0:
            shards.append(current.getvalue())
            current = io.BytesIO()
    if current.tell():
        shards.append(current.getvalue())
    if not shards:
        raise SubmissionError("no rollouts to submit")
    names = [f"submission.binproto-{i:05d}-of-{len(shards):05d}" for i in range(len(shards))]
    with atomic_write(Path(out)) as handle:
        with tarfile.open(fileobj=handle, mode="w:gz") as tar:
            for name, data in zip(names, shards):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return {"scenarios": count, "shards": names}


def read_submission(path: str | os.PathLike) -> list[pb.SimAgentsChallengeSubmission]:
    """The shards of a submission archive, parsed (for checks and tests)."""
    out = []
    with tarfile.open(path, "r:gz") as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            out.append(pb.SimAgentsChallengeSubmission.FromString(tar.extractfile(member).read()))
    return out
