"""RoaD's trainers (token model and GMM ego policy) and CAT-K on the GMM's modes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli import run
from safetensors.torch import load_file

from closedloop.agents.gmm import GMMEgoModel
from closedloop.agents.smart import SmartModel
from closedloop.agents.tokens import default_vocabulary
from closedloop.data.batch import collate_scenarios
from closedloop.data.synthetic import generate_scenarios
from closedloop.trainers.checkpoint import CheckpointError, read_latest
from closedloop.trainers.data import collate_tokens, ego_examples, token_examples
from closedloop.trainers.ego import EgoCatK, EgoRoaD, ego_rollout
from closedloop.trainers.guided import guided_token_rollout
from closedloop.trainers.road import DemoSchedule, RoaDTokens, read_token_demos, write_token_demos


@pytest.fixture(scope="module")
def vocabulary():
    return default_vocabulary()


@pytest.fixture(scope="module")
def scenarios():
    return list(generate_scenarios(2, seed=3, agents=(4, 6)))


@pytest.fixture(scope="module")
def batch(vocabulary, scenarios):
    return collate_tokens(token_examples(scenarios, vocabulary))


def _road(vocabulary, tmp_path, **kw) -> RoaDTokens:
    return RoaDTokens(vocabulary, DemoSchedule(tmp_path, None, seed=0), **kw)


def test_road_executes_the_nearest_sample_and_learns_what_it_executed(vocabulary, batch, tmp_path):
    torch.manual_seed(0)
    model = SmartModel("micro", vocabulary=vocabulary.table())
    rollouts = {}
    for name, select in (("road", True), ("sampling", False)):
        objective = _road(vocabulary, tmp_path, k=32, select=select, recovery_distance=float("inf"))
        objective.generator = torch.Generator().manual_seed(1)
        rollouts[name] = guided_token_rollout(model, batch, vocabulary, objective.decide)
    road, plain = rollouts["road"], rollouts["sampling"]
    where = road.target_valid
    assert int(where.sum()) > 50
    assert torch.equal(road.targets[where], road.tokens[where])  # the rollout is the demonstration
    assert road.error[where].mean() < 0.5 * plain.error[plain.target_valid].mean()
    assert not road.stats["recovery"].any()  # recovery off (infinite distance)


def test_always_recovering_in_one_step_reproduces_the_tokenization(vocabulary, batch, tmp_path):
    """Recovery with a 1-step ramp replaces every guided sample by the log itself, executed
    as the nearest token: the log's own tokenization (what CAT-K with K = |V| executes)."""
    torch.manual_seed(0)
    model = SmartModel("micro", vocabulary=vocabulary.table())
    objective = _road(vocabulary, tmp_path, k=2, recovery_distance=-1.0, recovery_steps=1)
    objective.generator = torch.Generator().manual_seed(0)
    rollout = guided_token_rollout(model, batch, vocabulary, objective.decide)
    always = batch.log_valid.all(-1)[..., None] & rollout.target_valid
    assert int(always.sum()) > 100
    assert torch.equal(rollout.tokens[always], batch.tokens[always])
    assert bool(rollout.stats["recovery"][always].all())


def test_demonstrations_round_trip_and_refuse_other_data(vocabulary, scenarios, tmp_path):
    torch.manual_seed(0)
    model = SmartModel("micro", vocabulary=vocabulary.table())
    logs = token_examples(scenarios, vocabulary)
    objective = _road(vocabulary, tmp_path, k=4, collect_batch=1)
    demos, stats = objective.collect(model, logs, torch.Generator().manual_seed(0))
    assert set(stats) == {"rollout_error_m", "recovery_fraction"}
    path = tmp_path / "demos.safetensors"
    write_token_demos(path, demos, stats)
    back = read_token_demos(path, logs)
    for a, b in zip(demos, back):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.target_valid, b.target_valid)
        assert torch.equal(a.poses, b.poses)
    with pytest.raises(CheckpointError, match="other scenarios"):
        read_token_demos(path, logs[::-1])
    # Same generator, same demonstrations (collection does not touch the global RNG).
    again, _ = objective.collect(model, logs, torch.Generator().manual_seed(0))
    assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(demos, again))


def test_demo_schedule_refreshes_every_e_epochs_or_once():
    refreshed, once = DemoSchedule("x", 2, 0), DemoSchedule("x", None, 0)
    assert [refreshed.collection_epoch(e) for e in range(5)] == [0, 0, 2, 2, 4]
    assert [once.collection_epoch(e) for e in range(5)] == [0, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="refresh"):
        DemoSchedule("x", 0, 0)


