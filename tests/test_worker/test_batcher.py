"""Dynamic batcher: full-or-timeout release, fairness, bounds, drain, with a fake clock."""

from __future__ import annotations

import threading
import time

import pytest

from worker.batcher import DynamicBatcher, QueueFull


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(clock: FakeClock, size: int = 4, wait_ms: float = 10, bound: int = 8) -> DynamicBatcher[int]:
    return DynamicBatcher(max_batch_size=size, max_wait_ms=wait_ms, max_queue_items=bound, clock=clock)


def test_full_batch_leaves_immediately() -> None:
    clock = FakeClock()
    b = make(clock)
    for i in range(4):
        b.put("a", i)
    batch = b.ready()
    assert batch is not None and batch.items == [0, 1, 2, 3] and batch.reason == "full"
    assert b.ready() is None


def test_partial_batch_waits_for_the_oldest_item() -> None:
    clock = FakeClock()
    b = make(clock)
    b.put("a", 1)
    clock.now += 0.005
    b.put("a", 2)
    assert b.ready() is None
    clock.now += 0.0049
    assert b.ready() is None  # oldest waited 9.9 ms
    clock.now += 0.0001
    batch = b.ready()
    assert batch is not None and batch.items == [1, 2] and batch.reason == "timeout"
    assert batch.oldest_wait_s == pytest.approx(0.010)


def test_batches_never_mix_keys_and_oldest_ready_goes_first() -> None:
    clock = FakeClock()
    b = make(clock, size=2)
    b.put("line-b", 10)
    clock.now += 0.001
    b.put("line-a", 1)
    b.put("line-a", 2)
    b.put("line-b", 11)
    first = b.ready()
    second = b.ready()
    assert first is not None and second is not None
    assert first.key == "line-b" and first.items == [10, 11]
    assert second.key == "line-a" and second.items == [1, 2]


def test_bounded_queue_refuses() -> None:
    clock = FakeClock()
    b = make(clock, size=100, bound=3)
    for i in range(3):
        b.put("a", i)
    with pytest.raises(QueueFull):
        b.put("a", 3)
    b.put("b", 0)  # other keys are independent


def test_max_wait_zero_sends_whatever_is_queued() -> None:
    clock = FakeClock()
    b = make(clock, wait_ms=0)
    b.put("a", 1)
    batch = b.ready()
    assert batch is not None and batch.items == [1]


def test_batch_caps_at_max_size_and_keeps_fifo() -> None:
    clock = FakeClock()
    b = make(clock, size=3)
    for i in range(7):
        b.put("a", i)
    assert [b.ready().items for _ in range(2)] == [[0, 1, 2], [3, 4, 5]]  # type: ignore[union-attr]
    clock.now += 1
    assert b.ready().items == [6]  # type: ignore[union-attr]


def test_drain_and_remove() -> None:
    clock = FakeClock()
    b = make(clock, size=2)
    for i in range(5):
        b.put("a", i)
    assert b.remove(lambda x: x % 2 == 1) == [1, 3]
    batches = b.drain()
    assert [x.items for x in batches] == [[0, 2], [4]]
    assert all(x.reason == "flush" for x in batches)
    assert b.pending() == 0


def test_get_blocks_until_the_timer_fires_with_the_real_clock() -> None:
    b: DynamicBatcher[int] = DynamicBatcher(max_batch_size=8, max_wait_ms=30, max_queue_items=16)
    b.put("a", 1)
    start = time.monotonic()
    batch = b.get(timeout_s=2)
    elapsed = time.monotonic() - start
    assert batch is not None and batch.items == [1]
    assert 0.02 <= elapsed < 1.0


def test_get_wakes_when_a_queue_fills() -> None:
    b: DynamicBatcher[int] = DynamicBatcher(max_batch_size=3, max_wait_ms=10_000, max_queue_items=16)
    result = {}

    def consumer() -> None:
        result["batch"] = b.get(timeout_s=5)

    t = threading.Thread(target=consumer)
    t.start()
    for i in range(3):
        b.put("a", i)
    t.join(2)
    assert result["batch"].items == [0, 1, 2]


