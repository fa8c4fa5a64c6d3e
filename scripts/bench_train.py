"""Behaviour-cloning training throughput per model size: seconds per optimizer step and
agent-tokens per second at a stated batch, on CPU and on CUDA when present.

  python scripts/bench_train.py [--sizes micro nano mini tiny] [--batch-size 8] [--steps 3]

Each row times ``steps`` full steps (forward, loss, backward, clipping, AdamW) of the
trainer's own code (:func:`closedloop.trainers.loop.forward_backward`) after one warm-up
step, on synthetic scenarios (grid town, seed 0, 30-60 agents; their tokenization is
done once beforehand, as the trainer does). ``ratio`` is the throughput relative to the
first size measured in the same run. On CPU the trainer asks for deterministic
algorithms (for bit-exact resume); ``det. cost`` measures what that costs. ``catk/bc`` is
the cost of a CAT-K step (``--k`` candidates: the closed-loop rollout with incremental
decoding, the recovery tokens, then the same teacher-forced pass) relative to a BC step of
the same model on the same batch. ``road/bc`` is the cost of collecting RoaD
demonstrations on the batch's scenarios (``--road-k`` samples per agent and decision, one
guided rollout each) relative to a BC step on them: RoaD adds that once per collection
(per epoch when refreshed every epoch), not per step.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from closedloop.agents.smart import SmartModel, count_parameters
from closedloop.agents.tokens import default_vocabulary
from closedloop.data.synthetic import generate_scenarios
from closedloop.trainers.catk import CatK
from closedloop.trainers.data import collate_tokens, token_examples
from closedloop.trainers.distributed import Distributed
from closedloop.trainers.loop import forward_backward
from closedloop.trainers.objectives import TokenBC
from closedloop.trainers.road import DemoSchedule, RoaDTokens


def time_steps(
    size: str, examples, vocabulary, device: torch.device, steps: int, deterministic: bool, catk_k: int = 0
) -> float:
    """Seconds per training step of model ``size`` on ``examples`` (one batch): BC, or
    CAT-K with ``catk_k`` candidates."""
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.manual_seed(0)
    model = SmartModel(size, vocabulary=vocabulary.table()).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    objective = CatK(vocabulary, k=catk_k) if catk_k else TokenBC(vocabulary)
    dist = Distributed(0, 1, device)
    batch = collate_tokens(examples).to(device)

    def step():
        forward_backward(model, objective, batch, dist)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    torch.use_deterministic_algorithms(False)
    return (time.perf_counter() - start) / steps


def time_road_collection(size: str, examples, vocabulary, device: torch.device, k: int) -> float:
    """Seconds to collect RoaD demonstrations (``k`` samples) on ``examples`` with model ``size``."""
    torch.manual_seed(0)
    model = SmartModel(size, vocabulary=vocabulary.table()).to(device)
    objective = RoaDTokens(vocabulary, DemoSchedule("unused", None, 0), k=k, collect_batch=len(examples))
    objective.collect(model, examples, torch.Generator(device=device).manual_seed(0))  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    objective.collect(model, examples, torch.Generator(device=device).manual_seed(1))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["micro", "nano", "mini", "tiny"])
    parser.add_argument("--batch-size", type=int, default=8, help="scenarios per step")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--k", type=int, default=32, help="CAT-K candidates")
    parser.add_argument("--road-k", type=int, default=64, help="RoaD samples")
    args = parser.parse_args()
    vocabulary = default_vocabulary()
    examples = token_examples(list(generate_scenarios(args.batch_size, seed=0)), vocabulary)
    tokens = sum(e.num_tokens for e in examples)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print(
        f"batch: {args.batch_size} synthetic scenarios, {tokens} agent-tokens; torch threads {torch.get_num_threads()}"
    )
    print(
        f"{'device':<7}{'model':<7}{'params':>11}{'s/step':>9}{'tokens/s':>10}{'ratio':>8}{'det. cost':>11}"
        f"{'catk/bc':>9}{'road/bc':>9}"
    )
    rows = []
    for device in devices:
        base = None
        for size in args.sizes:
            seconds = time_steps(size, examples, vocabulary, device, args.steps, deterministic=device.type == "cpu")
            free = time_steps(size, examples, vocabulary, device, args.steps, deterministic=False)
            catk = time_steps(size, examples, vocabulary, device, args.steps, device.type == "cpu", catk_k=args.k)
            road = time_road_collection(size, examples, vocabulary, device, args.road_k)
            rate = tokens / seconds
            base = base or rate
            params = count_parameters(SmartModel(size))
            row = {
                "device": device.type,
                "model": size,
                "parameters": params,
                "seconds_per_step": seconds,
                "agent_tokens_per_s": rate,
                "ratio_to_first": rate / base,
                "deterministic_cost": seconds / free,
                "catk_seconds_per_step": catk,
                "catk_to_bc": catk / seconds,
                "road_collection_seconds": road,
                "road_collection_to_bc": road / seconds,
            }
            rows.append(row)
            print(
                f"{device.type:<7}{size:<7}{params:>11,}{seconds:>9.3f}{rate:>10.0f}{rate / base:>8.2f}"
                f"{seconds / free:>10.2f}x{catk / seconds:>8.2f}x{road / seconds:>8.2f}x",
                flush=True,
            )
    print(json.dumps({"batch_size": args.batch_size, "agent_tokens": tokens, "rows": rows}))


if __name__ == "__main__":
    main()
