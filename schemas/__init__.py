"""Wire contracts of space-worker: requests, results, alerts, dead letters and threshold records.

Pydantic models and pure functions only; this package imports nothing but pydantic and the standard
library, so producers, MES adapters and tools can use it without Kafka, Redis or torch.
"""

from schemas._wire import header_text
from schemas.deadletter import (
    DEAD_LETTER_REASONS,
    MAX_DETAIL_BYTES,
    DeadLetter,
    DeadLetterInfo,
    DeadLetterReason,
    build_dead_letter,
    dead_letter_headers,
    parse_dead_letter_headers,
    truncate_dead_letter_value,
)
from schemas.export import json_schemas, render_json_schemas
from schemas.request import (
    CLAIM_CHECK_CONTENT_TYPE,
    IMAGE_CONTENT_TYPES,
    REQUEST_EVENT_TYPE,
    ClaimCheck,
    ContentType,
    InspectionRequest,
    RequestError,
    RequestErrorReason,
    build_claim_check_value,
    build_request_headers,
    parse_request,
)
from schemas.result import (
    ALERT_EVENT_TYPE,
    RESULT_EVENT_TYPE,
    HeatmapRef,
    InspectionAlert,
    InspectionResult,
    ModelRef,
    SourceRecord,
    ThresholdInfo,
    ThresholdSource,
    Timings,
    Verdict,
    build_result_headers,
    decide_verdict,
    make_result_id,
    normalize_score,
)
from schemas.threshold import ThresholdMethod, ThresholdRecord

__all__ = [
    "ALERT_EVENT_TYPE",
    "CLAIM_CHECK_CONTENT_TYPE",
    "DEAD_LETTER_REASONS",
    "IMAGE_CONTENT_TYPES",
    "MAX_DETAIL_BYTES",
    "REQUEST_EVENT_TYPE",
    "RESULT_EVENT_TYPE",
    "ClaimCheck",
    "ContentType",
    "DeadLetter",
    "DeadLetterInfo",
    "DeadLetterReason",
    "HeatmapRef",
    "InspectionAlert",
    "InspectionRequest",
    "InspectionResult",
    "ModelRef",
    "RequestError",
    "RequestErrorReason",
    "SourceRecord",
    "ThresholdInfo",
    "ThresholdMethod",
    "ThresholdRecord",
    "ThresholdSource",
    "Timings",
    "Verdict",
    "build_claim_check_value",
    "build_dead_letter",
    "build_request_headers",
    "build_result_headers",
    "dead_letter_headers",
    "decide_verdict",
    "header_text",
    "json_schemas",
    "make_result_id",
    "normalize_score",
    "parse_dead_letter_headers",
    "parse_request",
    "render_json_schemas",
    "truncate_dead_letter_value",
]
