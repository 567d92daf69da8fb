"""Inspection requests: the CloudEvents Kafka binding (binary mode) for ``inspection.requests``.

A camera (or a gateway in front of it) publishes one record per image. The CloudEvents attributes
travel as ``ce_*`` headers and the record value is the payload:

========================  ==========  ==================================================================
header                    required    meaning
========================  ==========  ==================================================================
``ce_specversion``        yes         ``1.0``
``ce_id``                 yes         message id, 1..256 characters, no control characters
``ce_source``             yes         the producer (camera URI or name), 1..1024 characters
``ce_type``               yes         ``space.inspection.request.v1``
``ce_time``               no          capture time, RFC 3339 with offset (absent: the record timestamp)
``ce_productline``        yes         ``[A-Za-z0-9][A-Za-z0-9._-]{0,63}`` (used in Redis keys and paths)
``ce_cameraid``           yes         camera id, 1..256 characters (also the record key)
``ce_partid``             no          part / serial number, 1..256 characters
``ce_deadline``           no          absolute deadline: RFC 3339, or Unix epoch milliseconds (digits)
``content-type``          yes         ``image/jpeg|png|bmp|tiff`` (value = image bytes) or
                                      ``application/json`` (value = claim check, see :class:`ClaimCheck`)
========================  ==========  ==================================================================

Parsing rules (see :func:`parse_request`): header names are case-insensitive; a CloudEvents header
(``ce_*`` or ``content-type``) that appears twice is rejected (``duplicate-attribute``), because two
different camera ids or product lines on one record cannot be resolved safely; all such header
values must be UTF-8. Headers outside the binding (tracing, client metadata) are ignored and may
hold any bytes. Unknown ``ce_*`` extensions are allowed and ignored. Media types compare
case-insensitively, parameters (``; charset=utf-8``) are ignored, and the common non-standard
aliases in :data:`CONTENT_TYPE_ALIASES` (``image/jpg``...) are read as their standard type.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, Final, Literal, get_args

from pydantic import Field, StringConstraints, ValidationError, model_validator

from schemas._wire import (
    DATETIME_HEADER_SCHEMA,
    NO_CONTROL_PATTERN,
    HeaderSpec,
    Identifier,
    ProductLine,
    Sha256Hex,
    UtcDatetime,
    WireModel,
    format_rfc3339,
    headers_json_schema,
    parse_rfc3339,
    string_schema,
)

__all__ = [
    "CLAIM_CHECK_CONTENT_TYPE",
    "CLAIM_CHECK_SCHEMES",
    "CONTENT_TYPE_ALIASES",
    "IMAGE_CONTENT_TYPES",
    "MAX_CLAIM_CHECK_BYTES",
    "REQUEST_EVENT_TYPE",
    "SPECVERSION",
    "ClaimCheck",
    "ContentType",
    "ImageContentType",
    "InspectionRequest",
    "RequestError",
    "RequestErrorReason",
    "build_claim_check_value",
    "build_request_headers",
    "parse_request",
    "request_headers_json_schema",
]

REQUEST_EVENT_TYPE: Final = "space.inspection.request.v1"
SPECVERSION: Final = "1.0"
CLAIM_CHECK_CONTENT_TYPE: Final = "application/json"
#: URI schemes a claim check may use; the worker's settings decide which buckets and roots.
CLAIM_CHECK_SCHEMES: Final = ("s3", "file")
#: Non-standard media types some cameras send, read as their standard equivalent.
CONTENT_TYPE_ALIASES: Final[dict[str, str]] = {
    "image/jpg": "image/jpeg",
    "image/pjpeg": "image/jpeg",
    "image/x-bmp": "image/bmp",
    "image/x-ms-bmp": "image/bmp",
    "image/tif": "image/tiff",
}
#: A claim-check value larger than this is rejected before JSON parsing.
MAX_CLAIM_CHECK_BYTES: Final = 16 * 1024
MAX_SOURCE_CHARS: Final = 1024
MAX_URI_CHARS: Final = 2048
#: Largest epoch-milliseconds deadline (9999-12-31T23:59:59.999Z).
_MAX_EPOCH_MS: Final = 253_402_300_799_999

ImageContentType = Literal["image/jpeg", "image/png", "image/bmp", "image/tiff"]
ContentType = Literal["image/jpeg", "image/png", "image/bmp", "image/tiff", "application/json"]
IMAGE_CONTENT_TYPES: Final[tuple[str, ...]] = get_args(ImageContentType)

Source = Annotated[str, StringConstraints(min_length=1, max_length=MAX_SOURCE_CHARS, pattern=NO_CONTROL_PATTERN)]
ImageUri = Annotated[
    str,
    StringConstraints(
        min_length=1,
        max_length=MAX_URI_CHARS,
        pattern=r"^(?:s3|file)://[^\x00-\x20\x7f-\x9f]+$",
    ),
]
Dimension = Annotated[int, Field(ge=1, le=65535)]


class RequestErrorReason(StrEnum):
    """Why a request record was rejected (the stable ``error-reason`` code of its dead letter)."""

    MISSING_ATTRIBUTE = "missing-attribute"
    INVALID_ATTRIBUTE = "invalid-attribute"
    DUPLICATE_ATTRIBUTE = "duplicate-attribute"
    INVALID_HEADER_ENCODING = "invalid-header-encoding"
    UNSUPPORTED_SPECVERSION = "unsupported-specversion"
    WRONG_EVENT_TYPE = "wrong-event-type"
    UNSUPPORTED_CONTENT_TYPE = "unsupported-content-type"
    EMPTY_VALUE = "empty-value"
    INVALID_CLAIM_CHECK = "invalid-claim-check"


class RequestError(ValueError):
    """A request record that does not follow the contract; never retried, always dead-lettered.

    Attributes:
        reason: The stable reason code.
        field: The header (``ce_cameraid``, ``content-type``) or value path (``value.sha256``)
            at fault, or None when the record as a whole is at fault.
        detail: A human-readable explanation (never contains the image bytes).
    """

    def __init__(self, reason: RequestErrorReason, field: str | None, detail: str) -> None:
        """Create the error; the message reads ``<reason> [<field>]: <detail>``."""
        self.reason = reason
        self.field = field
        self.detail = detail
        where = f" [{field}]" if field else ""
        super().__init__(f"{reason.value}{where}: {detail}")

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle with the three constructor arguments (exceptions cross thread pools)."""
        return (type(self), (self.reason, self.field, self.detail))


