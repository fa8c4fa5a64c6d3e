"""CAT-K: the guidance choices against brute force, the rollout, and `closedloop train catk`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from cli import run

from closedloop.agents.smart import SmartModel
from closedloop.agents.tokens import default_vocabulary
from closedloop.constants import token_kind
from closedloop.data.synthetic import generate_scenarios
from closedloop.trainers.catk import CatK
from closedloop.trainers.checkpoint import read_latest
from closedloop.trainers.data import collate_tokens, token_examples
from closedloop.wrappers.guidance import catk_choice, chunk_distance, recovery_tokens, token_chunks


@pytest.fixture(scope="module")
def vocabulary():
    return default_vocabulary()


@pytest.fixture(scope="module")
def batch(vocabulary):
    return collate_tokens(token_examples(list(generate_scenarios(2, seed=3, agents=(4, 6))), vocabulary))


def _corners(x, y, heading, length, width):
    """The 4 box corners, by hand."""
    c, s = math.cos(heading), math.sin(heading)
    return [
        (x + dx * c - dy * s, y + dx * s + dy * c)
        for dx, dy in (
            (length / 2, width / 2),
            (length / 2, -width / 2),
            (-length / 2, -width / 2),
            (-length / 2, width / 2),
        )
    ]


def _distance(chunk, log, valid, box) -> float:
    """The tokenizer's distance, by hand: mean over the valid steps and 4 corners."""
    per_step = []
    for pose, logged, ok in zip(chunk, log, valid):
        if ok:
            a, b = _corners(*pose, *box), _corners(*logged, *box)
            per_step.append(np.mean([math.dist(p, q) for p, q in zip(a, b)]))
    return float(np.mean(per_step)) if per_step else 0.0


def _start_and_log(vocabulary, generator):
    """A random start pose and a logged chunk (a perturbed token) for 3 agents of each kind."""
    table = vocabulary.table()
    agent_type = torch.tensor([[1, 1, 2, 2, 3, 3]])
    kind = token_kind(agent_type)
    pose = torch.randn(1, 6, 3, generator=generator) * torch.tensor([20.0, 20.0, 1.0])
    true = torch.randint(0, 30, (1, 6, 1), generator=generator)
    log = token_chunks(pose, true, table, kind)[:, :, 0] + 0.3 * torch.randn(1, 6, 5, 3, generator=generator)
    valid = torch.ones(1, 6, 5, dtype=torch.bool)
    valid[0, 1, :2] = False  # a partly logged chunk
    box = torch.tensor([[[4.5, 2.0], [5.0, 2.2], [0.8, 0.8], [0.6, 0.6], [2.0, 0.9], [1.8, 0.7]]])
    return table, agent_type, kind, pose, log, valid, box


def test_catk_picks_the_truly_closest_of_the_top_k(vocabulary):
    generator = torch.Generator().manual_seed(0)
    table, agent_type, kind, pose, log, valid, box = _start_and_log(vocabulary, generator)
    logits = torch.randn(1, 6, 30, generator=generator)
    scores, candidates = logits.topk(8, dim=-1)
    allowed = torch.ones_like(candidates, dtype=torch.bool)
    allowed[0, 0, 0] = False  # a candidate that may not be chosen
    chunks = token_chunks(pose, candidates, table, kind)
    choice = catk_choice(chunk_distance(chunks, log, valid, box), allowed)
    for agent in range(6):
        by_hand = [
            _distance(
                chunks[0, agent, c].tolist(), log[0, agent].tolist(), valid[0, agent].tolist(), box[0, agent].tolist()
            )
            if allowed[0, agent, c]
            else math.inf
            for c in range(8)
        ]
        assert int(choice[0, agent]) == int(np.argmin(by_hand))


def test_recovery_token_is_the_vocabulary_argmin(vocabulary):
    generator = torch.Generator().manual_seed(1)
    table, agent_type, kind, pose, log, valid, box = _start_and_log(vocabulary, generator)
    sizes = vocabulary.sizes()
    token = recovery_tokens(pose, log, valid, table, sizes, agent_type, box)
    for agent in range(6):
        k = int(kind[0, agent])
        every = torch.arange(int(sizes[k])).view(1, 1, -1).expand(1, 6, -1)
        chunks = token_chunks(pose, every, table, kind)[0, agent]
        by_hand = [
            _distance(chunks[v].tolist(), log[0, agent].tolist(), valid[0, agent].tolist(), box[0, agent].tolist())
            for v in range(int(sizes[k]))
        ]
        assert int(token[0, agent]) == int(np.argmin(by_hand))
        assert int(token[0, agent]) < int(sizes[k])


