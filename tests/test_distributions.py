"""Action distributions of learned policies and the GMM ego policy."""

from __future__ import annotations

import math

import pytest
import torch

from closedloop.agents.distributions import GaussianMixture, TokenDistribution


def _tokens(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 3, 6, generator=g)
    mask = torch.ones(2, 3, 6, dtype=torch.bool)
    mask[1, :, 4:] = False  # a kind with only 4 tokens
    return TokenDistribution(logits, mask), logits, mask


def test_token_distribution_values_and_masks():
    dist, logits, mask = _tokens()
    expected = torch.log_softmax(logits.masked_fill(~mask, -math.inf), -1)
    tokens = torch.tensor([[0, 5, 2], [1, 3, 0]])
    assert torch.allclose(dist.log_prob(tokens), expected.gather(-1, tokens[..., None])[..., 0])
    assert torch.equal(dist.mode(), expected.argmax(-1))
    top, top_lp = dist.top_k(3)
    assert torch.equal(top[..., 0], dist.mode()) and (top_lp[..., :-1] >= top_lp[..., 1:]).all()
    assert torch.equal(dist.sample(temperature=1.0, top_k=1), dist.mode())
    assert torch.equal(dist.sample(temperature=0.0), dist.mode())
    assert (dist.entropy() > 0).all()


def test_token_sampling_frequencies_and_reproducibility():
    dist, logits, mask = _tokens(1)
    big = TokenDistribution(logits.expand(4000, 2, 3, 6).reshape(4000 * 2, 3, 6), mask.repeat(4000, 1, 1))
    draws = big.sample(generator=torch.Generator().manual_seed(5)).view(4000, 2, 3)
    freq = torch.nn.functional.one_hot(draws, 6).float().mean(0)
    assert torch.allclose(freq, dist.log_probs.exp(), atol=0.03)
    assert not freq[1, :, 4:].any()  # masked tokens are never drawn
    again = big.sample(generator=torch.Generator().manual_seed(5)).view(4000, 2, 3)
    assert torch.equal(draws, again)
    cold = big.sample(temperature=1e-5, top_k=3, generator=torch.Generator().manual_seed(6)).view(4000, 2, 3)
    assert torch.equal(cold, dist.mode().expand(4000, 2, 3))  # CAT-K's near-greedy rollouts
    # Top-2 sampling at temperature 1: the two most likely tokens, renormalised.
    top2 = big.sample(top_k=2, generator=torch.Generator().manual_seed(7)).view(4000, 2, 3)
    freq2 = torch.nn.functional.one_hot(top2, 6).float().mean(0)
    best, best_lp = dist.top_k(2)
    expected = torch.zeros(2, 3, 6).scatter(-1, best, torch.softmax(best_lp, -1))
    assert torch.allclose(freq2, expected, atol=0.03)


def test_a_row_without_any_token_is_refused():
    mask = torch.ones(2, 3, 6, dtype=torch.bool)
    mask[1, 2] = False
    with pytest.raises(ValueError, match=r"no token at all for rows \[\[1, 2\]\]"):
        TokenDistribution(torch.zeros(2, 3, 6), mask)


def _mixture(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 3, 4, generator=g)
    mean = torch.randn(2, 3, 4, 5, 3, generator=g)
    log_std = torch.randn(2, 3, 4, 5, 3, generator=g) * 0.3 - 1.0
    return GaussianMixture(logits, mean, log_std), logits, mean, log_std


