"""Factories for the schema tests: valid contracts with overridable fields."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from schemas import (
    ClaimCheck,
    HeatmapRef,
    InspectionRequest,
    InspectionResult,
    ModelRef,
    SourceRecord,
    ThresholdInfo,
    Timings,
    decide_verdict,
    make_result_id,
    normalize_score,
)
from tests.test_schemas.samples import CAPTURED_AT, SHA


@pytest.fixture
def make_request() -> Callable[..., InspectionRequest]:
    """Build a valid image request; keyword arguments override fields."""

    def factory(**overrides: Any) -> InspectionRequest:
        fields: dict[str, Any] = {
            "message_id": "msg-0001",
            "source": "urn:plant-7:line-2:cam-3",
            "time": CAPTURED_AT,
            "product_line": "bottle",
            "camera_id": "cam-3",
            "part_id": "SN-4711",
            "deadline": datetime(2026, 11, 26, 12, 0, 5, tzinfo=UTC),
            "content_type": "image/png",
        }
        fields.update(overrides)
        return InspectionRequest(**fields)

    return factory


@pytest.fixture
def claim_check() -> ClaimCheck:
    """A complete claim check."""
    return ClaimCheck(image_uri="s3://plant-images/bottle/msg-0001.png", sha256=SHA, width=1024, height=768)


@pytest.fixture
def make_result() -> Callable[..., InspectionResult]:
    """Build a valid result for ``score``/``threshold``; other keyword arguments override fields."""

    def factory(score: float = 0.82, threshold: float = 0.5, **overrides: Any) -> InspectionResult:
        fields: dict[str, Any] = {
            "result_id": make_result_id("inspection.requests", 3, 1042, "2026.11.1"),
            "message_id": "msg-0001",
            "product_line": "bottle",
            "camera_id": "cam-3",
            "part_id": "SN-4711",
            "captured_at": CAPTURED_AT,
            "model": ModelRef(name="space-s", version="2026.11.1"),
            "score": score,
            "normalized_score": normalize_score(score, threshold),
            "threshold": ThresholdInfo(value=threshold, version=7, source="redis", model_version="2026.11.1"),
            "verdict": decide_verdict(score, threshold),
            "late": False,
            "heatmap": HeatmapRef(
                uri="s3://heatmaps/bottle/2026/11/26/msg-0001.9f86d081884c7d65.png", width=256, height=256, sha256=SHA
            ),
            "timings": Timings(queue_ms=12.5, decode_ms=3.1, infer_ms=18.0, publish_ms=2.2, total_ms=38.4),
            "batch_size": 16,
            "worker_id": "space-worker-7f9c4",
            "source": SourceRecord(topic="inspection.requests", partition=3, offset=1042),
            "produced_at": datetime(2026, 11, 26, 12, 0, 0, 291000, tzinfo=UTC),
        }
        fields.update(overrides)
        return InspectionResult(**fields)

    return factory
