"""Reading and writing the project's safetensors files (vocabularies, model weights):
tensors plus one JSON header in the metadata, never pickle, bad files as one error type."""

from __future__ import annotations

import json
import os

import torch

METADATA_KEY = "closedloop"


def write_safetensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], header: dict, metadata_key: str = METADATA_KEY
) -> None:
    """Write ``tensors`` and ``header`` (JSON-able, stored under ``metadata_key``) atomically;
    byte-identical for equal input."""
    from safetensors.torch import save

    from closedloop._atomic import atomic_write

    data = save(tensors, metadata={metadata_key: json.dumps(header, sort_keys=True)})
    with atomic_write(path) as handle:
        handle.write(data)


def read_format(
    path: str | os.PathLike, what: str, error: type[Exception], max_bytes: int, metadata_key: str = METADATA_KEY
) -> str | None:
    """The ``format`` a file's header declares (None if it has none), reading only the
    header; a file that is not safetensors raises ``error`` naming it."""
    where = str(path)
    try:
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if not 0 < length <= min(max_bytes, 100 << 20):
                raise ValueError(f"header length {length}")
            header = json.loads(handle.read(length).decode("utf-8"))
        metadata = header.get("__metadata__") or {}
        declared = json.loads(metadata[metadata_key]) if metadata_key in metadata else {}
    except OSError as err:
        raise error(f"{where}: cannot read {what} ({err.strerror or err})") from None
    except (ValueError, UnicodeDecodeError, AttributeError, TypeError) as err:
        raise error(f"{where}: not {what} (a closedloop safetensors file): {err}") from None
    return declared.get("format") if isinstance(declared, dict) else None


def read_safetensors(
    path: str | os.PathLike,
    what: str,
    error: type[Exception],
    max_bytes: int,
    expected_format: str,
    metadata_key: str = METADATA_KEY,
) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and JSON header of a file written by :func:`write_safetensors` whose
    header says ``format: expected_format``; anything else raises ``error`` naming the
    file and ``what`` it should have been."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    where = str(path)
    try:
        size = os.path.getsize(path)
        if size > max_bytes:
            raise error(f"{where}: {size} bytes, too large for {what}")
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as err:
        raise error(f"{where}: cannot read {what} ({err.strerror or err})") from None
    try:
        tensors = load(data)
        length = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + length].decode("utf-8")).get("__metadata__") or {}
        header = json.loads(metadata[metadata_key])
    except (SafetensorError, ValueError, KeyError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise error(f"{where}: not {what} (a closedloop safetensors file): {err}") from None
    if not isinstance(header, dict) or header.get("format") != expected_format:
        raise error(f"{where}: a safetensors file, but not {what}")
    return tensors, header
