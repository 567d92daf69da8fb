"""Building blocks shared by every wire contract: constrained types, RFC 3339 time, header schemas.

Private to :mod:`schemas`. The constrained string types here are the single definition of what an
identifier, a product line or a digest may look like; the request parser, the result model, the
threshold record and the exported JSON Schemas all use them, so the rules cannot drift apart.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Final

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, StringConstraints, TypeAdapter

#: No C0/C1 control characters (tabs and newlines included) in identifiers.
NO_CONTROL_PATTERN: Final = r"^[^\x00-\x1f\x7f-\x9f]+$"
#: Product lines become Redis keys and storage path segments: keep them path- and key-safe.
PRODUCT_LINE_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
SHA256_PATTERN: Final = r"^[0-9a-fA-F]{64}$"
MAX_ID_CHARS: Final = 256

_RFC3339_RE: Final = re.compile(
    r"^(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$", re.ASCII
)


def _to_utc(value: datetime) -> datetime:
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("datetime is out of range once converted to UTC") from None


def _lower(value: str) -> str:
    return value.lower()


Identifier = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_CHARS, pattern=NO_CONTROL_PATTERN)]
"""An opaque id (message, camera, part, worker): 1..256 characters, no control characters."""

ProductLine = Annotated[str, StringConstraints(pattern=PRODUCT_LINE_PATTERN)]
"""A product line name: ``[A-Za-z0-9][A-Za-z0-9._-]{0,63}`` (safe in Redis keys and paths)."""

Sha256Hex = Annotated[str, StringConstraints(pattern=SHA256_PATTERN), AfterValidator(_lower)]
"""A SHA-256 digest as 64 hex digits; accepted in any case, always stored lowercased."""

TopicName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,249}$")]
"""A Kafka topic name (legal characters, 1..249 long)."""

UtcDatetime = Annotated[AwareDatetime, AfterValidator(_to_utc)]
"""A timezone-aware timestamp, converted to UTC (naive datetimes are rejected)."""


class WireModel(BaseModel):
    """Base of every contract: immutable, unknown fields rejected, no NaN or infinity."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


def format_rfc3339(value: datetime) -> str:
    """Format an aware datetime as RFC 3339 in UTC with a ``Z`` suffix.

    Microseconds are written only when non-zero, as ``datetime.isoformat`` does.

    Raises:
        ValueError: If ``value`` is naive.
    """
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("datetime must be timezone-aware")
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def parse_rfc3339(text: str) -> datetime:
    """Parse an RFC 3339 date-time (offset required) into an aware UTC datetime.

    Fractions beyond microseconds are truncated.

    Raises:
        ValueError: If ``text`` is not an RFC 3339 date-time.
    """
    match = _RFC3339_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"not an RFC 3339 date-time with offset: {text[:64]!r}")
    date, clock, fraction, offset = match.groups()
    fraction = (fraction or "")[:7]
    offset = "+00:00" if offset in ("Z", "z") else offset
    parsed = datetime.fromisoformat(f"{date}T{clock}{fraction}{offset}")
    return _to_utc(parsed)


def truncate_utf8(text: str, max_bytes: int) -> str:
    """Cut ``text`` to at most ``max_bytes`` UTF-8 bytes without splitting a character.

    Characters that cannot be encoded (lone surrogates) become ``?``. When the text is cut, it
    ends with ``…`` and still fits in ``max_bytes``.
    """
    data = text.encode("utf-8", "replace")
    if len(data) <= max_bytes:
        return data.decode("utf-8")
    marker = "…".encode()
    kept = data[: max(0, max_bytes - len(marker))].decode("utf-8", "ignore")
    return kept + "…" if max_bytes >= len(marker) else kept


@dataclass(frozen=True, slots=True)
class HeaderSpec:
    """One Kafka header of a contract, for the exported header JSON Schemas.

    Attributes:
        name: The header name on the wire (lowercase).
        description: What the header carries.
        schema: JSON Schema of the header value, read as a UTF-8 string.
        required: Whether every record carries it.
    """

    name: str
    description: str
    schema: dict[str, Any]
    required: bool = True


def string_schema(annotation: Any) -> dict[str, Any]:
    """JSON Schema of a constrained string type (used to describe header values)."""
    schema: dict[str, Any] = TypeAdapter(annotation).json_schema()
    return schema


DATETIME_HEADER_SCHEMA: Final[dict[str, Any]] = {"type": "string", "format": "date-time"}
INTEGER_HEADER_SCHEMA: Final[dict[str, Any]] = {"type": "string", "pattern": r"^[0-9]{1,19}$"}


def headers_json_schema(title: str, description: str, specs: Sequence[HeaderSpec]) -> dict[str, Any]:
    """Describe a set of Kafka headers as a JSON object schema (name -> UTF-8 string value).

    Other headers may be present (tracing, client headers), so additional properties are allowed.
    """
    return {
        "title": title,
        "description": description,
        "type": "object",
        "properties": {spec.name: {**spec.schema, "description": spec.description} for spec in specs},
        "required": [spec.name for spec in specs if spec.required],
        "additionalProperties": True,
    }


def header_text(headers: Iterable[tuple[str, bytes | None]] | None, name: str) -> str | None:
    """The first non-null value of header ``name`` (case-insensitive) of a record, decoded as UTF-8 (lenient)."""
    wanted = name.lower()
    for key, value in headers or ():
        if key.lower() == wanted and value is not None:
            return value.decode("utf-8", "replace")
    return None
