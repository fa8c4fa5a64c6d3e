"""Map tokens and the SMART-style tokenized model (closedloop.agents.map_tokens, .smart)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from closedloop.agents.map_tokens import MAP_LANE, MAP_ROAD_EDGE, map_tokens
from closedloop.agents.smart import MODEL_SIZES, SmartModel, count_parameters, logit_mask
from closedloop.constants import LIGHT_GO, LIGHT_STOP
from closedloop.data import collate_scenarios
from closedloop.data.synthetic import generate_scenarios
from tests.scenes import make_scenario


def _lane_batch():
    """A 20 m straight lane along +x (points every 0.5 m) whose light is red, then green from
    step 40; a 12 m road edge along y = 5; the SDC parked at the origin."""
    lane = np.stack([np.linspace(0.0, 20.0, 41), np.zeros(41)], axis=1)
    edge = np.stack([np.linspace(0.0, 12.0, 7), np.full(7, 5.0)], axis=1)
    states = np.where(np.arange(91) < 40, LIGHT_STOP, LIGHT_GO)
    scenario = make_scenario(
        [{"xy": (0.0, 0.0), "heading": 0.0}], road_edges=[edge], lanes=[lane], lights=[(0, states, (20.0, 0.0))]
    )
    return collate_scenarios([scenario])


def test_map_tokens_straight_lane():
    tokens = map_tokens(_lane_batch(), segment_length=5.0)
    assert tokens.mask.shape == (1, 7) and tokens.mask.all()
    lane = tokens.kind[0] == MAP_LANE
    edge = tokens.kind[0] == MAP_ROAD_EDGE
    assert int(lane.sum()) == 4 and int(edge.sum()) == 3
    torch.testing.assert_close(
        tokens.position[0, lane], torch.tensor([[2.5, 0.0], [7.5, 0.0], [12.5, 0.0], [17.5, 0.0]])
    )
    torch.testing.assert_close(tokens.heading[0, lane], torch.zeros(4))
    torch.testing.assert_close(tokens.length[0, lane], torch.full((4,), 5.0))
    # The 12 m edge: three pieces of 4 m.
    torch.testing.assert_close(tokens.position[0, edge], torch.tensor([[2.0, 5.0], [6.0, 5.0], [10.0, 5.0]]))
    torch.testing.assert_close(tokens.length[0, edge], torch.full((3,), 4.0))
    # Lights are per step: red before step 40, green after, none on the edge.
    assert (tokens.light[0, lane, :40] == LIGHT_STOP).all() and (tokens.light[0, lane, 40:] == LIGHT_GO).all()
    assert (tokens.light[0, edge] == 0).all()
    assert (tokens.subtype[0, lane] == 2).all() and (tokens.subtype[0, edge] == 15).all()


def test_map_tokens_max_tokens_keeps_nearest():
    batch = collate_scenarios(list(generate_scenarios(2, seed=1)))
    full = map_tokens(batch)
    kept = map_tokens(batch, max_tokens=40)
    assert kept.mask.shape[1] <= 40 and kept.mask.sum(1).tolist() == [min(40, int(n)) for n in full.mask.sum(1)]
    for b in range(2):
        d_full = full.position[b, full.mask[b]].norm(dim=-1).sort().values
        d_kept = kept.position[b, kept.mask[b]].norm(dim=-1).sort().values
        torch.testing.assert_close(d_kept, d_full[: len(d_kept)])
    assert (full.length[full.mask] <= 5.0 + 1e-4).all()
    assert (full.mask.sum(1) > 0).all()


# ---------------------------------------------------------------------------------------
# The model

S = 8  # elements (tokens) per agent in the model tests


def _scene(seed: int = 3, scenarios: int = 2):
    """Synthetic scenarios as model inputs: tokens, start poses every 0.5 s, validity, map."""
    batch = collate_scenarios(list(generate_scenarios(scenarios, seed=seed, agents=(6, 9))))
    poses = torch.cat([batch.agent_xyz[:, :, ::5, :2], batch.agent_heading[:, :, ::5, None]], -1)[:, :, : S + 1]
    valid = batch.agent_valid[:, :, ::5][:, :, :S] & batch.agent_mask[:, :, None]
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 2048, valid.shape, generator=gen)
    return tokens, poses, valid, batch.agent_type, map_tokens(batch)


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    model = SmartModel("micro", vocabulary=torch.randn(3, 700, 5, 3)).eval()
    return model


def test_parameter_counts():
    targets = {"tiny": 7e6, "mini": 3e6, "nano": 1e6}
    for name, target in targets.items():
        config = MODEL_SIZES[name]
        assert config.vocab_size == 2048 and config.kinds == 3
        n = count_parameters(SmartModel(config))
        assert abs(n - target) <= 0.15 * target, (name, n)
    assert count_parameters(SmartModel("micro")) < count_parameters(SmartModel("nano"))


def test_incremental_decoding_equals_forward(micro):
    tokens, poses, valid, agent_type, tokens_map = _scene()
    assert (tokens_map.light != 0).any(), "the scene should have traffic lights"
    assert (~valid).any() and valid.any()
    with torch.no_grad():
        full = micro(tokens, poses, valid, agent_type, tokens_map)
    cache = micro.start(tokens[:, :, :2], poses[:, :, :3], valid[:, :, :3], agent_type, tokens_map)
    v = valid[:, :, 2]
    torch.testing.assert_close(cache.logits[v], full[:, :, 2][v], atol=1e-4, rtol=0)
    branch = None
    for s in range(3, S):
        if s == 5:
            branch = cache.clone()
        logits = micro.step(cache, tokens[:, :, s - 1], poses[:, :, s], valid[:, :, s], time_index=5 * s)
        v = valid[:, :, s]
        torch.testing.assert_close(logits[v], full[:, :, s][v], atol=1e-4, rtol=0)
    # The branch taken at element 5 is independent of the cache that went on.
    assert branch.next_step == 25 and cache.next_step == 5 * S
    logits = micro.step(branch, tokens[:, :, 4], poses[:, :, 5], valid[:, :, 5], time_index=25)
    torch.testing.assert_close(logits[valid[:, :, 5]], full[:, :, 5][valid[:, :, 5]], atol=1e-4, rtol=0)
    # A cache already past the step asked for refuses it.
    with pytest.raises(ValueError, match="clone"):
        micro.step(cache, tokens[:, :, 4], poses[:, :, 5], valid[:, :, 5], time_index=25)


def _transform_poses(poses: torch.Tensor, rotation: float, translation: tuple[float, float]) -> torch.Tensor:
    c, s = math.cos(rotation), math.sin(rotation)
    x, y, h = poses.unbind(-1)
    return torch.stack([c * x - s * y + translation[0], s * x + c * y + translation[1], h + rotation], dim=-1)


def test_pose_invariance():
    # Neighbourhoods are the K nearest, and the synthetic town is a regular grid where several
    # map tokens often lie at exactly the same distance: the set chosen among ties may change
    # with the rounding of a rotated scene. Ample K leaves the selection to the radii.
    config = dataclasses.replace(MODEL_SIZES["micro"], map_neighbours=512, agent_map_neighbours=512)
    torch.manual_seed(0)
    micro = SmartModel(config, vocabulary=torch.randn(3, 700, 5, 3)).eval()
    tokens, poses, valid, agent_type, tokens_map = _scene(seed=5)
    rotation, translation = 2.1, (37.0, -81.0)
    with torch.no_grad():
        base = micro(tokens, poses, valid, agent_type, tokens_map)
        moved = micro(
            tokens,
            _transform_poses(poses, rotation, translation),
            valid,
            agent_type,
            tokens_map.transformed(rotation, translation),
        )
    torch.testing.assert_close(moved[valid], base[valid], atol=1e-4, rtol=0)
    assert base[valid].std() > 1e-3  # not trivially constant


def test_padded_agents_do_not_change_valid_logits(micro):
    tokens, poses, valid, agent_type, tokens_map = _scene(seed=7)
    B, N, _ = tokens.shape
    extra = 5
    gen = torch.Generator().manual_seed(0)
    pad_poses = torch.cat([poses, torch.randn(B, extra, S + 1, 3, generator=gen) * 5], dim=1)
    pad_poses[:, N:, 0, 0] = float("nan")  # garbage in padding must not leak either
    pad_tokens = torch.cat([tokens, torch.randint(0, 2048, (B, extra, S), generator=gen)], dim=1)
    pad_valid = torch.cat([valid, torch.zeros(B, extra, S, dtype=torch.bool)], dim=1)
    pad_type = torch.cat([agent_type, torch.ones(B, extra, dtype=agent_type.dtype)], dim=1)
    with torch.no_grad():
        base = micro(tokens, poses, valid, agent_type, tokens_map)
        padded = micro(pad_tokens, pad_poses, pad_valid, pad_type, tokens_map)
    torch.testing.assert_close(padded[:, :N][valid], base[valid], atol=1e-5, rtol=0)
    assert torch.isfinite(padded).all()


def test_micro_forward_backward_finite():
    torch.manual_seed(0)
    model = SmartModel("micro").train()
    tokens, poses, valid, agent_type, tokens_map = _scene(seed=9)
    logits = model(tokens, poses, valid, agent_type, tokens_map)
    assert logits.shape == (*tokens.shape, 2048)
    loss = torch.nn.functional.cross_entropy(logits[valid], tokens[valid], label_smoothing=0.1)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) > 0.9 * len(list(model.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)


def test_logit_mask():
    agent_type = torch.tensor([[1, 2, 3, 0]])  # vehicle, pedestrian, cyclist, unset (a vehicle)
    mask = logit_mask([5, 3, 4], agent_type, vocab_size=6)
    assert mask.sum(-1).tolist() == [[5, 3, 4, 5]]
    assert mask[0, 1].tolist() == [True, True, True, False, False, False]


def test_real_scenario_tokens_and_invariance(scenario_file):
    """On real WOMD (no grid ties) the default top-K neighbourhoods are invariant too."""
    from closedloop.data import read_scenarios

    batch = collate_scenarios(list(read_scenarios(scenario_file)))
    tokens_map = map_tokens(batch)
    assert tokens_map.mask.all() and (tokens_map.length <= 5.0 + 1e-4).all()
    assert set(tokens_map.kind.unique().tolist()) == {0, 1, 2, 3}
    lit = (tokens_map.light != 0).any(-1)
    assert lit.any() and (tokens_map.kind[lit] == MAP_LANE).all()
    poses = torch.cat([batch.agent_xyz[:, :, ::5, :2], batch.agent_heading[:, :, ::5, None]], -1)
    valid = batch.agent_valid[:, :, ::5][:, :, :18]
    tokens = torch.randint(0, 2048, valid.shape, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = SmartModel("micro").eval()
    with torch.no_grad():
        base = model(tokens, poses, valid, batch.agent_type, tokens_map)
        moved = model(
            tokens,
            _transform_poses(poses, -0.7, (500.0, 20.0)),
            valid,
            batch.agent_type,
            tokens_map.transformed(-0.7, (500.0, 20.0)),
        )
    torch.testing.assert_close(moved[valid], base[valid], atol=1e-4, rtol=0)


def test_map_tokens_do_not_depend_on_the_other_scenarios_of_the_batch(real_scenarios):
    from closedloop.data import collate_scenarios

    first, second = real_scenarios["637f20cafde22ff8"], real_scenarios["ee519cf571686d19"]
    alone = map_tokens(collate_scenarios([second]))
    batched = map_tokens(collate_scenarios([first, second]))
    M = int(alone.mask[0].sum())
    assert int(batched.mask[1].sum()) == M
    assert torch.allclose(batched.position[1, :M], alone.position[0, :M], atol=1e-3)
    assert torch.allclose(torch.cos(batched.heading[1, :M] - alone.heading[0, :M]), torch.ones(M), atol=1e-5)
    assert (batched.length[1, :M] <= 5.0 + 1e-4).all()
