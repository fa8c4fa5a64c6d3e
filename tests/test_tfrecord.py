import pytest

from closedloop.data.tfrecord import (
    TFRecordError,
    count_records,
    encode_record,
    iter_records,
    masked_crc32c,
    write_records,
)


def test_masked_crc_matches_known_value():
    # crc32c("123456789") = 0xE3069283, a standard check value; masking per TFRecord.
    crc = 0xE3069283
    expected = (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
    assert masked_crc32c(b"123456789") == expected


def test_writer_reproduces_real_file_byte_for_byte(scenario_file):
    payloads = list(iter_records(scenario_file))
    assert b"".join(encode_record(p) for p in payloads) == scenario_file.read_bytes()


def test_writer_reader_round_trip(tmp_path):
    payloads = [b"", b"a", bytes(range(256)) * 40, b"x" * 100_000]
    path = tmp_path / "rt.tfrecord"
    assert write_records(path, payloads) == 4
    assert list(iter_records(path)) == payloads
    assert count_records(path) == 4


def _corrupt(tmp_path, data: bytes):
    path = tmp_path / "bad.tfrecord"
    path.write_bytes(data)
    return path


def test_payload_crc_mismatch_names_file_record_offset(tmp_path):
    good = encode_record(b"first") + encode_record(b"second payload")
    bad = bytearray(good)
    bad[len(encode_record(b"first")) + 12 + 2] ^= 0x01  # flip a bit in record 1's payload
    path = _corrupt(tmp_path, bytes(bad))
    reader = iter_records(path)
    assert next(reader) == b"first"  # what came before the bad record is not lost
    with pytest.raises(TFRecordError) as err:
        next(reader)
    assert err.value.record_index == 1 and err.value.offset == len(encode_record(b"first"))
    assert "CRC mismatch in the payload" in str(err.value) and str(path) in str(err.value)


def test_length_crc_mismatch(tmp_path):
    bad = bytearray(encode_record(b"hello"))
    bad[0] ^= 0x04
    with pytest.raises(TFRecordError, match=r"record 0 at byte offset 0: CRC mismatch in the length"):
        list(iter_records(_corrupt(tmp_path, bytes(bad))))


def test_truncated_payload_and_header(tmp_path):
    data = encode_record(b"a" * 50) + encode_record(b"b" * 50)
    with pytest.raises(TFRecordError, match=r"record 1 .*truncated record"):
        list(iter_records(_corrupt(tmp_path, data[:-10])))
    with pytest.raises(TFRecordError, match=r"record 1 .*truncated length header"):
        list(iter_records(_corrupt(tmp_path, data[: len(encode_record(b"a" * 50)) + 5])))


def test_truncated_record_detected_when_skipping_payload(tmp_path):
    data = encode_record(b"a" * 50)[:-10]
    with pytest.raises(TFRecordError, match="truncated"):
        count_records(_corrupt(tmp_path, data))


def test_empty_file(tmp_path):
    path = _corrupt(tmp_path, b"")
    with pytest.raises(TFRecordError, match="empty file"):
        list(iter_records(path))
    assert list(iter_records(path, allow_empty=True)) == []


def test_wrong_file_type(tmp_path):
    path = _corrupt(tmp_path, b'{"this": "is json, not a TFRecord file"}\n')
    with pytest.raises(TFRecordError, match="not a TFRecord file"):
        list(iter_records(path))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.tfrecord"):
        list(iter_records(tmp_path / "nope.tfrecord"))


def test_huge_declared_length_fails_before_allocating(tmp_path):
    import struct
    import tracemalloc

    length = struct.pack("<Q", 2**31 - 1)  # a valid header CRC, but far more than the file holds
    path = _corrupt(
        tmp_path, encode_record(b"a" * 1000) + length + struct.pack("<I", masked_crc32c(length)) + b"b" * 500_000
    )
    tracemalloc.start()
    try:
        with pytest.raises(TFRecordError, match=r"record 1 .*declares 2147483647 payload bytes.*500000 bytes left"):
            list(iter_records(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * path.stat().st_size


def test_corrupt_payload_inside_intact_framing_can_be_passed_over(tmp_path):
    from closedloop.data.tfrecord import iter_record_spans

    records = [encode_record(p) for p in (b"first", b"second", b"third")]
    data = bytearray(b"".join(records))
    data[len(records[0]) + 12] ^= 0x10  # one bit of record 1's payload; its framing is intact
    path = _corrupt(tmp_path, bytes(data))
    errors = []
    spans = list(iter_record_spans(path, on_corrupt_payload=errors.append))
    assert [payload for _, _, payload in spans] == [b"first", None, b"third"]
    assert len(errors) == 1 and errors[0].record_index == 1 and "CRC mismatch in the payload" in str(errors[0])
    with pytest.raises(TFRecordError, match="record 1"):  # without the callback it is an error
        list(iter_records(path))


@pytest.mark.skipif(not __import__("os").path.isdir("/dev/fd"), reason="needs /dev/fd")
def test_reads_from_a_pipe():
    import os

    read_end, write_end = os.pipe()
    os.write(write_end, encode_record(b"a") + encode_record(b"b"))  # a pipe has no size to check against
    os.close(write_end)
    try:
        assert list(iter_records(f"/dev/fd/{read_end}")) == [b"a", b"b"]
    finally:
        os.close(read_end)
