"""The policy protocol every sim agent implements: baselines, learned models, user code.

A policy drives the controlled agents of B scenarios at once::

    policy.reset(state, dynamics, generator)   # at the start of each episode
    actions = policy.act(state)                # [B, N, *dynamics.spec.shape], every step

``reset`` receives the episode's first state (so a policy can build per-scenario caches
or hidden state), the dynamics its actions are for, and the ``torch.Generator`` it must
draw any randomness from (so rollouts are reproducible from a seed and independent of
the global RNG); the generator lives on the state's device, so sample with
``device=state.device``. ``act`` returns actions for every agent slot; the simulator reads only
the controlled agents' entries. Subclass :class:`BasePolicy` to get ``reset``'s
bookkeeping and ``__call__``; a plain function ``fn(state, dynamics) -> actions`` becomes a
policy through :func:`as_policy`.
"""

from __future__ import annotations

import abc
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:  # imported for annotations only: the simulator imports this module
    from closedloop.envs.core import SimState
    from closedloop.envs.dynamics import Dynamics


@runtime_checkable
class Policy(Protocol):
    def reset(self, state: SimState, dynamics: Dynamics, generator: torch.Generator | None = None) -> None:
        """Start an episode at ``state`` with actions for ``dynamics``."""
        ...

    def act(self, state: SimState) -> torch.Tensor:
        """Actions ``[B, N, *dynamics.spec.shape]`` for the agents of ``state``."""
        ...


class BasePolicy(abc.ABC):
    """Keeps ``dynamics`` and ``generator`` from :meth:`reset`; subclasses write :meth:`act`
    (and extend :meth:`reset` for per-episode state)."""

    dynamics: Dynamics
    generator: torch.Generator

    def reset(self, state: SimState, dynamics: Dynamics, generator: torch.Generator | None = None) -> None:
        self.dynamics = dynamics
        if generator is None:
            generator = torch.Generator(device=state.device).manual_seed(0)
        self.generator = generator

    @abc.abstractmethod
    def act(self, state: SimState) -> torch.Tensor:
        """Actions ``[B, N, *dynamics.spec.shape]``."""

    def __call__(self, state: SimState) -> torch.Tensor:
        if not hasattr(self, "dynamics"):
            raise RuntimeError(f"{type(self).__name__}: call reset(state, dynamics) before acting")
        return self.act(state)


class FunctionPolicy(BasePolicy):
    """A plain function ``fn(state, dynamics) -> actions`` as a policy."""

    def __init__(self, fn: Callable[[SimState, Dynamics], torch.Tensor]):
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", type(fn).__name__)

    def act(self, state: SimState) -> torch.Tensor:
        return self.fn(state, self.dynamics)


class LearnedPolicy(BasePolicy):
    """A policy with an action distribution (see :mod:`closedloop.agents.distributions`).

    ``distribution(state)`` gives the distribution of the next action of the agents the
    policy drives; ``act`` samples it at ``temperature`` among the ``top_k`` most likely
    (``None``: all) with the episode's generator, without gradients. Whether
    ``distribution`` carries gradients is the policy's to say (the GMM ego policy's does;
    the token policy's incremental decoding is inference-only).

    A learned policy may keep a cache that follows one rollout (a transformer's keys and
    values, say). It is valid for the state it was last advanced to: acting on any other
    state (an older one, a branch) raises, and ``reset(state, ...)`` starts again from
    there; nothing goes silently stale."""

    temperature: float = 1.0
    top_k: int | None = None

    @abc.abstractmethod
    def distribution(self, state: SimState):
        """The distribution of the next action of the agents this policy drives."""

    def act(self, state: SimState) -> torch.Tensor:
        with torch.no_grad():
            return self.to_actions(state, self.distribution(state).sample(self.temperature, self.generator, self.top_k))

    def to_actions(self, state: SimState, sample: torch.Tensor) -> torch.Tensor:
        """Actions ``[B, N, ...]`` for the simulator from a sample of the distribution (the
        identity when the distribution covers every agent slot)."""
        return sample


def as_policy(obj: Any) -> Policy:
    """A :class:`Policy` from a policy object, a policy class (built with no arguments) or
    a function ``fn(state, dynamics) -> actions``."""
    if inspect.isclass(obj):
        obj = obj()
    if isinstance(obj, Policy):
        return obj
    if callable(obj):
        return FunctionPolicy(obj)
    raise TypeError(
        f"{obj!r} is not a policy: expected an object with act(state) and reset(state, dynamics, "
        "generator), a class of such objects, or a function fn(state, dynamics) -> actions"
    )


def load_policy(spec: str, seed: int = 0, vocabulary=None, top_k: int | None = 48, temperature: float = 1.0) -> Policy:
    """A baseline by name (``log``, ``expert``, ``constant_velocity``, ``idm``); an untrained
    tokenized traffic model ``model:SIZE`` (``tiny``, ``mini``, ``nano``, ``micro``: random
    weights from ``seed``, the default vocabulary unless ``vocabulary`` is given); a weights
    file ``model:FILE.safetensors``; a training run's checkpoint ``ckpt:RUN_DIR`` (its
    latest) or ``ckpt:RUN_DIR/FILE`` (see :mod:`closedloop.trainers.checkpoint`); or user
    code: ``module:attr``, ``path/to/file.py:attr`` or an entry point of
    ``closedloop.policies`` (see :func:`closedloop.plugins.load_object`), made a policy by
    :func:`as_policy`. Learned policies sample the ``top_k`` most likely actions at
    ``temperature`` (CAT-K's evaluation setting by default)."""
    from closedloop.agents.baselines import POLICIES
    from closedloop.plugins import PluginError, load_object

    if spec in POLICIES:
        return POLICIES[spec]()
    sampling = {"top_k": top_k, "temperature": temperature}
    if spec.startswith(("model:", "ckpt:")):
        from closedloop.agents.token_policy import TokenPolicy
        from closedloop.agents.weights import policy_from_weights

        kind, name = spec.split(":", 1)
        if kind == "ckpt" or name.endswith(".safetensors"):  # trained weights (closedloop.agents.weights)
            if vocabulary is not None:
                raise ValueError(f"{spec} brings its own vocabulary: leave out --vocabulary")
            if kind == "ckpt":
                from closedloop.trainers.checkpoint import resolve_weights

                name = resolve_weights(name)
            return policy_from_weights(name, **sampling)
        return TokenPolicy.untrained(name, vocabulary=vocabulary, seed=seed, **sampling)
    try:
        return as_policy(load_object(spec, group="closedloop.policies"))
    except PluginError as err:
        if ":" not in spec:
            raise PluginError(
                f"unknown policy {spec!r}: use one of {', '.join(sorted(POLICIES))}, "
                "module:attr or path/to/file.py:attr"
            ) from None
        raise err
