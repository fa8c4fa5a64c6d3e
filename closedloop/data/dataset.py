"""Datasets over WOMD TFRecord shards and over a prepared cache.

``WomdIterableDataset`` streams scenarios from TFRecord shards and splits the work across
DataLoader workers and ``torch.distributed`` ranks: with at least as many shards as readers
each reader takes whole shards; otherwise every reader walks the framing of every shard
(cheap: 12-byte headers and a seek) and decodes only every ``n``-th record. Either way each
scenario is seen by exactly one reader.

``CachedScenarioDataset`` is a map-style dataset over the output of ``closedloop prepare``
(see :mod:`closedloop.data.cache`); being indexable it works with ``DistributedSampler``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import torch.distributed as dist
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from closedloop.data.scenario import Scenario
from closedloop.data.womd import OnError, SkipCounter, _read_file, expand_paths, iter_file_scenarios


def reader_slot() -> tuple[int, int]:
    """(index, count) of this reader among all DataLoader workers of all ranks."""
    rank, world = 0, 1
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * workers + worker, world * workers


class WomdIterableDataset(IterableDataset):
    """Stream :class:`Scenario` records from TFRecord shards (files, globs or directories).

    ``on_error="skip"`` skips corrupt records, counting them in ``self.skipped`` (per
    reader process) and warning; ``"raise"`` stops with an error naming file and record.
    """

    def __init__(
        self,
        paths: str | os.PathLike | Iterable[str | os.PathLike],
        *,
        on_error: OnError = "raise",
    ):
        self.paths = expand_paths(paths)
        self.on_error = on_error
        self.skipped = SkipCounter()

    def __iter__(self) -> Iterator[Scenario]:
        slot, slots = reader_slot()
        if len(self.paths) >= slots:
            for path in self.paths[slot::slots]:
                yield from _read_file(path, self.on_error, self.skipped)
            return
        base = 0  # global record number of the shard's first record, known from framing
        for path in self.paths:
            count = 0
            for index, scenario in iter_file_scenarios(
                path,
                self.on_error,
                self.skipped,
                keep=lambda i, base=base: (base + i) % slots == slot,
            ):
                count = index + 1
                if scenario is not None:
                    yield scenario
            base += count


class CachedScenarioDataset(Dataset):
    """Random access to the scenarios of a ``closedloop prepare`` cache directory."""

    def __init__(self, cache_dir: str | os.PathLike):
        from closedloop.data.cache import ScenarioCache

        self.cache = ScenarioCache(cache_dir)

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, index: int) -> Scenario:
        return self.cache[index]