def test_ego_catk_executes_the_nearest_mode_and_targets_the_log_from_where_it_is(scenarios):
    torch.manual_seed(0)
    model = GMMEgoModel()
    batch = collate_scenarios(scenarios)
    samples, distance = ego_rollout(model, batch, EgoCatK(k=16).decide)
    _, top1 = ego_rollout(model, batch, EgoCatK(k=1).decide)
    assert len(samples) == len(ego_examples(scenarios, model))  # the same guided chunks as BC
    assert distance.mean() < top1.mean()  # 16 modes to choose from beat the heaviest alone
    # A target is the trajectory action that lands on the log: on the log's first chunk
    # (where the rollout starts from the logged pose) it is BC's target.
    bc = ego_examples(scenarios, model)
    # Time-major: rows 0 and 1 are the two scenarios' chunks at t = 10, where both start on the log.
    assert torch.allclose(samples.target[:2], bc.target[:2], atol=1e-4)


def test_ego_rollouts_learn_where_bc_does_when_the_sdc_log_has_a_gap(scenarios, tmp_path):
    import copy

    gapped = copy.deepcopy(scenarios)
    gapped[0].track_valid[gapped[0].sdc_track_index, 20] = False
    model = GMMEgoModel()
    objective = EgoRoaD(DemoSchedule(tmp_path, None, 0), k=4)
    logs = objective.examples(gapped, model)
    demos, _ = objective.collect(model, torch.Generator().manual_seed(0))
    assert len(demos) == len(logs) < len(ego_examples(scenarios, model))  # the gap removes samples from both


def test_token_bc_learns_only_the_target_valid_tokens(vocabulary, batch):
    import dataclasses

    from closedloop.trainers.objectives import TokenBC

    model = SmartModel("micro", vocabulary=vocabulary.table())
    where = torch.zeros_like(batch.valid)
    where.view(-1)[batch.valid.view(-1).nonzero()[0]] = True  # one valid token
    where[0, 0, 0] |= not bool(batch.valid[0, 0, 0])  # and one that is not valid: never learned
    loss = TokenBC(vocabulary).loss(model, dataclasses.replace(batch, target_valid=where))
    assert float(loss.count) == 1.0


def test_ego_road_demonstrations_are_the_executed_chunks(scenarios, tmp_path):
    torch.manual_seed(0)
    model = GMMEgoModel()
    objective = EgoRoaD(DemoSchedule(tmp_path, None, 0), k=32, recovery_distance=float("inf"))
    objective.examples(scenarios, model)
    objective.generator = torch.Generator().manual_seed(0)
    samples, distance = ego_rollout(model, collate_scenarios(scenarios), objective.decide)
    plain = EgoRoaD(DemoSchedule(tmp_path, None, 0), k=32, select=False)
    plain.generator = torch.Generator().manual_seed(0)
    _, plain_distance = ego_rollout(model, collate_scenarios(scenarios), plain.decide)
    assert distance.mean() < plain_distance.mean()
    demos, _ = objective.collect(model, torch.Generator().manual_seed(0))
    assert len(demos) == len(ego_examples(scenarios, model))


def _train(*args):
    run("train", *map(str, args), "--quiet")


def test_train_road_refreshed_resumes_bit_for_bit(tmp_path):
    """5 steps straight = 3 steps, then --resume from the step-3 checkpoint; the resumed run
    reuses the demonstrations on disk and recollects the later ones identically."""
    from closedloop.data import write_scenarios
    from closedloop.trainers.loop import TrainConfig, train

    data = tmp_path / "train.tfrecord"
    write_scenarios(data, list(generate_scenarios(4, seed=4, agents=(4, 6))))
    common = dict(data=[str(data)], batch_size=2, warmup_steps=1, quiet=True, log_every=1)
    bc = train(TrainConfig(out=str(tmp_path / "bc"), steps=1, **common))
    road = dict(objective="road", init=str(bc), k=8, refresh_every=1, steps=5, checkpoint_every=3, keep_checkpoints=5)
    run_dir = train(TrainConfig(out=str(tmp_path / "road"), **road, **common))
    straight = load_file(str(read_latest(run_dir)["weights"]))
    demos = run_dir / "demos"
    # 4 scenarios in batches of 2: epochs 0, 1, 2 by step 5, each collected once.
    assert sorted(p.name for p in demos.iterdir()) == [f"epoch_000{e}_rank0.safetensors" for e in range(3)]
    last = load_file(str(demos / "epoch_0002_rank0.safetensors"))
    for name in ("step_00000005.safetensors", "step_00000005.train.safetensors"):
        (run_dir / "checkpoints" / name).unlink()
    (demos / "epoch_0002_rank0.safetensors").unlink()  # collected after step 4: must come back the same
    train(
        TrainConfig(out=str(run_dir), **road, **common),
        resume=str(run_dir / "checkpoints" / "step_00000003.safetensors"),
    )
    resumed = load_file(str(read_latest(run_dir)["weights"]))
    assert read_latest(run_dir)["step"] == 5
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)
    again = load_file(str(demos / "epoch_0002_rank0.safetensors"))
    assert all(torch.equal(last[name], again[name]) for name in last)


