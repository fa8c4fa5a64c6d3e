from collections import Counter
from functools import partial

import pytest
from torch.utils.data import DataLoader

from closedloop.data import (
    CachedScenarioDataset,
    ScenarioCache,
    WomdIterableDataset,
    collate_scenarios,
    prepare_cache,
    read_scenarios,
)
from closedloop.data.tfrecord import encode_record, iter_records


def _ids(loader):
    return Counter(sid for batch in loader for sid in batch.scenario_id)


@pytest.mark.parametrize("num_files", [5, 1])
def test_two_workers_see_every_scenario_once(many_shards, num_files):
    files = sorted(many_shards.glob("*.tfrecord"))[:num_files]
    expected = Counter(s.scenario_id for s in read_scenarios(files))
    dataset = WomdIterableDataset(files)
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=partial(collate_scenarios, max_agents=128))
    assert _ids(loader) == expected and set(expected.values()) == {1}


def test_skip_mode_in_dataset(tmp_path, scenario_file):
    good = next(iter_records(scenario_file))
    (tmp_path / "a.tfrecord").write_bytes(encode_record(good) + encode_record(b"\xffbad"))
    dataset = WomdIterableDataset(tmp_path, on_error="skip")
    with pytest.warns(UserWarning):
        assert len(list(dataset)) == 1
    assert len(dataset.skipped) == 1


def test_cache_prepare_resume_and_read(tmp_path, many_shards):
    out = tmp_path / "cache"
    files = sorted(many_shards.glob("*.tfrecord"))
    first = prepare_cache(files[:2], out, progress=False)
    assert first == {"converted": 2, "rebuilt": 0, "reused": 0, "scenarios": 6, "skipped": 0}
    second = prepare_cache(files, out, workers=2, progress=False)
    assert second["converted"] == 3 and second["reused"] == 2 and second["scenarios"] == 15
    cache = ScenarioCache(out)
    originals = list(read_scenarios(files))
    assert len(cache) == 15
    assert all(cache[i].equals(s) for i, s in enumerate(originals))
    assert cache[-1].equals(originals[-1])
    with pytest.raises(IndexError):
        cache[15]
    loader = DataLoader(CachedScenarioDataset(out), batch_size=4, num_workers=2, collate_fn=collate_scenarios)
    assert _ids(loader) == Counter(s.scenario_id for s in originals)


def test_cache_without_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="closedloop prepare"):
        ScenarioCache(tmp_path)
