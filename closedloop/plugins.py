"""Load user code named on the command line: ``module:attr``, ``path/to/file.py:attr``, or
the name of an entry point in a group (``closedloop.policies``, ``closedloop.planners``).

The same loader serves ``closedloop rollout --policy`` and the planner plug-ins, so a
researcher's code plugs in the same way everywhere.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any


class PluginError(ValueError):
    """The named object cannot be found or imported; the message says which and why."""


def load_object(spec: str, group: str | None = None) -> Any:
    """The object ``spec`` names: ``package.module:attr`` (``attr`` may be dotted),
    ``path/to/file.py:attr``, or an entry point name registered in ``group``."""
    if ":" not in spec or spec.endswith(":"):
        if group is not None:
            found = [ep for ep in entry_points(group=group) if ep.name == spec]
            if found:
                return found[0].load()
        where = f" nor an entry point of {group!r}" if group else ""
        raise PluginError(f"{spec!r} is not of the form module:attr or path/to/file.py:attr{where}")
    source, _, attr = spec.rpartition(":")
    module = _load_file(source) if source.endswith(".py") else _import(source, spec)
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise PluginError(f"{spec}: {source} has no attribute {attr!r}") from None
    return obj


def _import(name: str, spec: str):
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise PluginError(f"{spec}: cannot import {name!r}: {err}") from err


def _load_file(path_text: str):
    path = Path(path_text)
    if not path.is_file():
        raise PluginError(f"{path_text}: no such file")
    name = f"closedloop_plugin_{abs(hash(str(path.resolve())))}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        raise PluginError(f"{path_text}: importing it failed: {type(err).__name__}: {err}") from err
    return module
