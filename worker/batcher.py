"""Dynamic batcher: one bounded FIFO per key (product line, model version), Triton's rules.

A batch leaves when its queue holds ``max_batch_size`` items ("full"), or when the oldest queued item
has waited ``max_wait_ms`` ("timeout"). Among ready queues the one with the oldest item goes first,
so no product line starves another. One batch never mixes keys (different weights or input sizes).

Keys of one *group* (the versions of one product line) leave in put order: while two versions of a
line hold items (a model hot swap), only the version holding the line's oldest item may leave, with
its items put before the other version's first one, and at once ("flush"), since that run cannot grow.
Otherwise a full batch of the new version would overtake a camera's older images still waiting in a
partial batch of the old one. The clock is injected; the object is thread-safe (decode threads put,
the inference thread gets).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

T = TypeVar("T")

BatchReason = Literal["full", "timeout", "flush"]


class QueueFull(Exception):
    """The key's queue is at ``max_queue_items``; the caller must hold the item back."""


@dataclass(frozen=True)
class Batch(Generic[T]):
    """Items that leave together for one model call."""

    key: Hashable
    items: list[T]
    reason: BatchReason
    oldest_wait_s: float  # how long the oldest item had waited when the batch formed


@dataclass(frozen=True)
class _Entry(Generic[T]):
    put_at: float  # clock() at put
    seq: int  # put order across keys
    item: T


class DynamicBatcher(Generic[T]):
    """Bounded per-key queues with the full-or-timeout release rule.

    Args:
        max_batch_size: Items per batch.
        max_wait_ms: Longest wait of the oldest item before a partial batch leaves.
        max_queue_items: Bound of each key's queue.
        clock: Monotonic seconds (injected in tests).
        group: The ordering group of a key (the product line of a ``(line, version)`` key); batches of
            one group leave in put order. None: every key is its own group.
    """

    def __init__(
        self,
        *,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue_items: int,
        clock: Callable[[], float] = time.monotonic,
        group: Callable[[Hashable], Hashable] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue_items < 1 or max_wait_ms < 0:
            raise ValueError("max_batch_size and max_queue_items must be >= 1 and max_wait_ms >= 0")
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue_items = max_queue_items
        self._clock = clock
        self._group = group
        self._queues: OrderedDict[Hashable, deque[_Entry[T]]] = OrderedDict()
        self._seq = 0  # put order, across keys
        self._cond = threading.Condition()
        self._closed = False

    def put(self, key: Hashable, item: T) -> None:
        """Queue ``item`` under ``key``; raises :class:`QueueFull` at the bound."""
        with self._cond:
            queue = self._queues.setdefault(key, deque())
            if len(queue) >= self.max_queue_items:
                raise QueueFull(f"queue {key!r} holds {len(queue)} items")
            queue.append(_Entry(self._clock(), self._seq, item))
            self._seq += 1
            # Wake the consumer only when this put can change its decision: a queue that just
            # became full, a first item whose timer must be armed, or an older version's run now cut.
            if len(queue) == 1 or len(queue) >= self.max_batch_size or self._has_other_key_of_group(key):
                self._cond.notify_all()

    def ready(self) -> Batch[T] | None:
        """The next batch that may leave now, or None (never blocks)."""
        with self._cond:
            return self._take_ready(self._clock())

    def get(self, timeout_s: float | None = None) -> Batch[T] | None:
        """Block until a batch may leave (or ``timeout_s`` passes, or :meth:`close`)."""
        deadline = None if timeout_s is None else self._clock() + timeout_s
        with self._cond:
            while True:
                now = self._clock()
                batch = self._take_ready(now)
                if batch is not None or self._closed:
                    return batch
                wait = self._next_timer(now)
                if deadline is not None:
                    remaining = deadline - now
                    if remaining <= 0:
                        return None
                    wait = remaining if wait is None else min(wait, remaining)
                self._cond.wait(wait)

    def drain(self) -> list[Batch[T]]:
        """Everything queued, as batches of at most ``max_batch_size`` in release order (shutdown)."""
        out: list[Batch[T]] = []
        with self._cond:
            now = self._clock()
            while (batch := self._take_ready(now, flush=True)) is not None:
                out.append(batch)
        return out

    def remove(self, predicate: Callable[[T], bool]) -> list[T]:
        """Take out every queued item matching ``predicate`` (revoked partitions)."""
        removed: list[T] = []
        with self._cond:
            for key in list(self._queues):
                kept: deque[_Entry[T]] = deque()
                for entry in self._queues[key]:
                    if predicate(entry.item):
                        removed.append(entry.item)
                    else:
                        kept.append(entry)
                if kept:
                    self._queues[key] = kept
                else:
                    del self._queues[key]
        return removed

    def close(self) -> None:
        """Wake waiters; :meth:`get` returns None once nothing is ready."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def pending(self) -> int:
        """Items queued across all keys."""
        with self._cond:
            return sum(len(q) for q in self._queues.values())

    def depth(self) -> dict[Hashable, int]:
        """Items queued per key."""
        with self._cond:
            return {k: len(q) for k, q in self._queues.items() if q}

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    # -- internals (call with the lock held) -----------------------------------------------------
    def _take_ready(self, now: float, *, flush: bool = False) -> Batch[T] | None:
        best_key: Hashable | None = None
        best_reason: BatchReason | None = None
        best_oldest = float("inf")
        best_count = 0
        for key, queue in self._queues.items():
            if not queue:
                continue
            count, cut = self._releasable(key, queue)
            if count == 0:
                continue  # an older version of its group goes first
            oldest = queue[0].put_at
            if flush:
                reason: BatchReason = "flush"
            elif count >= self.max_batch_size:
                reason = "full"
            elif cut:
                reason = "flush"
            elif now - oldest >= self.max_wait_s:
                reason = "timeout"
            else:
                continue
            if oldest < best_oldest:
                best_key, best_reason, best_oldest, best_count = key, reason, oldest, count
        if best_key is None or best_reason is None:
            return None
        queue = self._queues[best_key]
        items = [queue.popleft().item for _ in range(min(self.max_batch_size, best_count))]
        if not queue:
            del self._queues[best_key]
        return Batch(best_key, items, best_reason, now - best_oldest)

    def _releasable(self, key: Hashable, queue: deque[_Entry[T]]) -> tuple[int, bool]:
        """How many of ``key``'s items may leave in one run, and whether another key's items cut it.

        Only the key holding its group's oldest item may leave, and only its items put before the
        first item of another key of the group (counted up to ``max_batch_size``).
        """
        if self._group is None:
            return len(queue), False
        group = self._group(key)
        others = [q[0].seq for k, q in self._queues.items() if k != key and q and self._group(k) == group]
        if not others:
            return len(queue), False
        cut_at = min(others)
        count = 0
        for entry in queue:
            if entry.seq > cut_at or count == self.max_batch_size:
                break
            count += 1
        return count, True

    def _has_other_key_of_group(self, key: Hashable) -> bool:
        if self._group is None:
            return False
        group = self._group(key)
        return any(k != key and q and self._group(k) == group for k, q in self._queues.items())

    def _next_timer(self, now: float) -> float | None:
        oldest = min((q[0].put_at for q in self._queues.values() if q), default=None)
        if oldest is None:
            return None
        return max(0.0, oldest + self.max_wait_s - now)
