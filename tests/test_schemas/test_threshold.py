"""Threshold records: Redis hash round trip, wire fixture, validation."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from schemas import ThresholdRecord

FIXTURE = Path(__file__).parent / "fixtures" / "threshold-record.v1.json"


def make_record(**overrides: Any) -> ThresholdRecord:
    fields: dict[str, Any] = {
        "product_line": "bottle",
        "value": 0.4375,
        "version": 7,
        "model_version": "2026.11.1",
        "method": "f1",
        "updated_at": datetime(2026, 11, 20, 9, 30, tzinfo=UTC),
        "updated_by": "qe.jane@plant-7",
        "note": "recalibrated after lens swap",
    }
    fields.update(overrides)
    return ThresholdRecord(**fields)


def test_v1_hash_fixture_round_trips() -> None:
    stored = json.loads(FIXTURE.read_text())
    record = ThresholdRecord.from_redis_hash(stored)
    assert record == make_record()
    assert record.to_redis_hash() == stored


def test_bytes_hash_as_redis_returns_it() -> None:
    record = make_record(model_version=None, note="")
    raw = {k.encode(): v.encode() for k, v in record.to_redis_hash().items()}
    assert ThresholdRecord.from_redis_hash(raw) == record


def test_every_field_is_always_written() -> None:
    """HSET of a full hash never leaves a stale model_version or note behind."""
    record = make_record(model_version=None, note="")
    assert set(record.to_redis_hash()) == set(ThresholdRecord.model_fields)
    assert record.to_redis_hash()["model_version"] == ""


def test_unknown_hash_fields_are_ignored() -> None:
    stored = {**make_record().to_redis_hash(), "written_by_v2": "x"}
    assert ThresholdRecord.from_redis_hash(stored) == make_record()


@settings(max_examples=200, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_any_finite_value_reads_back_exactly(value: float) -> None:
    assert ThresholdRecord.from_redis_hash(make_record(value=value).to_redis_hash()).value == value


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("value", "nan"),
        ("value", "inf"),
        ("version", "0"),
        ("method", "guess"),
        ("product_line", "bottle/../x"),
        ("updated_at", "2026-11-20T09:30:00"),
        ("note", "n" * 1001),
        ("schema_version", "2"),
    ],
)
def test_invalid_hash_fields_are_named(field: str, value: str) -> None:
    stored = {**make_record().to_redis_hash(), field: value}
    with pytest.raises(ValidationError) as info:
        ThresholdRecord.from_redis_hash(stored)
    assert info.value.errors()[0]["loc"][0] == field


def test_missing_field_is_named() -> None:
    stored = make_record().to_redis_hash()
    del stored["updated_by"]
    with pytest.raises(ValidationError, match="updated_by"):
        ThresholdRecord.from_redis_hash(stored)


def test_value_must_be_finite_in_python_too() -> None:
    with pytest.raises(ValidationError):
        make_record(value=math.inf)
