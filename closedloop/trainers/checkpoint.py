"""Training runs on disk: the run's config, checkpoints, and the pointer to the latest one.

Layout of a run directory::

    RUN_DIR/config.json                              what rebuilds the run: model, data,
                                                     hyper-parameters, the command line
    RUN_DIR/latest.json                              {"step": N, "weights": ..., "train_state": ...}
    RUN_DIR/checkpoints/step_00001000.safetensors    the model (a weights file: usable as
                                                     ``--policy model:FILE`` on its own)
    RUN_DIR/checkpoints/step_00001000.train.safetensors
                                                     optimizer moments, RNG states and the
                                                     data position, for ``--resume``
    RUN_DIR/tb/                                      TensorBoard events

No pickle: tensors go to safetensors files, everything else to JSON. Each file is written
atomically and ``latest.json`` is replaced last, so a run killed mid-save still points at a
complete checkpoint. A missing, truncated or foreign file raises :class:`CheckpointError`
naming it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from closedloop._atomic import atomic_write
from closedloop.safetensors_io import read_safetensors, write_safetensors

RUN_FORMAT = "closedloop-run"
LATEST_FORMAT = "closedloop-latest-checkpoint"
TRAIN_STATE_FORMAT = "closedloop-train-state"
VERSION = 1
MAX_STATE_BYTES = 8 << 30


class CheckpointError(ValueError):
    """A run directory or checkpoint file that cannot be used; the message names the file."""


def _write_json(path: Path, value: dict) -> None:
    with atomic_write(path, "w") as handle:
        json.dump(value, handle, indent=2, sort_keys=True)
        handle.write("\n")


def _read_json(path: Path, what: str, expected_format: str) -> dict:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing ({what})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not a readable {what}: {err}") from None
    if not isinstance(value, dict) or value.get("format") != expected_format:
        raise CheckpointError(f"{path}: not a closedloop {what} (format {expected_format!r} expected)")
    if value.get("version") != VERSION:
        raise CheckpointError(f"{path}: {what} version {value.get('version')!r}, this closedloop reads {VERSION}")
    return value


def write_run_config(run_dir: str | os.PathLike, config: dict) -> None:
    """``RUN_DIR/config.json`` (atomic)."""
    _write_json(Path(run_dir) / "config.json", {"format": RUN_FORMAT, "version": VERSION, **config})


def read_run_config(run_dir: str | os.PathLike) -> dict:
    """The ``config.json`` of a run directory."""
    if not Path(run_dir).is_dir():
        raise CheckpointError(f"{run_dir}: no such run directory")
    return _read_json(Path(run_dir) / "config.json", "training run config", RUN_FORMAT)


def read_latest(run_dir: str | os.PathLike) -> dict:
    """``latest.json``: the step and the files of the run's latest checkpoint (paths
    resolved against the run directory and checked to exist)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run directory")
    latest = _read_json(run_dir / "latest.json", "latest-checkpoint pointer", LATEST_FORMAT)
    for key in ("weights", "train_state"):
        if not isinstance(latest.get(key), str):
            raise CheckpointError(f"{run_dir / 'latest.json'}: no {key} file named")
        path = run_dir / latest[key]
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (named by {run_dir / 'latest.json'})")
        latest[key] = path
    if not isinstance(latest.get("step"), int):
        raise CheckpointError(f"{run_dir / 'latest.json'}: no step")
    return latest


def resolve_weights(spec: str | os.PathLike) -> Path:
    """The weights file ``ckpt:SPEC`` names: ``RUN_DIR`` (its latest checkpoint), or
    ``RUN_DIR/FILE`` / any path to a weights file."""
    path = Path(spec)
    if path.is_dir():
        return read_latest(path)["weights"]
    if path.is_file():
        return path
    raise CheckpointError(f"{spec}: neither a run directory nor a checkpoint file")


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    save_weights,
    optimizer: torch.optim.Optimizer,
    train_state: dict,
    keep: int = 3,
) -> Path:
    """Write the checkpoint of ``step``: ``save_weights(path)`` writes the model, the
    optimizer's state and the RNG states go beside it with ``train_state`` (JSON: data
    position, elapsed time...), then ``latest.json`` moves to it and all but the ``keep``
    newest checkpoints are deleted. Returns the weights path."""
    run_dir = Path(run_dir)
    folder = run_dir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / f"step_{step:08d}.safetensors"
    state = folder / f"step_{step:08d}.train.safetensors"
    save_weights(weights)
    tensors, optimizer_header = _optimizer_tensors(optimizer)
    tensors.update({f"rng.{name}": value for name, value in rng_state().items()})
    header = {
        "format": TRAIN_STATE_FORMAT,
        "version": VERSION,
        "step": step,
        "optimizer": optimizer_header,
        "train_state": train_state,
    }
    write_safetensors(state, tensors, header)
    _write_json(
        run_dir / "latest.json",
        {
            "format": LATEST_FORMAT,
            "version": VERSION,
            "step": step,
            "weights": str(weights.relative_to(run_dir)),
            "train_state": str(state.relative_to(run_dir)),
        },
    )
    old = sorted(folder.glob("step_*.train.safetensors"))[:-keep] if keep > 0 else []
    for path in old:
        path.unlink(missing_ok=True)
        (folder / path.name.replace(".train.safetensors", ".safetensors")).unlink(missing_ok=True)
    return weights


def load_train_state(path: str | os.PathLike, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Restore ``optimizer`` from a train-state file; returns ``(train_state, rng)`` (the
    JSON it was saved with, and the RNG state tensors for :func:`set_rng_state`)."""
    tensors, header = read_safetensors(
        path, "closedloop training state", CheckpointError, MAX_STATE_BYTES, TRAIN_STATE_FORMAT
    )
    if header.get("version") != VERSION:
        raise CheckpointError(f"{path}: training state version {header.get('version')!r}, this closedloop reads 1")
    try:
        _load_optimizer(optimizer, tensors, header["optimizer"])
    except (KeyError, ValueError, TypeError, RuntimeError) as err:
        raise CheckpointError(f"{path}: the optimizer state does not fit this model: {err}") from None
    rng = {name[4:]: value for name, value in tensors.items() if name.startswith("rng.")}
    if "cpu" not in rng:
        raise CheckpointError(f"{path}: no RNG state")
    return header.get("train_state") or {}, rng


def rng_state() -> dict[str, torch.Tensor]:
    """The global CPU and CUDA RNG states (dropout draws from them)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, value in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda.{index}"] = value
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["cpu"])
    cuda = [state[f"cuda.{i}"] for i in range(len(state) - 1) if f"cuda.{i}" in state]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer's state as flat tensors ``optim.<param>.<key>`` plus JSON for the rest."""
    saved = optimizer.state_dict()
    tensors, scalars = {}, {}
    for param, values in saved["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{param}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{param}.{key}"] = value
    return tensors, {"param_groups": saved["param_groups"], "scalars": scalars}


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], header: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, param, key = name.split(".", 2)
            state.setdefault(int(param), {})[key] = value
    for name, value in header["scalars"].items():
        param, key = name.split(".", 1)
        state.setdefault(int(param), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": header["param_groups"]})
