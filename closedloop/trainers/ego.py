"""CAT-K and RoaD for the GMM ego policy: closed-loop fine-tuning of a continuous planner.

The SDC of each scenario is driven by the :class:`~closedloop.agents.gmm.GMMEgoModel`
through the ``trajectory`` dynamics (a chunk of 5 poses per action); the other agents
follow the log. Every chunk, guidance compares the model's candidate chunks with the
logged continuation (the mean 4-corner distance over the chunk's steps, the SDC's own box):

- **CAT-K on the modes** (:class:`EgoCatK`): the candidates are the means of the K
  heaviest mixture components; the nearest is executed; the target at every visited state
  is the recovery trajectory, the logged next chunk expressed from where the SDC actually
  is (the trajectory action that lands exactly on the log). A fresh rollout per batch of
  scenarios; loss: the mixture's negative log-likelihood of the targets.
- **RoaD on samples** (:class:`EgoRoaD`): the candidates are K samples of the mixture at
  ``temperature``; the nearest is executed, blended toward the log when farther than
  ``recovery_distance`` (recovery mode); the executed chunks are the demonstrations,
  collected once or every ``refresh_every`` epochs, then learned by NLL as in BC.

Chunks whose log is not valid throughout (or where the SDC's log is not valid now) are not
learned from, exactly the samples BC skips; there CAT-K executes the heaviest mode and RoaD
its first sample.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from closedloop.agents.distributions import GaussianMixture
from closedloop.agents.gmm import GMMEgoModel, GMMEgoPolicy
from closedloop.agents.tokens import compose, to_local
from closedloop.data.batch import ScenarioBatch, collate_scenarios
from closedloop.data.scenario import Scenario
from closedloop.envs.core import SimState, reset, step
from closedloop.safetensors_io import read_safetensors, write_safetensors
from closedloop.trainers.checkpoint import CheckpointError
from closedloop.trainers.data import GROUP, EgoSamples, ego_examples
from closedloop.trainers.objectives import EgoBC, StepLoss
from closedloop.trainers.road import DEMOS_MAX_BYTES, DemoSchedule
from closedloop.wrappers.guidance import catk_choice, chunk_distance, road_choose

EGO_DEMOS_FORMAT = "closedloop-road-ego-demos"


@dataclass
class EgoChunk:
    """One decision for the SDCs ``[B, 1]``: where the SDC is (``pose`` ``[B, 1, 3]``), the
    logged next chunk in world coordinates (``log`` ``[B, 1, chunk, 3]``) and as the
    trajectory action from where it is (``recovery``), whether that is a target
    (``guided`` ``[B, 1]``), the SDC's box ``[B, 1, 2]`` and the mixture."""

    pose: torch.Tensor
    log: torch.Tensor
    recovery: torch.Tensor
    guided: torch.Tensor
    box: torch.Tensor
    mixture: GaussianMixture


