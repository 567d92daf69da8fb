"""kafka-python record reading with the header-name fix: a name that is not UTF-8 no longer makes a partition
unreadable (the reliability tests prove the other two fixes against the broker)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kafka.errors import CorruptRecordError
from kafka.record.default_records import DefaultRecordBatchBuilder
from kafka.record.memory_records import MemoryRecords

from worker import kafka_patches


def batch_with_a_bad_header_name(compression_type: int = 0) -> bytes:
    """Three records; the middle one has a header whose name bytes are not UTF-8 (as a non-Java producer may write)."""
    builder = DefaultRecordBatchBuilder(
        magic=2, compression_type=compression_type, is_transactional=False, producer_id=-1, producer_epoch=-1,
        base_sequence=-1, batch_size=1 << 20,
    )  # fmt: skip
    builder.append(0, timestamp=None, key=b"k0", value=b"v0", headers=[("ce_id", b"m0")])
    builder.append(1, timestamp=None, key=b"k1", value=b"v1", headers=[("ce_id", b"m1"), ("xZZname", b"1")])
    builder.append(2, timestamp=None, key=b"k2", value=b"v2", headers=[("ce_id", b"m2")])
    data = bytearray(builder.build())
    if compression_type == 0:  # compressed, the name cannot be found (the valid-batch case)
        at = data.find(b"xZZ")
        data[at : at + 3] = b"\xff\xfe\xfd"  # the CRC no longer matches; only check_crcs would look
    return bytes(data)


def read_all(data: bytes) -> Iterator[tuple[int, list[tuple[str, bytes | None]]]]:
    batch = MemoryRecords(data).next_batch()
    assert batch is not None
    for record in batch:
        yield record.offset, record.headers


def test_a_header_name_that_is_not_utf8_is_read_with_replacement_characters() -> None:
    records = list(read_all(batch_with_a_bad_header_name()))
    assert [offset for offset, _ in records] == [0, 1, 2]  # the records after it are read too
    assert records[1][1] == [("ce_id", b"m1"), ("\ufffd\ufffd\ufffdname", b"1")]
    assert records[0][1] == [("ce_id", b"m0")] and records[2][1] == [("ce_id", b"m2")]


def test_without_the_fix_the_record_stops_the_partition() -> None:
    kafka_patches.revert()
    try:
        with pytest.raises(CorruptRecordError, match="UnicodeDecodeError"):
            list(read_all(batch_with_a_bad_header_name()))
    finally:
        kafka_patches.apply()
    assert kafka_patches.is_applied()


def test_valid_batches_read_exactly_as_before() -> None:
    valid = batch_with_a_bad_header_name(compression_type=1)  # gzip: the names stay intact
    with_fix = list(read_all(valid))
    kafka_patches.revert()
    try:
        without = list(read_all(valid))
    finally:
        kafka_patches.apply()
    assert with_fix == without and with_fix[1][1] == [("ce_id", b"m1"), ("xZZname", b"1")]
