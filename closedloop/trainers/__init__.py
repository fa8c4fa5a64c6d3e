"""Trainers: one training loop (:mod:`closedloop.trainers.loop`) and the objectives it
minimises (:mod:`closedloop.trainers.objectives`), with checkpoints as sim agents
(:mod:`closedloop.trainers.checkpoint`) and ``torchrun`` support
(:mod:`closedloop.trainers.distributed`)."""

from closedloop.trainers.checkpoint import CheckpointError, resolve_weights
from closedloop.trainers.loop import TrainConfig, learning_rate, train
from closedloop.trainers.objectives import EgoBC, StepLoss, TokenBC

__all__ = [
    "CheckpointError",
    "EgoBC",
    "StepLoss",
    "TokenBC",
    "TrainConfig",
    "learning_rate",
    "resolve_weights",
    "train",
]