# decide(chunk) -> (executed trajectory action [B, 1, chunk, 3], target [B, 1, chunk, 3], distance [B, 1])
EgoGuide = Callable[[EgoChunk], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@torch.no_grad()
def ego_rollout(model: GMMEgoModel, batch: ScenarioBatch, decide: EgoGuide) -> tuple[EgoSamples, torch.Tensor]:
    """Drive each scenario's SDC with ``model`` and ``decide``; returns the guided chunks'
    (observation, target) samples in time-major order (:func:`ego_examples`' order) and
    the executed chunks' distance to the log ``[samples]``."""
    was_training = model.training
    model.eval()
    with torch.autocast("cuda", enabled=False):  # full-precision poses even inside a bf16 training step
        samples, distances = _ego_rollout(model, batch, decide)
    model.train(was_training)
    return samples, distances


def _ego_rollout(model: GMMEgoModel, batch: ScenarioBatch, decide: EgoGuide) -> tuple[EgoSamples, torch.Tensor]:
    policy = GMMEgoPolicy(model)
    dynamics = policy.make_dynamics()
    state: SimState = reset(batch)
    policy.reset(state, dynamics)
    sdc = policy.sdc  # [B, 1]
    obs, targets, distances = [], [], []
    while state.t + model.chunk <= state.num_steps - 1:
        observation = policy.observer(state, sdc)  # [B, 1, D]
        recovery, ok = policy.target(state)  # the logged chunk from the rolled-out pose
        guided = ok & batch.agent_valid[:, :, state.t].gather(1, sdc)  # as BC's samples: the log's validity
        pose = state.current[..., :3].gather(1, sdc[..., None].expand(-1, 1, 3))
        chunk = EgoChunk(
            pose,
            compose(pose, recovery),
            recovery,
            guided,
            state.dims[..., :2].gather(1, sdc[..., None].expand(-1, 1, 2)),
            model(observation),
        )
        action, target, distance = decide(chunk)
        obs.append(observation[guided])
        targets.append(target[guided])
        distances.append(distance[guided])
        state = step(state, policy.to_actions(state, action), dynamics)
    return EgoSamples(torch.cat(obs), torch.cat(targets)), torch.cat(distances)


class EgoCatK(EgoBC):
    """CAT-K on the GMM's modes (see the module docstring); examples are scenarios."""

    def __init__(self, k: int = 16):
        if k < 1:
            raise ValueError(f"CAT-K needs k >= 1 candidates, not {k}")
        self.k = k

    def examples(self, scenarios: Sequence[Scenario], model, progress: bool = False) -> list[Scenario]:
        return list(scenarios)

    def batch(self, examples: list[Scenario], rows: torch.Tensor, device: torch.device) -> ScenarioBatch:
        return collate_scenarios([examples[i] for i in rows.tolist()]).to(device)

    def decide(self, chunk: EgoChunk):
        means, _ = chunk.mixture.top_k(self.k)  # [B, 1, K, chunk, 3] local
        world = compose(chunk.pose[:, :, None, :], means)
        valid = chunk.guided[..., None].expand(-1, -1, means.shape[3])
        distance = chunk_distance(world, chunk.log, valid, chunk.box)  # [B, 1, K]
        choice = torch.where(chunk.guided, catk_choice(distance, torch.ones_like(distance, dtype=torch.bool)), 0)
        action = means.gather(2, choice[..., None, None, None].expand(-1, -1, 1, *means.shape[3:])).squeeze(2)
        return action, chunk.recovery, distance.gather(-1, choice[..., None]).squeeze(-1)

    def loss(self, model, batch: ScenarioBatch) -> StepLoss:
        samples, distance = ego_rollout(getattr(model, "module", model), batch, self.decide)
        loss = super().loss(model, samples)
        loss.stats["rollout_error_m"] = distance.sum()
        return loss


class EgoRoaD(EgoBC):
    """RoaD on the GMM's samples (see the module docstring): examples are the BC samples
    of the log (their number and order), batches come from the current demonstrations."""

    def __init__(
        self,
        schedule: DemoSchedule,
        k: int = 64,
        temperature: float = 0.8,
        recovery_distance: float = 3.0,
        recovery_steps: int = 30,
        select: bool = True,
    ):
        if k < 1 or temperature <= 0:
            raise ValueError(f"RoaD needs k >= 1 and a positive temperature, not k={k}, temperature={temperature}")
        self.schedule, self.k, self.temperature = schedule, k, temperature
        self.recovery_distance, self.recovery_steps, self.select = recovery_distance, recovery_steps, select
        self.scenarios: list[Scenario] = []
        self.generator: torch.Generator | None = None

    def examples(self, scenarios: Sequence[Scenario], model, progress: bool = False) -> EgoSamples:
        self.scenarios = list(scenarios)
        return ego_examples(scenarios, model, progress)

    def decide(self, chunk: EgoChunk):
        m = chunk.mixture
        B = m.weights.shape[0]
        event = m.mean.shape[2:]
        many = GaussianMixture(  # K independent draws per SDC
            m.weights.expand(B, self.k, -1), m.mean.expand(B, self.k, *event), m.log_std.expand(B, self.k, *event)
        )
        samples = many.sample(self.temperature, self.generator)[:, None]  # [B, 1, K, chunk, 3]
        world = compose(chunk.pose[:, :, None, :], samples)
        valid = chunk.guided[..., None].expand(-1, -1, samples.shape[3])
        chosen = road_choose(
            world,
            chunk.log,
            valid,
            chunk.box,
            chunk.guided,
            recovery_distance=self.recovery_distance,
            recovery_steps=self.recovery_steps,
            select=self.select,
        )
        action = to_local(chunk.pose, chosen.poses)
        return action, action, chosen.distance

    @torch.no_grad()
    def collect(self, model, generator: torch.Generator, show: bool = False) -> tuple[EgoSamples, dict[str, float]]:
        """RoaD-guided rollouts of the SDC on every scenario: the demonstrations."""
        self.generator = generator
        device = generator.device
        parts, distances = [], []
        bar = tqdm(total=len(self.scenarios), desc="collect RoaD", unit="scenario", disable=not show, leave=False)
        for first in range(0, len(self.scenarios), GROUP):
            group = self.scenarios[first : first + GROUP]
            samples, distance = ego_rollout(model, collate_scenarios(group).to(device), self.decide)
            parts.append(samples)
            distances.append(distance)
            bar.update(len(group))
        bar.close()
        self.generator = None
        demos = EgoSamples(torch.cat([p.obs for p in parts]).cpu(), torch.cat([p.target for p in parts]).cpu())
        return demos, {"rollout_error_m": float(torch.cat(distances).mean())}

    def epoch_examples(self, model, logs: EgoSamples, epoch: int, rank: int, show: bool) -> EgoSamples:
        """The demonstrations this epoch trains on (see :meth:`DemoSchedule.demonstrations`)."""

        def collect(generator: torch.Generator):
            demos, stats = self.collect(model, generator, show)
            if len(demos) != len(logs):
                raise RuntimeError(f"RoaD collected {len(demos)} ego samples where the log has {len(logs)}")
            return demos, stats

        return self.schedule.demonstrations(
            epoch,
            rank,
            next(model.parameters()).device,
            read=lambda path: read_ego_demos(path, logs),
            collect=collect,
            write=write_ego_demos,
            show=show,
        )


def write_ego_demos(path: Path, demos: EgoSamples, header: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(path, {"obs": demos.obs, "target": demos.target}, {"format": EGO_DEMOS_FORMAT, **header})


def read_ego_demos(path: Path, logs: EgoSamples) -> EgoSamples:
    """The ego demonstrations of ``path``, checked against the shapes of this run's samples."""
    tensors, _ = read_safetensors(path, "RoaD ego demonstrations", CheckpointError, DEMOS_MAX_BYTES, EGO_DEMOS_FORMAT)
    try:
        for name, like in (("obs", logs.obs), ("target", logs.target)):
            if tensors[name].shape != like.shape:
                raise ValueError(f"{name} has shape {list(tensors[name].shape)}, this run's data {list(like.shape)}")
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{path}: not this run's RoaD ego demonstrations: {err}") from None
    return EgoSamples(tensors["obs"], tensors["target"])
