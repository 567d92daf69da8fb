"""The embedded stack really is a Kafka-protocol broker and a Redis, reached over sockets."""

from __future__ import annotations

import time
import uuid

import pytest
from kafka import TopicPartition
from kafka.structs import OffsetAndMetadata

from tests.conftest import StackInfo, Topics
from tests.kafka_helpers import collect, produce
from worker.kafka_clients import make_consumer
from worker.settings import Settings

pytestmark = [pytest.mark.kafka, pytest.mark.redis]


def _drain(consumer, want: int, timeout_s: float = 30.0) -> list:
    got: list = []
    deadline = time.monotonic() + timeout_s
    while len(got) < want and time.monotonic() < deadline:
        for recs in consumer.poll(timeout_ms=200).values():
            got.extend(recs)
    return got


def test_produce_with_headers_and_read_back(make_settings, topics: Topics) -> None:
    settings: Settings = make_settings(topics)
    records = [(f"cam-{i % 3}".encode(), f"v{i}".encode(), [("ce_id", f"id-{i}".encode())]) for i in range(12)]
    produce(settings, topics.requests, records)
    got = collect(settings, topics.requests, expected=12, timeout_s=20)
    assert sorted(r.value for r in got) == sorted(v for _, v, _ in records)
    by_value = {r.value: r for r in got}
    assert by_value[b"v5"].headers == [("ce_id", b"id-5")]
    assert by_value[b"v5"].key == b"cam-2"


def test_group_manual_commit_then_restart_resumes_from_committed_offset(make_settings, topics: Topics) -> None:
    settings: Settings = make_settings(topics)
    produce(settings, topics.requests, [(b"cam", f"m{i}".encode(), []) for i in range(10)])

    first = make_consumer(settings.kafka)
    first.subscribe([topics.requests])
    got = _drain(first, 10)
    assert len(got) == 10
    # Commit only the first 4 records of each partition that has any.
    offsets = {}
    for rec in got:
        tp = TopicPartition(rec.topic, rec.partition)
        offsets.setdefault(tp, []).append(rec.offset)
    committed = {tp: OffsetAndMetadata(min(offs) + min(4, len(offs)), "", -1) for tp, offs in offsets.items()}
    first.commit(committed)
    first.close()

    second = make_consumer(settings.kafka)
    second.subscribe([topics.requests])
    rest = _drain(second, 6)
    second.close()
    expected_rest = {
        (r.partition, r.offset) for r in got if r.offset >= committed[TopicPartition(r.topic, r.partition)].offset
    }
    assert {(r.partition, r.offset) for r in rest} == expected_rest
    assert len(rest) == 6


def test_redis_hash_and_pubsub(stack: StackInfo, redis_client, key_prefix: str) -> None:
    key = f"{key_prefix}:threshold:line-a"
    redis_client.hset(key, mapping={"value": "0.42", "version": "3"})
    assert redis_client.hgetall(key) == {"value": "0.42", "version": "3"}

    pubsub = redis_client.pubsub()
    channel = f"{key_prefix}:thresholds"
    pubsub.subscribe(channel)
    assert pubsub.get_message(timeout=2)["type"] == "subscribe"
    payload = uuid.uuid4().hex
    assert redis_client.publish(channel, payload) == 1
    message = pubsub.get_message(timeout=2)
    assert message is not None and message["data"] == payload
    pubsub.close()
