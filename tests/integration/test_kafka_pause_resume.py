"""Backpressure by pause()/resume() must never starve a partition (kafka-python 3.0.x bug fix)."""

from __future__ import annotations

import time

import pytest
from kafka import KafkaConsumer, TopicPartition

from worker import kafka_patches

pytestmark = pytest.mark.kafka


def _pause_resume_cycle(settings, topic: str, n: int) -> dict[int, list[int]]:
    """Pause partition 0 while its fetched records are buffered and partition 1 keeps flowing."""
    consumer = KafkaConsumer(
        **settings.kafka.client_kwargs(), group_id=None, auto_offset_reset="earliest", enable_auto_commit=False,
        max_poll_records=5,
    )  # fmt: skip
    p0, p1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
    consumer.assign([p0, p1])
    seen: dict[int, list[int]] = {0: [], 1: []}

    def poll(timeout_ms: int = 100) -> None:
        for tp, recs in consumer.poll(timeout_ms=timeout_ms, max_records=5).items():
            seen[tp.partition].extend(r.offset for r in recs)

    deadline = time.monotonic() + 8
    try:
        while not seen[0] and time.monotonic() < deadline:
            poll()
        consumer.pause(p0)
        for _ in range(12):  # partition 1 drains meanwhile, leaving a drained slot behind
            poll()
        consumer.resume(p0)
        while len(seen[0]) + len(seen[1]) < 2 * n and time.monotonic() < deadline:
            poll(200)
    finally:
        consumer.close()
    return seen


def _fill(settings, topic: str, n: int) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(**settings.kafka.client_kwargs())
    for i in range(n):
        for partition in (0, 1):
            producer.send(topic, value=f"{i}".encode(), partition=partition)
    producer.flush(10)
    producer.close()


@pytest.mark.parametrize("topics", [2], indirect=True)
def test_resume_delivers_every_buffered_record_in_order(make_settings, topics) -> None:
    settings = make_settings(topics)
    n = 40
    _fill(settings, topics.requests, n)
    assert kafka_patches.is_applied()
    seen = _pause_resume_cycle(settings, topics.requests, n)
    assert seen == {0: list(range(n)), 1: list(range(n))}


@pytest.mark.parametrize("topics", [2], indirect=True)
def test_without_the_fix_the_paused_partition_starves(make_settings, topics) -> None:
    settings = make_settings(topics)
    n = 40
    _fill(settings, topics.requests, n)
    kafka_patches.revert()
    try:
        seen = _pause_resume_cycle(settings, topics.requests, n)
    finally:
        kafka_patches.apply()
    # When this fails, kafka-python has fixed the bug: drop worker/kafka_patches.py and this test.
    assert seen[1] == list(range(n))
    assert len(seen[0]) < n
