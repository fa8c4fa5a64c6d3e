"""Dynamics models: batched forward and inverse maps between actions and poses.

A model advances agent states ``(x, y, heading, vx, vy)`` ``[..., 5]`` by ``chunk`` steps
of ``DT`` seconds. ``forward(state, action)`` returns the next ``chunk`` states
``[..., chunk, 5]``; ``inverse(state, target)`` returns the action that best reproduces
``target`` states ``[..., chunk, 5]`` from ``state``. All models run on any device and
broadcast over leading (batch, agent) dimensions.

Models: ``delta_global`` (dx, dy, dyaw in the world frame), ``delta_local`` (the same in
the agent's frame), ``bicycle`` (acceleration and curvature, Waymax's invertible kinematic
bicycle: |a| <= 6 m/s^2, |kappa| <= 0.3 1/m, target yaw from the velocity direction above
0.6 m/s), ``state`` (teleport to a pose), ``trajectory`` (a k-step chunk of local poses),
``tokens`` (one of a vocabulary of k-step local pose chunks, 0.5 s with k = 5).

Action bounds (``spec.low`` / ``spec.high``): continuous actions outside them are clipped
by the simulator (angles are wrapped instead), and the clipping is counted per agent;
discrete actions outside their range, NaN/inf, and actions of the wrong dtype or shape are
rejected with a :class:`SimulationError`. The bounds keep every state finite: no finite
action can move an agent more than a few kilometres in one step.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import torch

from closedloop.constants import DT, token_kind
from closedloop.envs.errors import SimulationError

X, Y, YAW, VX, VY = range(5)
INVERSE_BLOCK = 1 << 23  # elements of the token-matching difference computed at once


def wrap_angle(angle: torch.Tensor) -> torch.Tensor:
    """Wrap to [-pi, pi)."""
    return torch.remainder(angle + math.pi, 2 * math.pi) - math.pi


def _rotate(x: torch.Tensor, y: torch.Tensor, angle: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c, s = torch.cos(angle), torch.sin(angle)
    return x * c - y * s, x * s + y * c


def _with_velocity(x, y, yaw, prev_x, prev_y) -> torch.Tensor:
    """States from poses, velocities by finite difference along the chunk."""
    vx = (x - prev_x) / DT
    vy = (y - prev_y) / DT
    return torch.stack([x, y, yaw, vx, vy], dim=-1)


def _chain_velocities(state: torch.Tensor, poses: torch.Tensor) -> torch.Tensor:
    """States ``[..., k, 5]`` for poses ``[..., k, 3]`` reached one step apart from ``state``."""
    px = torch.cat([state[..., None, X], poses[..., :-1, 0]], dim=-1)
    py = torch.cat([state[..., None, Y], poses[..., :-1, 1]], dim=-1)
    return _with_velocity(poses[..., 0], poses[..., 1], wrap_angle(poses[..., 2]), px, py)


@dataclass(frozen=True)
class ActionSpec:
    """What an action looks like: ``shape`` of one agent's action, box bounds or ``n``.

    ``low`` / ``high`` / ``angular`` run along the action's last dimension; ``angular``
    marks headings, which are wrapped into the bounds rather than clipped."""

    shape: tuple[int, ...]
    low: tuple[float, ...] | None = None
    high: tuple[float, ...] | None = None
    n: int | None = None  # one discrete action of n values
    bins: int | None = None  # one discrete value per dimension, of `bins` values each
    angular: tuple[bool, ...] | None = None

    @property
    def discrete(self) -> bool:
        return self.n is not None or self.bins is not None

    @property
    def levels(self) -> int:
        """How many values a discrete action (or each of its dimensions) takes."""
        return self.n if self.n is not None else self.bins


class Dynamics(abc.ABC):
    """Base class: subclasses set ``name``, ``chunk`` and ``spec``."""

    name: str = ""
    chunk: int = 1
    spec: ActionSpec

    def check_action(self, action: torch.Tensor, batch_shape: tuple[int, ...]) -> None:
        """Raise :class:`SimulationError` for a wrong dtype or shape (no device sync: values
        are checked by :meth:`bound` and the simulator)."""
        expected = (*batch_shape, *self.spec.shape)
        if action.dtype in (torch.bool,) or action.dtype.is_complex:
            raise SimulationError(
                f"{self.name} actions cannot be of dtype {action.dtype}; "
                f"{'integer' if self.spec.discrete else 'real'} actions expected"
            )
        if self.spec.discrete and action.dtype.is_floating_point:
            raise SimulationError(
                f"{self.name} actions are integer indices in [0, {self.spec.levels}), not {action.dtype}"
            )
        if tuple(action.shape) != expected:
            raise SimulationError(f"{self.name} actions must have shape {list(expected)}, got {list(action.shape)}")

    def bound(self, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(action, outside)``: continuous actions (floating point) clipped into ``spec``'s
        bounds, except headings, which every model wraps anyway (any finite heading is
        harmless, so none is clipped), and NaN/inf turned into NaN (so that they show in
        the next state, where the simulator looks for them); discrete ones clamped into
        range; and whether each agent's action was outside the bounds ``[*batch]``."""
        batch_dims = action.dim() - len(self.spec.shape)
        if self.spec.discrete:
            outside = (action < 0) | (action >= self.spec.levels)
            inside = action.clamp(0, self.spec.levels - 1)
        else:
            low, high = self._clip_limits(action)
            inside = torch.clamp(action, low, high) + action * 0  # x * 0 is NaN for NaN/inf, else 0
            outside = inside != action
        if batch_dims < action.dim():
            outside = outside.flatten(batch_dims).any(-1)
        return inside, outside

    def limits(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``spec``'s bounds ``(low, high)`` as tensors on ``like``'s device and dtype."""

        def make():
            low = torch.tensor(self.spec.low, dtype=like.dtype, device=like.device)
            return low, torch.tensor(self.spec.high, dtype=like.dtype, device=like.device)

        return self._cached("limits", like, make)

    def _clip_limits(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The bounds actions are clipped to: ``spec``'s, unbounded for headings."""

        def make():
            low, high = self.limits(like)
            if self.spec.angular is None:
                return low, high
            angular = torch.tensor(self.spec.angular, device=like.device)
            return low.masked_fill(angular, -math.inf), high.masked_fill(angular, math.inf)

        return self._cached("clip_limits", like, make)

    def _cached(self, name: str, like: torch.Tensor, make):
        """``make()`` once per device and dtype of ``like``: constants moved to the device
        every step would cost a host-to-device copy (a synchronisation on CUDA) per step."""
        cache = self.__dict__.setdefault("_device_cache", {})
        key = (name, like.device, like.dtype)
        if key not in cache:
            cache[key] = make()
        return cache[key]

    @abc.abstractmethod
    def forward(
        self, state: torch.Tensor, action: torch.Tensor, agent_type: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The next ``chunk`` states ``[..., chunk, 5]`` after ``action`` from ``state``.
        ``agent_type`` (WOMD type codes, the batch shape) matters to models whose actions
        depend on it (per-kind token vocabularies); the others ignore it."""

    @abc.abstractmethod
    def inverse(
        self, state: torch.Tensor, target: torch.Tensor, agent_type: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The action that best reaches ``target`` ``[..., chunk, 5]`` from ``state``."""


class DeltaGlobal(Dynamics):
    name, chunk = "delta_global", 1
    spec = ActionSpec((3,), (-6.0, -6.0, -math.pi), (6.0, 6.0, math.pi), angular=(False, False, True))

    def forward(self, state, action, agent_type=None):
        pose = torch.stack(
            [state[..., X] + action[..., 0], state[..., Y] + action[..., 1], state[..., YAW] + action[..., 2]], dim=-1
        )
        return _chain_velocities(state, pose[..., None, :])

    def inverse(self, state, target, agent_type=None):
        t = target[..., 0, :]
        return torch.stack(
            [t[..., X] - state[..., X], t[..., Y] - state[..., Y], wrap_angle(t[..., YAW] - state[..., YAW])], dim=-1
        )


class DeltaLocal(Dynamics):
    name, chunk = "delta_local", 1
    spec = ActionSpec((3,), (-6.0, -6.0, -math.pi), (6.0, 6.0, math.pi), angular=(False, False, True))

    def forward(self, state, action, agent_type=None):
        dx, dy = _rotate(action[..., 0], action[..., 1], state[..., YAW])
        pose = torch.stack([state[..., X] + dx, state[..., Y] + dy, state[..., YAW] + action[..., 2]], dim=-1)
        return _chain_velocities(state, pose[..., None, :])

    def inverse(self, state, target, agent_type=None):
        t = target[..., 0, :]
        dx, dy = _rotate(t[..., X] - state[..., X], t[..., Y] - state[..., Y], -state[..., YAW])
        return torch.stack([dx, dy, wrap_angle(t[..., YAW] - state[..., YAW])], dim=-1)


class Bicycle(Dynamics):
    """Invertible kinematic bicycle: action (acceleration m/s^2, curvature 1/m)."""

    name, chunk = "bicycle", 1
    max_accel, max_curvature, min_speed_for_yaw = 6.0, 0.3, 0.6
    spec = ActionSpec((2,), (-6.0, -0.3), (6.0, 0.3))

    def forward(self, state, action, agent_type=None):
        accel = action[..., 0].clamp(-self.max_accel, self.max_accel)
        kappa = action[..., 1].clamp(-self.max_curvature, self.max_curvature)
        yaw = state[..., YAW]
        speed = torch.hypot(state[..., VX], state[..., VY])
        distance = speed * DT + 0.5 * accel * DT * DT
        x = state[..., X] + state[..., VX] * DT + 0.5 * accel * torch.cos(yaw) * DT * DT
        y = state[..., Y] + state[..., VY] * DT + 0.5 * accel * torch.sin(yaw) * DT * DT
        new_yaw = wrap_angle(yaw + kappa * distance)
        new_speed = speed + accel * DT
        out = torch.stack([x, y, new_yaw, new_speed * torch.cos(new_yaw), new_speed * torch.sin(new_yaw)], -1)
        return out[..., None, :]

    def inverse(self, state, target, agent_type=None):
        t = target[..., 0, :]
        speed = torch.hypot(state[..., VX], state[..., VY])
        new_speed = torch.hypot(t[..., VX], t[..., VY])
        # The acceleration that lands on the target position along the heading (the
        # position update is x + v dt + a h dt^2 / 2), so longitudinal drift is corrected.
        yaw = state[..., YAW]
        along = (t[..., X] - state[..., X] - state[..., VX] * DT) * torch.cos(yaw) + (
            t[..., Y] - state[..., Y] - state[..., VY] * DT
        ) * torch.sin(yaw)
        accel = 2 * along / (DT * DT)
        # Logged headings are noisy at speed; the velocity direction is the better target.
        velocity_yaw = torch.atan2(t[..., VY], t[..., VX])
        target_yaw = torch.where(new_speed > self.min_speed_for_yaw, velocity_yaw, t[..., YAW])
        distance = speed * DT + 0.5 * accel * DT * DT
        turn = wrap_angle(target_yaw - state[..., YAW])
        kappa = torch.where(
            distance.abs() > 1e-3,
            turn / torch.where(distance.abs() > 1e-3, distance, torch.ones_like(distance)),
            torch.zeros_like(turn),
        )
        return torch.stack(
            [accel.clamp(-self.max_accel, self.max_accel), kappa.clamp(-self.max_curvature, self.max_curvature)], dim=-1
        )


class StateDynamics(Dynamics):
    """Teleport: the action is the next pose (x, y, heading) in the world frame."""

    name, chunk = "state", 1
    spec = ActionSpec((3,), (-1e6, -1e6, -math.pi), (1e6, 1e6, math.pi), angular=(False, False, True))

    def forward(self, state, action, agent_type=None):
        return _chain_velocities(state, action[..., None, :])

    def inverse(self, state, target, agent_type=None):
        return target[..., 0, :3].clone()


class Trajectory(Dynamics):
    """A chunk of ``k`` poses in the agent's frame at the chunk start, executed as given."""

    name = "trajectory"

    def __init__(self, chunk: int = 5):
        self.chunk = chunk
        self.spec = ActionSpec(
            (chunk, 3), (-50.0, -50.0, -math.pi), (50.0, 50.0, math.pi), angular=(False, False, True)
        )

    def forward(self, state, action, agent_type=None):
        dx, dy = _rotate(action[..., 0], action[..., 1], state[..., None, YAW])
        poses = torch.stack(
            [state[..., None, X] + dx, state[..., None, Y] + dy, state[..., None, YAW] + action[..., 2]], dim=-1
        )
        return _chain_velocities(state, poses)

    def inverse(self, state, target, agent_type=None):
        dx, dy = _rotate(
            target[..., X] - state[..., None, X], target[..., Y] - state[..., None, Y], -state[..., None, YAW]
        )
        return torch.stack([dx, dy, wrap_angle(target[..., YAW] - state[..., None, YAW])], dim=-1)


class Tokens(Dynamics):
    """Discrete motion tokens: a vocabulary of k-step local pose chunks (x, y, yaw in the
    frame of the chunk's start pose), either one ``[V, k, 3]`` for every agent or one per
    agent kind ``[K, V, k, 3]`` (vehicle, pedestrian, cyclist: see
    :func:`closedloop.constants.token_kind`), where an agent's type picks its vocabulary.
    Kinds with fewer than V tokens repeat their token 0 up to V (harmless motions that
    :meth:`inverse` never prefers: ties go to the lowest index)."""

    name = "tokens"

    def __init__(self, vocabulary: torch.Tensor):
        if vocabulary.dim() == 3:
            vocabulary = vocabulary[None]
        if vocabulary.dim() != 4 or vocabulary.shape[-1] != 3 or vocabulary.shape[1] == 0:
            raise ValueError(f"a token vocabulary is [V, k, 3] or [kinds, V, k, 3], got {list(vocabulary.shape)}")
        if not vocabulary.dtype.is_floating_point or not bool(torch.isfinite(vocabulary).all()):
            bad = torch.nonzero(~torch.isfinite(vocabulary).flatten(2).all(-1))[:5].tolist()
            raise ValueError(
                f"a token vocabulary holds finite floats; (kind, token) {bad} are NaN/inf"
                if bad
                else f"a token vocabulary holds floats, not {vocabulary.dtype}"
            )
        if float(vocabulary[..., :2].abs().max()) > 50.0:
            raise ValueError(
                "a token vocabulary's chunks move at most 50 m (the trajectory bounds); "
                f"this one reaches {float(vocabulary[..., :2].abs().max()):.1f} m"
            )
        self.vocabulary = vocabulary  # [K, V, k, 3]
        self.chunk = vocabulary.shape[2]
        self.spec = ActionSpec((), n=vocabulary.shape[1])
        self._trajectory = Trajectory(self.chunk)

    @property
    def kinds(self) -> int:
        return self.vocabulary.shape[0]

    def _table(self, like: torch.Tensor) -> torch.Tensor:
        return self._cached("vocabulary", like, lambda: self.vocabulary.to(like.device, like.dtype))

    def _kind(self, agent_type: torch.Tensor | None, shape: torch.Size, device) -> torch.Tensor:
        if self.kinds == 1:
            return torch.zeros(shape, dtype=torch.long, device=device)
        if agent_type is None:
            raise ValueError("a per-kind token vocabulary needs the agents' types (agent_type)")
        return token_kind(agent_type.to(device)).expand(shape)

    def forward(self, state, action, agent_type=None):
        kind = self._kind(agent_type, action.shape, state.device)
        return self._trajectory.forward(state, self._table(state)[kind, action])

    def inverse(self, state, target, agent_type=None):
        """The token of each agent's vocabulary whose poses lie closest (mean position
        error plus heading error in metres at 1 m per radian) to the target chunk."""
        local = self._trajectory.inverse(state, target)  # [..., k, 3]
        batch_shape = local.shape[:-2]
        kind = self._kind(agent_type, batch_shape, state.device).reshape(-1)
        local = local.reshape(-1, *local.shape[-2:])
        table = self._table(state)
        # In blocks of agents: a [agents, V, k, 3] difference at once would take gigabytes.
        rows = max(1, INVERSE_BLOCK // (table.shape[1] * table.shape[2] * 3))
        best = []
        for start in range(0, local.shape[0], rows):
            diff = local[start : start + rows, None] - table[kind[start : start + rows]]
            cost = torch.linalg.norm(diff[..., :2], dim=-1).mean(-1) + wrap_angle(diff[..., 2]).abs().mean(-1)
            best.append(cost.argmin(-1))
        return torch.cat(best).view(batch_shape) if best else kind.new_zeros(batch_shape)


class Normalized(Dynamics):
    """Actions in [-1, 1] per dimension, mapped linearly onto the wrapped model's bounds."""

    def __init__(self, inner: Dynamics):
        if inner.spec.low is None:
            raise ValueError(f"{inner.name} has no continuous bounds to normalise")
        self.inner, self.name, self.chunk = inner, f"{inner.name}[-1,1]", inner.chunk
        self.spec = ActionSpec(
            inner.spec.shape, tuple([-1.0] * len(inner.spec.low)), tuple([1.0] * len(inner.spec.low))
        )

    def forward(self, state, action, agent_type=None):
        low, high = self.inner.limits(state)
        return self.inner.forward(state, low + (action.clamp(-1, 1) + 1) / 2 * (high - low), agent_type)

    def inverse(self, state, target, agent_type=None):
        low, high = self.inner.limits(state)
        return ((self.inner.inverse(state, target, agent_type) - low) / (high - low) * 2 - 1).clamp(-1, 1)


class Discretized(Dynamics):
    """``bins`` evenly spaced values per action dimension (integer actions per dimension)."""

    def __init__(self, inner: Dynamics, bins: int):
        if inner.spec.low is None or len(inner.spec.shape) != 1:
            raise ValueError(f"{inner.name} actions cannot be discretised per dimension")
        if bins < 2:
            raise ValueError("discretisation needs at least 2 bins")
        self.inner, self.name, self.chunk = inner, f"{inner.name}[{bins} bins]", inner.chunk
        self.spec = ActionSpec(inner.spec.shape, bins=bins)

    def _values(self, index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        low, high = self.inner.limits(like)
        return low + index.to(like.dtype) * (high - low) / (self.spec.bins - 1)

    def forward(self, state, action, agent_type=None):
        return self.inner.forward(state, self._values(action, state), agent_type)

    def inverse(self, state, target, agent_type=None):
        low, high = self.inner.limits(state)
        value = self.inner.inverse(state, target, agent_type)
        return torch.round((value - low) / (high - low) * (self.spec.bins - 1)).clamp(0, self.spec.bins - 1).long()


def make_dynamics(
    name: str, vocabulary: torch.Tensor | None = None, chunk: int = 5, normalize: bool = False, bins: int | None = None
) -> Dynamics:
    """A dynamics model by name; continuous ones optionally take actions in [-1, 1]
    (``normalize``) or as ``bins`` integer levels per dimension."""
    model = _make(name, vocabulary, chunk)
    if bins is not None:
        return Discretized(model, bins)
    return Normalized(model) if normalize else model


def _make(name: str, vocabulary: torch.Tensor | None, chunk: int) -> Dynamics:
    if name == "tokens":
        if vocabulary is None:
            raise ValueError("the tokens dynamics needs a vocabulary tensor [V, k, 3]")
        return Tokens(vocabulary)
    if name == "trajectory":
        return Trajectory(chunk)
    models = {"delta_global": DeltaGlobal, "delta_local": DeltaLocal, "bicycle": Bicycle, "state": StateDynamics}
    if name not in models:
        raise ValueError(f"unknown dynamics {name!r}; choose one of {', '.join([*models, 'trajectory', 'tokens'])}")
    return models[name]()


DYNAMICS = ("delta_global", "delta_local", "bicycle", "state", "trajectory", "tokens")