def test_get_times_out_and_close_wakes() -> None:
    b: DynamicBatcher[int] = DynamicBatcher(max_batch_size=3, max_wait_ms=10, max_queue_items=16)
    assert b.get(timeout_s=0.05) is None
    threading.Timer(0.05, b.close).start()
    assert b.get(timeout_s=5) is None


def _by_line(clock: FakeClock, size: int = 4, wait_ms: float = 20, bound: int = 64) -> DynamicBatcher[int]:
    """Keys are (line, version), grouped by line, as the worker builds it."""
    return DynamicBatcher(
        max_batch_size=size, max_wait_ms=wait_ms, max_queue_items=bound, clock=clock, group=lambda key: key[0]
    )


def _release_all(b: DynamicBatcher[int], clock: FakeClock) -> list[tuple[object, list[int], str]]:
    out = []
    while b.pending():
        batch = b.ready()
        if batch is None:
            clock.now += 0.005
            continue
        out.append((batch.key, batch.items, batch.reason))
    return out


def test_an_older_version_leaves_before_a_full_batch_of_the_new_one() -> None:
    # Review finding 2: images 1-3 decoded with v1 just before a hot swap waited in a partial v1 batch
    # while 4-19 (v2) filled a batch and left first: the camera's results came out 4..19, 1..3.
    clock = FakeClock()
    b = _by_line(clock, size=16)
    for i in (1, 2, 3):
        b.put(("brick", "v1"), i)
    clock.now += 0.004
    for i in range(4, 20):
        b.put(("brick", "v2"), i)
    first = b.ready()
    assert first is not None and first.key == ("brick", "v1") and first.items == [1, 2, 3]
    assert first.reason == "flush"  # at once, not after max_wait_ms: the v1 run cannot grow any more
    second = b.ready()
    assert second is not None and second.key == ("brick", "v2") and second.items == list(range(4, 20))
    assert second.reason == "full"


def test_interleaved_versions_of_a_line_leave_in_put_order() -> None:
    # Parallel decode can give a later record the old model (it looked the model up before the swap).
    clock = FakeClock()
    b = _by_line(clock)
    puts = [("v1", 1), ("v1", 2), ("v2", 3), ("v2", 4), ("v1", 5), ("v2", 6), ("v2", 7), ("v2", 8), ("v2", 9)]
    for version, i in puts:
        b.put(("brick", version), i)
    released = _release_all(b, clock)
    assert [items for _, items, _ in released] == [[1, 2], [3, 4], [5], [6, 7, 8, 9]]
    assert [key[1] for key, _, _ in released] == ["v1", "v2", "v1", "v2"]  # type: ignore[index]
    assert [reason for _, _, reason in released] == ["flush", "flush", "flush", "full"]


def test_version_order_does_not_hold_back_other_lines_or_single_versions() -> None:
    clock = FakeClock()
    b = _by_line(clock, size=2)
    b.put(("bottle", "v1"), 100)
    b.put(("brick", "v2"), 1)
    b.put(("brick", "v2"), 2)
    full = b.ready()
    assert full is not None and full.key == ("brick", "v2") and full.reason == "full"
    assert b.ready() is None  # bottle's single queue still waits for its timer
    clock.now += 0.021
    timed = b.ready()
    assert timed is not None and timed.items == [100] and timed.reason == "timeout"


def test_drain_keeps_put_order_across_versions() -> None:
    clock = FakeClock()
    b = _by_line(clock, size=8)
    for version, i in [("v2", 1), ("v1", 2), ("v2", 3)]:
        b.put(("brick", version), i)
    assert [x.items for x in b.drain()] == [[1], [2], [3]]
    assert b.pending() == 0
