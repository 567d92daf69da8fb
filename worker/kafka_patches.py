"""A small, isolated fix for kafka-python 3.0.x: resume() after pause() can starve a partition.

Bug: records of a paused partition that were already fetched are parked; after ``resume()`` the
fetcher restores parked records only when ``_next_partition_records is None``, but a drained
(falsy) ``PartitionRecords`` stays in that slot, and ``_fetchable_partitions()`` skips partitions
with parked data, so the partition is never delivered nor fetched again. The fix clears a drained
in-line slot before the original ``fetched_records`` runs. The worker's backpressure relies on
pause/resume, so it applies this at import; ``tests/integration/test_kafka_pause_resume.py`` fails
without it.
"""

from __future__ import annotations

from typing import Any

from kafka.consumer.fetcher import Fetcher

_original_fetched_records = Fetcher.fetched_records


def _fetched_records(self: Any, *args: Any, **kwargs: Any) -> Any:
    current = getattr(self, "_next_partition_records", None)
    if current is not None and not current:
        self._next_partition_records = None
    return _original_fetched_records(self, *args, **kwargs)


def apply() -> None:
    """Install the fix (idempotent)."""
    Fetcher.fetched_records = _fetched_records  # type: ignore[method-assign]


def revert() -> None:
    """Restore kafka-python's original method (tests prove the fix is needed)."""
    Fetcher.fetched_records = _original_fetched_records  # type: ignore[method-assign]


def is_applied() -> bool:
    """Whether the fix is installed."""
    return Fetcher.fetched_records is _fetched_records


apply()
