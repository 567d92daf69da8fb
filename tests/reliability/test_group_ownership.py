"""A member fenced out of the group rejoins without claiming the partitions it lost.

kafka-python (3.0.12) advertises, in a member's JoinGroup, the partitions of the last assignment it
*received*, also after it lost them (fenced: session expired, ``IllegalGeneration``). When the leader
then moves one of those partitions to another member, the cooperative protocol withholds it for one
round; the fenced member has nothing to revoke, nobody asks for the second round, and the partition
is consumed by no one until an unrelated rebalance. :class:`worker.kafka_clients.CooperativeStickyAssignor`
advertises what the consumer owns now. This test fences a member the way kafka-python itself does on
``IllegalGeneration`` (reset the generation, keep the member id) while a new member joins, on the real
broker; the control test runs it with kafka-python's own assignor and sees partitions stranded.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from kafka import ConsumerRebalanceListener, KafkaConsumer
from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor as KafkaPythonCooperativeSticky
from kafka.errors import UnknownMemberIdError
from kafka.structs import MemberState

from worker import kafka_patches
from worker.kafka_clients import make_consumer
from worker.settings import Settings

pytestmark = [pytest.mark.kafka]


class _Member(ConsumerRebalanceListener):
    """A group consumer polled on its own thread, which a test can hold (stop polling) and release."""

    def __init__(self, consumer: KafkaConsumer, topic: str) -> None:
        self.consumer = consumer
        self.owned: set[int] = set()
        self.lost: list[set[int]] = []
        self._polling = threading.Event()
        self._polling.set()
        self._idle = threading.Event()
        self._stop = threading.Event()
        self.errors: list[BaseException] = []
        consumer.subscribe([topic], listener=self)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def on_partitions_assigned(self, assigned: Any) -> None:
        self.owned |= {tp.partition for tp in assigned}

    def on_partitions_revoked(self, revoked: Any) -> None:
        self.owned -= {tp.partition for tp in revoked}

    def on_partitions_lost(self, lost: Any) -> None:
        self.lost.append({tp.partition for tp in lost})
        self.owned -= {tp.partition for tp in lost}

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self._polling.is_set():
                    self._idle.set()
                    self._polling.wait(0.1)
                    continue
                self._idle.clear()
                self.consumer.poll(timeout_ms=100)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(exc)

    def hold(self) -> None:
        self._polling.clear()
        assert self._idle.wait(10), "the member did not stop polling"

    def release(self) -> None:
        self._polling.set()

    def fence(self) -> None:
        """What kafka-python does on ``IllegalGeneration``: forget the generation, keep the member id."""
        coordinator = self.consumer._coordinator
        coordinator.reset_generation(member_id=coordinator._generation.member_id)

    def close(self) -> None:
        self._stop.set()
        self._polling.set()
        self.thread.join(30)
        self.consumer.close()


def _settle(members: dict[str, _Member], partitions: int, timeout_s: float) -> dict[str, set[int]]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        owned = {name: set(m.owned) for name, m in members.items()}
        each_once = sum(map(len, owned.values())) == partitions
        if each_once and set().union(*owned.values()) == set(range(partitions)) and all(owned.values()):
            return owned
        time.sleep(0.05)
    for m in members.values():
        assert not m.errors, m.errors
    raise AssertionError(f"partitions not settled after {timeout_s:.0f} s: {owned}")


def _consumer(settings: Settings, name: str, **overrides: Any) -> KafkaConsumer:
    return make_consumer(settings.kafka, client_id=f"ownership-{name}", max_poll_interval_ms=10_000, **overrides)


def run_fenced_rejoin(
    settings: Settings, topic: str, settle_s: float = 25, **overrides: Any
) -> tuple[list[set[int]], dict[str, set[int]]]:
    """B owns all four partitions; B is fenced and held while C joins; B rejoins in C's round."""
    members: dict[str, _Member] = {}
    try:
        members["B"] = _Member(_consumer(settings, "B", **overrides), topic)
        _settle(members, 4, 30)
        members["B"].hold()
        members["B"].fence()
        members["C"] = _Member(_consumer(settings, "C", **overrides), topic)
        deadline = time.monotonic() + 10  # C's JoinGroup starts the round; the coordinator waits for B
        while members["C"].consumer._coordinator.state != MemberState.REBALANCING:
            assert time.monotonic() < deadline, "C never sent its JoinGroup"
            time.sleep(0.01)
        time.sleep(0.2)  # the request is on the wire
        members["B"].release()
        owned = _settle(members, 4, settle_s)
        return members["B"].lost, owned
    finally:
        for m in members.values():
            m.close()


