"""Env wrappers: the bases that ground-truth guidance (expert, CAT-K, RoaD), adapters and
recorders build on, for the PettingZoo face and for the batched tensor env."""

from closedloop.wrappers.base import BaseParallelWrapper, BatchedEnvWrapper
from closedloop.wrappers.catk import CatK, CatKBatched, CatKParallel, catk_select
from closedloop.wrappers.road import (
    Expert,
    ExpertBatched,
    ExpertParallel,
    RoaD,
    RoaDBatched,
    RoaDParallel,
    RoaDSettings,
    Sampling,
    road_select,
)

__all__ = [
    "BaseParallelWrapper",
    "BatchedEnvWrapper",
    "CatK",
    "CatKBatched",
    "CatKParallel",
    "Expert",
    "ExpertBatched",
    "ExpertParallel",
    "RoaD",
    "RoaDBatched",
    "RoaDParallel",
    "RoaDSettings",
    "Sampling",
    "catk_select",
    "road_select",
]
