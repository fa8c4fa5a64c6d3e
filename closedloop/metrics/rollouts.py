"""Rollout files: ``<scenario_id>.npz`` with ``scenario_id``, ``object_ids``, ``trajectories``.

``trajectories`` is float32 ``[R, A, 80, 4]`` (x, y, z, heading for steps 11..90) and
``object_ids`` int64 ``[A]`` (the objects valid at step 10). This is what
``closedloop rollout`` writes and ``closedloop metrics`` / ``closedloop submit`` read.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from closedloop._atomic import atomic_write

KEYS = ("scenario_id", "object_ids", "trajectories")


class RolloutFileError(ValueError):
    """A rollout file is missing, unreadable or malformed."""


@dataclass
class Rollouts:
    scenario_id: str
    object_ids: np.ndarray  # int64 [A]
    trajectories: np.ndarray  # float32 [R, A, 80, 4]
    path: str = ""


def save_rollouts(path: str | os.PathLike, scenario_id: str, object_ids: np.ndarray,
                  trajectories: np.ndarray) -> None:
    """Write one rollout file atomically."""
    with atomic_write(path) as handle:
        np.savez(handle, scenario_id=np.array(scenario_id), object_ids=np.asarray(object_ids, np.int64),
                 trajectories=np.asarray(trajectories, np.float32))


def load_rollouts(path: str | os.PathLike) -> Rollouts:
    """Read and shape-check one rollout file (no pickle)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in KEYS if k not in data.files]
            if missing:
                raise RolloutFileError(f"{path}: missing {', '.join(missing)} (expected keys {', '.join(KEYS)})")
            sid, ids, traj = str(data["scenario_id"]), data["object_ids"], data["trajectories"]
    except FileNotFoundError:
        raise RolloutFileError(f"{path}: no such rollout file") from None
    except (zipfile.BadZipFile, ValueError, OSError) as err:
        if isinstance(err, RolloutFileError):
            raise
        raise RolloutFileError(f"{path}: not a readable rollout .npz ({err})") from None
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise RolloutFileError(f"{path}: object_ids must be a 1-D integer array, got {ids.dtype} {list(ids.shape)}")
    if traj.ndim != 4 or traj.shape[2:] != (80, 4) or traj.shape[1] != len(ids):
        raise RolloutFileError(
            f"{path}: trajectories must be [rollouts, {len(ids)} objects, 80, 4], got {list(traj.shape)}")
    return Rollouts(sid, ids.astype(np.int64), traj.astype(np.float32), str(path))


def iter_rollout_files(path: str | os.PathLike) -> Iterator[Path]:
    """The ``.npz`` files of a directory (sorted), or the single file given."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.npz"))
        if not files:
            raise RolloutFileError(f"{path}: no .npz rollout files")
        yield from files
    elif path.exists():
        yield path
    else:
        raise RolloutFileError(f"{path}: no such rollout file or directory")
