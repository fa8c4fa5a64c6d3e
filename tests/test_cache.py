"""A damaged cache is reported as one CacheError naming the file; prepare repairs it."""

import json

import pytest

from closedloop.data import write_scenarios
from closedloop.data.cache import CacheError, ScenarioCache, prepare_cache
from closedloop.data.synthetic import generate_scenarios


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    scenarios = list(generate_scenarios(4, seed=1, agents=(4, 6)))
    write_scenarios(root / "a.tfrecord", scenarios[:2])
    write_scenarios(root / "b.tfrecord", scenarios[2:])
    return sorted(root.glob("*.tfrecord"))


@pytest.fixture
def cache(tmp_path, sources):
    out = tmp_path / "cache"
    prepare_cache(sources, out, progress=False)
    return out


def _shard(cache, index=0):
    return cache / "shards" / json.loads((cache / "manifest.json").read_text())["shards"][index]["file"]


def _damage(path, how):
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "bit flip":
        data[len(data) // 3] ^= 0x01
    elif how == "empty":
        data = b""
    else:  # garbage
        data = b"\x93NUMPY garbage" * 100
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "bit flip", "empty", "garbage"])
def test_corrupt_shard_is_a_cache_error_naming_the_shard(cache, how):
    shard = _shard(cache)
    _damage(shard, how)
    reader = ScenarioCache(cache)
    with pytest.raises(CacheError, match=rf"{shard.name}.*(member|bytes, the manifest)"):
        [reader[i] for i in range(len(reader))]


def test_rerun_prepare_rebuilds_a_corrupt_shard(cache, sources):
    shard = _shard(cache)
    good = shard.read_bytes()
    _damage(shard, "bit flip")
    result = prepare_cache(sources, cache, progress=False)
    assert result["converted"] == 1 and result["rebuilt"] == 1 and result["reused"] == 1
    assert shard.read_bytes() == good
    assert len([ScenarioCache(cache)[i] for i in range(4)]) == 4


def test_count_off_by_one_is_a_cache_error(cache):
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["shards"][0]["count"] += 1
    (cache / "manifest.json").write_text(json.dumps(manifest))
    reader = ScenarioCache(cache)
    with pytest.raises(CacheError, match=r"holds 2 scenarios, the manifest says 3"):
        reader[2]


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("{not json", r"not a readable cache manifest"),
        ('{"format": "closedloop-cache", "version": 1, "shards": {}}', r"'shards' is not a list"),
        (
            '{"format": "closedloop-cache", "version": 1, "shards": [{"source": "x", "file": 3, "count": 1}]}',
            r"shards\[0\]\.file is missing or not a str",
        ),
        (
            '{"format": "closedloop-cache", "version": 1, "shards": [{"source": "x", "file": "../../x", "count": 1}]}',
            r"a plain file name",
        ),
        ("[1, 2]", r"not a closedloop cache manifest"),
    ],
)
def test_garbage_manifest_is_a_cache_error(cache, sources, text, pattern):
    (cache / "manifest.json").write_text(text)
    with pytest.raises(CacheError, match=rf"manifest.json: .*{pattern}"):
        ScenarioCache(cache)
    with pytest.raises(CacheError, match=pattern):
        prepare_cache(sources, cache, progress=False)


def test_prepare_removes_temporaries_of_a_killed_run(cache, sources):
    stale = [cache / "shards" / ".a-123.npz.x1y2.tmp", cache / ".manifest.json.abc.tmp"]
    for path in stale:
        path.write_bytes(b"half written")
    assert prepare_cache(sources, cache, progress=False)["reused"] == 2
    assert not any(path.exists() for path in stale)
