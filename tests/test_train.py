"""The trainers: loss, schedule, the loop, checkpoints and resume, DDP, and `closedloop train`."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cli import run

from closedloop.trainers import TrainConfig, learning_rate, train
from closedloop.trainers.checkpoint import CheckpointError, read_latest
from closedloop.trainers.objectives import smoothed_cross_entropy


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    from closedloop.data import write_scenarios
    from closedloop.data.synthetic import generate_scenarios

    root = tmp_path_factory.mktemp("train_data")
    write_scenarios(root / "train.tfrecord", list(generate_scenarios(4, seed=21, agents=(6, 10))))
    write_scenarios(root / "heldout.tfrecord", list(generate_scenarios(2, seed=1021, agents=(6, 10))))
    return root


def _config(data, out, **kw) -> TrainConfig:
    values = dict(data=[str(data)], out=str(out), steps=4, batch_size=2, warmup_steps=1, quiet=True, log_every=1)
    values.update(kw)
    return TrainConfig(**values)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(read_latest(run_dir)["weights"]))


# ---- the loss and the schedule


def test_smoothed_cross_entropy_matches_an_independent_computation():
    torch.manual_seed(0)
    logits = torch.randn(5, 7)
    allowed = torch.ones(5, 7, dtype=torch.bool)
    allowed[:, 5:] = False  # a kind vocabulary of 5 tokens in a head of 7
    target = torch.tensor([0, 4, 2, 1, 3])
    # Without smoothing: plain cross-entropy over the 5 real tokens.
    plain = smoothed_cross_entropy(logits, target, allowed, 0.0)
    assert torch.allclose(plain, F.cross_entropy(logits[:, :5], target, reduction="none"))
    # With smoothing: torch's label smoothing over exactly the 5 real tokens.
    smooth = smoothed_cross_entropy(logits, target, allowed, 0.1)
    expected = F.cross_entropy(logits[:, :5], target, reduction="none", label_smoothing=0.1)
    assert torch.allclose(smooth, expected, atol=1e-6)
    # By hand for one row: 0.9 * nll + 0.1 * mean over the allowed of -log p.
    log_p = torch.log_softmax(logits[0, :5], -1)
    assert math.isclose(float(smooth[0]), float(0.9 * -log_p[0] + 0.1 * -log_p.mean()), rel_tol=1e-5)


def test_learning_rate_warms_up_then_decays_to_the_floor():
    config = TrainConfig(data=["x"], out="y", steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert learning_rate(config, 0) == pytest.approx(1e-4)
    assert learning_rate(config, 9) == pytest.approx(1e-3)
    assert learning_rate(config, 55) == pytest.approx(1e-4 + 0.9e-3 * 0.5, rel=1e-6)  # half way down the cosine
    assert learning_rate(config, 100) == pytest.approx(1e-4)


# ---- the loop


def test_resume_continues_bit_for_bit(synthetic, tmp_path):
    """4 steps straight = 2 steps, then --resume from the step-2 checkpoint, then 2 more."""
    data = synthetic / "train.tfrecord"
    run_dir = tmp_path / "run"
    train(_config(data, run_dir, checkpoint_every=2, keep_checkpoints=5))
    straight = _weights(run_dir)
    (run_dir / "checkpoints" / "step_00000004.safetensors").unlink()
    train(_config(data, run_dir, checkpoint_every=2), resume=str(run_dir / "checkpoints" / "step_00000002.safetensors"))
    resumed = _weights(run_dir)
    assert read_latest(run_dir)["step"] == 4
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)
    # ...and the run moved: the weights are not those at step 2.
    from safetensors.torch import load_file

    early = load_file(str(run_dir / "checkpoints" / "step_00000002.safetensors"))
    assert not all(torch.equal(early[name], resumed[name]) for name in early if early[name].is_floating_point())


def test_time_budget_stops_cleanly_with_a_checkpoint(synthetic, tmp_path):
    run_dir = train(_config(synthetic / "train.tfrecord", tmp_path / "run", steps=10_000, time_budget=0.002))
    latest = read_latest(run_dir)
    assert 1 <= latest["step"] < 10_000
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == latest["step"]


@pytest.mark.slow
def test_real_womd_scenarios_overfit(scenario_file, large_scenario_file, tmp_path):
    """The command line that trains on synthetic data trains on the real files: the loss falls."""
    run_dir = tmp_path / "real"
    config = TrainConfig(
        data=[str(scenario_file), str(large_scenario_file)],
        out=str(run_dir),
        steps=20,
        batch_size=2,
        lr=3e-3,
        warmup_steps=2,
        log_every=4,
        quiet=True,
    )
    train(config)
    losses = [loss for _, loss in json.loads((run_dir / "summary.json").read_text())["loss"]]
    assert len(losses) == 5
    assert losses[-1] < 0.7 * losses[0], losses


def test_trains_the_same_from_a_prepare_cache(synthetic, tmp_path):
    """TFRecords and their `closedloop prepare` cache give the same examples, so the same run."""
    cache = tmp_path / "cache"
    run("prepare", "--data", synthetic / "train.tfrecord", "--out", cache)
    from_records = train(_config(synthetic / "train.tfrecord", tmp_path / "records", steps=2))
    from_cache = train(_config(cache, tmp_path / "cached", steps=2))
    first, second = _weights(from_records), _weights(from_cache)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_init_starts_from_the_weights_with_a_fresh_optimizer(synthetic, tmp_path):
    data = synthetic / "train.tfrecord"
    first = train(_config(data, tmp_path / "bc", steps=2))
    second = train(_config(data, tmp_path / "continued", steps=1, init=str(first), lr=1e-12))
    before, after = _weights(first), _weights(second)
    # One step at a vanishing learning rate: (almost) the initial weights, not a fresh model.
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)
    assert read_latest(second)["step"] == 1
    config = json.loads((second / "config.json").read_text())
    assert config["args"]["init"] == str(first) and config["model_name"] == "micro"


def test_gmm_ego_bc_trains_and_rolls_out(synthetic, tmp_path):
    run_dir = train(_config(synthetic / "train.tfrecord", tmp_path / "gmm", model="gmm-ego", batch_size=16, steps=3))
    config = json.loads((run_dir / "config.json").read_text())
    assert config["architecture"]["kind"] == "gmm-ego"
    out = tmp_path / "rollouts"
    run(
        "rollout",
        "--data",
        synthetic / "heldout.tfrecord",
        "--policy",
        f"ckpt:{run_dir}",
        "--num-rollouts",
        2,
        "--out",
        out,
        "--quiet",
    )
    assert len(list(out.glob("*.npz"))) == 2


# ---- checkpoints as files


@pytest.mark.slow
def test_damaged_checkpoints_give_errors_naming_the_file(synthetic, tmp_path):
    run_dir = train(_config(synthetic / "train.tfrecord", tmp_path / "run", steps=1))
    weights = read_latest(run_dir)["weights"]
    heldout = synthetic / "heldout.tfrecord"

    def rollout_error(spec: str) -> str:
        proc = run(
            "rollout", "--data", heldout, "--policy", spec, "--num-rollouts", 1, "--out", tmp_path / "o", check=False
        )
        assert proc.returncode == 2, proc.stderr
        return proc.stderr

    # Truncated weights.
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert str(weights) in rollout_error(f"ckpt:{run_dir}")
    # A foreign file in its place (a vocabulary is safetensors too).
    from closedloop.agents.tokens import default_vocabulary

    default_vocabulary().save(weights)
    assert str(weights) in rollout_error(f"ckpt:{run_dir}")
    # Missing weights, then a missing pointer.
    weights.unlink()
    assert str(weights) in rollout_error(f"ckpt:{run_dir}")
    (run_dir / "latest.json").unlink()
    assert "latest.json" in rollout_error(f"ckpt:{run_dir}")
    with pytest.raises(CheckpointError, match="latest.json"):
        read_latest(run_dir)
    # Resuming a run whose train state is truncated.
    other = train(_config(synthetic / "train.tfrecord", tmp_path / "other", steps=1))
    state = read_latest(other)["train_state"]
    state.write_bytes(state.read_bytes()[:100])
    proc = run("train", "bc", "--resume", other, "--steps", 2, "--quiet", check=False)
    assert proc.returncode == 2 and str(state) in proc.stderr


# ---- the command line


@pytest.mark.slow
def test_train_bc_command_then_rollout_and_evaluate_the_checkpoint(synthetic, tmp_path):
    run_dir = tmp_path / "cli_run"
    proc = run(
        "train",
        "bc",
        "--data",
        synthetic / "train.tfrecord",
        "--model",
        "micro",
        "--out",
        run_dir,
        "--steps",
        3,
        "--batch-size",
        2,
        "--seed",
        1,
        "--eval-data",
        synthetic / "heldout.tfrecord",
        "--eval-scenarios",
        1,
        "--eval-rollouts",
        2,
    )
    assert f"ckpt:{run_dir}" in proc.stdout
    config = json.loads((run_dir / "config.json").read_text())
    assert config["command"][:3] == ["closedloop", "train", "bc"] and config["architecture"]["hidden"] == 32
    assert config["vocabulary"]["path"] == "default"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 3 and 0 <= summary["eval"]["metametric"] <= 1
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    out = tmp_path / "rollouts"
    run(
        "rollout",
        "--data",
        synthetic / "heldout.tfrecord",
        "--policy",
        f"ckpt:{run_dir}",
        "--num-rollouts",
        2,
        "--top-k",
        5,
        "--temperature",
        0.5,
        "--out",
        out,
        "--quiet",
    )
    assert len(list(out.glob("*.npz"))) == 2
    weights = read_latest(run_dir)["weights"]
    rel = weights.relative_to(run_dir)
    proc = run(
        "evaluate",
        "--policy",
        f"ckpt:{run_dir}/{rel}",
        "--data",
        synthetic / "heldout.tfrecord",
        "--num-rollouts",
        2,
        "--json",
        "--quiet",
    )
    total = json.loads(proc.stdout.strip().splitlines()[-1])
    assert total["scenario_id"] == "ALL" and 0 <= total["collision_rate"] <= 1
    # Resume extends the run to more steps with the saved settings.
    run("train", "bc", "--resume", run_dir, "--steps", 4, "--quiet")
    assert read_latest(run_dir)["step"] == 4
    assert [step for step, _ in json.loads((run_dir / "summary.json").read_text())["loss"]] == [3, 4]


def test_train_bc_refuses_bad_arguments(synthetic, tmp_path):
    proc = run("train", "bc", "--data", synthetic / "train.tfrecord", check=False)
    assert proc.returncode == 2 and "--out" in proc.stderr
    proc = run("train", "bc", "--data", tmp_path / "nothing", "--out", tmp_path / "r", check=False)
    assert proc.returncode == 2 and "nothing" in proc.stderr
    proc = run("train", "bc", "--resume", tmp_path / "no_run", check=False)
    assert proc.returncode == 2 and "no_run" in proc.stderr
    proc = run(
        "train", "bc", "--data", synthetic / "train.tfrecord", "--out", tmp_path / "r", "--model", "huge", check=False
    )
    assert proc.returncode == 2 and "huge" in proc.stderr


# ---- distributed


def _ddp_worker(rank: int, world: int, init_file: str, data: str, out: str) -> None:
    """One rank: its half of a global batch of 4 scenarios through DDP; saves its gradient."""
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.nn.parallel import DistributedDataParallel

    from closedloop.agents.smart import SmartModel
    from closedloop.agents.tokens import default_vocabulary
    from closedloop.trainers.data import collate_tokens, load_scenarios, token_examples
    from closedloop.trainers.distributed import Distributed
    from closedloop.trainers.loop import forward_backward
    from closedloop.trainers.objectives import TokenBC

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    vocabulary = default_vocabulary()
    torch.manual_seed(0)
    model = SmartModel("micro", vocabulary=vocabulary.table()).eval()  # eval: no dropout, so ranks compare
    examples = token_examples(load_scenarios(data, rank, world), vocabulary)
    net = DistributedDataParallel(model)
    forward_backward(net, TokenBC(vocabulary), collate_tokens(examples), Distributed(rank, world, torch.device("cpu")))
    if rank == 0:
        save_file({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, out)
    dist.destroy_process_group()


def test_ddp_gradients_equal_one_process_over_the_global_batch(synthetic, tmp_path):
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    from closedloop.agents.smart import SmartModel
    from closedloop.agents.tokens import default_vocabulary
    from closedloop.trainers.data import collate_tokens, load_scenarios, token_examples
    from closedloop.trainers.distributed import Distributed
    from closedloop.trainers.loop import forward_backward
    from closedloop.trainers.objectives import TokenBC

    data, out = str(synthetic / "train.tfrecord"), tmp_path / "grad.safetensors"
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), data, str(out)), nprocs=2, start_method="spawn")
    vocabulary = default_vocabulary()
    torch.manual_seed(0)
    model = SmartModel("micro", vocabulary=vocabulary.table()).eval()
    examples = token_examples(load_scenarios(data), vocabulary)
    # The ranks split the records round-robin; the global batch is all of them.
    counts = [e.num_tokens for e in examples]
    assert counts[0] != counts[1] or counts[2] != counts[3]  # unequal shares: the normalisation matters
    forward_backward(model, TokenBC(vocabulary), collate_tokens(examples), Distributed(0, 1, torch.device("cpu")))
    distributed = load_file(str(out))
    single = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert distributed.keys() == single.keys()
    for name, grad in single.items():
        assert torch.allclose(distributed[name], grad, rtol=1e-4, atol=1e-7), name


def _free_port() -> int:
    """A TCP port nobody listens on now (torchrun's own pick can race with other runs)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_torchrun_trains_with_gloo_on_two_processes(synthetic, tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun is not installed next to this python")
    run_dir = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            torchrun,
            "--nnodes",
            "1",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(_free_port()),
            "--nproc-per-node",
            "2",
            "-m",
            "closedloop.cli",
            "train",
            "bc",
            "--data",
            str(synthetic / "train.tfrecord"),
            "--out",
            str(run_dir),
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    latest = read_latest(run_dir)
    assert latest["step"] == 2
    state = json.loads((run_dir / "config.json").read_text())
    assert state["args"]["batch_size"] == 4


def test_a_nan_loss_stops_before_the_weights_change():
    from closedloop.trainers.objectives import StepLoss, check_finite

    check_finite(StepLoss(torch.tensor(1.5), torch.tensor(3.0)), step=7)
    with pytest.raises(FloatingPointError, match="step 7.*--lr"):
        check_finite(StepLoss(torch.tensor(float("nan")), torch.tensor(3.0)), step=7)