def test_k_equal_to_the_vocabulary_reproduces_the_tokenization(vocabulary, batch):
    torch.manual_seed(0)
    model = SmartModel("micro", vocabulary=vocabulary.table())
    rollout = CatK(vocabulary, k=int(vocabulary.sizes().max())).rollout(model, batch)
    always = batch.log_valid.all(-1)[..., None] & rollout.target_valid  # agents logged throughout
    assert int(always.sum()) > 100
    assert torch.equal(rollout.tokens[always], batch.tokens[always])
    assert torch.equal(rollout.targets[always], batch.tokens[always])
    assert torch.allclose(rollout.poses[:, :, 1:][always], batch.poses[:, :, 1:][always], atol=1e-4)


def test_k_one_is_the_greedy_policy_and_the_targets_are_recovery_tokens(vocabulary, batch):
    torch.manual_seed(0)
    model = SmartModel("micro", vocabulary=vocabulary.table()).eval()
    objective = CatK(vocabulary, k=1)
    rollout = objective.rollout(model, batch)
    # The teacher-forced pass over the rollout gives the logits the rollout acted on.
    with torch.no_grad():
        logits = model(rollout.tokens, rollout.poses, rollout.valid, batch.agent_type, batch.map)
    allowed = model.logit_mask(vocabulary.sizes(), batch.agent_type).unsqueeze(2)
    greedy = logits.masked_fill(~allowed, float("-inf")).argmax(-1)
    driven = rollout.valid.clone()
    driven[:, :, :2] = False
    assert torch.equal(greedy[driven], rollout.tokens[driven])
    # Every target is its step's vocabulary argmin from the rolled-out pose.
    s = 5
    window = slice(s * 5 + 1, s * 5 + 6)
    expected = recovery_tokens(
        rollout.poses[:, :, s],
        batch.log_poses[:, :, window],
        batch.log_valid[:, :, window],
        vocabulary.table(),
        vocabulary.sizes(),
        batch.agent_type,
        vocabulary.boxes()[token_kind(batch.agent_type)],
    )
    where = rollout.target_valid[:, :, s]
    assert torch.equal(rollout.targets[:, :, s][where], expected[where])
    # A greedy untrained policy drifts from the log; the top-32 guided one stays near it.
    guided = CatK(vocabulary, k=32).rollout(model, batch)
    assert guided.error[guided.target_valid].mean() < 0.5 * rollout.error[rollout.target_valid].mean()


def test_catk_loss_has_gradients_and_leaves_the_mode(vocabulary, batch):
    torch.manual_seed(0)
    model = SmartModel("micro", vocabulary=vocabulary.table()).train()
    loss = CatK(vocabulary, k=4).loss(model, batch)
    assert model.training
    (loss.total / loss.count).backward()
    assert loss.count > 0 and torch.isfinite(loss.total)
    assert model.head_weight.grad is not None and model.head_weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_train_catk_from_a_bc_run_then_resume(tmp_path):
    data = tmp_path / "data"
    run("generate", "--out", data, "--num-scenarios", 2, "--seed", 4, "--agents", "4:6", "--quiet")
    bc = tmp_path / "bc"
    run("train", "bc", "--data", data, "--out", bc, "--steps", 1, "--batch-size", 2, "--quiet")
    proc = run("train", "catk", "--data", data, "--out", tmp_path / "x", "--steps", 1, check=False)
    assert proc.returncode == 2 and "--init" in proc.stderr
    catk = tmp_path / "catk"
    run(
        "train",
        "catk",
        "--init",
        bc,
        "--data",
        data,
        "--out",
        catk,
        "--k",
        8,
        "--steps",
        2,
        "--batch-size",
        2,
        "--freeze-encoder",
        "--checkpoint-every",
        1,
        "--quiet",
    )
    config = json.loads((catk / "config.json").read_text())
    assert config["args"]["objective"] == "catk" and config["args"]["k"] == 8 and config["args"]["freeze_encoder"]
    from safetensors.torch import load_file

    start, end = load_file(str(read_latest(bc)["weights"])), load_file(str(read_latest(catk)["weights"]))
    assert torch.equal(start["map_encoder.kind.weight"], end["map_encoder.kind.weight"])  # frozen
    assert not torch.equal(start["head_weight"], end["head_weight"])  # trained
    run("train", "catk", "--resume", catk, "--steps", 3, "--quiet")
    assert read_latest(catk)["step"] == 3


def test_catk_objective_per_model_and_bad_k(vocabulary):
    from closedloop.trainers.ego import EgoCatK
    from closedloop.trainers.loop import TrainConfig, make_objective

    config = TrainConfig(data=["x"], out="y", model="gmm-ego", objective="catk", k=8)
    objective = make_objective(config, None)
    assert isinstance(objective, EgoCatK) and objective.k == 8 and config.batch_size == 16  # scenarios
    assert isinstance(make_objective(TrainConfig(data=["x"], out="y", objective="catk"), vocabulary), CatK)
    with pytest.raises(ValueError, match="k >= 1"):
        CatK(vocabulary, k=0)
    with pytest.raises(ValueError, match="k >= 1"):
        EgoCatK(k=0)