def test_a_fenced_member_rejoining_while_another_joins_leaves_no_partition_unowned(make_settings, topics) -> None:
    lost, owned = run_fenced_rejoin(make_settings(topics), topics.requests)
    assert lost == [{0, 1, 2, 3}], f"B was not fenced as intended: lost={lost}"
    assert sorted(map(len, owned.values())) == [2, 2], owned


def test_with_kafka_pythons_assignor_the_fenced_member_strands_partitions(make_settings, topics) -> None:
    # When this fails, kafka-python advertises current ownership itself: drop the metadata() override
    # of worker.kafka_clients.CooperativeStickyAssignor and this test.
    with pytest.raises(AssertionError, match="partitions not settled"):
        run_fenced_rejoin(make_settings(topics), topics.requests, settle_s=12,
                          partition_assignment_strategy=[KafkaPythonCooperativeSticky()])  # fmt: skip


def _refuse_next_join(consumer: KafkaConsumer) -> list[str]:
    """The next JoinGroup round is refused with UNKNOWN_MEMBER_ID, with kafka-python's own handling of
    that answer (``reset_generation()``, then raise; ``BaseCoordinator._handle_join_group_response``).
    Tansu admits any member id, so the refusal real Kafka gives a member it expired is injected here."""
    coordinator = consumer._coordinator
    original = coordinator._do_join_and_sync_async
    refused: list[str] = []

    async def refuse_once() -> Any:
        if not refused:
            member_id = coordinator._generation.member_id
            coordinator.reset_generation()
            refused.append(member_id)  # after the reset: the test's wait sees the member unjoined
            raise UnknownMemberIdError(member_id)
        return await original()

    coordinator._do_join_and_sync_async = refuse_once
    coordinator.request_rejoin()
    return refused


def run_refused_join(settings: Settings, topic: str) -> tuple[list[set[int]], set[int]]:
    """A owns all four partitions; its next join is refused; returns what A lost and what it owns after."""
    a = _Member(_consumer(settings, "A"), topic)
    try:
        _settle({"A": a}, 4, 30)
        a.hold()
        refused = _refuse_next_join(a.consumer)
        a.release()
        deadline = time.monotonic() + 20
        while not (refused and a.consumer._coordinator.state == MemberState.STABLE and a.owned == {0, 1, 2, 3}):
            assert time.monotonic() < deadline, f"A did not rejoin: refused={refused} owned={a.owned} lost={a.lost}"
            time.sleep(0.05)
        time.sleep(0.5)
        assert not a.errors, a.errors
        return a.lost, set(a.owned)
    finally:
        a.close()


def test_a_member_whose_join_is_refused_reports_its_partitions_lost_before_rejoining(make_settings, topics) -> None:
    # Refused (UNKNOWN_MEMBER_ID: real Kafka expired it), A's generation is gone and with it its claim:
    # another member may own those partitions now. It must hear on_partitions_lost (the worker forgets
    # them without committing) and rejoin owning nothing, then be assigned afresh.
    assert kafka_patches.is_applied()
    lost, owned = run_refused_join(make_settings(topics), topics.requests)
    assert lost == [{0, 1, 2, 3}]
    assert owned == {0, 1, 2, 3}


def test_without_the_fix_a_refused_member_keeps_its_partitions_silently(make_settings, topics) -> None:
    kafka_patches.revert()
    try:
        lost, owned = run_refused_join(make_settings(topics), topics.requests)
    finally:
        kafka_patches.apply()
    # When this fails, kafka-python has fixed the bug (KAFKA-12983's equivalent): drop the
    # reset_generation fix from worker/kafka_patches.py and this test.
    assert lost == []
    assert owned == {0, 1, 2, 3}
