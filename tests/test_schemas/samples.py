"""Constants shared by the schema tests."""

from __future__ import annotations

from datetime import UTC, datetime

CAPTURED_AT = datetime(2026, 11, 26, 12, 0, 0, 250000, tzinfo=UTC)
PNG_BYTES = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"
SHA = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
