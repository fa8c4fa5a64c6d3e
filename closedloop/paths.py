"""File names derived from data.

Scenario ids come from the files being read, so a crafted id such as ``../../x`` or
``/etc/x`` would otherwise make ``out / f"{scenario_id}.npz"`` write outside ``out``. Every
command that writes per-scenario files builds their names here. Unsafe ids are rejected, not
encoded: an encoded name would no longer be the id a user looks for (or that ``metrics``
reads back), and WOMD ids are 16 hex digits, so a rejected id is corrupt input anyway.
"""

from __future__ import annotations

import os
from pathlib import Path

MAX_ID_LENGTH = 200  # well under the 255-byte file-name limit of common file systems, with a suffix


def check_scenario_id(scenario_id: str) -> str:
    """``scenario_id`` if it is safe as a file name; ``ValueError`` naming it otherwise.

    Unsafe: empty, longer than ``MAX_ID_LENGTH``, containing ``/``, ``\\`` or NUL, or
    starting with ``.`` (which covers ``.``, ``..`` and hidden files).
    """
    if not isinstance(scenario_id, str) or not scenario_id:
        raise ValueError(f"scenario id {scenario_id!r} is empty, so it cannot name a file")
    if len(scenario_id) > MAX_ID_LENGTH:
        raise ValueError(
            f"scenario id {scenario_id[:40]!r}... is {len(scenario_id)} characters long, "
            f"more than the {MAX_ID_LENGTH} a file name may take"
        )
    if any(c in scenario_id for c in "/\\\0"):
        raise ValueError(f"scenario id {scenario_id!r} contains a path separator or NUL, so it cannot name a file")
    if scenario_id.startswith("."):
        raise ValueError(f"scenario id {scenario_id!r} starts with '.', so it cannot name a file")
    return scenario_id


def scenario_path(directory: str | os.PathLike, scenario_id: str, suffix: str) -> Path:
    """``directory / (scenario_id + suffix)``, refusing ids that would leave ``directory``."""
    return Path(directory) / f"{check_scenario_id(scenario_id)}{suffix}"
