"""TFRecord framing without TensorFlow.

A TFRecord file is a sequence of records, each framed as::

    uint64 length (little endian)
    uint32 masked_crc32c(length bytes)
    bytes  payload[length]
    uint32 masked_crc32c(payload)

Both checksums are verified on every read, so a flipped bit anywhere is reported with the
file, the record index and the byte offset of the record instead of surfacing later as a
puzzling protobuf error.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import google_crc32c

from closedloop._atomic import atomic_write

_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")
_MASK_DELTA = 0xA282EAD8
# A single WOMD scenario is a few MB; anything claiming more than this is not a record. The
# declared length is also checked against the bytes left in the file before anything is
# allocated, so a corrupt length can never make the reader allocate more than the file holds.
MAX_RECORD_BYTES = 1 << 30


class TFRecordError(ValueError):
    """A TFRecord file is corrupt, truncated, empty or not a TFRecord file at all."""

    def __init__(self, path: str | os.PathLike, record_index: int, offset: int, reason: str):
        self.path = str(path)
        self.record_index = record_index
        self.offset = offset
        self.reason = reason
        super().__init__(f"{self.path}: record {record_index} at byte offset {offset}: {reason}")


def masked_crc32c(data: bytes) -> int:
    """The CRC32C checksum, rotated and offset the way TFRecord stores it."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def _read_exact(handle: BinaryIO, size: int) -> bytes:
    data = handle.read(size)
    return data if data is not None else b""


def iter_records(path: str | os.PathLike, *, allow_empty: bool = False, verify: bool = True) -> Iterator[bytes]:
    """Yield the payload of every record in ``path``, verifying both checksums.

    Raises :class:`TFRecordError` on the first bad record; records before it have already
    been yielded. An empty file is an error unless ``allow_empty`` (a scenario shard with no
    scenarios is almost always a failed download or write).
    """
    for _, _, payload in iter_record_spans(path, allow_empty=allow_empty, verify=verify):
        yield payload


def iter_record_spans(
    path: str | os.PathLike,
    *,
    allow_empty: bool = False,
    verify: bool = True,
    keep: Callable[[int], bool] | None = None,
    on_corrupt_payload: Callable[[TFRecordError], None] | None = None,
) -> Iterator[tuple[int, int, bytes | None]]:
    """Yield ``(record_index, byte_offset, payload)`` for each record.

    ``keep(record_index)`` may return False to skip a record's payload without reading or
    checking it (its length header is still verified); the payload is then ``None``. This is
    how DataLoader workers share one file without each decoding all of it.

    A payload whose own checksum fails, inside intact framing (good length header, the whole
    record present), does not hide the records after it: with ``on_corrupt_payload`` the
    error is handed to that callback, the payload is yielded as ``None`` and reading goes on.
    Without it the error is raised. Broken framing (a bad length header, a truncated record)
    always raises: nothing after it can be located.
    """
    path = Path(path)
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such TFRecord file") from None
    with handle:
        info = os.fstat(handle.fileno())
        # A pipe has no size to check against; MAX_RECORD_BYTES still bounds what it can claim.
        size = info.st_size if stat.S_ISREG(info.st_mode) else None
        index = 0
        offset = 0
        while True:
            header = _read_exact(handle, _HEADER.size)
            if not header:
                if index == 0 and not allow_empty:
                    raise TFRecordError(path, 0, 0, "empty file: no records")
                return
            if len(header) < _HEADER.size:
                raise TFRecordError(
                    path,
                    index,
                    offset,
                    f"truncated length header ({len(header)} of {_HEADER.size} bytes)",
                )
            length, length_crc = _HEADER.unpack(header)
            if verify and masked_crc32c(header[:8]) != length_crc:
                raise TFRecordError(
                    path,
                    index,
                    offset,
                    "CRC mismatch in the length header (corrupt, or not a TFRecord file)",
                )
            left = None if size is None else size - offset - _HEADER.size
            if left is not None and length + _FOOTER.size > left:
                raise TFRecordError(
                    path,
                    index,
                    offset,
                    f"truncated record: declares {length} payload bytes and a checksum, the file has {left} bytes left",
                )
            if length > MAX_RECORD_BYTES:
                raise TFRecordError(path, index, offset, f"implausible record length {length}")
            if keep is not None and not keep(index):
                handle.seek(length + _FOOTER.size, os.SEEK_CUR)
                yield index, offset, None
            else:
                payload = _read_exact(handle, length)
                footer = _read_exact(handle, _FOOTER.size)
                if len(payload) < length or len(footer) < _FOOTER.size:  # the file shrank
                    raise TFRecordError(
                        path,
                        index,
                        offset,
                        f"truncated record: expected {length} payload bytes and a checksum",
                    )
                if verify and masked_crc32c(payload) != _FOOTER.unpack(footer)[0]:
                    error = TFRecordError(path, index, offset, "CRC mismatch in the payload (corrupt)")
                    if on_corrupt_payload is None:
                        raise error
                    on_corrupt_payload(error)
                    payload = None
                yield index, offset, payload
            offset += _HEADER.size + length + _FOOTER.size
            index += 1


def count_records(path: str | os.PathLike) -> int:
    """Number of records in ``path`` (length headers are checked, payloads skipped)."""
    return sum(1 for _ in iter_record_spans(path, allow_empty=True, keep=lambda _: False))


def encode_record(payload: bytes) -> bytes:
    """One framed record, byte for byte what TensorFlow's TFRecordWriter writes."""
    length = struct.pack("<Q", len(payload))
    return length + struct.pack("<I", masked_crc32c(length)) + payload + struct.pack("<I", masked_crc32c(payload))


def write_records(path: str | os.PathLike, payloads: Iterable[bytes]) -> int:
    """Write ``payloads`` as a TFRecord file atomically; returns the number of records."""
    count = 0
    with atomic_write(path) as handle:
        for payload in payloads:
            handle.write(encode_record(payload))
            count += 1
    return count
