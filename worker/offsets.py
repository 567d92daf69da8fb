"""Offset tracking for at-least-once: commit only what every record below has been answered for.

Per partition the tracker remembers polled offsets in order and which of them are acknowledged
(result, or dead letter, accepted by the broker). The committable offset is one past the highest
offset below which every tracked record is acknowledged, so a crash never skips an image: after a
restart the group resumes at the first unanswered record (duplicates of later ones are possible and
carry the same idempotency key). Thread-safe; pure Python, no Kafka import.

Each polled copy of a record gets a token, and an acknowledgement counts only with the token of the
copy the tracker holds for that offset. When a position moves back (the consumer re-reads a partition
after log truncation, or the partition is revoked and assigned again) while the earlier copy is still
in flight, that copy's late acknowledgement must not answer for the new one: after an unclean leader
election the new record at the same offset may be another message altogether.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Generic, NamedTuple, TypeVar

P = TypeVar("P", bound=Hashable)  # a partition key (kafka's TopicPartition in the worker)


class Tracked(NamedTuple):
    """A polled copy of a record, as the tracker holds it."""

    token: int  # what its acknowledgement must carry
    reread: bool  # its offset is at or below one still pending: the partition's position moved back


@dataclass
class _PartitionState:
    pending: deque[int] = field(default_factory=deque)  # polled, in poll order
    acked: set[int] = field(default_factory=set)
    tokens: dict[int, int] = field(default_factory=dict)  # pending offset -> token of the copy tracked
    next_commit: int | None = None  # offset to commit (one past the contiguous acked prefix)
    committed: int | None = None  # what the broker last accepted from us


class OffsetTracker(Generic[P]):
    """Tracks polled and acknowledged offsets per partition (any hashable partition id)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._parts: dict[P, _PartitionState] = {}
        self._next_token = 1

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

    def track(self, tp: P, offset: int) -> Tracked | None:
        """Record a polled offset.

        Returns:
            Its token (a positive int its acknowledgement must carry) and whether it re-reads offsets
            still pending; None when the partition is not owned (the record must be ignored).
        """
        with self._lock:
            state = self._parts.get(tp)
            if state is None:
                return None
            reread = bool(state.pending) and offset <= state.pending[-1]
            if reread:
                # A seek back re-delivers records: restart from here; copies in flight no longer count.
                state.pending = deque(o for o in state.pending if o < offset)
                state.acked = {o for o in state.acked if o < offset}
                state.tokens = {o: t for o, t in state.tokens.items() if o < offset}
            token = self._next_token
            self._next_token += 1
            state.pending.append(offset)
            state.tokens[offset] = token
            return Tracked(token, reread)

    def ack(self, tp: P, offset: int, token: int | None = None) -> bool:
        """Mark a record answered; advances the committable offset over the contiguous prefix.

        Args:
            tp: the partition.
            offset: the record's offset.
            token: what :meth:`track` returned for this copy; None acknowledges whichever copy is tracked.

        Returns:
            Whether the acknowledgement counted (False: the partition is not owned, or the copy is stale).
        """
        with self._lock:
            state = self._parts.get(tp)
            if state is None or (token is not None and state.tokens.get(offset) != token):
                return False
            state.acked.add(offset)
            while state.pending and state.pending[0] in state.acked:
                done = state.pending.popleft()
                state.acked.discard(done)
                state.tokens.pop(done, None)
                state.next_commit = done + 1
            return True

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
