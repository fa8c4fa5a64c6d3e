"""Planners: programs that drive the SDC, and the policy-evaluation benchmark's own.

- :mod:`~closedloop.agents.planners.interface`: the third-party planner interface (a
  callable ``obs -> action`` or an object with ``act(obs)`` and optional ``reset(seed)``,
  or the scene-view form) and its checks;
- :mod:`~closedloop.agents.planners.random_shooting`: the 64 random-shooting MPC planners
  ``rs_J{j}_D{d}``, batched;
- :mod:`~closedloop.agents.planners.scoring`: the planner-evaluation reward and the route;
- :mod:`~closedloop.agents.planners.episode`: an episode with the SDC driven by a planner
  and the others by a sim-agent model;
- :mod:`~closedloop.agents.planners.host`: one episode of a planner on the ego env or the
  PettingZoo face, with frames.

:func:`load_planners` resolves command-line specs: ``random_shooting`` (all 64),
``rs_J{j}_D{d}`` (one), ``ppo:RUN_DIR`` (a ``closedloop train ppo`` policy,
:mod:`~closedloop.agents.planners.ppo`), ``module:attr``, ``path/to/file.py:attr`` or the
name of an entry point in the group ``closedloop.planners``.
"""

from __future__ import annotations

from collections.abc import Sequence

from closedloop.agents.planners.interface import PlannerError, SceneView, UserPlanner, scene_view
from closedloop.agents.planners.random_shooting import NAMES as RANDOM_SHOOTING
from closedloop.agents.planners.random_shooting import RandomShooting, candidate_library, parse_name
from closedloop.agents.planners.scoring import Route, planner_reward

ENTRY_POINT_GROUP = "closedloop.planners"


def load_planner(spec: str) -> UserPlanner:
    """A third-party planner from ``module:attr``, ``path/to/file.py:attr`` or an entry
    point of ``closedloop.planners``, or a ``closedloop train ppo`` policy
    (``ppo:RUN_DIR`` or ``ppo:FILE.safetensors``), named by its spec."""
    from closedloop.plugins import load_object

    if spec.startswith("ppo:"):
        from closedloop.agents.planners.ppo import PPOPlanner

        return UserPlanner(spec, PPOPlanner(spec[len("ppo:") :]))
    return UserPlanner(spec, load_object(spec, group=ENTRY_POINT_GROUP))


def load_planners(specs: Sequence[str]) -> tuple[list[tuple[str, int, int]], list[UserPlanner]]:
    """``(random_shooting, others)``: the random-shooting planners named (``(name, J, D)``;
    ``random_shooting`` stands for all 64) and the third-party planners, in spec order."""
    shooting: list[tuple[str, int, int]] = []
    others: list[UserPlanner] = []
    for spec in specs:
        if spec == "random_shooting":
            shooting += [(name, *parse_name(name)) for name in RANDOM_SHOOTING]
        elif parse_name(spec) is not None:
            shooting.append((spec, *parse_name(spec)))
        else:
            others.append(load_planner(spec))
    names = [name for name, _, _ in shooting] + [p.name for p in others]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"planners named more than once: {', '.join(repeated)}")
    if not names:
        raise ValueError("no planners to evaluate")
    return shooting, others


__all__ = [
    "ENTRY_POINT_GROUP",
    "RANDOM_SHOOTING",
    "PlannerError",
    "RandomShooting",
    "Route",
    "SceneView",
    "UserPlanner",
    "candidate_library",
    "load_planner",
    "load_planners",
    "parse_name",
    "planner_reward",
    "scene_view",
]
