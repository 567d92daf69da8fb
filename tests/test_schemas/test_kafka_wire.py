"""The contracts on a real Kafka-protocol broker: headers survive the trip, dead letters are producible."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from schemas import (
    DeadLetterInfo,
    DeadLetterReason,
    InspectionRequest,
    build_dead_letter,
    build_request_headers,
    parse_dead_letter_headers,
    parse_request,
)
from tests.conftest import Topics
from tests.kafka_helpers import collect, produce
from tests.test_schemas.samples import PNG_BYTES
from worker.settings import Settings

pytestmark = pytest.mark.kafka


def test_request_and_dead_letter_round_trip_through_the_broker(
    make_settings: Callable[..., Settings], topics: Topics, make_request: Callable[..., InspectionRequest]
) -> None:
    settings = make_settings(topics)
    request = make_request()
    shouted = [(name.upper(), value) for name, value in build_request_headers(request)]
    sent_headers = [*shouted, ("traceparent", b"00-abc-01")]
    produce(settings, topics.requests, [(b"cam-3", PNG_BYTES, sent_headers)])

    (record,) = collect(settings, topics.requests, expected=1, timeout_s=30)
    assert parse_request(record.headers, record.value) == request

    info = DeadLetterInfo(
        error_class="DecodeError",
        reason=DeadLetterReason.CORRUPT_IMAGE,
        detail="png: truncated",
        worker_id="w-1",
        time=datetime(2026, 11, 26, 12, 0, 1, tzinfo=UTC),
        source_topic=record.topic,
        source_partition=record.partition,
        source_offset=record.offset,
    )
    letter = build_dead_letter(record.headers, record.value, info, max_value_bytes=8)
    produce(settings, topics.dlq, [(record.key, letter.value, letter.headers)])

    (dead,) = collect(settings, topics.dlq, expected=1, timeout_s=30)
    assert dead.key == b"cam-3"
    assert dead.value == PNG_BYTES[:8]
    assert dead.headers[: len(sent_headers)] == sent_headers
    assert parse_dead_letter_headers(dead.headers) == info.model_copy(
        update={"value_truncated_from": len(PNG_BYTES)}
    )
