"""Optional ``torch.compile`` of the simulator's pure per-step kernels.

An ego env steps one agent of one scenario at a time, where each eager tensor operation's
fixed cost (a few microseconds) dominates: a step is hundreds of them. The kernels here
are the pure, shape-stable parts of a step (no data-dependent branches, no host
synchronisation): measuring points against road-edge candidates (for small batches the
whole off-road pass up to its branch), the roadgraph-point search's per-step pass,
assembling the observation features, red-light crossings, and the collisions of a few
agents or of every agent (up to ``core.ALL_PAIRS`` pairs). Compiled, each becomes one fused program.

Compilation is off unless switched on (``set_compile(True)``, the ``CLOSEDLOOP_COMPILE=1``
environment variable, or ``--compile`` on the commands that simulate): it costs seconds
per kernel and shape family on first use (Inductor caches the result on disk, so later
processes pay less), which pays only over thousands of steps. The dynamics are never
compiled: a compiled bicycle model rounds differently from the eager one in the last bit,
and in closed loop such differences grow into centimetres. The kernels' outputs are
compared with the eager ones in the tests; where the compiler is unavailable (no C++
toolchain, say) a kernel warns once and runs eagerly. Two limits of that fallback: it
catches failures of the forward call only (through a differentiable rollout, the backward
is compiled when it first runs, and a failure there surfaces in ``backward()``), and any
error of the compiled call, out of memory included, switches its kernel to eager for good.
Identity with eager is tested on CPU; on a GPU (Triton) it is not verified.
"""

from __future__ import annotations

import functools
import os
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch

_enabled = os.environ.get("CLOSEDLOOP_COMPILE", "0") == "1"


def set_compile(enabled: bool) -> None:
    """Switch compiled kernels on or off for this process and the processes it starts
    (SB3's ``SubprocVecEnv`` workers, say: through ``CLOSEDLOOP_COMPILE``)."""
    global _enabled
    _enabled = bool(enabled)
    os.environ["CLOSEDLOOP_COMPILE"] = "1" if _enabled else "0"


def compile_enabled() -> bool:
    return _enabled


class Kernel:
    """A pure tensor function run compiled when compilation is on, eagerly otherwise."""

    def __init__(self, fn: Callable[..., Any]):
        functools.update_wrapper(self, fn)
        self.fn = fn
        # One compiled copy per family of calls (see _family), each with a state of its own.
        self._compiled: dict[tuple, Callable[..., Any]] = {}
        self._failed = False

    @property
    def active(self) -> bool:
        """Whether calls run compiled now (compilation on, and it has not failed)."""
        return _enabled and not self._failed

    def __call__(self, *args, **kwargs):
        if not self.active:
            return self.fn(*args, **kwargs)
        try:
            family = _family(args)
            compiled = self._compiled.get(family)
            if compiled is None:
                compiled = torch.compile(_copy(self.fn, len(self._compiled)), dynamic=None)
                self._compiled[family] = compiled
            return compiled(*args, **kwargs)
        except Exception as err:
            result = self.fn(*args, **kwargs)  # raises the same error where the inputs are at fault
            self._failed = True  # the compiler is: eager from now on
            warnings.warn(
                f"torch.compile of {self.fn.__qualname__} failed ({type(err).__name__}: {err}); running it eagerly",
                stacklevel=2,
            )
            return result


def _family(args: tuple) -> tuple:
    """The family of a call: the rank of each tensor argument and whether the batch holds
    one scenario (an ego env) or more (a vector env, a trainer's batch)."""
    ranks = tuple(arg.dim() if isinstance(arg, torch.Tensor) else -1 for arg in args)
    first = next((arg for arg in args if isinstance(arg, torch.Tensor) and arg.dim()), None)
    return ranks, first is not None and first.shape[0] == 1


def _copy(fn: Callable[..., Any], index: int) -> Callable[..., Any]:
    """``fn`` under a name of its own (``fn__1``, ...). Dynamo compiles a function for the
    shapes of its first call, and for shapes that then change, a graph generic in them; it
    remembers which shapes changed by the function's file, line and name. One copy per
    family keeps an ego env's one-scenario shapes from making a vector env's graphs generic
    in every dimension, which made the vector env slower after an ego env had run in the
    same process (``scripts/bench_sim.py --only ego`` runs them in turn)."""
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}__{index}")
    copy = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


def kernel(fn: Callable[..., Any]) -> Kernel:
    """Decorator: ``fn`` runs compiled when compilation is on (see the module docstring)."""
    return Kernel(fn)
