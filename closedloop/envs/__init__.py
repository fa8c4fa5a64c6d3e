"""The simulator: batched core, dynamics, events, the env core and its faces.

``import closedloop.envs`` registers the Gymnasium env ``closedloop/Ego-v0``.
"""

from closedloop.envs.core import SimState, check_actions, collisions, distance_to_log, reset, step
from closedloop.envs.dynamics import DYNAMICS, make_dynamics
from closedloop.envs.env import EnvConfig, EnvCore, Guidance, Transition
from closedloop.envs.errors import SimulationError
from closedloop.envs.faces import ClosedLoopParallelEnv, EgoEnv, ego_env, parallel_env, register
from closedloop.envs.gym_vector import AgentVectorEnv, agents_vector_env, ego_vector_env
from closedloop.envs.observation import ObservationConfig
from closedloop.envs.rewards import RewardConfig
from closedloop.envs.vector import BatchedEnv

register()

__all__ = [
    "DYNAMICS",
    "AgentVectorEnv",
    "BatchedEnv",
    "ClosedLoopParallelEnv",
    "EgoEnv",
    "EnvConfig",
    "EnvCore",
    "Guidance",
    "ObservationConfig",
    "agents_vector_env",
    "ego_vector_env",
    "RewardConfig",
    "SimState",
    "SimulationError",
    "Transition",
    "check_actions",
    "collisions",
    "distance_to_log",
    "ego_env",
    "make_dynamics",
    "parallel_env",
    "reset",
    "step",
]
