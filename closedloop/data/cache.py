"""A scenario cache for datasets too large to re-parse protos every epoch.

Layout of a cache directory::

    manifest.json           {"format": "closedloop-cache", "version": 1, "shards": [...]}
    shards/<name>.npz       one uncompressed npz per source TFRecord shard; member
                            "<record>/<field>" holds one field of one scenario

No pickle anywhere: arrays are saved with ``np.savez`` and loaded with
``allow_pickle=False``. Every file is written atomically and the manifest is rewritten after
each finished shard, so an interrupted ``closedloop prepare`` resumes where it stopped.

The manifest records each shard's size and SHA-256. A rerun of ``prepare`` counts a shard
done only if it still matches (a corrupt or replaced one is rebuilt) and deletes the
temporary files a killed run left behind, so run one ``prepare`` per cache at a time.
Reading a damaged cache raises :class:`CacheError` naming the shard file and member,
whatever the underlying zip, npy or JSON error was.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

from closedloop._atomic import atomic_write
from closedloop.data.scenario import Scenario
from closedloop.data.womd import OnError, SkipCounter, expand_paths, read_scenarios

FORMAT = "closedloop-cache"
VERSION = 1
_CHUNK = 1 << 20


class CacheError(ValueError):
    """A cache file is missing, corrupt, or does not match its manifest."""


def _shard_name(source: Path) -> str:
    digest = hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:10]
    return f"{source.name.split('.')[0]}-{digest}.npz"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _convert_shard(source: str, target: str, on_error: OnError) -> dict:
    """Parse one TFRecord shard and write its cache file; runs in a worker process."""
    skipped = SkipCounter()
    arrays: dict[str, np.ndarray] = {}
    count = 0
    for count, scenario in enumerate(read_scenarios(source, on_error=on_error, skipped=skipped), 1):
        for name, value in scenario.to_arrays().items():
            arrays[f"{count - 1}/{name}"] = value
    with atomic_write(target) as handle:
        np.savez(handle, **arrays)
    return {
        "source": source,
        "file": Path(target).name,
        "count": count,
        "bytes": os.path.getsize(target),
        "sha256": _sha256(Path(target)),
        "skipped": len(skipped),
        "errors": skipped.errors,
    }


def _shard_is_intact(out: Path, shard: dict) -> bool:
    """Whether a shard file still has the size and checksum the manifest recorded."""
    path = out / "shards" / shard["file"]
    if "sha256" not in shard or "bytes" not in shard or not path.is_file():
        return False
    return path.stat().st_size == shard["bytes"] and _sha256(path) == shard["sha256"]


def _remove_stale_temporaries(out: Path) -> None:
    """Delete the hidden ``.*.tmp`` files of writes a killed ``prepare`` never finished."""
    for path in [p for folder in (out, out / "shards") for p in folder.glob(".*.tmp") if p.is_file()]:
        path.unlink(missing_ok=True)


def _write_manifest(out: Path, shards: Sequence[dict]) -> None:
    ordered = sorted(shards, key=lambda s: s["source"])
    with atomic_write(out / "manifest.json", "w") as handle:
        json.dump({"format": FORMAT, "version": VERSION, "shards": ordered}, handle, indent=1)


def _check_shard_entry(path: Path, i: int, entry: object) -> dict:
    """One manifest entry, checked: a mistyped field is reported here, not as a KeyError later."""
    if not isinstance(entry, dict):
        raise CacheError(f"{path}: shards[{i}] is not an object")
    for key, kind in (("source", str), ("file", str), ("count", int)):
        if not isinstance(entry.get(key), kind) or isinstance(entry.get(key), bool):
            raise CacheError(f"{path}: shards[{i}].{key} is missing or not a {kind.__name__}")
    name = entry["file"]
    if entry["count"] < 0 or not name or name.startswith(".") or any(c in name for c in "/\\\0"):
        raise CacheError(
            f"{path}: shards[{i}] has count {entry['count']} and file {name!r}; "
            "expected a non-negative count and a plain file name"
        )
    return entry


def _read_manifest(out: Path) -> list[dict]:
    path = out / "manifest.json"
    if not path.exists():
        return []
    try:
        manifest = json.loads(path.read_bytes())
    except (ValueError, OSError) as err:
        raise CacheError(
            f"{path}: not a readable cache manifest ({err}); delete the cache directory and rerun `closedloop prepare`"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CacheError(f"{path}: not a closedloop cache manifest (version {VERSION})")
    if not isinstance(manifest.get("shards"), list):
        raise CacheError(f"{path}: 'shards' is not a list")
    return [_check_shard_entry(path, i, entry) for i, entry in enumerate(manifest["shards"])]


def prepare_cache(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    out: str | os.PathLike,
    *,
    workers: int = 1,
    on_error: OnError = "raise",
    progress: bool = True,
) -> dict:
    """Convert TFRecord shards into a cache at ``out``; shards already done are skipped.

    Returns a summary: shards converted now (``rebuilt``: how many of them had a shard that
    failed verification), shards reused, scenarios and skipped records.
    """
    from tqdm import tqdm

    out = Path(out)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    sources = [p.resolve() for p in expand_paths(paths)]
    wanted = {str(s) for s in sources}
    recorded = {s["source"]: s for s in _read_manifest(out)}  # first: is this a cache at all?
    _remove_stale_temporaries(out)
    # Shards of other sources are kept as they are; those of these sources must verify.
    done = {src: s for src, s in recorded.items() if src not in wanted or _shard_is_intact(out, s)}
    pending = [s for s in sources if str(s) not in done]
    rebuilt = sum(str(s) in recorded for s in pending)
    shards = list(done.values())
    bar = tqdm(
        total=len(sources), initial=len(sources) - len(pending), unit="shard", desc="prepare", disable=not progress
    )
    jobs = [(str(s), str(out / "shards" / _shard_name(s)), on_error) for s in pending]
    try:
        if workers <= 1:
            for job in jobs:
                shards.append(_convert_shard(*job))
                _write_manifest(out, shards)
                bar.update()
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = [pool.submit(_convert_shard, *job) for job in jobs]
                for future in as_completed(futures):
                    shards.append(future.result())
                    _write_manifest(out, shards)
                    bar.update()
    finally:
        bar.close()
    _write_manifest(out, shards)
    return {
        "converted": len(pending),
        "rebuilt": rebuilt,
        "reused": len(sources) - len(pending),
        "scenarios": sum(s["count"] for s in shards if Path(s["source"]) in set(sources)),
        "skipped": sum(s["skipped"] for s in shards),
    }


class ScenarioCache:
    """Indexable view of a cache directory. Open shard files are kept per process."""

    def __init__(self, cache_dir: str | os.PathLike):
        self.root = Path(cache_dir)
        if not (self.root / "manifest.json").exists():
            raise FileNotFoundError(f"{self.root}: no manifest.json; run `closedloop prepare` first")
        self.shards = _read_manifest(self.root)
        self.offsets = np.cumsum([0] + [s["count"] for s in self.shards])
        self._open: tuple[int, int, np.lib.npyio.NpzFile] | None = None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _shard(self, shard: int) -> np.lib.npyio.NpzFile:
        pid = os.getpid()
        if self._open is None or self._open[:2] != (pid, shard):
            if self._open is not None and self._open[0] == pid:
                self._open[2].close()
            self._open = None
            entry = self.shards[shard]
            path = self.root / "shards" / entry["file"]
            if "bytes" in entry and path.is_file() and path.stat().st_size != entry["bytes"]:
                raise CacheError(
                    f"{path}: {path.stat().st_size} bytes, the manifest recorded {entry['bytes']}; "
                    "rerun `closedloop prepare` to rebuild it"
                )
            archive = self._guarded(path, "(the archive)", lambda: np.load(path, allow_pickle=False))
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise CacheError(f"{path}: not an npz archive; rerun `closedloop prepare` to rebuild it")
            names = set(archive.files)
            count = entry["count"]
            if (count and f"{count - 1}/scenario_id" not in names) or f"{count}/scenario_id" in names:
                archive.close()
                held = sum(name.endswith("/scenario_id") for name in names)
                raise CacheError(
                    f"{path}: holds {held} scenarios, the manifest says {count}; "
                    "rerun `closedloop prepare` to rebuild it"
                )
            self._open = (pid, shard, archive)
        return self._open[2]

    @staticmethod
    def _guarded(path: Path, member: str, read):
        """``read()``, with any error of a damaged archive turned into a :class:`CacheError`."""
        try:
            return read()
        except FileNotFoundError:
            raise CacheError(f"{path}: shard file is missing; rerun `closedloop prepare`") from None
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError) as err:
            # numpy reads garbage where an npy header belongs as "pickled data": say what it is.
            reason = "corrupt: no npy array header" if "pickle" in str(err) else str(err) or type(err).__name__
            raise CacheError(
                f"{path}: member {member}: unreadable ({reason}); rerun `closedloop prepare` to rebuild it"
            ) from None

    def __getitem__(self, index: int) -> Scenario:
        if not -len(self) <= index < len(self):
            raise IndexError(f"scenario index {index} out of range for a cache of {len(self)}")
        index %= len(self)
        shard = int(np.searchsorted(self.offsets, index, side="right") - 1)
        record = index - int(self.offsets[shard])
        archive = self._shard(shard)
        path = self.root / "shards" / self.shards[shard]["file"]
        arrays = {}
        for name in Scenario.field_names():
            member = f"{record}/{name}"
            arrays[name] = self._guarded(path, repr(member), lambda member=member: archive[member])
        return self._guarded(path, f"'{record}/*'", lambda: Scenario.from_arrays(arrays))
