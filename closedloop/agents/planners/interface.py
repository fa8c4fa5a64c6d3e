"""Third-party planners: how they are called, checked and loaded.

A planner drives the SDC, one scenario at a time, like an agent in a Gymnasium loop:

- **observation form** (the default): ``action = planner(obs)`` for a callable, or
  ``planner.act(obs)`` for an object, where ``obs`` is the ego env's observation of the SDC
  (:mod:`closedloop.envs.observation`, float32 ``[392]`` with the default config) and the
  action is one for the ego dynamics (the bicycle model's ``[acceleration, curvature]`` by
  default); a Stable-Baselines3 model fits as ``lambda obs: model.predict(obs,
  deterministic=True)[0]``;
- **scene-view form**: a planner (function or object) with the attribute
  ``scene_view = True`` gets a :class:`SceneView` instead of ``obs``.

An optional ``reset(seed)`` is called before each episode. A class is built with no
arguments. Whatever a planner returns is checked: a real array (a numpy array, a list, a
tensor) of the ego dynamics' action shape, all finite; anything else raises
:class:`PlannerError` naming the planner, which the evaluation reports with the scenario.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from closedloop.constants import DT
from closedloop.envs.core import SimState
from closedloop.envs.dynamics import Dynamics

from .scoring import Route


class PlannerError(ValueError):
    """A planner failed: it raised, or returned something that is not a valid action."""


@dataclass(frozen=True)
class SceneView:
    """A read-only view of one scenario at the current step, for scene-view planners.

    Positions are metres in the scenario's frame (world minus ``origin``), headings
    radians; arrays are numpy and not writeable. Only the past and present: the log's
    future is not in it (the route is the SDC's navigation goal, see
    :mod:`closedloop.agents.planners.scoring`)."""

    scenario_id: str
    t: int  # the current step (10..89)
    dt: float  # seconds per step
    origin: np.ndarray  # [2] world x, y of the frame's origin
    sdc: int  # the SDC's index among the agents
    agent_id: np.ndarray  # [N] WOMD track ids
    agent_type: np.ndarray  # [N] WOMD object types (1 vehicle, 2 pedestrian, 3 cyclist)
    valid: np.ndarray  # [N] bool: the agent exists now
    states: np.ndarray  # [N, 5] x, y, heading, vx, vy now
    boxes: np.ndarray  # [N, 3] length, width, height
    history: np.ndarray  # [N, t + 1, 5] states at steps 0..t (NaN where not valid)
    road_points: np.ndarray  # [P, 3] roadgraph points x, y, z
    road_dir: np.ndarray  # [P, 3] vector to the next point of the same polyline
    road_type: np.ndarray  # [P] WOMD roadgraph type codes (closedloop.constants: is_road_edge, ...)
    road_id: np.ndarray  # [P] map feature id of each point
    light_lane_id: np.ndarray  # [L] the lane each traffic light controls
    light_state: np.ndarray  # [L] its state now (closedloop.constants: light_is_red, ...)
    light_stop_point: np.ndarray  # [L, 3]
    route: np.ndarray  # [R, 2] the SDC's route waypoints


def _frozen(tensor: torch.Tensor) -> np.ndarray:
    array = tensor.detach().cpu().numpy().copy()
    array.flags.writeable = False
    return array


def scene_view(state: SimState, route: Route, row: int = 0) -> SceneView:
    """Scenario ``row`` of ``state`` as a :class:`SceneView`."""
    b = state.batch
    agents = b.agent_mask[row]
    roads = b.road_mask[row]
    lights = b.light_mask[row]
    valid_hist = state.valid[row, agents]
    history = state.pose[row, agents].masked_fill(~valid_hist[..., None], float("nan"))
    return SceneView(
        scenario_id=b.scenario_id[row],
        t=state.t,
        dt=DT,
        origin=_frozen(b.origin[row]),
        sdc=int(torch.nonzero(b.is_sdc[row, agents])[0]),
        agent_id=_frozen(b.agent_id[row, agents]),
        agent_type=_frozen(b.agent_type[row, agents]),
        valid=_frozen(state.valid_now[row, agents]),
        states=_frozen(state.current[row, agents]),
        boxes=_frozen(state.dims[row, agents]),
        history=_frozen(history),
        road_points=_frozen(b.road_xyz[row, roads]),
        road_dir=_frozen(b.road_dir[row, roads]),
        road_type=_frozen(b.road_type[row, roads]),
        road_id=_frozen(b.road_id[row, roads]),
        light_lane_id=_frozen(b.light_lane_id[row, lights]),
        light_state=_frozen(b.light_state[row, lights, state.t]),
        light_stop_point=_frozen(b.light_stop_point[row, lights]),
        route=_frozen(route.points[row]),
    )


class UserPlanner:
    """A third-party planner (see the module docstring) under its ``name``."""

    def __init__(self, name: str, obj: Any):
        if inspect.isclass(obj):
            try:
                obj = obj()
            except Exception as err:
                raise PlannerError(f"planner {name}: building {obj.__name__}() failed: {err}") from err
        act = getattr(obj, "act", None)
        if not callable(act):
            act = obj if callable(obj) else None
        if act is None:
            raise PlannerError(
                f"planner {name}: {obj!r} is neither callable nor has act(obs); a planner is fn(obs) -> action "
                "or an object with act(obs) (and optional reset(seed))"
            )
        self.name, self.obj, self._act = name, obj, act
        self.scene_view = bool(getattr(obj, "scene_view", False))

    def reset(self, seed: int) -> None:
        reset = getattr(self.obj, "reset", None)
        if callable(reset):
            self._call(reset, seed)

    def act(self, inputs, dynamics: Dynamics) -> np.ndarray:
        """The planner's action for ``inputs`` (an observation or a :class:`SceneView`),
        checked against ``dynamics``' action shape."""
        return self.check(self._call(self._act, inputs), dynamics)

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except Exception as err:  # a third-party planner may raise anything: report it, go on
            raise PlannerError(f"planner {self.name} raised {type(err).__name__}: {err}") from err

    def check(self, action, dynamics: Dynamics) -> np.ndarray:
        """``action`` as a float32 array of ``dynamics``' action shape; :class:`PlannerError`
        for anything else (wrong type or shape, NaN/inf)."""
        if isinstance(action, torch.Tensor):
            action = action.detach().cpu().numpy()
        try:
            array = np.asarray(action)
        except (TypeError, ValueError) as err:
            raise PlannerError(f"planner {self.name} returned {type(action).__name__}, not an array: {err}") from None
        if array.dtype.kind not in "fiu":
            raise PlannerError(
                f"planner {self.name} returned {type(action).__name__} of dtype {array.dtype}, not real numbers: "
                f"{action!r:.80}"
            )
        shape = tuple(dynamics.spec.shape)
        if array.shape != shape:
            raise PlannerError(
                f"planner {self.name} returned shape {list(array.shape)}; {dynamics.name} actions have shape "
                f"{list(shape)}"
            )
        if not np.isfinite(array).all():
            raise PlannerError(f"planner {self.name} returned NaN/inf: {array.tolist()}")
        return array.astype(np.float32)
