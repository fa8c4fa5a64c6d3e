"""Configurable per-agent rewards from the step's events.

The default is the RL fine-tuning paper's ``r = -||pos - pos_log|| - lambda * collision``
(Peng et al.); every term has its own weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from closedloop.envs.core import SimState


@dataclass(frozen=True)
class RewardConfig:
    distance_to_log: float = -1.0  # times metres from the logged position (0 where no log)
    collision: float = -1.0  # lambda
    offroad: float = 0.0
    red_light: float = 0.0
    progress: float = 0.0  # times metres travelled this step

    def __call__(self, previous: SimState, state: SimState, events: dict[str, torch.Tensor]) -> torch.Tensor:
        """Rewards ``[B, N]``."""
        travelled = torch.linalg.norm(state.pose[:, :, state.t, :2] - previous.pose[:, :, previous.t, :2], dim=-1)
        return (self.distance_to_log * torch.nan_to_num(events["distance_to_log"], nan=0.0)
                + self.collision * events["collision"].float()
                + self.offroad * events["offroad"].float()
                + self.red_light * events["red_light"].float()
                + self.progress * travelled)
