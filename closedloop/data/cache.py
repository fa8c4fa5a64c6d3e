"""A scenario cache for datasets too large to re-parse protos every epoch.

Layout of a cache directory::

    manifest.json           {"format": "closedloop-cache", "version": 1, "shards": [...]}
    shards/<name>.npz       one uncompressed npz per source TFRecord shard; member
                            "<record>/<field>" holds one field of one scenario

No pickle anywhere: arrays are saved with ``np.savez`` and loaded with
``allow_pickle=False``. Every file is written atomically and the manifest is rewritten after
each finished shard, so an interrupted ``closedloop prepare`` resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from closedloop._atomic import atomic_write
from closedloop.data.scenario import Scenario
from closedloop.data.womd import OnError, SkipCounter, expand_paths, read_scenarios

FORMAT = "closedloop-cache"
VERSION = 1


def _shard_name(source: Path) -> str:
    digest = hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:10]
    return f"{source.name.split('.')[0]}-{digest}.npz"


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
    return {"source": source, "file": Path(target).name, "count": count,
            "skipped": len(skipped), "errors": skipped.errors}


def _write_manifest(out: Path, shards: Sequence[dict]) -> None:
    ordered = sorted(shards, key=lambda s: s["source"])
    with atomic_write(out / "manifest.json", "w") as handle:
        json.dump({"format": FORMAT, "version": VERSION, "shards": ordered}, handle, indent=1)


def _read_manifest(out: Path) -> list[dict]:
    path = out / "manifest.json"
    if not path.exists():
        return []
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(f"{path}: not a closedloop cache manifest (version {VERSION})")
    return manifest["shards"]


def prepare_cache(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    out: str | os.PathLike,
    *,
    workers: int = 1,
    on_error: OnError = "raise",
    progress: bool = True,
) -> dict:
    """Convert TFRecord shards into a cache at ``out``; shards already done are skipped.

    Returns a summary: shards converted now, shards reused, scenarios and skipped records.
    """
    from tqdm import tqdm

    out = Path(out)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    sources = [p.resolve() for p in expand_paths(paths)]
    done = {s["source"]: s for s in _read_manifest(out) if (out / "shards" / s["file"]).exists()}
    pending = [s for s in sources if str(s) not in done]
    shards = list(done.values())
    bar = tqdm(total=len(sources), initial=len(sources) - len(pending), unit="shard",
               desc="prepare", disable=not progress)
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
        "converted": len(pending), "reused": len(sources) - len(pending),
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
            path = self.root / "shards" / self.shards[shard]["file"]
            self._open = (pid, shard, np.load(path, allow_pickle=False))
        return self._open[2]

    def __getitem__(self, index: int) -> Scenario:
        if not -len(self) <= index < len(self):
            raise IndexError(f"scenario index {index} out of range for a cache of {len(self)}")
        index %= len(self)
        shard = int(np.searchsorted(self.offsets, index, side="right") - 1)
        record = index - int(self.offsets[shard])
        archive = self._shard(shard)
        return Scenario.from_arrays(
            {name: archive[f"{record}/{name}"] for name in Scenario.field_names()}
        )
