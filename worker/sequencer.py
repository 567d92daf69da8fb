"""Per-partition reorder buffer: parallel decoding, in-order release.

Records of one partition (one camera's stream lands in one partition) are decoded by a thread pool
and may finish out of order. The sequencer releases them to the batcher strictly in poll order, so
results of a camera keep the order its images were published in. Pure Python, thread-safe.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")

_PENDING = object()


class Sequencer(Generic[T]):
    """Release completed items per partition in the order they were registered."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._slots: dict[Hashable, OrderedDict[int, object]] = {}

    def register(self, tp: Hashable, offset: int) -> None:
        """Reserve a slot in poll order (call from the consumer thread, before dispatch)."""
        with self._lock:
            self._slots.setdefault(tp, OrderedDict())[offset] = _PENDING

    def complete(self, tp: Hashable, offset: int, item: T, release: Callable[[T], None]) -> int:
        """Fill a slot and call ``release`` for every item now releasable, in order.

        ``release`` runs under the sequencer's lock, so two threads completing neighbouring slots
        can never hand their items on in the wrong order. Returns how many were released.
        """
        with self._lock:
            slots = self._slots.get(tp)
            if slots is None or offset not in slots:
                return 0
            slots[offset] = item
            released = 0
            while slots:
                first = next(iter(slots.values()))
                if first is _PENDING:
                    break
                slots.popitem(last=False)
                release(first)  # type: ignore[arg-type]
                released += 1
            return released

    def drop_from(self, tp: Hashable, offset: int) -> None:
        """Drop a partition's slots at ``offset`` and above (its position moved back: they are polled again)."""
        with self._lock:
            slots = self._slots.get(tp)
            if slots is not None:
                for stale in [o for o in slots if o >= offset]:
                    del slots[stale]

    def forget(self, tp: Hashable) -> None:
        """Drop a revoked partition's slots."""
        with self._lock:
            self._slots.pop(tp, None)

    def pending(self) -> int:
        """Slots not yet released."""
        with self._lock:
            return sum(len(s) for s in self._slots.values())
