"""Sequencer: per-partition release strictly in registration order."""

from __future__ import annotations

import random
import threading

from worker.sequencer import Sequencer


def test_releases_in_order_even_when_completed_out_of_order() -> None:
    s: Sequencer[str] = Sequencer()
    out: list[str] = []
    for o in range(4):
        s.register("p", o)
    assert s.complete("p", 2, "c", out.append) == 0
    assert s.complete("p", 0, "a", out.append) == 1
    assert s.complete("p", 1, "b", out.append) == 2
    assert s.complete("p", 3, "d", out.append) == 1
    assert out == ["a", "b", "c", "d"]
    assert s.pending() == 0


def test_partitions_are_independent_and_forget_drops() -> None:
    s: Sequencer[int] = Sequencer()
    out: list[int] = []
    s.register("p0", 0)
    s.register("p1", 0)
    s.complete("p1", 0, 10, out.append)
    assert out == [10]
    s.forget("p0")
    assert s.complete("p0", 0, 1, out.append) == 0
    assert out == [10]


def test_concurrent_completion_keeps_order() -> None:
    s: Sequencer[int] = Sequencer()
    out: list[int] = []
    n = 400
    for o in range(n):
        s.register("p", o)
    offsets = list(range(n))
    random.Random(7).shuffle(offsets)
    chunks = [offsets[i::4] for i in range(4)]
    threads = [threading.Thread(target=lambda c=c: [s.complete("p", o, o, out.append) for o in c]) for c in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == list(range(n))


def test_drop_from_removes_the_slots_a_seek_back_polls_again() -> None:
    s: Sequencer[str] = Sequencer()
    out: list[str] = []
    for o in range(4):
        s.register("p", o)
    s.complete("p", 3, "old-3", out.append)  # waiting behind 0
    s.drop_from("p", 2)
    assert s.pending() == 2
    s.register("p", 2)
    s.register("p", 3)
    assert s.complete("p", 3, "new-3", out.append) == 0
    assert s.complete("p", 0, "a", out.append) == 1
    assert s.complete("p", 1, "b", out.append) == 1
    assert s.complete("p", 2, "new-2", out.append) == 2
    assert out == ["a", "b", "new-2", "new-3"] and s.pending() == 0
