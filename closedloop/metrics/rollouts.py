"""Rollout files: ``<scenario_id>.npz`` with ``scenario_id``, ``object_ids``, ``trajectories``.

``trajectories`` is float32 ``[R, A, 80, 4]`` (x, y, z, heading for steps 11..90) and
``object_ids`` int64 ``[A]`` (the objects valid at step 10). This is what
``closedloop rollout`` writes and ``closedloop metrics`` / ``closedloop submit`` read.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from closedloop._atomic import atomic_write

KEYS = ("scenario_id", "object_ids", "trajectories")
# Positions are metres in the scenario's frame, headings radians. WOMD coordinates stay
# within a few tens of km; past this bound a value is corrupt (and float32 keeps no metre).
MAX_ABS_VALUE = 1e6


class RolloutFileError(ValueError):
    """A rollout file is missing, unreadable or malformed."""


@dataclass
class Rollouts:
    scenario_id: str
    object_ids: np.ndarray  # int64 [A]
    trajectories: np.ndarray  # float32 [R, A, 80, 4]
    path: str = ""


def save_rollouts(path: str | os.PathLike, scenario_id: str, object_ids: np.ndarray, trajectories: np.ndarray) -> None:
    """Write one rollout file atomically."""
    with atomic_write(path) as handle:
        np.savez(
            handle,
            scenario_id=np.array(scenario_id),
            object_ids=np.asarray(object_ids, np.int64),
            trajectories=np.asarray(trajectories, np.float32),
        )


def _read_arrays(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three arrays of a rollout file, any failure to read them a RolloutFileError."""
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise RolloutFileError(
                f"{path}: a single .npy array, not a rollout .npz archive (expected keys {', '.join(KEYS)})"
            )
        with data:
            missing = [k for k in KEYS if k not in data.files]
            if missing:
                raise RolloutFileError(f"{path}: missing {', '.join(missing)} (expected keys {', '.join(KEYS)})")
            return data["scenario_id"], data["object_ids"], data["trajectories"]
    except FileNotFoundError:
        raise RolloutFileError(f"{path}: no such rollout file") from None
    except RolloutFileError:
        raise
    except EOFError:
        raise RolloutFileError(f"{path}: empty file, not a rollout .npz") from None
    except (zipfile.BadZipFile, zlib.error, ValueError, OSError, KeyError) as err:
        reason = "an npy array header is corrupt" if "pickle" in str(err) else str(err) or type(err).__name__
        raise RolloutFileError(f"{path}: not a readable rollout .npz ({reason})") from None


def load_rollouts(path: str | os.PathLike) -> Rollouts:
    """Read and check one rollout file (no pickle): a string id, integer ids, and real,
    finite trajectories of plausible magnitude (anything else would be scored silently:
    complex values lose their imaginary part, strings and 1e30 parse as numbers)."""
    path = Path(path)
    sid, ids, traj = _read_arrays(path)
    if sid.ndim != 0 or sid.dtype.kind not in "US":
        raise RolloutFileError(f"{path}: scenario_id must be one string, got {sid.dtype} {list(sid.shape)}")
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise RolloutFileError(f"{path}: object_ids must be a 1-D integer array, got {ids.dtype} {list(ids.shape)}")
    if traj.dtype.kind != "f":
        raise RolloutFileError(f"{path}: trajectories must be real floating point, got {traj.dtype}")
    if traj.ndim != 4 or traj.shape[0] < 1 or traj.shape[2:] != (80, 4) or traj.shape[1] != len(ids):
        raise RolloutFileError(
            f"{path}: trajectories must be [rollouts >= 1, {len(ids)} objects, 80, 4], got {list(traj.shape)}"
        )
    if not np.isfinite(traj).all():
        r, a, t, c = np.argwhere(~np.isfinite(traj))[0]
        raise RolloutFileError(
            f"{path}: non-finite trajectory value at rollout {r}, object {ids[a]}, step {t}, channel {'xyzh'[c]}"
        )
    if np.abs(traj).max(initial=0) > MAX_ABS_VALUE:
        raise RolloutFileError(
            f"{path}: trajectory values up to {np.abs(traj).max():.3g}, beyond the "
            f"plausible {MAX_ABS_VALUE:g} (metres or radians)"
        )
    sid = sid.item().decode(errors="replace") if sid.dtype.kind == "S" else str(sid)
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
