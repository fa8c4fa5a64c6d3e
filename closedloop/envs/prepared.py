"""Scenarios prepared once for simulation and stacked into batch after batch.

Starting an episode of B scenarios collates them into a :class:`ScenarioBatch` and builds
the roadgraph indexes the events and observations search (road-edge chunks, stop lines,
roadgraph-point chunks). Both are per-scenario work: a scenario's rows of the batch and of
each index do not depend on the other scenarios, only the padding does. So an env that
draws the same scenarios again and again (a training set of a few hundred, epoch after
epoch) prepares each scenario once, keeps it, and starts an episode by stacking the
prepared scenarios: padding and concatenating, several times cheaper than collating and
indexing (``scripts/profile_envs.py`` times both). A stacked batch and its indexes equal
those built on the batch directly, so episodes are the same either way
(``tests/test_prepared.py``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from closedloop.data.batch import ScenarioBatch, cat_padded, collate_scenarios, stack_batches
from closedloop.data.scenario import Scenario
from closedloop.envs.events import StopLines
from closedloop.envs.map_index import NearestPoints, RoadEdges
from closedloop.envs.observation import light_colours, road_table


@dataclass(frozen=True)
class MapIndexes:
    """The roadgraph indexes of a batch: what events (``edges``, ``stop_lines``) and
    observations (``road_points``, with ``keep`` candidates per agent; the tables) read.
    An env core takes them over and keeps its agents' neighbourhoods in them."""

    edges: RoadEdges
    stop_lines: StopLines
    road_points: NearestPoints
    road_table: torch.Tensor  # [B, P, 8] what observations read of each point
    light_colours: torch.Tensor  # [B, L, T, 3] each light's colour at each step

    @classmethod
    def build(cls, batch: ScenarioBatch, keep: int) -> MapIndexes:
        """The indexes of ``batch``; ``keep``: the observation's ``road_candidates``."""
        points = NearestPoints(batch.road_xyz[..., :2], batch.road_mask, keep, polyline_id=batch.road_id)
        return cls(RoadEdges(batch), StopLines(batch), points, road_table(batch), light_colours(batch))

    @classmethod
    def stack(cls, parts: Sequence[MapIndexes]) -> MapIndexes:
        """The indexes of the batch that stacks the parts' scenarios in order (padded
        points and lights read as absent: zeros)."""
        return cls(
            RoadEdges.stack([part.edges for part in parts]),
            StopLines.stack([part.stop_lines for part in parts]),
            NearestPoints.stack([part.road_points for part in parts]),
            cat_padded([part.road_table for part in parts], 0.0),
            cat_padded([part.light_colours for part in parts], 0.0),
        )


@dataclass(frozen=True)
class PreparedScenario:
    """One scenario collated (a batch of one) with its roadgraph indexes, never stepped:
    only stacks of it are."""

    scenario: Scenario
    batch: ScenarioBatch
    maps: MapIndexes


class PreparedScenarios:
    """Batches and their indexes for lists of scenarios, keeping the ``capacity`` most
    recently drawn scenarios prepared (0: none; each then costs its collating and
    indexing at every draw).

    A scenario is known again by identity: the same ``Scenario`` object (a list source
    hands out the same objects epoch after epoch; a dataset that reads scenarios from
    disk makes new ones, which are prepared anew). A scenario changed in place after it
    was prepared is not seen: make a new object (``scenario.replace(...)``) instead. What one holds in memory:
    ``scripts/profile_envs.py`` prints it for synthetic and real scenarios.
    """

    def __init__(self, max_agents: int, keep: int, device: str = "cpu", capacity: int = 128):
        if capacity < 0:
            raise ValueError(f"the number of scenarios kept prepared must be >= 0, not {capacity}")
        self.max_agents, self.keep, self.device, self.capacity = max_agents, keep, device, capacity
        self._kept: OrderedDict[int, PreparedScenario] = OrderedDict()  # by id(scenario), oldest first
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._kept)

    def batch(self, scenarios: Sequence[Scenario]) -> tuple[ScenarioBatch, MapIndexes]:
        """The batch of ``scenarios`` (agents padded to ``max_agents``) and its indexes."""
        if self.capacity == 0:
            batch = collate_scenarios(scenarios, max_agents=self.max_agents, pad_agents=True).to(self.device)
            return batch, MapIndexes.build(batch, self.keep)
        parts = [self._prepared(scenario) for scenario in scenarios]
        batch = stack_batches([part.batch for part in parts])
        return batch, MapIndexes.stack([part.maps for part in parts])

    def _prepared(self, scenario: Scenario) -> PreparedScenario:
        key = id(scenario)
        part = self._kept.get(key)
        if part is not None and part.scenario is scenario:  # the entry holds it, so its id is not reused
            self._kept.move_to_end(key)
            self.hits += 1
            return part
        self.misses += 1
        batch = collate_scenarios([scenario], max_agents=self.max_agents, pad_agents=True).to(self.device)
        part = PreparedScenario(scenario, batch, MapIndexes.build(batch, self.keep))
        self._kept[key] = part
        if len(self._kept) > self.capacity:
            self._kept.popitem(last=False)
        return part
