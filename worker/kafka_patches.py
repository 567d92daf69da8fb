"""Three small, isolated fixes for kafka-python 3.0.x, applied at import (before any consumer exists).

1. **resume() after pause() can starve a partition.** Records of a paused partition that were already
   fetched are parked; after ``resume()`` the fetcher restores parked records only when
   ``_next_partition_records is None``, but a drained (falsy) ``PartitionRecords`` stays in that slot,
   and ``_fetchable_partitions()`` skips partitions with parked data, so the partition is never
   delivered nor fetched again. The fix clears a drained in-line slot before the original
   ``fetched_records`` runs. The worker's backpressure relies on pause/resume;
   ``tests/integration/test_kafka_pause_resume.py`` fails without it.
2. **A member whose JoinGroup or SyncGroup is refused keeps partitions it no longer owns.** The
   coordinator runs ``_on_join_prepare`` (which reports a lost generation's partitions through
   ``on_partitions_lost`` and empties the assignment) once per rebalance; when the join is then refused
   with ``UNKNOWN_MEMBER_ID`` or ``ILLEGAL_GENERATION`` the generation is reset and the join retried
   *without* that step. The member keeps consuming the old partitions, never hears they were lost,
   and advertises them as owned in its next JoinGroup, so another member can be given them in the
   same generation. The Java client fixed the same flaw in KAFKA-12983 (reset ``needsJoinPrepare``
   with the generation); so does this (``rejoining`` is kafka-python's name for it).
   ``tests/reliability/test_group_ownership.py`` fails without it.
3. **A header name that is not UTF-8 makes the partition unreadable.** Kafka header names are strings,
   but a non-Java producer can write any bytes. kafka-python decodes them strictly and raises
   ``CorruptRecordError`` from ``poll()`` without saying where; the position stays on the record, so
   every poll fails again and each worker that takes the partition over stops the same way (a poison
   pill for the group). The Java client decodes such names with U+FFFD replacement characters; so does
   this, on the failing record only. The worker then treats the name like any header it does not know.
   ``tests/test_worker/test_kafka_patches.py`` fails without it.
"""

from __future__ import annotations

from typing import Any

from kafka.consumer.fetcher import Fetcher
from kafka.coordinator.base import BaseCoordinator
from kafka.record.default_records import DefaultRecordBatch

_original_fetched_records = Fetcher.fetched_records
_original_reset_generation = BaseCoordinator.reset_generation
_original_read_msg = DefaultRecordBatch._read_msg


def _fetched_records(self: Any, *args: Any, **kwargs: Any) -> Any:
    current = getattr(self, "_next_partition_records", None)
    if current is not None and not current:
        self._next_partition_records = None
    return _original_fetched_records(self, *args, **kwargs)


def _reset_generation(self: Any, *args: Any, **kwargs: Any) -> Any:
    result = _original_reset_generation(self, *args, **kwargs)
    with self._lock:
        self.rejoining = False  # the next join attempt runs _on_join_prepare again: lost partitions reported
    return result


class _ReplacingBytes(bytes):
    """Bytes whose ``decode`` replaces what is not valid (U+FFFD), whatever error handler is asked for."""

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return bytes.decode(self, encoding, "replace")


class _ReplacingBuffer:
    """A record batch buffer seen through :class:`_ReplacingBytes`: indexing as before, slices decode leniently."""

    def __init__(self, buffer: Any) -> None:
        self._buffer = buffer

    def __len__(self) -> int:
        return len(self._buffer)

    def __getitem__(self, index: Any) -> Any:
        item = self._buffer[index]
        return _ReplacingBytes(item) if isinstance(index, slice) else item


def _read_msg(self: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return _original_read_msg(self, *args, **kwargs)
    except UnicodeDecodeError:
        # The original moves ``_pos`` only once a record is read whole: read this one again, leniently.
        buffer = self._buffer
        self._buffer = _ReplacingBuffer(buffer)
        try:
            return _original_read_msg(self, *args, **kwargs)
        finally:
            self._buffer = buffer


_FIXES: list[tuple[type, str, Any, Any]] = [
    (Fetcher, "fetched_records", _fetched_records, _original_fetched_records),
    (BaseCoordinator, "reset_generation", _reset_generation, _original_reset_generation),
    (DefaultRecordBatch, "_read_msg", _read_msg, _original_read_msg),
]


def apply() -> None:
    """Install the fixes (idempotent)."""
    for owner, name, fixed, _ in _FIXES:
        setattr(owner, name, fixed)


def revert() -> None:
    """Restore kafka-python's original methods (tests prove the fixes are needed)."""
    for owner, name, _, original in _FIXES:
        setattr(owner, name, original)


def is_applied() -> bool:
    """Whether the fixes are installed."""
    return all(getattr(owner, name) is fixed for owner, name, fixed, _ in _FIXES)


apply()
