"""Map tokens and the SMART-style tokenized model (closedloop.agents.map_tokens, .smart)."""

from __future__ import annotations

import numpy as np
import torch

from closedloop.agents.map_tokens import MAP_LANE, MAP_ROAD_EDGE, map_tokens
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
