"""Threshold records: what Redis holds per product line (hash ``space:threshold:<line>``).

A quality engineer moves a threshold without redeploying; workers read it, cache it, and report
its ``version`` and ``source`` in every result. The hash is written as a whole on every change:
:meth:`ThresholdRecord.to_redis_hash` always returns every field (``model_version`` None is the
empty string), so an ``HSET`` never leaves a stale field behind. Reading ignores fields it does
not know, so older workers can read records written by newer ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Final, Literal

from pydantic import Field, StringConstraints

from schemas._wire import Identifier, ProductLine, UtcDatetime, WireModel, format_rfc3339

__all__ = ["MAX_NOTE_CHARS", "THRESHOLD_SCHEMA_VERSION", "ThresholdMethod", "ThresholdRecord"]

THRESHOLD_SCHEMA_VERSION: Final = 1
MAX_NOTE_CHARS: Final = 1000

ThresholdMethod = Literal["quantile", "f1", "manual"]


class ThresholdRecord(WireModel):
    """The decision threshold of one product line."""

    schema_version: Literal[1] = THRESHOLD_SCHEMA_VERSION
    product_line: ProductLine
    value: float = Field(description="Threshold on the raw score (finite).")
    version: int = Field(ge=1, description="Incremented on every write.")
    model_version: Identifier | None = Field(
        default=None, description="Model version the threshold was calibrated for."
    )
    method: ThresholdMethod = Field(description="quantile / f1 (calibrated) or manual.")
    updated_at: UtcDatetime
    updated_by: Identifier
    note: Annotated[str, StringConstraints(max_length=MAX_NOTE_CHARS)] = ""

    def to_redis_hash(self) -> dict[str, str]:
        """Every field as a string (floats via ``repr``, so they read back exactly)."""
        return {
            "schema_version": str(self.schema_version),
            "product_line": self.product_line,
            "value": repr(self.value),
            "version": str(self.version),
            "model_version": self.model_version or "",
            "method": self.method,
            "updated_at": format_rfc3339(self.updated_at),
            "updated_by": self.updated_by,
            "note": self.note,
        }

    @classmethod
    def from_redis_hash(cls, fields: Mapping[str, str] | Mapping[bytes, bytes]) -> ThresholdRecord:
        """Read a hash as ``HGETALL`` returns it (str or bytes keys and values).

        Raises:
            ValueError: A field is missing or invalid (a pydantic ``ValidationError`` naming it).
        """
        text: dict[str, str] = {}
        for key, value in fields.items():
            name = key.decode("utf-8") if isinstance(key, bytes) else key
            text[name] = value.decode("utf-8") if isinstance(value, bytes) else value
        known: dict[str, Any] = {name: text[name] for name in cls.model_fields if name in text}
        if known.get("model_version") == "":
            known["model_version"] = None
        version = known.get("schema_version")
        if isinstance(version, str) and version.isascii() and version.isdigit():
            known["schema_version"] = int(version)  # Literal[1] does not coerce strings
        return cls.model_validate(known)
