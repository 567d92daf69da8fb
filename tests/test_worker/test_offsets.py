"""Offset tracker: only the contiguous acknowledged prefix is ever committed."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from worker.offsets import OffsetTracker


def test_out_of_order_acks_commit_only_the_prefix() -> None:
    t = OffsetTracker()
    t.assign(["p0"])
    for o in range(5):
        assert t.track("p0", o)
    t.ack("p0", 2)
    t.ack("p0", 1)
    assert t.committable() == {}
    t.ack("p0", 0)
    assert t.committable() == {"p0": 3}
    t.mark_committed({"p0": 3})
    assert t.committable() == {}
    t.ack("p0", 4)
    assert t.committable() == {}
    t.ack("p0", 3)
    assert t.committable() == {"p0": 5}
    assert t.inflight() == 0


def test_gaps_in_offsets_are_fine() -> None:
    t = OffsetTracker()
    t.assign(["p"])
    for o in (10, 13, 20):
        t.track("p", o)
    t.ack("p", 13)
    t.ack("p", 10)
    assert t.committable() == {"p": 14}


def test_revoked_partitions_are_ignored_and_never_committed() -> None:
    t = OffsetTracker()
    t.assign(["a", "b"])
    t.track("a", 0)
    t.track("b", 0)
    t.revoke(["b"])
    assert not t.owns("b")
    assert not t.track("b", 1)
    t.ack("b", 0)
    t.ack("a", 0)
    assert t.committable() == {"a": 1}


def test_seek_back_restarts_tracking() -> None:
    t = OffsetTracker()
    t.assign(["p"])
    for o in range(4):
        t.track("p", o)
    t.ack("p", 0)
    t.track("p", 2)  # re-delivered from 2
    assert t.inflight() == 2  # offsets 1 and 2


@given(st.integers(min_value=1, max_value=60), st.randoms(use_true_random=False))
def test_committed_offset_never_passes_an_unacked_record(n: int, rnd: random.Random) -> None:
    t = OffsetTracker()
    t.assign(["p"])
    for o in range(n):
        t.track("p", o)
    order = list(range(n))
    rnd.shuffle(order)
    acked: set[int] = set()
    for o in order:
        t.ack("p", o)
        acked.add(o)
        commit = t.committable().get("p")
        if commit is not None:
            assert all(x in acked for x in range(commit))
            assert commit == n or commit not in acked
    assert t.committable() == {"p": n}


def test_after_a_seek_back_only_the_new_copys_ack_counts() -> None:
    # Offsets 2 and 3 are re-read while their first copies are still being scored (log truncation after an
    # unclean leader election: the records there may now be other messages). The late acks of the first
    # copies must not commit past the new copies.
    t = OffsetTracker()
    t.assign(["p"])
    first = {o: tracked.token for o in range(4) if (tracked := t.track("p", o)) is not None}
    assert all(isinstance(token, int) and token > 0 for token in first.values())
    assert len(set(first.values())) == 4
    second = {o: tracked.token for o in (2, 3) if (tracked := t.track("p", o)) is not None}
    assert t.ack("p", 0, first[0]) and t.ack("p", 1, first[1])
    assert not t.ack("p", 2, first[2]) and not t.ack("p", 3, first[3])
    assert t.committable() == {"p": 2}
    assert t.ack("p", 3, second[3]) and t.ack("p", 2, second[2])
    assert t.committable() == {"p": 4}
    assert t.inflight() == 0


def test_a_late_ack_from_before_a_reassignment_does_not_count() -> None:
    t = OffsetTracker()
    t.assign(["p"])
    before = t.track("p", 0)
    t.revoke(["p"])
    t.assign(["p"])
    after = t.track("p", 0)
    assert before is not None and after is not None
    assert not t.ack("p", 0, before.token)
    assert t.committable() == {}
    assert t.ack("p", 0, after.token)
    assert t.committable() == {"p": 1}
