"""Motion vocabularies: k-disk build, sequential tokenization, files and the CLI."""

from __future__ import annotations

import json
import math
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from closedloop.agents.tokens import (
    REFERENCE_BOXES,
    TOKEN_STEPS,
    MotionVocabulary,
    VocabularyError,
    build_vocabulary,
    chunk_poses,
    corner_distance,
    default_vocabulary,
    detokenize,
    scenario_chunks,
    tokenize,
)
from closedloop.constants import TOKEN_KINDS, TYPE_CYCLIST, TYPE_PEDESTRIAN, TYPE_VEHICLE
from closedloop.data import write_scenarios
from closedloop.data.synthetic import generate_scenarios
from closedloop.envs.dynamics import make_dynamics


@pytest.fixture(scope="module")
def scenarios():
    return list(generate_scenarios(4, seed=0, town="cross", agents=(20, 30)))


@pytest.fixture(scope="module")
def vocab(scenarios):
    return build_vocabulary(scenarios, size=512, tolerance=0.05, seed=0)


def _logs(scenario_list):
    """Agents of the three kinds valid at step 10, stacked as one batch [1, N, 91]."""
    rows = []
    for s in scenario_list:
        keep = s.track_valid[:, 10] & np.isin(s.track_type, [TYPE_VEHICLE, TYPE_PEDESTRIAN, TYPE_CYCLIST])
        xy = s.track_xyz[keep, :, :2] - s.track_xyz[keep, 10:11, :2]
        rows.append((xy, s.track_heading[keep], s.track_valid[keep], s.track_type[keep]))
    cat = [np.concatenate(r) for r in zip(*rows)]
    return (
        torch.from_numpy(cat[0]).float()[None],
        torch.from_numpy(cat[1]).float()[None],
        torch.from_numpy(cat[2])[None],
        torch.from_numpy(cat[3].astype(np.int64))[None],
    )


def _straight(speed: float, turn: float = 0.0) -> torch.Tensor:
    """A chunk [5, 3] at constant speed and yaw rate."""
    t = torch.arange(1, TOKEN_STEPS + 1) * 0.1
    heading = turn * t
    return torch.stack([speed * t * torch.cos(heading / 2), speed * t * torch.sin(heading / 2), heading], -1)


def test_corner_distance_basics():
    a = _straight(10.0)
    assert float(corner_distance(a, a, REFERENCE_BOXES["vehicle"])) == 0.0
    shifted = a.clone()
    shifted[:, 1] += 0.3  # a pure lateral shift moves every corner by 0.3 m
    assert float(corner_distance(a, shifted, (4.8, 2.0))) == pytest.approx(0.3, abs=1e-5)
    turned = a.clone()
    turned[:, 2] += 0.1  # a rotation moves corners of a long box further than of a short one
    assert float(corner_distance(a, turned, (4.8, 2.0))) > float(corner_distance(a, turned, (1.0, 1.0)))


def test_kdisk_covers_every_chunk_and_tokens_are_apart(scenarios, vocab):
    for kind in TOKEN_KINDS:
        chunks = torch.from_numpy(np.concatenate([scenario_chunks(s)[kind] for s in scenarios]))
        tokens = vocab.chunks[kind]
        box = REFERENCE_BOXES[kind]
        assert vocab.settings["chunks_collected"][kind] == chunks.shape[0] > 0
        assert vocab.settings["ran_out_of_chunks"][kind]  # fewer distinct motions than 512 tokens
        nearest = torch.cat([corner_distance(c[:, None], tokens[None], box).min(1).values for c in chunks.split(4096)])
        assert float(nearest.max()) <= 0.05 + 1e-5  # k-disk ran to the end: everything is covered
        apart = corner_distance(tokens[:, None], tokens[None], box)
        apart.fill_diagonal_(math.inf)
        assert float(apart.min()) > 0.05 - 1e-5


def test_build_is_deterministic_for_a_seed(tmp_path, scenarios):
    paths = []
    for i, seed in enumerate((3, 3, 4)):
        v = build_vocabulary(scenarios[:2], size=64, tolerance=0.05, seed=seed)
        paths.append(tmp_path / f"v{i}.safetensors")
        v.save(paths[-1])
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert paths[0].read_bytes() != paths[2].read_bytes()
    loaded = MotionVocabulary.load(paths[0])
    assert loaded.settings["seed"] == 3 and loaded.settings["size"] == 64
    assert loaded.settings["reference_boxes"]["vehicle"] == [4.8, 2.0]
    assert all(int(n) <= 64 for n in loaded.sizes())


def test_build_subsamples_and_records_it(scenarios):
    v = build_vocabulary(scenarios[:1], size=16, seed=0, max_chunks=500)
    s = v.settings
    assert s["chunks_used"]["vehicle"] == 500 < s["chunks_collected"]["vehicle"] and s["subsampled"]["vehicle"]


