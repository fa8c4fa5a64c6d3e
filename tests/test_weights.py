"""Model weights files: round trip, the CLI, and bad files that must never be unpickled."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from cli import run

from closedloop.agents.smart import SmartModel
from closedloop.agents.tokens import default_vocabulary
from closedloop.agents.weights import WeightsError, load_model, save_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    vocabulary = default_vocabulary()
    model = SmartModel("micro", vocabulary=vocabulary.table())
    path = tmp_path_factory.mktemp("weights") / "micro.safetensors"
    save_model(model, vocabulary, path)
    return model, vocabulary, path


def test_round_trip(saved):
    model, vocabulary, path = saved
    loaded, loaded_vocabulary = load_model(path)
    assert loaded.config == model.config and not loaded.training
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert torch.equal(loaded_vocabulary.table(), vocabulary.table())


def _rewrite(path, out, change):
    from safetensors.torch import load, save

    data = path.read_bytes()
    tensors = load(data)
    length = int.from_bytes(data[:8], "little")
    import json

    metadata = json.loads(data[8 : 8 + length])["__metadata__"]
    tensors, metadata = change(tensors, metadata)
    out.write_bytes(save(tensors, metadata=metadata))
    return out


def _nan(tensors, metadata):
    tensors["norm.weight"] = torch.full_like(tensors["norm.weight"], float("nan"))
    return tensors, metadata


def _drop(tensors, metadata):
    tensors.pop("norm.weight")
    return tensors, metadata


def _shape(tensors, metadata):
    tensors["norm.weight"] = torch.zeros(7)
    return tensors, metadata


def _foreign(tensors, metadata):
    return tensors, {"closedloop": '{"format": "something-else"}'}


def _header(change):
    def rewrite(tensors, metadata):
        import json

        header = json.loads(metadata["closedloop"])
        change(header)
        return tensors, {"closedloop": json.dumps(header)}

    return rewrite


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda h: h["config"].update(hidden=-4), "hidden=-4 is not an integer"),
        (lambda h: h["config"].update(dropout="x"), "dropout='x' is not a number"),
        (lambda h: h["config"].update(heads=5), "not a multiple of heads=5"),
        (lambda h: h["config"].update(hidden=10**6), "hidden=1000000 is not an integer in"),
        (lambda h: h["config"].update(surprise=1), "unknown config fields"),
        (lambda h: h.update(vocabulary_settings={"reference_boxes": "x"}), "reference_boxes must map"),
    ],
)
def test_bad_headers_are_weights_errors(saved, tmp_path, change, match):
    _, _, path = saved
    bad = _rewrite(path, tmp_path / "bad.safetensors", _header(change))
    with pytest.raises(WeightsError, match=f"bad.safetensors: .*{match}"):
        load_model(bad)


@pytest.mark.parametrize(
    "kind, match",
    [
        ("garbage", "not closedloop model weights"),
        ("pickle", "not closedloop model weights"),
        ("missing", "cannot read closedloop model weights"),
        ("nan", r"NaN/inf in the weights \['norm.weight'\]"),
        ("drop", r"missing \['norm.weight'\]"),
        ("shape", "wrong shapes: norm.weight \\[7\\]"),
        ("foreign", "not closedloop model weights"),
    ],
)
def test_bad_files_name_the_file(saved, tmp_path, kind, match):
    _, _, path = saved
    bad = tmp_path / f"{kind}.safetensors"
    if kind == "garbage":
        bad.write_bytes(b"\x00garbage" * 100)
    elif kind == "pickle":  # unpickling this would create the marker file
        bad.write_bytes(pickle.dumps(_Trap(tmp_path / "unpickled")))
    elif kind != "missing":
        _rewrite(path, bad, {"nan": _nan, "drop": _drop, "shape": _shape, "foreign": _foreign}[kind])
    with pytest.raises(WeightsError, match=f"{bad.name}: .*{match}"):
        load_model(bad)
    assert not (tmp_path / "unpickled").exists()


class _Trap:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _rollout(scenario_file, weights, out, *extra):
    return run("rollout", "--data", scenario_file, "--policy", f"model:{weights}", "--out", out, *extra, check=False)


def test_cli_rolls_out_saved_weights(saved, tmp_path, scenario_file):
    _, _, path = saved
    out = tmp_path / "runs"
    proc = _rollout(scenario_file, path, out, "--num-rollouts", "2")
    assert proc.returncode == 0, proc.stderr
    assert "2 rollouts" in proc.stdout and (out / "637f20cafde22ff8.npz").exists()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"nope")
    proc = _rollout(scenario_file, bad, out)
    assert proc.returncode == 2 and "bad.safetensors: not closedloop model weights" in proc.stderr
    for extra in (("--num-rollouts", "-1"), ("--rollouts-together", "0")):
        proc = _rollout(scenario_file, path, out, *extra)
        assert proc.returncode == 2 and "expected a positive integer" in proc.stderr
    npy = tmp_path / "v.npy"
    np.save(npy, np.zeros((4, 5, 3), np.float32))
    proc = run(
        "rollout", "--data", scenario_file, "--policy", "model:micro", "--vocabulary", npy, "--out", out, check=False
    )
    assert proc.returncode == 2 and "takes a .safetensors motion vocabulary" in proc.stderr