class ClaimCheck(WireModel):
    """The JSON value of a request whose image lives in object storage (``application/json``)."""

    image_uri: ImageUri = Field(description="Where the image is: an s3:// or file:// URI.")
    sha256: Sha256Hex = Field(description="SHA-256 of the image bytes (hex; stored lowercased).")
    width: Dimension | None = Field(default=None, description="Image width in pixels, if known.")
    height: Dimension | None = Field(default=None, description="Image height in pixels, if known.")
    content_type: ImageContentType | None = Field(default=None, description="Media type of the stored image, if known.")


class InspectionRequest(WireModel):
    """The validated attributes of one request record (the image bytes stay in the record value)."""

    specversion: Literal["1.0"] = SPECVERSION
    type: Literal["space.inspection.request.v1"] = REQUEST_EVENT_TYPE
    message_id: Identifier = Field(description="CloudEvents id (ce_id).")
    source: Source = Field(description="CloudEvents source (ce_source): the producing camera/gateway.")
    time: UtcDatetime | None = Field(
        default=None, description="Capture time (ce_time); None: the worker uses the record timestamp."
    )
    product_line: ProductLine = Field(description="Product line (ce_productline).")
    camera_id: Identifier = Field(description="Camera id (ce_cameraid); also the record key.")
    part_id: Identifier | None = Field(default=None, description="Part or serial number (ce_partid).")
    deadline: UtcDatetime | None = Field(
        default=None, description="Absolute deadline (ce_deadline); results after it are marked late."
    )
    content_type: ContentType = Field(description="Media type of the record value (content-type).")
    claim_check: ClaimCheck | None = Field(
        default=None, description="The parsed value when content_type is application/json."
    )

    @model_validator(mode="after")
    def _claim_check_matches_content_type(self) -> InspectionRequest:
        is_json = self.content_type == CLAIM_CHECK_CONTENT_TYPE
        if is_json != (self.claim_check is not None):
            raise ValueError("claim_check is required for application/json and forbidden otherwise")
        return self

    @property
    def is_claim_check(self) -> bool:
        """True when the image must be fetched from ``claim_check.image_uri``."""
        return self.claim_check is not None


# Model field -> header, in the order build_request_headers writes them.
_FIELD_HEADERS: Final[dict[str, str]] = {
    "specversion": "ce_specversion",
    "message_id": "ce_id",
    "source": "ce_source",
    "type": "ce_type",
    "time": "ce_time",
    "product_line": "ce_productline",
    "camera_id": "ce_cameraid",
    "part_id": "ce_partid",
    "deadline": "ce_deadline",
    "content_type": "content-type",
}
_REQUIRED_HEADERS: Final = ("ce_id", "ce_source", "ce_productline", "ce_cameraid")
_CONTENT_TYPE: Final = "content-type"


