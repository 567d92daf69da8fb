"""Inspection results and alerts: the JSON values on ``inspection.results`` and ``inspection.alerts``.

Every scored request yields one :class:`InspectionResult` on ``inspection.results``; an anomalous
one is also published, unchanged, as an :class:`InspectionAlert` on ``inspection.alerts``. Both
travel as CloudEvents in binary mode (:func:`build_result_headers`), keyed by the camera id of the
request, so the order per camera holds.

Delivery is at-least-once: a record that is processed twice (a worker crashed after publishing but
before committing) yields the same ``result_id`` (:func:`make_result_id`), so consumers deduplicate
on it. A retry after a threshold change keeps the id, so the first copy wins.

Score mapping: ``normalized_score = clip(0.5 * score / threshold, 0, 1)`` when ``threshold > 0``
(0.5 means "at the threshold"), and ``1.0 if anomalous else 0.0`` for a non-positive threshold.
The verdict is ``anomalous`` when ``score >= threshold``; decide on ``verdict``, not on the
normalized score, which may round to 0.5 just below the threshold.
"""

from __future__ import annotations

import math
import uuid
from typing import Annotated, Any, ClassVar, Final, Literal

from pydantic import Field, StringConstraints, model_validator

from schemas._wire import (
    DATETIME_HEADER_SCHEMA,
    HeaderSpec,
    Identifier,
    ProductLine,
    Sha256Hex,
    TopicName,
    UtcDatetime,
    WireModel,
    format_rfc3339,
    headers_json_schema,
    string_schema,
)

__all__ = [
    "ALERT_EVENT_TYPE",
    "RESULT_EVENT_TYPE",
    "RESULT_ID_NAMESPACE",
    "RESULT_SCHEMA_VERSION",
    "HeatmapRef",
    "InspectionAlert",
    "InspectionResult",
    "ModelRef",
    "ResultEventType",
    "SourceRecord",
    "ThresholdInfo",
    "ThresholdSource",
    "Timings",
    "Verdict",
    "build_result_headers",
    "decide_verdict",
    "make_result_id",
    "normalize_score",
    "result_headers_json_schema",
]

RESULT_EVENT_TYPE: Final = "space.inspection.result.v1"
ALERT_EVENT_TYPE: Final = "space.inspection.alert.v1"
RESULT_SCHEMA_VERSION: Final = 1
#: uuid5 namespace of result ids (= uuid5(NAMESPACE_URL, "urn:space-worker:inspection-result")).
RESULT_ID_NAMESPACE: Final = uuid.UUID("2bd38fd9-1cbd-59f6-86a6-8ef41008d295")
MAX_HEATMAP_ERROR_CHARS: Final = 1024
_NORMALIZED_TOLERANCE: Final = 1e-6

Verdict = Literal["ok", "anomalous"]
ThresholdSource = Literal["redis", "cache", "model-default"]
ResultEventType = Literal["space.inspection.result.v1", "space.inspection.alert.v1"]

ResultId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")]
StorageUri = Annotated[
    str,
    StringConstraints(min_length=1, max_length=2048, pattern=r"^(?:s3|file|https?)://[^\x00-\x20\x7f-\x9f]+$"),
]
Milliseconds = Annotated[float, Field(ge=0)]
Pixels = Annotated[int, Field(ge=1, le=65535)]


def normalize_score(score: float, threshold: float) -> float:
    """Map a raw score to [0, 1] with 0.5 at the threshold (see the module docstring)."""
    if threshold > 0:
        return min(1.0, max(0.0, 0.5 * score / threshold))
    return 1.0 if decide_verdict(score, threshold) == "anomalous" else 0.0


def decide_verdict(score: float, threshold: float) -> Verdict:
    """``anomalous`` when ``score >= threshold``, else ``ok``."""
    return "anomalous" if score >= threshold else "ok"


def make_result_id(topic: str, partition: int, offset: int, model_version: str) -> str:
    """The idempotency key of a result: the same record scored by the same model gets the same id.

    Args:
        topic: Source topic of the request record.
        partition: Its partition.
        offset: Its offset.
        model_version: Version of the model that scored it (a new model yields a new result).

    Returns:
        A UUID (version 5) string, lowercase with hyphens.
    """
    return str(uuid.uuid5(RESULT_ID_NAMESPACE, f"{topic}/{partition}/{offset}/{model_version}"))


class ModelRef(WireModel):
    """Which model scored the image."""

    name: Identifier
    version: Identifier


class ThresholdInfo(WireModel):
    """The decision threshold that produced the verdict and where it came from."""

    value: float = Field(description="Threshold on the raw score.")
    version: int | None = Field(
        default=None, ge=1, description="Version of the Redis record; None for the model default."
    )
    source: ThresholdSource = Field(
        description="redis: read now; cache: last known good (Redis unreachable, or it lost the record); "
        "model-default: none set."
    )
    model_version: Identifier | None = Field(
        default=None, description="Model version the threshold was calibrated for, if recorded."
    )


class HeatmapRef(WireModel):
    """Where the anomaly heatmap of the image is stored."""

    uri: StorageUri
    format: Literal["png"] = "png"
    width: Pixels
    height: Pixels
    sha256: Sha256Hex


class Timings(WireModel):
    """Where the time went, in milliseconds."""

    queue_ms: Milliseconds = Field(description="Wait in the batcher: decoded image handed over to its batch forming.")
    decode_ms: Milliseconds = Field(description="Fetch (claim check) and decode.")
    infer_ms: Milliseconds = Field(description="Model time of the batch this image was in.")
    publish_ms: Milliseconds | None = Field(
        default=None,
        description="The publish step's time on the batch until this result was built: waiting for heatmaps "
        "and sending the batch's earlier results.",
    )
    total_ms: Milliseconds = Field(description="Poll that returned the record to result produced.")