def test_round_trip_tokenize_detokenize(scenarios, vocab):
    xy, heading, valid, types = _logs(scenarios)
    tok = tokenize(vocab, xy, heading, valid, types, start=10)
    assert tok.tokens.shape == (1, xy.shape[1], 16) and tok.poses.shape == (1, xy.shape[1], 17, 3)
    assert torch.equal(tok.poses[:, :, 0, :2], xy[:, :, 10])
    full = tok.token_valid.all(-1)
    assert int(full.sum()) > 10
    poses = detokenize(vocab, tok.poses[:, :, 0], tok.tokens, types)  # [1, N, 80, 3]
    assert poses.shape == (1, xy.shape[1], 80, 3)
    # Chunk ends of the detokenized chain are the tokenized poses (no drift).
    assert torch.allclose(poses[:, :, 4::5][full], tok.poses[:, :, 1:][full], atol=1e-4)
    # And close to the log, every step (the vocabulary was built on these scenarios).
    logged = torch.cat([xy, heading[..., None]], -1)[:, :, 11:91]
    err = torch.linalg.vector_norm(poses[..., :2] - logged[..., :2], dim=-1)[full]
    assert float(err.mean()) < 0.1 and float(err.max()) < 1.0
    # chunk_poses gives the same steps.
    assert torch.allclose(chunk_poses(vocab, tok, types).flatten(2, 3)[full], poses[full], atol=1e-4)


def test_tokenize_reanchors_after_a_gap(vocab):
    t = 21
    xy = torch.zeros(1, 1, t, 2)
    xy[..., 0] = torch.arange(t) * 0.5  # 5 m/s straight
    heading = torch.zeros(1, 1, t)
    valid = torch.ones(1, 1, t, dtype=torch.bool)
    valid[..., 5] = False  # the first token's end is missing
    xy[0, 0, 10] += torch.tensor([0.0, 3.0])  # the log jumps while unseen
    xy[0, 0, 11:, 1] += 3.0
    tok = tokenize(vocab, xy, heading, valid, torch.tensor([[TYPE_VEHICLE]]))
    assert tok.token_valid[0, 0].tolist() == [False, False, True, True]
    assert tok.pose_valid[0, 0].tolist() == [True, False, True, True, True]
    assert torch.allclose(tok.poses[0, 0, 2, :2], xy[0, 0, 10])  # re-anchored at the logged pose
    assert float(tok.poses[0, 0, 4, 1]) == pytest.approx(3.0, abs=0.2)


def test_per_kind_vocabularies_are_picked_by_type():
    chunks = {
        "vehicle": torch.stack([_straight(10.0), _straight(0.0), _straight(12.0)]),
        "pedestrian": torch.stack([_straight(1.5), _straight(0.0)]),
        "cyclist": torch.stack([_straight(4.0)]),
    }
    v = MotionVocabulary(chunks, {})
    assert v.sizes().tolist() == [3, 2, 1]
    table = v.table()
    assert table.shape == (3, 3, 5, 3)
    assert torch.equal(table[1, 2], chunks["pedestrian"][0]) and torch.equal(table[2, 1], chunks["cyclist"][0])
    types = torch.tensor([[TYPE_VEHICLE, TYPE_PEDESTRIAN, TYPE_CYCLIST, 4]])  # "other" moves like a vehicle
    start = torch.zeros(1, 4, 3)
    poses = detokenize(v, start, torch.zeros(1, 4, 1, dtype=torch.long), types)
    assert poses[0, :, -1, 0].tolist() == pytest.approx([5.0, 0.75, 2.0, 5.0], abs=1e-5)
    # Tokenizing a 1.5 m/s walk: the pedestrian takes its own token 0, the vehicle stands (token 1).
    t = torch.arange(6) * 0.15
    xy = torch.stack([t, torch.zeros(6)], -1).expand(1, 4, 6, 2)
    tok = tokenize(v, xy, torch.zeros(1, 4, 6), torch.ones(1, 4, 6, dtype=torch.bool), types)
    assert tok.tokens[0, :, 0].tolist() == [1, 0, 0, 1]


def test_vocabulary_as_tokens_dynamics(scenarios, vocab):
    xy, heading, valid, types = _logs(scenarios[:2])
    tok = tokenize(vocab, xy, heading, valid, types, start=10)
    dynamics = make_dynamics("tokens", vocabulary=vocab.table())
    state = torch.cat([tok.poses[:, :, 0], torch.zeros(*tok.poses.shape[:2], 2)], -1)
    steps = []
    for s in range(tok.tokens.shape[-1]):
        chunk = dynamics.forward(state, tok.tokens[..., s], types)
        steps.append(chunk[..., :3])
        state = chunk[..., -1, :]
    ours = detokenize(vocab, tok.poses[:, :, 0], tok.tokens, types)
    theirs = torch.cat(steps, -2)
    assert torch.allclose(ours[..., :2], theirs[..., :2], atol=1e-3)
    dh = torch.remainder(ours[..., 2] - theirs[..., 2] + math.pi, 2 * math.pi) - math.pi
    assert float(dh.abs().max()) < 1e-4


