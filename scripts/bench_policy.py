"""Throughput of the tokenized traffic model, per size.

  python scripts/bench_policy.py [--sizes micro nano mini tiny] [--rollouts 32] [--device cpu|cuda]

For each size (random weights, the default vocabulary):

- closed-loop rollouts: ``--rollouts`` rollouts of the real scenario 637f20cafde22ff8 with
  every WOSAC agent (50) controlled by the model, simulated as one batch (what
  ``closedloop rollout --policy model:SIZE`` does): seconds per scenario, and the share
  spent in the model's decoder;
- training throughput: a teacher-forced forward and backward pass (cross-entropy on the
  tokenized logs) over ``--train-batch`` synthetic scenarios: agent-tokens per second.

Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from closedloop.agents.map_tokens import map_tokens
from closedloop.agents.smart import SmartModel, count_parameters
from closedloop.agents.token_policy import TokenPolicy
from closedloop.agents.tokens import default_vocabulary, tokenize
from closedloop.data import collate_scenarios, read_scenarios
from closedloop.data.synthetic import generate_scenarios
from closedloop.envs import reset
from closedloop.envs.rollout import run_episode

REAL = "../shared/womd/motion_data_one_scenario.tfrecord"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def rollout_seconds(size: str, scenario, rollouts: int, device: str) -> tuple[float, float]:
    """Seconds for ``rollouts`` rollouts of ``scenario`` in one batch, and the decoder's share."""
    policy = TokenPolicy.untrained(size, seed=0)
    dynamics = policy.make_dynamics()
    batch = collate_scenarios([scenario] * rollouts).to(device)
    decoder = {"seconds": 0.0}
    step = policy.model.step

    def timed_step(*args, **kwargs):
        sync(device)
        start = time.perf_counter()
        out = step(*args, **kwargs)
        sync(device)
        decoder["seconds"] += time.perf_counter() - start
        return out

    policy.model.step = timed_step
    sync(device)
    start = time.perf_counter()
    run_episode(reset(batch), policy, dynamics, torch.Generator(device=device).manual_seed(0))
    sync(device)
    total = time.perf_counter() - start
    return total, decoder["seconds"] / total


def train_tokens_per_second(size: str, scenarios, device: str, repeats: int = 3) -> float:
    vocabulary = default_vocabulary()
    torch.manual_seed(0)
    model = SmartModel(size, vocabulary=vocabulary.table()).to(device).train()
    batch = collate_scenarios(scenarios, max_agents=64, allow_drop_scored=True).to(device)
    tokens = tokenize(
        vocabulary,
        batch.agent_xyz[..., :2],
        batch.agent_heading,
        batch.agent_valid & batch.agent_mask[..., None],
        batch.agent_type,
    )
    roads = map_tokens(batch, max_tokens=1024)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    mask = model.logit_mask(vocabulary.sizes().to(device), batch.agent_type)
    targets = tokens.token_valid
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        logits = model(tokens.tokens, tokens.poses, tokens.token_valid, batch.agent_type, roads)
        logits = logits.masked_fill(~mask[:, :, None], -1e9)
        loss = torch.nn.functional.cross_entropy(logits[targets], tokens.tokens[targets])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return int(targets.sum()) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["micro", "nano", "mini", "tiny"])
    parser.add_argument("--rollouts", type=int, default=32)
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    scenario = next(read_scenarios(REAL))
    train_scenarios = list(generate_scenarios(args.train_batch, seed=0, town="grid"))
    print(f"{torch.get_num_threads()} threads, device {args.device}")
    print(f"{'size':<7}{'parameters':>12}{'s / scenario':>14}{'decoder':>9}{'train agent-tokens/s':>22}")
    rows = []
    for size in args.sizes:
        seconds, decoder = rollout_seconds(size, scenario, args.rollouts, args.device)
        train = train_tokens_per_second(size, train_scenarios, args.device)
        params = count_parameters(SmartModel(size))
        rows.append(
            {
                "size": size,
                "parameters": params,
                "rollouts": args.rollouts,
                "seconds_per_scenario": round(seconds, 2),
                "decoder_share": round(decoder, 2),
                "train_agent_tokens_per_s": round(train),
                "device": args.device,
            }
        )
        print(f"{size:<7}{params:>12,}{seconds:>14.2f}{decoder:>8.0%}{train:>22,.0f}")
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