def test_mixture_log_prob_matches_torch_distributions():
    from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

    dist, logits, mean, log_std = _mixture()
    reference = MixtureSameFamily(Categorical(logits=logits), Independent(Normal(mean, log_std.exp()), 2))
    x = torch.randn(2, 3, 5, 3, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(dist.log_prob(x), reference.log_prob(x), atol=1e-5)
    assert torch.equal(
        dist.mode(), mean.gather(2, logits.argmax(-1)[..., None, None, None].expand(-1, -1, 1, 5, 3))[:, :, 0]
    )
    top, top_lp = dist.top_k(2)
    assert top.shape == (2, 3, 2, 5, 3) and torch.allclose(top_lp[:, :, 0], dist.log_prob(dist.mode()))


def test_mixture_with_other_batch_shapes():
    g = torch.Generator().manual_seed(2)
    for batch in ((4,), (5, 2, 1)):
        logits = torch.randn(*batch, 3, generator=g)
        mean = torch.randn(*batch, 3, 5, 3, generator=g)
        mix = GaussianMixture(logits, mean, torch.zeros(*batch, 3, 5, 3) - 1)
        assert mix.mode().shape == (*batch, 5, 3) and mix.sample(generator=g).shape == (*batch, 5, 3)
        top, lp = mix.top_k(2)
        assert top.shape == (*batch, 2, 5, 3) and lp.shape == (*batch, 2)
        assert torch.allclose(lp[..., 0], mix.log_prob(mix.mode()))


def test_mixture_sampling_moments():
    logits = torch.tensor([0.0, math.log(3.0)]).expand(20000, 1, 2)
    mean = torch.tensor([[-2.0], [4.0]]).expand(20000, 1, 2, 1)
    log_std = torch.log(torch.tensor([[0.5], [1.0]])).expand(20000, 1, 2, 1)
    x = GaussianMixture(logits, mean, log_std).sample(generator=torch.Generator().manual_seed(0))[:, 0, 0]
    # weights 1/4, 3/4: mean 0.25 * -2 + 0.75 * 4 = 2.5
    assert abs(float(x.mean()) - 2.5) < 0.06
    variance = 0.25 * (0.25 + 4.5**2) + 0.75 * (1.0 + 1.5**2)
    assert abs(float(x.var()) - variance) < 0.15


def test_gmm_ego_policy_drives_the_sdc_and_learns_its_chunk():
    from closedloop.agents.gmm import GMMEgoModel, GMMEgoPolicy
    from closedloop.data import collate_scenarios
    from closedloop.data.synthetic import generate_scenarios
    from closedloop.envs import EnvConfig, EnvCore, SimulationError, make_dynamics

    torch.manual_seed(0)
    batch = collate_scenarios(list(generate_scenarios(2, seed=3, town="cross", agents=(8, 12))))
    dynamics = make_dynamics("trajectory", chunk=5)
    policy = GMMEgoPolicy(GMMEgoModel(hidden=64, layers=2))
    core = EnvCore(batch, EnvConfig(dynamics), controlled="sdc")
    policy.reset(core.state, dynamics, torch.Generator().manual_seed(1))
    with pytest.raises(SimulationError, match="trajectory dynamics"):
        policy.reset(core.state, make_dynamics("bicycle"))
    policy.reset(core.state, dynamics, torch.Generator().manual_seed(1))
    # Behaviour cloning on the logged first chunk lowers its negative log-likelihood.
    target, valid = policy.target(core.state)
    assert valid.all()
    optimizer = torch.optim.Adam(policy.model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = -policy.distribution(core.state).log_prob(target).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 5
    # The mode now follows the log: executing it lands near the logged pose 0.5 s ahead.
    policy.temperature = 0.0
    actions = policy.act(core.state)
    assert actions.shape == (2, batch.agent_xyz.shape[1], 5, 3)
    # The other agents follow the log (the expert's actions): an ego planner among logged traffic.
    from closedloop.envs.env import expert_targets

    expert = dynamics.inverse(core.state.current, expert_targets(core.state, 5), batch.agent_type)
    not_sdc = ~batch.is_sdc
    assert torch.equal(actions[not_sdc], expert[not_sdc])
    transition = core.step(actions)
    sdc = batch.is_sdc & batch.agent_mask
    error = torch.linalg.norm(transition.state.current[sdc][:, :2] - batch.agent_xyz[:, :, 15, :2][sdc], dim=-1)
    assert error.max() < 0.5
