"""RoaD: rollouts as demonstrations, for the tokenized traffic model.

Garcia-Cobo et al. fine-tune a BC policy on its own guided closed-loop rollouts:

1. **Collect** (no gradient, :func:`closedloop.trainers.guided.guided_token_rollout`):
   every 0.5 s each driven agent draws K tokens from the current policy at
   ``temperature`` (RoaD: 64 at 0.8); the one whose chunk stays nearest the logged poses
   is executed (:func:`closedloop.wrappers.guidance.road_choose`, the mean 4-corner
   distance over the token's 5 steps); when even that one is farther than
   ``recovery_distance`` it is blended toward the log over ``recovery_steps`` and
   executed as the vocabulary token nearest the blend (recovery mode). Agents without a
   logged pose where the token ends execute their first sample.
2. **Learn** by behaviour cloning on the executed rollouts: teacher forcing over the
   rolled-out tokens and poses, cross-entropy on the executed tokens where the log
   guided them (and on the two history tokens, the log's). No recovery token is built:
   the rollout itself is the demonstration.
3. **Refresh**: the demonstrations are collected with the current policy every
   ``refresh_every`` epochs, or once at the start and reused (``refresh_every=None``,
   "one-off").

Deviation from the paper, said plainly: the paper scores a 2 s horizon of each candidate;
a token here covers 0.5 s, so the horizon is one token (sampling K continuations of four
tokens for every agent would multiply the collection cost by the decoding of 4 x K
branches). The GMM ego variant lives in :mod:`closedloop.trainers.ego`.

Demonstrations are written to ``RUN_DIR/demos/epoch_EEEE_rankR.safetensors`` when
collected, so a resumed run reuses exactly the data the interrupted one trained on.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from closedloop.agents.tokens import MotionVocabulary
from closedloop.safetensors_io import read_safetensors, write_safetensors
from closedloop.trainers.checkpoint import CheckpointError
from closedloop.trainers.data import TokenExample, collate_tokens
from closedloop.trainers.guided import HISTORY, Decision, StepContext, guided_token_rollout
from closedloop.trainers.objectives import TokenBC
from closedloop.wrappers.guidance import recovery_tokens, road_choose, token_chunks

DEMOS_FORMAT = "closedloop-road-demos"
DEMOS_MAX_BYTES = 8 << 30


class DemoSchedule:
    """When demonstrations are (re)collected and where they are kept: epoch 0 and then
    every ``refresh_every`` epochs (never again when None), one file per (epoch, rank).
    A fresh run clears its rank's files (:meth:`clear`); a resumed run reads them back."""

    def __init__(self, run_dir: str | Path, refresh_every: int | None, seed: int):
        if refresh_every is not None and refresh_every < 1:
            raise ValueError(f"--refresh-every must be >= 1 epoch, not {refresh_every}")
        self.run_dir, self.refresh_every, self.seed = Path(run_dir), refresh_every, seed
        self.epoch: int | None = None  # the collection epoch of the demonstrations held
        self.held = None

    def collection_epoch(self, epoch: int) -> int:
        return 0 if self.refresh_every is None else epoch - epoch % self.refresh_every

    def path(self, epoch: int, rank: int) -> Path:
        return self.run_dir / "demos" / f"epoch_{epoch:04d}_rank{rank}.safetensors"

    def clear(self, rank: int) -> None:
        """Remove this rank's demonstrations of an earlier run in the same directory: a
        fresh run must collect its own."""
        for stale in (self.run_dir / "demos").glob(f"epoch_*_rank{rank}.safetensors"):
            stale.unlink()

    def generator(self, epoch: int, rank: int, device: torch.device) -> torch.Generator:
        """The collection's own RNG: the same demonstrations whatever came before."""
        import numpy as np

        seed = int(np.random.SeedSequence([self.seed, epoch, rank]).generate_state(1, np.uint64)[0] >> 1)
        return torch.Generator(device=device).manual_seed(seed)

    def demonstrations(self, epoch: int, rank: int, device: torch.device, read, collect, write, show: bool):
        """The demonstrations for training ``epoch``: those held, those on disk (a resumed
        run), or ``collect(generator) -> (demos, stats)`` now, written with ``write(path,
        demos, header)``. ``read(path)`` loads a file."""
        collection = self.collection_epoch(epoch)
        if self.epoch == collection:
            return self.held
        path = self.path(collection, rank)
        if path.is_file():
            demos = read(path)
        else:
            demos, stats = collect(self.generator(collection, rank, device))
            write(path, demos, {"epoch": collection, "rank": rank, **stats})
            if show:
                summary = ", ".join(f"{name} {value:.3f}" for name, value in stats.items())
                tqdm.write(f"RoaD demonstrations for epoch {collection}: {summary}", file=sys.stderr)
        self.epoch, self.held = collection, demos
        return demos