class SourceRecord(WireModel):
    """The request record this result answers."""

    topic: TopicName
    partition: int = Field(ge=0, le=2**31 - 1)
    offset: int = Field(ge=0, le=2**63 - 1)


class InspectionResult(WireModel):
    """The verdict on one image (value of ``space.inspection.result.v1``)."""

    event_type: ClassVar[str] = RESULT_EVENT_TYPE

    schema_version: Literal[1] = RESULT_SCHEMA_VERSION
    result_id: ResultId = Field(description="Idempotency key, see make_result_id().")
    message_id: Identifier = Field(description="ce_id of the request.")
    product_line: ProductLine
    camera_id: Identifier
    part_id: Identifier | None = None
    captured_at: UtcDatetime = Field(description="ce_time of the request, else its record timestamp.")
    model: ModelRef
    score: float = Field(description="Raw image score (max of the anomaly map).")
    normalized_score: float = Field(ge=0, le=1, description="clip(0.5 * score / threshold, 0, 1).")
    threshold: ThresholdInfo
    verdict: Verdict
    late: bool = Field(default=False, description="The deadline had passed when the image's batch went to the model.")
    heatmap: HeatmapRef | None = None
    heatmap_error: Annotated[str, StringConstraints(max_length=MAX_HEATMAP_ERROR_CHARS)] | None = Field(
        default=None, description="Why no heatmap was stored, when storing it failed."
    )
    timings: Timings
    batch_size: int = Field(ge=1)
    worker_id: Identifier
    source: SourceRecord
    produced_at: UtcDatetime

    @model_validator(mode="after")
    def _consistent(self) -> InspectionResult:
        expected = decide_verdict(self.score, self.threshold.value)
        if self.verdict != expected:
            raise ValueError(f"verdict {self.verdict!r} contradicts score and threshold ({expected!r})")
        normalized = normalize_score(self.score, self.threshold.value)
        if not math.isclose(self.normalized_score, normalized, abs_tol=_NORMALIZED_TOLERANCE):
            raise ValueError(f"normalized_score should be {normalized!r}")
        if self.heatmap is not None and self.heatmap_error is not None:
            raise ValueError("heatmap and heatmap_error are mutually exclusive")
        return self


class InspectionAlert(InspectionResult):
    """An anomalous result, republished on ``inspection.alerts`` (same JSON, ce_type alert)."""

    event_type: ClassVar[str] = ALERT_EVENT_TYPE

    verdict: Literal["anomalous"]

    @classmethod
    def from_result(cls, result: InspectionResult) -> InspectionAlert:
        """The alert copy of an anomalous result.

        Raises:
            ValueError: If the result's verdict is ``ok``.
        """
        return cls.model_validate(result.model_dump())


def build_result_headers(
    result: InspectionResult, event_type: ResultEventType = RESULT_EVENT_TYPE
) -> list[tuple[str, bytes]]:
    """Headers of a result or alert record (CloudEvents binary mode; the value is the JSON).

    Args:
        result: The result to publish.
        event_type: ``RESULT_EVENT_TYPE`` or ``ALERT_EVENT_TYPE``.

    Raises:
        ValueError: For an unknown event type, or an alert whose verdict is not anomalous.
    """
    if event_type not in (RESULT_EVENT_TYPE, ALERT_EVENT_TYPE):
        raise ValueError(f"unknown result event type {event_type!r}")
    if event_type == ALERT_EVENT_TYPE and result.verdict != "anomalous":
        raise ValueError("only anomalous results are published as alerts")
    values: dict[str, str | None] = {
        "ce_specversion": "1.0",
        "ce_id": result.result_id,
        "ce_source": result.worker_id,
        "ce_type": event_type,
        "ce_subject": result.message_id,
        "ce_time": format_rfc3339(result.produced_at),
        "ce_productline": result.product_line,
        "ce_cameraid": result.camera_id,
        "ce_partid": result.part_id,
        "content-type": "application/json",
    }
    return [(name, text.encode("utf-8")) for name, text in values.items() if text is not None]


def result_headers_json_schema() -> dict[str, Any]:
    """JSON Schema of the headers of result and alert records."""
    identifier = string_schema(Identifier)
    specs = [
        HeaderSpec("ce_specversion", "CloudEvents spec version.", {"type": "string", "const": "1.0"}),
        HeaderSpec("ce_id", "The result_id (idempotency key).", string_schema(ResultId)),
        HeaderSpec("ce_source", "The worker_id of the producing worker.", identifier),
        HeaderSpec("ce_type", "Result or alert.", {"type": "string", "enum": [RESULT_EVENT_TYPE, ALERT_EVENT_TYPE]}),
        HeaderSpec("ce_subject", "The message_id (ce_id) of the request.", identifier),
        HeaderSpec("ce_time", "When the result was produced (produced_at).", DATETIME_HEADER_SCHEMA),
        HeaderSpec("ce_productline", "Product line.", string_schema(ProductLine)),
        HeaderSpec("ce_cameraid", "Camera id (also the record key).", identifier),
        HeaderSpec("ce_partid", "Part id, when the request had one.", identifier, required=False),
        HeaderSpec("content-type", "Media type of the value.", {"type": "string", "const": "application/json"}),
    ]
    return headers_json_schema(
        "InspectionResultHeaders",
        "Kafka headers of space.inspection.result.v1 and space.inspection.alert.v1 records "
        "(CloudEvents Kafka binding, binary mode).",
        specs,
    )
