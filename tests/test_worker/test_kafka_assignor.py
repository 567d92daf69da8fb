"""The assignor advertises the partitions its consumer owns now, not the last assignment it received."""

from __future__ import annotations

from kafka.protocol.consumer.metadata import ConsumerProtocolAssignment
from kafka.structs import TopicPartition

from worker.kafka_clients import CooperativeStickyAssignor


def owned(metadata) -> set[TopicPartition]:
    return {TopicPartition(t.topic, p) for t in metadata.owned_partitions for p in t.partitions}


def assignment(*partitions: int) -> ConsumerProtocolAssignment:
    return ConsumerProtocolAssignment(1, [("req", list(partitions))], b"")


def test_owned_partitions_follow_the_consumer_not_the_last_assignment() -> None:
    current: set[TopicPartition] = set()
    assignor = CooperativeStickyAssignor()
    assignor.track(lambda: current)
    assignor.on_assignment(assignment(2, 3), generation=5)
    current |= {TopicPartition("req", 2), TopicPartition("req", 3)}
    assert owned(assignor.metadata(["req"])) == current
    current.clear()  # partitions lost: kafka-python empties the subscription, not the assignor
    assert owned(assignor.metadata(["req"])) == set()
    assert assignor.metadata(["req"]).topics == ["req"]
    assert assignor.name == "cooperative-sticky"  # one group with members that lack the fix


def test_an_untracked_assignor_keeps_kafka_pythons_behaviour() -> None:
    assignor = CooperativeStickyAssignor()
    assert owned(assignor.metadata(["req"])) == set()
    assignor.on_assignment(assignment(1), generation=2)
    assert owned(assignor.metadata(["req"])) == {TopicPartition("req", 1)}


def test_a_consumer_without_an_assignment_yet_advertises_nothing() -> None:
    assignor = CooperativeStickyAssignor()
    assignor.track(lambda: None)  # KafkaConsumer.assignment() before the first join
    assert owned(assignor.metadata(["req"])) == set()
