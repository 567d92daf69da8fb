"""Results and alerts: JSON round trip, wire fixture, idempotency key, score mapping, headers."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from schemas import (
    ALERT_EVENT_TYPE,
    RESULT_EVENT_TYPE,
    InspectionAlert,
    InspectionResult,
    build_result_headers,
    decide_verdict,
    make_result_id,
    normalize_score,
)
from schemas.result import RESULT_ID_NAMESPACE

FIXTURES = Path(__file__).parent / "fixtures"
MakeResult = Callable[..., InspectionResult]


def test_result_json_round_trips(make_result: MakeResult) -> None:
    result = make_result()
    assert InspectionResult.model_validate_json(result.model_dump_json()) == result


def test_v1_wire_fixture_parses_and_reserializes_identically() -> None:
    """Catches wire drift: a field renamed, retyped or re-defaulted breaks this file."""
    text = (FIXTURES / "inspection-result.v1.json").read_text()
    result = InspectionResult.model_validate_json(text)
    assert result.model_dump(mode="json") == json.loads(text)
    assert result.captured_at.tzinfo is not None


def test_timestamps_serialize_as_utc_z(make_result: MakeResult) -> None:
    document = json.loads(make_result().model_dump_json())
    assert document["captured_at"] == "2026-11-26T12:00:00.250000Z"
    assert document["produced_at"].endswith("Z")


def test_result_id_is_deterministic_and_distinct() -> None:
    first = make_result_id("inspection.requests", 3, 1042, "2026.11.1")
    assert first == make_result_id("inspection.requests", 3, 1042, "2026.11.1")
    others = {
        make_result_id("inspection.requests", 3, 1043, "2026.11.1"),
        make_result_id("inspection.requests", 4, 1042, "2026.11.1"),
        make_result_id("inspection.requests-b", 3, 1042, "2026.11.1"),
        make_result_id("inspection.requests", 3, 1042, "2026.11.2"),
        make_result_id("inspection.requests", 31, 42, "2026.11.1"),
    }
    assert first not in others
    assert len(others) == 5
    assert uuid.UUID(first).version == 5


def test_result_id_namespace_is_the_documented_one() -> None:
    assert uuid.uuid5(uuid.NAMESPACE_URL, "urn:space-worker:inspection-result") == RESULT_ID_NAMESPACE


@pytest.mark.parametrize(
    ("score", "threshold", "normalized", "verdict"),
    [
        (0.0, 0.5, 0.0, "ok"),
        (0.25, 0.5, 0.25, "ok"),
        (0.5, 0.5, 0.5, "anomalous"),
        (0.75, 0.5, 0.75, "anomalous"),
        (1.0, 0.5, 1.0, "anomalous"),
        (7.0, 0.5, 1.0, "anomalous"),
        (-1.0, 0.5, 0.0, "ok"),
        (0.1, 0.0, 1.0, "anomalous"),
        (-0.2, -0.1, 0.0, "ok"),
    ],
)
def test_score_mapping(score: float, threshold: float, normalized: float, verdict: str) -> None:
    assert normalize_score(score, threshold) == pytest.approx(normalized)
    assert decide_verdict(score, threshold) == verdict


@settings(max_examples=200, deadline=None)
@given(
    score=st.floats(min_value=-1e6, max_value=1e6),
    threshold=st.floats(min_value=1e-6, max_value=1e6),
)
def test_normalized_score_is_in_range_and_monotone_around_the_threshold(
    score: float, threshold: float
) -> None:
    normalized = normalize_score(score, threshold)
    assert 0.0 <= normalized <= 1.0
    if decide_verdict(score, threshold) == "ok":
        assert normalized <= 0.5
    else:
        assert normalized >= 0.5


def test_verdict_must_agree_with_score_and_threshold(make_result: MakeResult) -> None:
    with pytest.raises(ValidationError, match="verdict 'ok' contradicts"):
        make_result(score=0.9, threshold=0.5, verdict="ok")


def test_normalized_score_must_follow_the_mapping(make_result: MakeResult) -> None:
    with pytest.raises(ValidationError, match="normalized_score should be"):
        make_result(score=0.9, threshold=2.0, normalized_score=0.9)


def test_heatmap_and_heatmap_error_are_exclusive(make_result: MakeResult) -> None:
    with pytest.raises(ValidationError, match="mutually exclusive"):
        make_result(heatmap_error="store unavailable")
    assert make_result(heatmap=None, heatmap_error="store unavailable").heatmap_error == "store unavailable"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("score", math.nan),
        ("score", math.inf),
        ("batch_size", 0),
        ("result_id", "not-a-uuid"),
        ("product_line", "bad line"),
        ("captured_at", "2026-11-26T12:00:00"),
        ("worker_id", ""),
        ("schema_version", 2),
    ],
)
def test_invalid_fields_are_rejected_by_name(make_result: MakeResult, field: str, value: object) -> None:
    document = json.loads(make_result().model_dump_json())
    document[field] = value
    with pytest.raises(ValidationError) as info:
        InspectionResult.model_validate(document)
    assert info.value.errors()[0]["loc"][0] == field


def test_unknown_fields_are_rejected(make_result: MakeResult) -> None:
    document = {**json.loads(make_result().model_dump_json()), "extra": 1}
    with pytest.raises(ValidationError, match="extra"):
        InspectionResult.model_validate(document)


def test_results_are_immutable(make_result: MakeResult) -> None:
    with pytest.raises(ValidationError):
        make_result().score = 0.1  # type: ignore[misc]


def test_alert_is_the_same_json_as_the_result(make_result: MakeResult) -> None:
    result = make_result()
    alert = InspectionAlert.from_result(result)
    assert alert.model_dump_json() == result.model_dump_json()
    assert InspectionAlert.event_type == ALERT_EVENT_TYPE
    assert InspectionResult.event_type == RESULT_EVENT_TYPE


def test_ok_results_are_never_alerts(make_result: MakeResult) -> None:
    ok = make_result(score=0.1)
    with pytest.raises(ValidationError, match="verdict"):
        InspectionAlert.from_result(ok)
    with pytest.raises(ValueError, match="only anomalous"):
        build_result_headers(ok, ALERT_EVENT_TYPE)


def test_result_headers(make_result: MakeResult) -> None:
    result = make_result()
    headers = dict(build_result_headers(result))
    assert headers == {
        "ce_specversion": b"1.0",
        "ce_id": result.result_id.encode(),
        "ce_source": b"space-worker-7f9c4",
        "ce_type": RESULT_EVENT_TYPE.encode(),
        "ce_subject": b"msg-0001",
        "ce_time": b"2026-11-26T12:00:00.291000Z",
        "ce_productline": b"bottle",
        "ce_cameraid": b"cam-3",
        "ce_partid": b"SN-4711",
        "content-type": b"application/json",
    }
    assert dict(build_result_headers(result, ALERT_EVENT_TYPE))["ce_type"] == ALERT_EVENT_TYPE.encode()
    assert "ce_partid" not in dict(build_result_headers(make_result(part_id=None)))


def test_unknown_result_event_type_is_refused(make_result: MakeResult) -> None:
    with pytest.raises(ValueError, match="unknown result event type"):
        build_result_headers(make_result(), "space.inspection.request.v1")  # type: ignore[arg-type]


def test_sdk_reads_a_result_record(make_result: MakeResult) -> None:
    kafka = pytest.importorskip("cloudevents.core.bindings.kafka")
    json_format = pytest.importorskip("cloudevents.core.formats.json").JSONFormat()
    result = make_result()
    message = kafka.KafkaMessage(
        headers=dict(build_result_headers(result)), key=b"cam-3", value=result.model_dump_json().encode()
    )
    event = kafka.from_binary(message, json_format)
    assert event.get_id() == result.result_id
    assert event.get_subject() == result.message_id
    assert event.get_time() == result.produced_at
    assert InspectionResult.model_validate(event.get_data()) == result