class RoaDTokens(TokenBC):
    """The RoaD objective for the shared loop (see the module docstring): its examples are
    the log's, its batches come from the demonstrations of the current collection."""

    def __init__(
        self,
        vocabulary: MotionVocabulary,
        schedule: DemoSchedule,
        k: int = 64,
        temperature: float = 0.8,
        recovery_distance: float = 3.0,
        recovery_steps: int = 30,
        select: bool = True,
        label_smoothing: float = 0.1,
        collect_batch: int = 8,
    ):
        if k < 1 or temperature <= 0:
            raise ValueError(f"RoaD needs k >= 1 and a positive temperature, not k={k}, temperature={temperature}")
        super().__init__(vocabulary, label_smoothing)
        self.schedule, self.k, self.temperature = schedule, k, temperature
        self.recovery_distance, self.recovery_steps, self.select = recovery_distance, recovery_steps, select
        self.collect_batch = collect_batch
        self.generator: torch.Generator | None = None

    def decide(self, step: StepContext) -> Decision:
        """Execute the nearest of K samples (blended toward the log when far); learn it."""
        B, N, V = step.logits.shape
        probs = torch.softmax(step.logits.float() / self.temperature, dim=-1).nan_to_num(0.0).flatten(0, 1)
        probs[:, 0] += probs.sum(-1) == 0  # padding agents: no allowed token at all
        candidates = torch.multinomial(probs, self.k, replacement=True, generator=self.generator).view(B, N, self.k)
        kind = step.kind
        chunks = token_chunks(step.pose, candidates, step.table, kind)  # [B, N, K, steps, 3]
        chosen = road_choose(
            chunks,
            step.log,
            step.log_ok,
            step.box,
            step.guided,
            recovery_distance=self.recovery_distance,
            recovery_steps=self.recovery_steps,
            select=self.select,
        )
        executed = candidates.gather(-1, chosen.choice[..., None]).squeeze(-1)
        if bool(chosen.recovery.any()):
            everywhere = torch.ones_like(step.log_ok)
            projected = recovery_tokens(
                step.pose, chosen.poses, everywhere, step.table, step.sizes, step.agent_type, step.box
            )
            executed = torch.where(chosen.recovery, projected, executed)
        reached = token_chunks(step.pose, executed[..., None], step.table, kind)[:, :, 0, -1]
        return Decision(executed, reached, executed, {"recovery": chosen.recovery.float()})

    @torch.no_grad()
    def collect(
        self, model, logs: Sequence[TokenExample], generator: torch.Generator, show: bool = False
    ) -> tuple[list[TokenExample], dict[str, float]]:
        """RoaD-guided rollouts of ``model`` on every log example: the demonstrations (same
        order) and the collection's mean distance to the log and recovery fraction."""
        self.generator = generator
        device = generator.device
        demos: list[TokenExample] = []
        error, recovered, targets = 0.0, 0.0, 0.0
        bar = tqdm(total=len(logs), desc="collect RoaD", unit="scenario", disable=not show, leave=False)
        for first in range(0, len(logs), self.collect_batch):
            group = list(logs[first : first + self.collect_batch])
            rollout = guided_token_rollout(model, collate_tokens(group).to(device), self.vocabulary, self.decide)
            learn = rollout.target_valid.clone()
            learn[:, :, :HISTORY] = rollout.valid[:, :, :HISTORY]
            error += float(rollout.error[rollout.target_valid].sum())
            recovered += float(rollout.stats["recovery"].sum())
            targets += float(rollout.target_valid.sum())
            for row, example in enumerate(group):
                n = example.tokens.shape[0]
                demos.append(
                    dataclasses.replace(
                        example,
                        tokens=rollout.tokens[row, :n].cpu(),
                        valid=rollout.valid[row, :n].cpu(),
                        poses=rollout.poses[row, :n].cpu(),
                        target_valid=learn[row, :n].cpu(),
                    )
                )
            bar.update(len(group))
        bar.close()
        self.generator = None
        count = max(targets, 1.0)
        return demos, {"rollout_error_m": error / count, "recovery_fraction": recovered / count}

    def epoch_examples(self, model, logs: list[TokenExample], epoch: int, rank: int, show: bool) -> list[TokenExample]:
        """The demonstrations this epoch trains on (see :meth:`DemoSchedule.demonstrations`)."""
        return self.schedule.demonstrations(
            epoch,
            rank,
            next(model.parameters()).device,
            read=lambda path: read_token_demos(path, logs),
            collect=lambda generator: self.collect(model, logs, generator, show),
            write=write_token_demos,
            show=show,
        )


def write_token_demos(path: Path, demos: Sequence[TokenExample], header: dict) -> None:
    """The rolled-out parts of ``demos`` (tokens, poses, validity, targets), agents of
    every scenario concatenated, with the agent count per scenario."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        "counts": torch.tensor([d.tokens.shape[0] for d in demos], dtype=torch.long),
        "tokens": torch.cat([d.tokens for d in demos]),
        "valid": torch.cat([d.valid for d in demos]),
        "poses": torch.cat([d.poses for d in demos]),
        "target_valid": torch.cat([d.target_valid for d in demos]),
    }
    write_safetensors(path, tensors, {"format": DEMOS_FORMAT, "scenarios": [d.scenario_id for d in demos], **header})


def read_token_demos(path: Path, logs: Sequence[TokenExample]) -> list[TokenExample]:
    """The demonstrations of ``path`` for the log examples ``logs`` (same scenarios, same order)."""
    tensors, header = read_safetensors(path, "RoaD demonstrations", CheckpointError, DEMOS_MAX_BYTES, DEMOS_FORMAT)
    names = ("tokens", "valid", "poses", "target_valid")
    try:
        counts = tensors["counts"].tolist()
        if header.get("scenarios") != [e.scenario_id for e in logs] or counts != [e.tokens.shape[0] for e in logs]:
            raise ValueError("demonstrations of other scenarios than this run's data")
        agents, steps = sum(counts), logs[0].tokens.shape[1]
        expected = {"tokens": (agents, steps), "valid": (agents, steps), "poses": (agents, steps + 1, 3)}
        expected["target_valid"] = (agents, steps)
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != shape:
                raise ValueError(f"{name} has shape {list(tensors[name].shape)}, expected {list(shape)}")
        parts = {name: tensors[name].split(counts) for name in names}
    except (KeyError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: not this run's RoaD demonstrations: {err}") from None
    return [
        dataclasses.replace(
            log,
            tokens=parts["tokens"][i],
            valid=parts["valid"][i].bool(),
            poses=parts["poses"][i],
            target_valid=parts["target_valid"][i].bool(),
        )
        for i, log in enumerate(logs)
    ]
