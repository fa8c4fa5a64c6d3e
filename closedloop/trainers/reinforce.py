"""REINFORCE fine-tuning of the tokenized multi-agent model (Peng et al., "Improving Agent
Behaviors with RL Fine-tuning for Autonomous Driving").

Every training step:

1. **Rollout** (no gradient, eval mode, incremental decoding): the batch's scenarios are
   simulated in the env core (:class:`closedloop.envs.env.EnvCore`, ``tokens`` dynamics)
   from the log's history; every 0.5 s each controlled agent (valid at step 10) samples
   its next token from the policy (its kind's whole vocabulary, ``temperature`` 1: the
   policy being improved). Agents that appear later follow the log.
2. **Rewards** from the env's :class:`~closedloop.envs.rewards.RewardConfig`, per agent and
   decision: ``r_t = -||pos_t - pos_log_t|| - lambda * collision_t`` by default (distance
   only where the log is valid; events at the end of each 0.5 s token).
3. **Returns**: discounted with ``gamma`` (0.95 per decision) to the end of the episode,
   then normalised over the whole batch (all agents, decisions and scenarios; all ranks
   under DDP) to zero mean and unit variance.
4. **Loss**: ``-mean(log pi(a_t) * R_hat_t)`` over the controlled agents' decisions, the
   log-probabilities from one teacher-forced pass of the model over the rollout (equal to
   the ones it sampled from: tested; in eval mode, so without dropout), plus optionally
   ``kl_weight * KL(pi || pi_init)`` toward the pre-trained policy (off by default, as in
   the paper).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from closedloop.agents.map_tokens import map_tokens
from closedloop.agents.token_policy import MAX_MAP_TOKENS, TokenPolicy, token_dynamics
from closedloop.agents.tokens import MotionVocabulary
from closedloop.data.batch import ScenarioBatch, collate_scenarios
from closedloop.data.scenario import Scenario
from closedloop.envs.env import EnvConfig, EnvCore
from closedloop.envs.rewards import RewardConfig
from closedloop.trainers.objectives import StepLoss, model_logit_mask


def discounted_returns(rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """Returns-to-go ``R_t = sum_k gamma^k r_(t+k)`` along the last dimension of ``rewards``
    ``[..., T]`` (the episode ends after ``T``)."""
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[..., 0])
    for t in range(rewards.shape[-1] - 1, -1, -1):
        running = rewards[..., t] + gamma * running
        returns[..., t] = running
    return returns


def normalise_returns(returns: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``(R - mean) / (std + eps)`` with the mean and (population) standard deviation over
    the ``mask`` elements of the whole batch, summed over all ranks when a process group is
    running; zero outside ``mask``."""
    values = returns[mask].double()
    moments = torch.stack([values.new_tensor(float(values.numel())), values.sum(), values.square().sum()])
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.all_reduce(moments)
    count, total, squares = moments.clamp_min(0).unbind()
    count = count.clamp_min(1)
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt()
    normalised = (returns.double() - mean) / (std + eps)
    return torch.where(mask, normalised, 0).to(returns.dtype)


@dataclass
class PolicyRollout:
    """One sampled closed-loop episode of B scenarios in :meth:`SmartModel.forward`'s layout:
    ``tokens`` ``[B, N, S]`` (two history tokens, then the executed ones), ``poses`` ``[B, N,
    S, 3]`` where each token started, ``valid`` ``[B, N, S]``, ``steps`` ``[S]`` their log
    steps; per decision ``[B, N, D]`` (``D = S - 2``): ``rewards``, ``sampled_log_prob`` (of
    the drawn token when it was drawn), ``entropy`` and the events ``collision``,
    ``offroad``, ``distance`` (m, NaN where no log); ``controlled`` ``[B, N]`` the agents
    the policy drove."""

    tokens: torch.Tensor
    poses: torch.Tensor
    valid: torch.Tensor
    steps: torch.Tensor
    rewards: torch.Tensor
    sampled_log_prob: torch.Tensor
    entropy: torch.Tensor
    collision: torch.Tensor
    offroad: torch.Tensor
    distance: torch.Tensor
    controlled: torch.Tensor


@torch.no_grad()
def sample_rollout(
    model, vocabulary: MotionVocabulary, batch: ScenarioBatch, reward: RewardConfig, temperature: float = 1.0
) -> PolicyRollout:
    """Simulate ``batch`` once with every controlled agent sampling from ``model`` (the
    global torch RNG draws, so a resumed run draws the same), with ``reward``'s rewards."""
    was_training = model.training
    dynamics = token_dynamics(vocabulary)
    policy = TokenPolicy(model, vocabulary, temperature=temperature, top_k=None)
    core = EnvCore(batch, EnvConfig(dynamics, reward=reward), controlled="wosac")
    policy.reset(core.state, dynamics)
    tokens, poses, valid, steps = (list(x.unbind(2)) if x.dim() > 1 else x for x in policy.history)
    per_decision: dict[str, list[torch.Tensor]] = {
        key: [] for key in ("rewards", "sampled_log_prob", "entropy", "collision", "offroad", "distance")
    }
    agent_type = batch.agent_type
    while not core.done:
        state = core.state
        distribution = policy.distribution(state)
        drawn = distribution.sample(temperature)
        log_probs = torch.log_softmax(distribution.logits.float() / temperature, dim=-1)
        transition = core.step(drawn)
        after = transition.state
        executed = dynamics.inverse(state.current, after.pose[:, :, state.t + 1 : after.t + 1], agent_type)
        tokens.append(executed)
        if not after.done:  # the element after the last token is never an input
            poses.append(after.current[..., :3])
            valid.append(after.valid_now)
            steps = torch.cat([steps, steps.new_tensor([after.t])])
        per_decision["rewards"].append(transition.rewards)
        per_decision["sampled_log_prob"].append(log_probs.gather(-1, drawn[..., None]).squeeze(-1))
        per_decision["entropy"].append(-(log_probs.exp() * log_probs.nan_to_num(neginf=0.0)).sum(-1))
        per_decision["collision"].append(transition.events["collision"])
        per_decision["offroad"].append(transition.events["offroad"])
        per_decision["distance"].append(transition.events["distance_to_log"])
    model.train(was_training)
    return PolicyRollout(
        torch.stack(tokens, dim=2),
        torch.stack(poses, dim=2),
        torch.stack(valid, dim=2),
        steps,
        **{key: torch.stack(values, dim=2) for key, values in per_decision.items()},
        controlled=core.state.controlled,
    )


