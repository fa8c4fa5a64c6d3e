"""Optional ``torch.compile`` of the simulator's pure per-step kernels.

An ego env steps one agent of one scenario at a time, where each eager tensor operation's
fixed cost (a few microseconds) dominates: a step is hundreds of them. The kernels here
are the pure, shape-stable parts of a step (no data-dependent branches, no host
synchronisation): measuring points against road-edge candidates and assembling the
observation features. Compiled, each becomes one fused program.

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
        self._compiled: Callable[..., Any] | None = None
        self._failed = False

    @property
    def active(self) -> bool:
        """Whether calls run compiled now (compilation on, and it has not failed)."""
        return _enabled and not self._failed

    def __call__(self, *args, **kwargs):
        if not self.active:
            return self.fn(*args, **kwargs)
        if self._compiled is None:
            self._compiled = torch.compile(self.fn, dynamic=None)
        try:
            return self._compiled(*args, **kwargs)
        except Exception as err:
            result = self.fn(*args, **kwargs)  # raises the same error where the inputs are at fault
            self._failed = True  # the compiler is: eager from now on
            warnings.warn(
                f"torch.compile of {self.fn.__qualname__} failed ({type(err).__name__}: {err}); running it eagerly",
                stacklevel=2,
            )
            return result


def kernel(fn: Callable[..., Any]) -> Kernel:
    """Decorator: ``fn`` runs compiled when compilation is on (see the module docstring)."""
    return Kernel(fn)
