"""One episode of a planner on the ego env or the PettingZoo face, with frames: how a
planner author watches what their planner does in the envs people step.

The ego env (``closedloop.envs.ego_env``) drives the SDC; the PettingZoo face hosts a
planner when it exposes the SDC alone (``parallel_env(..., controlled="sdc")``, the other
agents following the log or ``others=policy``). Observation-form planners get the env's
observation; scene-view planners a :class:`~closedloop.agents.planners.interface.SceneView`
of ``env.sim_state`` (its route is the SDC's logged path, as in policy evaluation).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from closedloop.envs.faces import ClosedLoopParallelEnv, EgoEnv

from .interface import UserPlanner, scene_view
from .scoring import Route


@dataclass
class HostedEpisode:
    """What :func:`host_planner` saw: the env's rewards summed, the steps, and the frames
    (``env.render()``, when the env was made with ``render_mode="rgb_array"``)."""

    scenario_id: str
    total_reward: float = 0.0
    steps: int = 0
    frames: list[np.ndarray] = field(default_factory=list)


def host_planner(env: EgoEnv | ClosedLoopParallelEnv, planner, seed: int | None = None) -> HostedEpisode:
    """Run ``planner`` (anything :class:`UserPlanner` takes, or one) on ``env`` for one
    episode from ``env.reset(seed=seed)``; a :class:`PlannerError` stops it, naming the
    scenario."""
    from .interface import PlannerError

    planner = (
        planner
        if isinstance(planner, UserPlanner)
        else UserPlanner(getattr(planner, "__name__", type(planner).__name__), planner)
    )
    parallel = isinstance(env, ClosedLoopParallelEnv)
    obs, _ = env.reset(seed=seed)
    if parallel and len(env.agents) != 1:
        raise ValueError("the PettingZoo face hosts a planner when it exposes the SDC alone: controlled='sdc'")
    route = Route.from_log(env.sim_state.batch)
    episode = HostedEpisode(env.scenario_id)
    try:
        planner.reset(0 if seed is None else seed)
        render = getattr(env, "render_mode", None) == "rgb_array"
        if render:
            episode.frames.append(env.render())
        while True:
            name = env.agents[0] if parallel else None
            inputs = scene_view(env.sim_state, route) if planner.scene_view else (obs[name] if parallel else obs)
            action = planner.act(inputs, env.dynamics)
            if parallel:
                obs, rewards, terminated, truncated, _ = env.step({name: action})
                reward, done = rewards[name], terminated[name] or truncated[name]
            else:
                obs, reward, terminated, truncated, _ = env.step(action)
                done = terminated or truncated
            episode.total_reward += float(reward)
            episode.steps += 1
            if render:
                episode.frames.append(env.render())
            if done:
                return episode
    except PlannerError as err:
        raise PlannerError(f"scenario {episode.scenario_id}, step {episode.steps}: {err}") from err
