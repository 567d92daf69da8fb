"""Dead letters: records the worker could not score, on ``inspection.dlq``, with the reason attached.

A dead letter is the original record value and headers, plus ``error-*`` headers that say what went
wrong and where the record came from. Nothing is dropped silently: every request either yields a
result or a dead letter.

Contract:

* The original headers are kept in order with their bytes untouched, except that a null header
  value becomes an empty one (kafka-python, like most producers, cannot send null header
  values, and a dead letter that cannot be produced would block the partition). Any
  ``error-*`` header already present (a record dead-lettered before and replayed) is removed, and
  the new ``error-*`` headers are appended, so each ``error-*`` name appears exactly once.
* ``error-detail`` holds at most :data:`MAX_DETAIL_BYTES` UTF-8 bytes; longer text is cut at a
  character boundary and ends with ``…``.
* Payload limit: when the original value is longer than the caller's ``max_value_bytes``, the
  dead letter carries only its first ``max_value_bytes`` bytes (enough to see the magic number or
  the start of the JSON) and ``error-value-truncated: <original length in bytes>``. Without that
  header the value is byte-identical to the original. A truncated dead letter cannot be replayed.
* Record limit: when the caller gives ``max_record_bytes`` (the producer's ``max_request_size``) and
  the key, value and headers would not fit in it, original headers are left out, largest first, and
  ``error-headers-dropped: <count>`` says how many; if that is not enough the value is cut further.
  A dead letter that cannot be produced would stop every worker that meets its record in turn. One
  with headers dropped cannot be replayed either.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Final, NamedTuple

from pydantic import BeforeValidator, Field

from schemas._wire import (
    DATETIME_HEADER_SCHEMA,
    INTEGER_HEADER_SCHEMA,
    HeaderSpec,
    Identifier,
    TopicName,
    UtcDatetime,
    WireModel,
    format_rfc3339,
    headers_json_schema,
    string_schema,
    truncate_utf8,
)

__all__ = [
    "DEAD_LETTER_REASONS",
    "ERROR_HEADER_PREFIX",
    "MAX_DETAIL_BYTES",
    "DeadLetter",
    "DeadLetterInfo",
    "DeadLetterReason",
    "build_dead_letter",
    "dead_letter_headers",
    "dead_letter_headers_json_schema",
    "is_error_header",
    "parse_dead_letter_headers",
    "record_size_bytes",
    "truncate_dead_letter_value",
]

ERROR_HEADER_PREFIX: Final = "error-"
MAX_DETAIL_BYTES: Final = 1024
#: Upper bound of Kafka's framing around one record: record batch header (61 bytes), record attributes,
#: timestamp and offset deltas and the length varints, with room to spare.
RECORD_FRAMING_BYTES: Final = 256
#: Upper bound of the framing of one header (two length varints).
HEADER_FRAMING_BYTES: Final = 10
#: Upper bound of one added count header (``error-headers-dropped`` or ``error-value-truncated``).
_COUNT_HEADER_BYTES: Final = 64


class DeadLetterReason(StrEnum):
    """The stable ``error-reason`` codes. The first nine are :class:`schemas.request.RequestErrorReason`."""

    MISSING_ATTRIBUTE = "missing-attribute"
    INVALID_ATTRIBUTE = "invalid-attribute"
    DUPLICATE_ATTRIBUTE = "duplicate-attribute"
    INVALID_HEADER_ENCODING = "invalid-header-encoding"
    UNSUPPORTED_SPECVERSION = "unsupported-specversion"
    WRONG_EVENT_TYPE = "wrong-event-type"
    UNSUPPORTED_CONTENT_TYPE = "unsupported-content-type"
    EMPTY_VALUE = "empty-value"
    INVALID_CLAIM_CHECK = "invalid-claim-check"
    VALUE_TOO_LARGE = "value-too-large"
    CONTENT_TYPE_MISMATCH = "content-type-mismatch"
    CORRUPT_IMAGE = "corrupt-image"
    TOO_MANY_PIXELS = "too-many-pixels"
    UNSUPPORTED_BIT_DEPTH = "unsupported-bit-depth"
    CLAIM_CHECK_DENIED = "claim-check-denied"
    CLAIM_CHECK_FETCH_FAILED = "claim-check-fetch-failed"
    CLAIM_CHECK_CHECKSUM_MISMATCH = "claim-check-checksum-mismatch"
    DEADLINE_EXPIRED = "deadline-expired"
    UNKNOWN_PRODUCT_LINE = "unknown-product-line"
    MODEL_UNAVAILABLE = "model-unavailable"
    INFERENCE_FAILED = "inference-failed"
    PROCESSING_FAILED = "processing-failed"


#: One line per reason, for operators and integrators (docs/integration.md is generated from it).
DEAD_LETTER_REASONS: Final[Mapping[DeadLetterReason, str]] = {
    DeadLetterReason.MISSING_ATTRIBUTE: "A required header (ce_id, ce_source, ce_type, ce_specversion, "
    "ce_productline, ce_cameraid, content-type) is absent.",
    DeadLetterReason.INVALID_ATTRIBUTE: "A header value breaks its rule (length, characters, "
    "product-line pattern, RFC 3339 time) or is null.",
    DeadLetterReason.DUPLICATE_ATTRIBUTE: "A ce_* or content-type header appears more than once "
    "(names compare case-insensitively).",
    DeadLetterReason.INVALID_HEADER_ENCODING: "A ce_* or content-type header value is not UTF-8.",
    DeadLetterReason.UNSUPPORTED_SPECVERSION: "ce_specversion is not 1.0.",
    DeadLetterReason.WRONG_EVENT_TYPE: "ce_type is not space.inspection.request.v1.",
    DeadLetterReason.UNSUPPORTED_CONTENT_TYPE: "content-type is not image/jpeg, image/png, image/bmp, "
    "image/tiff or application/json (structured mode is not supported).",
    DeadLetterReason.EMPTY_VALUE: "The record value is empty or null.",
    DeadLetterReason.INVALID_CLAIM_CHECK: "The application/json value is not a valid claim check "
    "(JSON, image_uri, sha256, size).",
    DeadLetterReason.VALUE_TOO_LARGE: "The image (inline or fetched) has more bytes than the configured limit.",
    DeadLetterReason.CONTENT_TYPE_MISMATCH: "The bytes are a different image format than content-type "
    "(or the claim check's content_type) declares.",
    DeadLetterReason.CORRUPT_IMAGE: "The bytes do not decode as an image (truncated or damaged file), or "
    "their structure is refused before decoding (the request contract's JPEG and TIFF rules).",
    DeadLetterReason.TOO_MANY_PIXELS: "The image declares or decodes to more pixels than the configured limit.",
    DeadLetterReason.UNSUPPORTED_BIT_DEPTH: "The image's bit depth or channel layout cannot be "
    "normalised to 8-bit RGB.",
    DeadLetterReason.CLAIM_CHECK_DENIED: "The claim-check URI's scheme, bucket or path is not "
    "allowed by this deployment.",
    DeadLetterReason.CLAIM_CHECK_FETCH_FAILED: "The claim-check image could not be read (after retries).",
    DeadLetterReason.CLAIM_CHECK_CHECKSUM_MISMATCH: "The fetched image's SHA-256 differs from the "
    "claim check's sha256.",
    DeadLetterReason.DEADLINE_EXPIRED: "The request's deadline passed before it was scored and the "
    "worker is set to dead-letter late images (otherwise the result is published with late=true).",
    DeadLetterReason.UNKNOWN_PRODUCT_LINE: "No model is deployed for the product line.",
    DeadLetterReason.MODEL_UNAVAILABLE: "The line has a model, but it cannot be loaded right now (registry "
    "unreadable or slow, pointer corrupt, model file fails to load); error-detail says why. Replay once fixed.",
    DeadLetterReason.INFERENCE_FAILED: "The model could not score this image (e.g. a non-finite score).",
    DeadLetterReason.PROCESSING_FAILED: "Any other per-record failure; error-class and error-detail "
    "name the exception.",
}


def _bounded_detail(value: object) -> object:
    return truncate_utf8(value, MAX_DETAIL_BYTES) if isinstance(value, str) else value


class DeadLetterInfo(WireModel):
    """What the ``error-*`` headers of a dead letter say."""

    error_class: Identifier = Field(description="Exception class name (error-class).")
    reason: DeadLetterReason = Field(description="Stable reason code (error-reason).")
    detail: Annotated[str, BeforeValidator(_bounded_detail)] = Field(
        description=f"Human-readable detail, at most {MAX_DETAIL_BYTES} UTF-8 bytes (error-detail)."
    )
    worker_id: Identifier = Field(description="Worker that gave up on the record (error-worker).")
    time: UtcDatetime = Field(description="When it was dead-lettered (error-time).")
    source_topic: TopicName = Field(description="Topic of the original record (error-source-topic).")
    source_partition: int = Field(ge=0, le=2**31 - 1, description="Its partition (error-source-partition).")
    source_offset: int = Field(ge=0, le=2**63 - 1, description="Its offset (error-source-offset).")
    value_truncated_from: int | None = Field(
        default=None,
        ge=0,
        description="Original value length in bytes, when truncated (error-value-truncated).",
    )
    headers_dropped: int | None = Field(
        default=None,
        ge=1,
        description="How many original headers were left out to keep the record under the producer's "
        "size limit, largest first (error-headers-dropped).",
    )


class DeadLetter(NamedTuple):
    """A dead-letter record ready to publish (key: the original record key)."""

    headers: list[tuple[str, bytes]]
    value: bytes | None


# DeadLetterInfo field -> header, in the order they are appended.
_FIELD_HEADERS: Final[dict[str, str]] = {
    "error_class": "error-class",
    "reason": "error-reason",
    "detail": "error-detail",
    "worker_id": "error-worker",
    "time": "error-time",
    "source_topic": "error-source-topic",
    "source_partition": "error-source-partition",
    "source_offset": "error-source-offset",
    "value_truncated_from": "error-value-truncated",
    "headers_dropped": "error-headers-dropped",
}


_OPTIONAL_FIELDS: Final = frozenset({"value_truncated_from", "headers_dropped"})


def _header_text(info: DeadLetterInfo, field: str) -> str | None:
    value = getattr(info, field)
    if value is None:
        return None
    if isinstance(value, datetime):
        return format_rfc3339(value)
    return str(value)


def dead_letter_headers(
    original_headers: Sequence[tuple[str, bytes | None]], info: DeadLetterInfo
) -> list[tuple[str, bytes]]:
    """The original headers (previous ``error-*`` removed) followed by ``info`` as ``error-*`` headers.

    Values come back as ``bytes`` (a null value as ``b""``), ready for ``KafkaProducer.send``.
    """
    kept = [
        (name, b"" if value is None else bytes(value)) for name, value in original_headers if not is_error_header(name)
    ]
    for field, header in _FIELD_HEADERS.items():
        text = _header_text(info, field)
        if text is not None:
            kept.append((header, text.encode("utf-8")))
    return kept


def is_error_header(name: str) -> bool:
    """Whether ``name`` is one of the ``error-*`` headers a dead letter adds (case-insensitive)."""
    return name.lower().startswith(ERROR_HEADER_PREFIX)


def parse_dead_letter_headers(headers: Sequence[tuple[str, bytes | None]]) -> DeadLetterInfo:
    """Read the ``error-*`` headers of a dead letter (names case-insensitive; the last one wins).

    Raises:
        ValueError: A header is missing, not UTF-8, or invalid (pydantic's ``ValidationError``
            is a ``ValueError``; it names the field).
    """
    header_fields = {header: field for field, header in _FIELD_HEADERS.items()}
    values: dict[str, Any] = {}
    for name, raw in headers:
        field = header_fields.get(name.lower())
        if field is None or raw is None:
            continue
        try:
            values[field] = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"dead-letter header {name!r} is not UTF-8") from None
    return DeadLetterInfo.model_validate(values)


def truncate_dead_letter_value(value: bytes | None, max_value_bytes: int) -> tuple[bytes | None, int | None]:
    """Apply the dead-letter payload limit.

    Args:
        value: The original record value.
        max_value_bytes: Largest value the dead-letter topic accepts (>= 0).

    Returns:
        ``(value, None)`` when it fits, else ``(value[:max_value_bytes], len(value))``.

    Raises:
        ValueError: If ``max_value_bytes`` is negative.
    """
    if max_value_bytes < 0:
        raise ValueError("max_value_bytes must be >= 0")
    if value is None or len(value) <= max_value_bytes:
        return value, None
    return bytes(value[:max_value_bytes]), len(value)


def record_size_bytes(key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes | None]]) -> int:
    """An upper bound of the bytes a record takes in a producer request (what ``max_request_size`` limits)."""
    size = RECORD_FRAMING_BYTES + len(key or b"") + len(value or b"")
    return size + sum(_header_bytes(name, v) for name, v in headers)


def _header_bytes(name: str, value: bytes | None) -> int:
    return len(name.encode("utf-8", "replace")) + len(value or b"") + HEADER_FRAMING_BYTES


def build_dead_letter(
    original_headers: Sequence[tuple[str, bytes | None]],
    value: bytes | None,
    info: DeadLetterInfo,
    *,
    max_value_bytes: int,
    max_record_bytes: int | None = None,
    key: bytes | None = None,
) -> DeadLetter:
    """The complete dead letter, within the payload limit and (given ``max_record_bytes``) the record limit.

    Args:
        original_headers: the failed record's headers.
        value: its value.
        info: what the ``error-*`` headers say.
        max_value_bytes: the dead-letter payload limit (``error-value-truncated`` when applied).
        max_record_bytes: the producer's request limit; None: headers are kept whole, whatever their size.
        key: the record key the dead letter is produced with (counted against ``max_record_bytes``).
    """
    kept_value, original_size = truncate_dead_letter_value(value, max_value_bytes)
    if original_size is not None:
        info = info.model_copy(update={"value_truncated_from": original_size})
    headers = dead_letter_headers(original_headers, info)
    if max_record_bytes is None or record_size_bytes(key, kept_value, headers) <= max_record_bytes:
        return DeadLetter(headers, kept_value)
    # Too large for the producer: leave out original headers, largest first, then cut the value.
    originals = [(name, v) for name, v in original_headers if not is_error_header(name)]
    sizes = [_header_bytes(name, v) for name, v in originals]
    excess = record_size_bytes(key, kept_value, headers) + _COUNT_HEADER_BYTES - max_record_bytes
    dropped: set[int] = set()
    for i in sorted(range(len(originals)), key=sizes.__getitem__, reverse=True):
        if excess <= 0:
            break
        dropped.add(i)
        excess -= sizes[i]
    info = info.model_copy(update={"headers_dropped": len(dropped) or None})
    if excess > 0 and kept_value:
        info = info.model_copy(update={"value_truncated_from": len(value or b"")})
        kept_value = bytes(kept_value[: max(0, len(kept_value) - excess - _COUNT_HEADER_BYTES)])
    headers = dead_letter_headers([h for i, h in enumerate(originals) if i not in dropped], info)
    return DeadLetter(headers, kept_value)


def dead_letter_headers_json_schema() -> dict[str, Any]:
    """JSON Schema of the ``error-*`` headers a dead letter adds to the original headers."""
    fields = DeadLetterInfo.model_fields
    identifier = string_schema(Identifier)
    schemas: dict[str, dict[str, Any]] = {
        "error_class": identifier,
        "reason": {"type": "string", "enum": [reason.value for reason in DeadLetterReason]},
        "detail": {"type": "string"},
        "worker_id": identifier,
        "time": DATETIME_HEADER_SCHEMA,
        "source_topic": string_schema(TopicName),
        "source_partition": INTEGER_HEADER_SCHEMA,
        "source_offset": INTEGER_HEADER_SCHEMA,
        "value_truncated_from": INTEGER_HEADER_SCHEMA,
        "headers_dropped": INTEGER_HEADER_SCHEMA,
    }
    specs = [
        HeaderSpec(header, str(fields[field].description), schemas[field], required=field not in _OPTIONAL_FIELDS)
        for field, header in _FIELD_HEADERS.items()
    ]
    return headers_json_schema(
        "DeadLetterHeaders",
        "Headers a dead letter carries in addition to the original record's headers.",
        specs,
    )
