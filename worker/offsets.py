"""Offset tracking for at-least-once: commit only what every record below has been answered for.

Per partition the tracker remembers polled offsets in order and which of them are acknowledged
(result, or dead letter, accepted by the broker). The committable offset is one past the highest
offset below which every tracked record is acknowledged, so a crash never skips an image: after a
restart the group resumes at the first unanswered record (duplicates of later ones are possible and
carry the same idempotency key). Thread-safe; pure Python, no Kafka import.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

P = TypeVar("P", bound=Hashable)  # a partition key (kafka's TopicPartition in the worker)


@dataclass
class _PartitionState:
    pending: deque[int] = field(default_factory=deque)  # polled, in poll order
    acked: set[int] = field(default_factory=set)
    next_commit: int | None = None  # offset to commit (one past the contiguous acked prefix)
    committed: int | None = None  # what the broker last accepted from us


class OffsetTracker(Generic[P]):
    """Tracks polled and acknowledged offsets per partition (any hashable partition id)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._parts: dict[P, _PartitionState] = {}

    def assign(self, partitions: Iterable[P]) -> None:
        """Start tracking newly owned partitions (fresh state)."""
        with self._lock:
            for tp in partitions:
                self._parts[tp] = _PartitionState()

    def revoke(self, partitions: Iterable[P]) -> None:
        """Forget partitions we no longer own; their acks arriving later are ignored."""
        with self._lock:
            for tp in partitions:
                self._parts.pop(tp, None)

    def owns(self, tp: P) -> bool:
        """Whether ``tp`` is currently owned (assigned and not revoked)."""
        with self._lock:
            return tp in self._parts

    def owned(self) -> list[P]:
        """Partitions currently tracked."""
        with self._lock:
            return list(self._parts)

    def track(self, tp: P, offset: int) -> bool:
        """Record a polled offset; False if the partition is not owned (record must be ignored)."""
        with self._lock:
            state = self._parts.get(tp)
            if state is None:
                return False
            if state.pending and offset <= state.pending[-1]:
                # A seek back (e.g. after an error) re-delivers records: restart from here.
                state.pending = deque(o for o in state.pending if o < offset)
                state.acked = {o for o in state.acked if o < offset}
            state.pending.append(offset)
            return True

    def ack(self, tp: P, offset: int) -> None:
        """Mark a record answered; advances the committable offset over the contiguous prefix."""
        with self._lock:
            state = self._parts.get(tp)
            if state is None:
                return
            state.acked.add(offset)
            while state.pending and state.pending[0] in state.acked:
                done = state.pending.popleft()
                state.acked.discard(done)
                state.next_commit = done + 1

    def committable(self) -> dict[P, int]:
        """Offsets to commit now: partitions whose acknowledged prefix advanced since the last commit."""
        with self._lock:
            return {
                tp: s.next_commit
                for tp, s in self._parts.items()
                if s.next_commit is not None and s.next_commit != s.committed
            }

    def mark_committed(self, offsets: dict[P, int]) -> None:
        """Record what the broker accepted."""
        with self._lock:
            for tp, offset in offsets.items():
                state = self._parts.get(tp)
                if state is not None:
                    state.committed = offset

    def inflight(self, partitions: Iterable[P] | None = None) -> int:
        """Polled but unanswered records (all partitions, or only ``partitions``)."""
        with self._lock:
            keys = self._parts.keys() if partitions is None else [p for p in partitions if p in self._parts]
            return sum(len(self._parts[k].pending) for k in keys)