def _write_safetensors(path, tensors, settings=None):
    from safetensors.torch import save_file

    metadata = None
    if settings is not False:
        header = {"format": "closedloop-motion-vocabulary", "version": 1, "settings": settings or {}}
        metadata = {"closedloop_motion_vocabulary": json.dumps(header)}
    save_file(tensors, str(path), metadata=metadata)


def _good():
    return {k: torch.zeros(4, TOKEN_STEPS, 3) for k in TOKEN_KINDS}


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "cannot read"),
        ("garbage", "not a motion vocabulary"),
        ("pickle", "not a motion vocabulary"),
        ("no_metadata", "not a motion vocabulary"),
        ("shape", r"vehicle chunks must be \[V >= 1, 5, 3\]"),
        ("nan", "pedestrian tokens \\[2\\] hold NaN"),
        ("far", "move up to 80.0 m"),
        ("keys", "expected the tensors"),
        ("dtype", "must be floats"),
        ("version", "format version 7"),
    ],
)
def test_bad_files_raise_vocabulary_error(tmp_path, monkeypatch, case, message):
    path = tmp_path / f"{case}.safetensors"
    tensors = _good()
    if case == "garbage":
        path.write_bytes(b"\x00\x01not a vocabulary" * 10)
    elif case == "pickle":
        called = []
        monkeypatch.setattr(pickle, "loads", lambda *a, **k: called.append(1))
        path.write_bytes(pickle.dumps(_good()))
    elif case == "no_metadata":
        _write_safetensors(path, tensors, settings=False)
    elif case == "version":
        from safetensors.torch import save_file

        header = {"format": "closedloop-motion-vocabulary", "version": 7, "settings": {}}
        save_file(tensors, str(path), metadata={"closedloop_motion_vocabulary": json.dumps(header)})
    elif case != "missing":
        if case == "shape":
            tensors["vehicle"] = torch.zeros(4, 6, 3)
        elif case == "nan":
            tensors["pedestrian"][2, 1, 0] = float("nan")
        elif case == "far":
            tensors["cyclist"][0, 4, 0] = 80.0
        elif case == "keys":
            tensors["bus"] = tensors.pop("cyclist")
        elif case == "dtype":
            tensors["vehicle"] = torch.zeros(4, 5, 3, dtype=torch.int32)
        _write_safetensors(path, tensors)
    with pytest.raises(VocabularyError, match=message) as info:
        MotionVocabulary.load(path)
    assert str(path) in str(info.value)
    if case == "pickle":
        assert not called


def test_save_load_round_trip(tmp_path, vocab):
    vocab.save(tmp_path / "v.safetensors")
    back = MotionVocabulary.load(tmp_path / "v.safetensors")
    assert back.settings == json.loads(json.dumps(vocab.settings))
    assert all(torch.equal(back.chunks[k], vocab.chunks[k]) for k in TOKEN_KINDS)


def test_default_vocabulary_loads():
    v = default_vocabulary()
    assert set(v.chunks) == set(TOKEN_KINDS) and v.table().shape[0] == 3
    assert all(int(n) >= 1 for n in v.sizes())
    assert v.settings["tolerance"] == 0.05 and v.settings["seed"] == 0
    make_dynamics("tokens", vocabulary=v.table())


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "closedloop.cli", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def test_cli_build_and_eval(tmp_path, scenarios):
    write_scenarios(tmp_path / "build.tfrecord", scenarios[:2])
    write_scenarios(tmp_path / "held.tfrecord", list(generate_scenarios(1, seed=5, town="cross", agents=(20, 30))))
    out = tmp_path / "v.safetensors"
    build = _cli("vocab", "build", "--data", tmp_path / "build.tfrecord", "--size", 128, "--seed", 1, "--out", out)
    assert build.returncode == 0, build.stderr
    assert "wrote" in build.stdout and "vehicle" in build.stdout
    ev = _cli("vocab", "eval", "--vocab", out, "--data", tmp_path / "held.tfrecord", "--json")
    assert ev.returncode == 0, ev.stderr
    result = json.loads(ev.stdout)
    assert set(result) == set(TOKEN_KINDS)
    for row in result.values():
        assert {"agents", "mean_corner_error_m", "p95_corner_error_m"} <= set(row)
    assert result["vehicle"]["agents"] > 0 and result["vehicle"]["mean_corner_error_m"] < 0.2
    text = _cli("vocab", "eval", "--vocab", out, "--data", tmp_path / "held.tfrecord")
    assert text.returncode == 0 and text.stdout.startswith("kind")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    failed = _cli("vocab", "eval", "--vocab", bad, "--data", tmp_path / "held.tfrecord")
    assert failed.returncode == 2 and str(bad) in failed.stderr and "Traceback" not in failed.stderr
    missing = _cli("vocab", "build", "--data", tmp_path / "nothing*.tfrecord", "--out", tmp_path / "x.safetensors")
    assert missing.returncode == 2 and "matched nothing" in missing.stderr
