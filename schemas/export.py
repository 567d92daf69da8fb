"""JSON Schemas of every contract, as checked into ``docs/schemas/`` (``space schemas export``).

:func:`render_json_schemas` is the single source of the files' bytes: the command writes them and a
test compares the checked-in copies with it, so the published schemas cannot go stale.
"""

from __future__ import annotations

import json
from typing import Any, Final

from schemas.deadletter import DeadLetterInfo, dead_letter_headers_json_schema
from schemas.request import ClaimCheck, InspectionRequest, request_headers_json_schema
from schemas.result import InspectionAlert, InspectionResult, result_headers_json_schema
from schemas.threshold import ThresholdRecord

__all__ = ["JSON_SCHEMA_DIALECT", "json_schemas", "render_json_schemas"]

JSON_SCHEMA_DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"


def json_schemas() -> dict[str, dict[str, Any]]:
    """File name -> JSON Schema, one per contract."""
    schemas: dict[str, dict[str, Any]] = {
        "inspection-request-headers.json": request_headers_json_schema(),
        "inspection-request.json": InspectionRequest.model_json_schema(),
        "claim-check.json": ClaimCheck.model_json_schema(),
        "inspection-result.json": InspectionResult.model_json_schema(),
        "inspection-alert.json": InspectionAlert.model_json_schema(),
        "inspection-result-headers.json": result_headers_json_schema(),
        "dead-letter-info.json": DeadLetterInfo.model_json_schema(),
        "dead-letter-headers.json": dead_letter_headers_json_schema(),
        "threshold-record.json": ThresholdRecord.model_json_schema(),
    }
    return {name: {"$schema": JSON_SCHEMA_DIALECT, **schema} for name, schema in schemas.items()}


def render_json_schemas() -> dict[str, str]:
    """File name -> file text (sorted keys, two-space indent, trailing newline)."""
    return {
        name: json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        for name, schema in json_schemas().items()
    }