@pytest.mark.slow
def test_train_road_command_line(tmp_path):
    data = tmp_path / "data"
    run("generate", "--out", data, "--num-scenarios", 2, "--seed", 4, "--agents", "4:6", "--quiet")
    bc = tmp_path / "bc"
    _train("bc", "--data", data, "--out", bc, "--steps", 1, "--batch-size", 2)
    out = tmp_path / "road"
    road = ["--k", 8, "--batch-size", 2, "--steps", 2, "--refresh-every", 1, "--guidance", "sampling"]
    _train(
        "road", "--init", bc, "--data", data, "--out", out, *road, "--recovery-distance", 2.5, "--recovery-steps", 10
    )
    config = json.loads((out / "config.json").read_text())["args"]
    assert (config["objective"], config["k"], config["refresh_every"], config["sample_temperature"]) == (
        "road",
        8,
        1,
        0.8,
    )
    assert (config["guidance"], config["recovery_distance"], config["recovery_steps"]) == ("sampling", 2.5, 10)
    # A fresh run into the same directory collects its own demonstrations (a stale file is cleared, not read).
    (out / "demos" / "epoch_0000_rank0.safetensors").write_bytes(b"an earlier run's demonstrations")
    _train("road", "--init", bc, "--data", data, "--out", out, "--k", 4, "--batch-size", 2, "--steps", 1)
    frozen = ["--freeze-encoder", "--steps", 1, "--batch-size", 2, "--k", 4]
    assert run("train", "road", "--init", bc, "--data", data, "--out", tmp_path / "y", *frozen).returncode == 0
    proc = run("train", "road", "--data", data, "--out", tmp_path / "x", check=False)
    assert proc.returncode == 2 and "--init" in proc.stderr
    proc = run("train", "road", "--init", bc, "--data", data, "--out", tmp_path / "x", "--one-off",
               "--refresh-every", 2, check=False)  # fmt: skip
    assert proc.returncode == 2 and "not allowed" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["road", "catk"])
def test_gmm_ego_fine_tuning_runs_resumes_and_rolls_out(tmp_path, objective):
    data = tmp_path / "data"
    run("generate", "--out", data, "--num-scenarios", 2, "--seed", 4, "--agents", "4:6", "--quiet")
    bc = tmp_path / "bc"
    _train("bc", "--model", "gmm-ego", "--data", data, "--out", bc, "--steps", 2)
    flags = ["--k", 4, "--batch-size", 2 if objective == "catk" else 8, "--checkpoint-every", 1]
    out = tmp_path / objective
    _train(objective, "--init", bc, "--model", "gmm-ego", "--data", data, "--out", out, "--steps", 2, *flags)
    _train(objective, "--resume", out, "--steps", 3)
    assert read_latest(out)["step"] == 3
    start, end = load_file(str(read_latest(bc)["weights"])), load_file(str(read_latest(out)["weights"]))
    assert any(not torch.equal(start[name], end[name]) for name in start)
    if objective == "road":
        assert (out / "demos" / "epoch_0000_rank0.safetensors").is_file()
        proc = run(
            "train", "road", "--init", bc, "--data", data, "--out", tmp_path / "x", "--freeze-encoder", check=False
        )
        assert proc.returncode == 2 and "gmm-ego" in proc.stderr
    proc = run("evaluate", "--policy", f"ckpt:{out}", "--data", data, "--num-rollouts", 2, "--json", "--quiet")
    row = json.loads(proc.stdout.splitlines()[-1])
    assert 0 <= row["sdc_collision_rate"] <= 1 and 0 <= row["sdc_offroad_rate"] <= 1


def test_damaged_demonstrations_name_the_file(tmp_path):
    path = Path(tmp_path) / "demos" / "epoch_0000_rank0.safetensors"
    path.parent.mkdir()
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=str(path)):
        read_token_demos(path, [])
