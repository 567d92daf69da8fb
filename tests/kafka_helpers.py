"""Small Kafka helpers for tests: produce records and collect a topic's records with a deadline."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from kafka import KafkaConsumer, KafkaProducer
from kafka.consumer.fetcher import ConsumerRecord

from worker.settings import Settings


def produce(
    settings: Settings, topic: str, records: Iterable[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]]
) -> int:
    """Send (key, value, headers) records and wait until all are acknowledged."""
    producer = KafkaProducer(
        **settings.kafka.client_kwargs(), acks="all", max_request_size=settings.kafka.max_request_size
    )
    try:
        futures = [producer.send(topic, key=k, value=v, headers=h) for k, v, h in records]
        producer.flush(30)
        for fut in futures:
            fut.get(timeout=30)
        return len(futures)
    finally:
        producer.close(timeout=5)


def collect(
    settings: Settings,
    topic: str,
    *,
    expected: int | None = None,
    timeout_s: float = 60.0,
    until: Callable[[list[ConsumerRecord]], bool] | None = None,
    idle_s: float | None = None,
) -> list[ConsumerRecord]:
    """Read ``topic`` from the beginning (no group) until ``expected`` records, ``until`` or timeout.

    With ``idle_s`` the read also stops after that long without new records (to prove nothing more
    arrives).
    """
    consumer = KafkaConsumer(
        **settings.kafka.client_kwargs(),
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        client_id=f"collector-{uuid.uuid4().hex[:6]}",
    )
    try:
        partitions = None
        deadline = time.monotonic() + timeout_s
        while partitions is None and time.monotonic() < deadline:
            partitions = consumer.partitions_for_topic(topic)
            if not partitions:
                partitions = None
                time.sleep(0.1)
        if partitions is None:
            return []
        from kafka import TopicPartition

        consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
        consumer.seek_to_beginning()
        out: list[ConsumerRecord] = []
        last_new = time.monotonic()
        while time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=200)
            for recs in batch.values():
                out.extend(recs)
                last_new = time.monotonic()
            if expected is not None and len(out) >= expected and idle_s is None:
                break
            if until is not None and until(out):
                break
            if (
                idle_s is not None
                and time.monotonic() - last_new > idle_s
                and (expected is None or len(out) >= expected)
            ):
                break
        return out
    finally:
        consumer.close()


def header(record: Any, name: str) -> str | None:
    """A header's value decoded as UTF-8 (first occurrence), or None."""
    for key, value in record.headers or []:
        if key.lower() == name.lower():
            return value.decode() if value is not None else None
    return None