def _decode_headers(headers: Sequence[tuple[str, bytes | None]]) -> dict[str, str | None]:
    """Collect the binding's headers by lowercased name; other headers are ignored."""
    found: dict[str, str | None] = {}
    for item in headers or ():
        try:
            name, raw = item
        except (TypeError, ValueError):
            raise RequestError(
                RequestErrorReason.INVALID_HEADER_ENCODING, None, "a header is not a (name, value) pair"
            ) from None
        if isinstance(name, bytes | bytearray):
            try:
                name = bytes(name).decode("utf-8")
            except UnicodeDecodeError:
                continue  # not a name this binding defines
        if not isinstance(name, str):
            raise RequestError(RequestErrorReason.INVALID_HEADER_ENCODING, None, "header name is not a string")
        key = name.lower()
        if not (key.startswith("ce_") or key == _CONTENT_TYPE):
            continue
        if key in found:
            raise RequestError(RequestErrorReason.DUPLICATE_ATTRIBUTE, key, f"header {key!r} appears twice")
        found[key] = _decode_value(key, raw)
    return found


def _decode_value(key: str, raw: object) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise RequestError(RequestErrorReason.INVALID_HEADER_ENCODING, key, "header value is not bytes")
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(
            RequestErrorReason.INVALID_HEADER_ENCODING, key, f"header value is not UTF-8 ({exc.reason})"
        ) from None


def _require(attrs: dict[str, str | None], key: str) -> str:
    if key not in attrs:
        raise RequestError(RequestErrorReason.MISSING_ATTRIBUTE, key, f"required header {key!r} is absent")
    value = attrs[key]
    if value is None:
        raise RequestError(RequestErrorReason.INVALID_ATTRIBUTE, key, "header value is null")
    return value


def _optional(attrs: dict[str, str | None], key: str) -> str | None:
    if key in attrs:
        return _require(attrs, key)
    return None


def _parse_content_type(attrs: dict[str, str | None]) -> str:
    raw = _require(attrs, _CONTENT_TYPE)
    media_type = raw.split(";", 1)[0].strip().lower()
    media_type = CONTENT_TYPE_ALIASES.get(media_type, media_type)
    if media_type not in get_args(ContentType):
        allowed = ", ".join(get_args(ContentType))
        raise RequestError(
            RequestErrorReason.UNSUPPORTED_CONTENT_TYPE,
            _CONTENT_TYPE,
            f"{raw[:100]!r} is not supported (binary mode only; allowed: {allowed})",
        )
    return media_type


def _parse_time(attrs: dict[str, str | None], key: str, *, allow_epoch_ms: bool) -> datetime | None:
    text = _optional(attrs, key)
    if text is None:
        return None
    if allow_epoch_ms and text.isascii() and text.isdigit():
        millis = int(text[:20])
        if len(text) > 15 or millis > _MAX_EPOCH_MS:
            raise RequestError(RequestErrorReason.INVALID_ATTRIBUTE, key, "epoch milliseconds out of range")
        return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=millis)
    try:
        return parse_rfc3339(text)
    except ValueError as exc:
        expected = "RFC 3339 date-time or epoch milliseconds" if allow_epoch_ms else "RFC 3339 date-time"
        raise RequestError(RequestErrorReason.INVALID_ATTRIBUTE, key, f"expected {expected}: {exc}") from None