class Reinforce:
    """The REINFORCE objective (see the module docstring) for the shared training loop.
    Examples are the scenarios themselves: every step simulates a fresh episode."""

    def __init__(
        self,
        vocabulary: MotionVocabulary,
        reward: RewardConfig,
        gamma: float = 0.95,
        temperature: float = 1.0,
        kl_weight: float = 0.0,
        reference=None,
    ):
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"the discount gamma must be in [0, 1], not {gamma}")
        if temperature <= 0:
            raise ValueError(f"REINFORCE samples the policy: the temperature must be > 0, not {temperature}")
        if kl_weight and reference is None:
            raise ValueError("a KL regulariser needs the pre-trained policy (reference)")
        self.vocabulary, self.reward, self.gamma = vocabulary, reward, gamma
        self.temperature, self.kl_weight, self.reference = temperature, kl_weight, reference
        self.sizes = vocabulary.sizes()

    def examples(self, scenarios: Sequence[Scenario], model, progress: bool = False) -> list[Scenario]:
        return list(scenarios)

    def batch(self, examples: list[Scenario], rows: torch.Tensor, device: torch.device) -> ScenarioBatch:
        return collate_scenarios([examples[i] for i in rows.tolist()]).to(device)

    def log_probs(self, model, rollout: PolicyRollout, batch: ScenarioBatch) -> torch.Tensor:
        """Log-probabilities ``[B, N, D, V]`` of every token at every decision, with gradient:
        one teacher-forced pass over the rollout at the sampling temperature."""
        roads = map_tokens(batch, max_tokens=MAX_MAP_TOKENS)
        table = self.vocabulary.table().to(rollout.tokens.device)  # the rollout's (TokenPolicy passes it too)
        logits = model(
            rollout.tokens, rollout.poses, rollout.valid, batch.agent_type, roads, steps=rollout.steps, vocabulary=table
        )
        allowed = model_logit_mask(model, self.sizes.to(logits.device), batch.agent_type)[:, :, None]
        history = rollout.tokens.shape[2] - rollout.rewards.shape[2]
        logits = logits[:, :, history:].float().masked_fill(~allowed, float("-inf"))
        return torch.log_softmax(logits / self.temperature, dim=-1)

    def loss(self, model, batch: ScenarioBatch) -> StepLoss:
        rollout = sample_rollout(getattr(model, "module", model), self.vocabulary, batch, self.reward, self.temperature)
        D = rollout.rewards.shape[2]
        where = rollout.controlled[:, :, None].expand(-1, -1, D)
        returns = discounted_returns(rollout.rewards, self.gamma)
        advantage = normalise_returns(returns, where)
        was_training = model.training
        model.eval()  # no dropout: the log-probabilities of the policy that sampled (the exact gradient)
        log_probs = self.log_probs(model, rollout, batch)
        model.train(was_training)
        executed = rollout.tokens[:, :, -D:]
        chosen = log_probs.gather(-1, executed[..., None]).squeeze(-1)
        total = -(chosen * advantage)[where].sum()
        count = torch.tensor(float(where.sum()), device=total.device)
        stats = self._stats(rollout, returns, where)
        if self.kl_weight:
            kl = self._kl(log_probs, rollout, batch)[where].sum()
            total = total + self.kl_weight * kl
            stats["kl"] = kl.detach()
        return StepLoss(total, count, stats)

    def _kl(self, log_probs: torch.Tensor, rollout: PolicyRollout, batch: ScenarioBatch) -> torch.Tensor:
        """``KL(pi || pi_init)`` ``[B, N, D]`` at every decision of the rollout."""
        with torch.no_grad():
            reference = self.log_probs(self.reference.to(log_probs.device).eval(), rollout, batch)
        allowed = torch.isfinite(reference)  # tokens outside the agent's kind: no term (and no NaN gradient)
        return (log_probs.exp() * torch.where(allowed, log_probs - reference, 0.0)).sum(-1)

    @staticmethod
    def _stats(rollout: PolicyRollout, returns: torch.Tensor, where: torch.Tensor) -> dict[str, torch.Tensor]:
        """Sums over the controlled agents' decisions (the loop divides by their count):
        ``return`` (discounted, to go), ``reward``, ``entropy``, ``distance_to_log_m`` (where
        the log is valid, else 0), and ``collision_rate`` / ``offroad_rate``, the fraction of
        agents with the event at least once in the episode (every agent has D decisions)."""
        D = where.shape[2]
        collided = (rollout.collision & where).any(-1, keepdim=True).expand(-1, -1, D)
        offroad = (rollout.offroad & where).any(-1, keepdim=True).expand(-1, -1, D)
        return {
            "return": returns[where].sum().detach(),
            "reward": rollout.rewards[where].sum(),
            "entropy": rollout.entropy[where].sum(),
            "distance_to_log_m": rollout.distance.nan_to_num(0.0)[where].sum(),
            "collision_rate": collided[where].float().sum(),
            "offroad_rate": offroad[where].float().sum(),
        }
