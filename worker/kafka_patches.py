"""Two small, isolated fixes for kafka-python 3.0.x, applied at import (before any consumer exists).

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
"""

from __future__ import annotations

from typing import Any

from kafka.consumer.fetcher import Fetcher
from kafka.coordinator.base import BaseCoordinator

_original_fetched_records = Fetcher.fetched_records
_original_reset_generation = BaseCoordinator.reset_generation


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


_FIXES: list[tuple[type, str, Any, Any]] = [
    (Fetcher, "fetched_records", _fetched_records, _original_fetched_records),
    (BaseCoordinator, "reset_generation", _reset_generation, _original_reset_generation),
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