def _parse_claim_check(value: bytes) -> ClaimCheck:
    if len(value) > MAX_CLAIM_CHECK_BYTES:
        raise RequestError(
            RequestErrorReason.INVALID_CLAIM_CHECK,
            "value",
            f"claim check is {len(value)} bytes, more than {MAX_CLAIM_CHECK_BYTES}",
        )
    try:
        document = json.loads(value.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise RequestError(
            RequestErrorReason.INVALID_CLAIM_CHECK, "value", f"not a UTF-8 JSON document: {exc}"
        ) from None
    if not isinstance(document, dict):
        raise RequestError(RequestErrorReason.INVALID_CLAIM_CHECK, "value", "claim check must be a JSON object")
    try:
        return ClaimCheck.model_validate(document)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        path = ".".join(str(part) for part in error["loc"])
        field = f"value.{path}" if path else "value"
        raise RequestError(RequestErrorReason.INVALID_CLAIM_CHECK, field, error["msg"]) from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, item in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = item
    return result


def parse_request(headers: Sequence[tuple[str, bytes | None]], value: bytes | None) -> InspectionRequest:
    """Validate one ``inspection.requests`` record and return its attributes.

    Pure: no I/O, no clock. The checks run in a fixed order, so one record always yields the same
    error: header encoding and duplicates, ``ce_specversion``, ``ce_type``, ``content-type``, the
    value, the required attributes, times, then every field constraint.

    Args:
        headers: The record headers as the Kafka client returns them (name, value-or-None).
        value: The record value (image bytes or claim-check JSON).

    Returns:
        The validated, immutable request.

    Raises:
        RequestError: The record breaks the contract; ``reason`` and ``field`` say how and where.
    """
    attrs = _decode_headers(headers)
    specversion = _require(attrs, "ce_specversion")
    if specversion != SPECVERSION:
        raise RequestError(
            RequestErrorReason.UNSUPPORTED_SPECVERSION,
            "ce_specversion",
            f"{specversion[:32]!r} is not supported (expected {SPECVERSION!r})",
        )
    event_type = _require(attrs, "ce_type")
    if event_type != REQUEST_EVENT_TYPE:
        raise RequestError(
            RequestErrorReason.WRONG_EVENT_TYPE,
            "ce_type",
            f"{event_type[:100]!r} is not {REQUEST_EVENT_TYPE!r}",
        )
    content_type = _parse_content_type(attrs)
    if not value:
        raise RequestError(RequestErrorReason.EMPTY_VALUE, "value", "the record value is empty or null")
    for key in _REQUIRED_HEADERS:
        _require(attrs, key)
    fields: dict[str, Any] = {
        "message_id": attrs["ce_id"],
        "source": attrs["ce_source"],
        "time": _parse_time(attrs, "ce_time", allow_epoch_ms=False),
        "product_line": attrs["ce_productline"],
        "camera_id": attrs["ce_cameraid"],
        "part_id": _optional(attrs, "ce_partid"),
        "deadline": _parse_time(attrs, "ce_deadline", allow_epoch_ms=True),
        "content_type": content_type,
    }
    if content_type == CLAIM_CHECK_CONTENT_TYPE:
        fields["claim_check"] = _parse_claim_check(bytes(value))
    try:
        return InspectionRequest.model_validate(fields)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        name = str(error["loc"][0]) if error["loc"] else ""
        header = _FIELD_HEADERS.get(name, name or None)
        raise RequestError(RequestErrorReason.INVALID_ATTRIBUTE, header, error["msg"]) from None


def build_request_headers(request: InspectionRequest) -> list[tuple[str, bytes]]:
    """Headers a producer attaches to a request record (binary mode, UTF-8 values).

    Optional attributes that are None are omitted; times are written as RFC 3339 UTC (``Z``).
    """
    values: dict[str, str | None] = {
        "ce_specversion": request.specversion,
        "ce_id": request.message_id,
        "ce_source": request.source,
        "ce_type": request.type,
        "ce_time": format_rfc3339(request.time) if request.time else None,
        "ce_productline": request.product_line,
        "ce_cameraid": request.camera_id,
        "ce_partid": request.part_id,
        "ce_deadline": format_rfc3339(request.deadline) if request.deadline else None,
        "content-type": request.content_type,
    }
    return [(name, text.encode("utf-8")) for name, text in values.items() if text is not None]


def build_claim_check_value(claim_check: ClaimCheck) -> bytes:
    """The record value for a claim-check request (compact JSON, unset optional fields omitted)."""
    return claim_check.model_dump_json(exclude_none=True).encode("utf-8")


def request_headers_json_schema() -> dict[str, Any]:
    """JSON Schema of the request headers (the CloudEvents attributes as Kafka headers)."""
    fields = InspectionRequest.model_fields
    identifier = string_schema(Identifier)
    specs = [
        HeaderSpec("ce_specversion", "CloudEvents spec version.", {"type": "string", "const": SPECVERSION}),
        HeaderSpec("ce_id", str(fields["message_id"].description), identifier),
        HeaderSpec("ce_source", str(fields["source"].description), string_schema(Source)),
        HeaderSpec("ce_type", "Event type.", {"type": "string", "const": REQUEST_EVENT_TYPE}),
        HeaderSpec("ce_time", "Capture time, RFC 3339 with offset.", DATETIME_HEADER_SCHEMA, required=False),
        HeaderSpec("ce_productline", str(fields["product_line"].description), string_schema(ProductLine)),
        HeaderSpec("ce_cameraid", str(fields["camera_id"].description), identifier),
        HeaderSpec("ce_partid", str(fields["part_id"].description), identifier, required=False),
        HeaderSpec(
            "ce_deadline",
            "Absolute deadline: RFC 3339 date-time, or Unix epoch milliseconds as decimal digits.",
            {"anyOf": [DATETIME_HEADER_SCHEMA, {"type": "string", "pattern": r"^[0-9]{1,15}$"}]},
            required=False,
        ),
        HeaderSpec(
            "content-type",
            "Media type of the value (parameters such as charset are ignored).",
            {"type": "string", "enum": list(get_args(ContentType))},
        ),
    ]
    return headers_json_schema(
        "InspectionRequestHeaders",
        f"Kafka headers of a {REQUEST_EVENT_TYPE} record (CloudEvents Kafka binding, binary mode). "
        "Header names are case-insensitive; each header may appear once.",
        specs,
    )
