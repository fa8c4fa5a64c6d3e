"""REINFORCE: returns by hand, the gradient's direction, the rollout's log-probabilities and
rewards, and `closedloop train reinforce` end to end (with an exact resume)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from cli import run

from closedloop.agents.smart import SmartModel
from closedloop.agents.tokens import default_vocabulary
from closedloop.data.batch import collate_scenarios
from closedloop.data.synthetic import generate_scenarios
from closedloop.envs.rewards import RewardConfig
from closedloop.trainers.checkpoint import read_latest
from closedloop.trainers.reinforce import Reinforce, discounted_returns, normalise_returns, sample_rollout


@pytest.fixture(scope="module")
def vocabulary():
    return default_vocabulary()


@pytest.fixture(scope="module")
def model(vocabulary):
    torch.manual_seed(0)
    return SmartModel("micro", vocabulary=vocabulary.table())


@pytest.fixture(scope="module")
def batch():
    return collate_scenarios(list(generate_scenarios(2, seed=3, agents=(4, 6))))


def test_discounted_and_normalised_returns_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.0, -1.0, 0.0]])
    returns = discounted_returns(rewards, 0.5)
    # R_2 = r_2; R_1 = r_1 + 0.5 R_2; R_0 = r_0 + 0.5 R_1
    assert torch.allclose(returns, torch.tensor([[1.5, 1.0, 2.0], [-0.5, -1.0, 0.0]]))
    mask = torch.tensor([[True, True, True], [True, True, False]])  # the last element is not an agent's
    normalised = normalise_returns(returns, mask)
    kept = torch.tensor([1.5, 1.0, 2.0, -0.5, -1.0])
    expected = (kept - kept.mean()) / kept.std(unbiased=False)
    assert torch.allclose(normalised[mask], expected, atol=1e-6)
    assert normalised[1, 2] == 0
    assert torch.allclose(discounted_returns(rewards, 0.0), rewards)


def test_reinforce_moves_a_two_action_policy_toward_the_rewarded_action():
    """The loss of the trainer's return processing on a bandit: action 0 pays 1, action 1
    pays 0; one gradient step must make action 0 more likely."""
    logits = torch.zeros(2, requires_grad=True)
    generator = torch.Generator().manual_seed(0)
    actions = torch.multinomial(torch.softmax(logits.detach(), 0), 64, replacement=True, generator=generator)
    rewards = (actions == 0).float()[:, None]  # [64 episodes, 1 decision]
    advantage = normalise_returns(discounted_returns(rewards, 0.95), torch.ones_like(rewards, dtype=torch.bool))
    loss = -(torch.log_softmax(logits, 0)[actions] * advantage[:, 0]).mean()
    loss.backward()
    assert logits.grad[0] < 0 < logits.grad[1]  # descent raises logit 0, lowers logit 1
    with torch.no_grad():
        stepped = logits - 0.5 * logits.grad
    assert torch.softmax(stepped, 0)[0] > 0.5


def test_teacher_forced_log_probs_are_the_sampled_ones(vocabulary, model, batch):
    torch.manual_seed(1)
    objective = Reinforce(vocabulary, RewardConfig())
    rollout = sample_rollout(model, vocabulary, batch, objective.reward)
    D = rollout.rewards.shape[2]
    assert D == 16 and rollout.tokens.shape[2] == 18 and rollout.poses.shape[2] == 18
    assert rollout.steps.tolist() == list(range(0, 90, 5))
    with torch.no_grad():
        log_probs = objective.log_probs(model.eval(), rollout, batch)
    chosen = log_probs.gather(-1, rollout.tokens[:, :, -D:, None]).squeeze(-1)
    where = rollout.controlled[:, :, None].expand(-1, -1, D)
    assert where.any()
    assert torch.allclose(chosen[where], rollout.sampled_log_prob[where], atol=1e-4)


def test_rewards_are_the_env_reward_terms(vocabulary, model, batch):
    """The same sampled episode under lambda = 0 and 10: the rewards differ by exactly
    -10 per collision, and with lambda = 0 they are minus the distance to the log."""
    torch.manual_seed(2)
    plain = sample_rollout(model, vocabulary, batch, RewardConfig(collision=0.0))
    torch.manual_seed(2)
    weighted = sample_rollout(model, vocabulary, batch, RewardConfig(collision=-10.0))
    assert torch.equal(plain.tokens, weighted.tokens)
    where = plain.controlled[:, :, None].expand_as(plain.rewards)
    assert torch.allclose((weighted.rewards - plain.rewards)[where], -10.0 * plain.collision[where].float())
    assert torch.allclose(plain.rewards[where], -plain.distance.nan_to_num(0.0)[where], atol=1e-5)
    assert (plain.rewards[~where] == 0).all()  # agents the policy does not drive earn nothing


def test_loss_has_gradients_and_its_statistics(vocabulary, model, batch):
    torch.manual_seed(3)
    reference = copy.deepcopy(model).eval()
    objective = Reinforce(vocabulary, RewardConfig(collision=-2.0), kl_weight=0.5, reference=reference)
    model.train()
    loss = objective.loss(model, batch)
    loss.total.backward()
    assert model.head_weight.grad is not None and model.head_weight.grad.abs().sum() > 0
    assert model.training  # restored after the rollout and the eval-mode pass
    stats = {name: float(value / loss.count) for name, value in loss.stats.items()}
    assert abs(stats["kl"]) < 1e-5  # the policy is still its reference
    assert 0 <= stats["collision_rate"] <= 1 and 0 <= stats["offroad_rate"] <= 1
    assert stats["entropy"] > 0 and stats["distance_to_log_m"] >= 0
    model.zero_grad()


def test_bad_settings_are_refused(vocabulary):
    with pytest.raises(ValueError, match="gamma"):
        Reinforce(vocabulary, RewardConfig(), gamma=1.5)
    with pytest.raises(ValueError, match="temperature"):
        Reinforce(vocabulary, RewardConfig(), temperature=0.0)
    with pytest.raises(ValueError, match="reference"):
        Reinforce(vocabulary, RewardConfig(), kl_weight=1.0)
    from closedloop.trainers.loop import TrainConfig, make_objective

    gmm = TrainConfig(data=["x"], out="y", model="gmm-ego", objective="reinforce")
    with pytest.raises(ValueError, match="train ppo"):  # the SDC's GMM policy: PPO, not this
        make_objective(gmm, None)
    config = TrainConfig(data=["x"], out="y", objective="reinforce", collision_weight=10.0, offroad_weight=2.0)
    objective = make_objective(config, vocabulary)
    assert objective.reward.collision == -10.0 and objective.reward.offroad == -2.0  # penalties
    assert objective.reward.distance_to_log == -1.0 and objective.temperature == 1.0
    with pytest.raises(ValueError, match="kl-weight"):
        make_objective(TrainConfig(data=["x"], out="y", objective="reinforce", kl_weight=0.1), vocabulary)


@pytest.mark.slow
def test_train_reinforce_runs_resumes_bit_for_bit_and_evaluates(tmp_path):
    data = tmp_path / "data"
    run("generate", "--out", data, "--num-scenarios", 3, "--seed", 4, "--agents", "4:6", "--quiet")
    bc = tmp_path / "bc"
    run("train", "bc", "--data", data, "--out", bc, "--steps", 1, "--batch-size", 2, "--quiet")
    proc = run("train", "reinforce", "--data", data, "--out", tmp_path / "x", check=False)
    assert proc.returncode == 2 and "--init" in proc.stderr
    common = ["--init", bc, "--data", data, "--collision-weight", 10, "--batch-size", 2, "--steps", 3, "--quiet"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run("train", "reinforce", *common, "--out", straight)
    run("train", "reinforce", *common, "--out", resumed, "--checkpoint-every", 2)
    config = json.loads((straight / "config.json").read_text())["args"]
    assert config["collision_weight"] == 10 and config["gamma"] == 0.95 and config["sample_temperature"] == 1.0
    for name in ("step_00000003.safetensors", "step_00000003.train.safetensors"):
        (resumed / "checkpoints" / name).unlink()
    run("train", "reinforce", "--resume", resumed / "checkpoints" / "step_00000002.safetensors", "--quiet")
    assert read_latest(resumed)["step"] == 3
    from safetensors.torch import load_file

    a, b = load_file(str(read_latest(straight)["weights"])), load_file(str(read_latest(resumed)["weights"]))
    assert all(torch.equal(a[name], b[name]) for name in a)
    out = tmp_path / "eval"
    run("evaluate", "--policy", f"ckpt:{straight}", "--data", data, "--num-rollouts", 2, "--out", out, "--quiet")
    assert "collision_rate" in (out / "evaluation.json").read_text()
