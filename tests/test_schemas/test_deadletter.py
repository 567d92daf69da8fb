"""Dead letters: error-* headers, replacement of earlier ones, bounded detail, payload limit, reasons."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, get_args

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from schemas import (
    DEAD_LETTER_REASONS,
    MAX_DETAIL_BYTES,
    DeadLetterInfo,
    DeadLetterReason,
    RequestErrorReason,
    build_dead_letter,
    dead_letter_headers,
    parse_dead_letter_headers,
    record_size_bytes,
    truncate_dead_letter_value,
)

ORIGINAL: list[tuple[str, bytes | None]] = [
    ("ce_id", b"msg-0001"),
    ("traceparent", None),
    ("content-type", b"image/png"),
    ("x-binary", b"\xff\x00"),
]


def make_info(**overrides: Any) -> DeadLetterInfo:
    fields: dict[str, Any] = {
        "error_class": "DecodeError",
        "reason": DeadLetterReason.CORRUPT_IMAGE,
        "detail": "png: truncated IDAT",
        "worker_id": "space-worker-7f9c4",
        "time": datetime(2026, 11, 26, 12, 0, 1, tzinfo=UTC),
        "source_topic": "inspection.requests",
        "source_partition": 3,
        "source_offset": 1042,
    }
    fields.update(overrides)
    return DeadLetterInfo(**fields)


def test_headers_keep_the_original_and_append_error_headers() -> None:
    headers = dead_letter_headers(ORIGINAL, make_info())
    assert headers[: len(ORIGINAL)] == [(n, b"" if v is None else v) for n, v in ORIGINAL]
    assert all(type(name) is str and type(value) is bytes for name, value in headers)  # what KafkaProducer takes
    assert headers[len(ORIGINAL) :] == [
        ("error-class", b"DecodeError"),
        ("error-reason", b"corrupt-image"),
        ("error-detail", b"png: truncated IDAT"),
        ("error-worker", b"space-worker-7f9c4"),
        ("error-time", b"2026-11-26T12:00:01Z"),
        ("error-source-topic", b"inspection.requests"),
        ("error-source-partition", b"3"),
        ("error-source-offset", b"1042"),
    ]


def test_headers_round_trip() -> None:
    info = make_info(value_truncated_from=5_000_000)
    assert parse_dead_letter_headers(dead_letter_headers(ORIGINAL, info)) == info


def test_earlier_error_headers_are_replaced_not_repeated() -> None:
    first = dead_letter_headers(ORIGINAL, make_info(value_truncated_from=10))
    replayed = [*first, ("Error-Custom", b"old")]
    second = dead_letter_headers(replayed, make_info(reason=DeadLetterReason.PROCESSING_FAILED))
    names = [name for name, _ in second]
    assert len(names) == len(set(names))
    assert "error-value-truncated" not in names
    assert "Error-Custom" not in names
    assert parse_dead_letter_headers(second).reason is DeadLetterReason.PROCESSING_FAILED


def test_detail_is_cut_to_1_kib_at_a_character_boundary() -> None:
    info = make_info(detail="é" * 2000)
    encoded = info.detail.encode("utf-8")
    assert len(encoded) <= MAX_DETAIL_BYTES
    assert info.detail.endswith("…")
    assert set(info.detail[:-1]) == {"é"}


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=0, max_size=1500))
def test_any_detail_fits_and_stays_valid_utf8(detail: str) -> None:
    info = make_info(detail=detail)
    encoded = info.detail.encode("utf-8")
    assert len(encoded) <= MAX_DETAIL_BYTES
    if len(detail.encode("utf-8", "replace")) <= MAX_DETAIL_BYTES:
        assert info.detail == detail.encode("utf-8", "replace").decode("utf-8")
    header = dict(dead_letter_headers([], info))["error-detail"]
    assert header is not None
    assert header.decode("utf-8") == info.detail


def test_lone_surrogates_in_detail_do_not_break_encoding() -> None:
    info = make_info(detail="bad \udcff byte")
    assert info.detail == "bad ? byte"


def test_parse_requires_every_mandatory_header() -> None:
    headers = [h for h in dead_letter_headers(ORIGINAL, make_info()) if h[0] != "error-source-offset"]
    with pytest.raises(ValidationError, match="source_offset"):
        parse_dead_letter_headers(headers)


def test_parse_rejects_unknown_reason_and_non_utf8() -> None:
    headers = dead_letter_headers(ORIGINAL, make_info())
    with pytest.raises(ValidationError, match="reason"):
        parse_dead_letter_headers([*headers, ("error-reason", b"gremlins")])
    with pytest.raises(ValueError, match="error-worker"):
        parse_dead_letter_headers([*headers, ("error-worker", b"\xff")])


def test_value_within_the_limit_is_untouched() -> None:
    assert truncate_dead_letter_value(b"abc", 3) == (b"abc", None)
    assert truncate_dead_letter_value(None, 0) == (None, None)


def test_value_over_the_limit_keeps_a_prefix_and_the_original_size() -> None:
    assert truncate_dead_letter_value(b"abcdef", 4) == (b"abcd", 6)
    assert truncate_dead_letter_value(b"abcdef", 0) == (b"", 6)
    with pytest.raises(ValueError, match="max_value_bytes"):
        truncate_dead_letter_value(b"a", -1)


def test_build_dead_letter_records_truncation_in_a_header() -> None:
    letter = build_dead_letter(ORIGINAL, b"x" * 100, make_info(), max_value_bytes=10)
    assert letter.value == b"x" * 10
    assert dict(letter.headers)["error-value-truncated"] == b"100"
    assert parse_dead_letter_headers(letter.headers).value_truncated_from == 100
    whole = build_dead_letter(ORIGINAL, b"x" * 10, make_info(), max_value_bytes=10)
    assert whole.value == b"x" * 10
    assert "error-value-truncated" not in dict(whole.headers)


def test_a_dead_letter_over_the_record_limit_leaves_out_the_largest_original_headers() -> None:
    # The request fitted; its dead letter (same headers, same value, plus error-*) would not, and a
    # dead letter the producer refuses stops every worker that meets the record.
    headers = [*ORIGINAL, ("x-blob", b"b" * 50_000), ("x-note", b"n" * 2_000)]
    limit = record_size_bytes(b"key", b"v" * 1_000, headers) + 100
    letter = build_dead_letter(
        headers, b"v" * 1_000, make_info(), max_value_bytes=10_000, max_record_bytes=limit, key=b"key"
    )
    assert record_size_bytes(b"key", letter.value, letter.headers) <= limit
    names = [name for name, _ in letter.headers]
    assert "x-blob" not in names and "x-note" in names and names[:4] == [name for name, _ in ORIGINAL]
    assert letter.value == b"v" * 1_000  # whole: dropping the header was enough
    info = parse_dead_letter_headers(letter.headers)
    assert (info.headers_dropped, info.value_truncated_from) == (1, None)


def test_a_dead_letter_cuts_its_value_when_dropping_every_original_header_is_not_enough() -> None:
    limit = 1_500
    letter = build_dead_letter(ORIGINAL, b"v" * 4_000, make_info(), max_value_bytes=10_000, max_record_bytes=limit)
    assert record_size_bytes(None, letter.value, letter.headers) <= limit
    info = parse_dead_letter_headers(letter.headers)
    assert info.value_truncated_from == 4_000 and info.headers_dropped == len(ORIGINAL)
    assert letter.value and set(letter.value) == {ord("v")}


def test_a_dead_letter_within_the_record_limit_keeps_every_header() -> None:
    limit = record_size_bytes(None, b"v" * 100, ORIGINAL) + 2_000  # room for the error-* headers
    within = build_dead_letter(ORIGINAL, b"v" * 100, make_info(), max_value_bytes=10_000, max_record_bytes=limit)
    assert within == build_dead_letter(ORIGINAL, b"v" * 100, make_info(), max_value_bytes=10_000)
    assert "error-headers-dropped" not in dict(within.headers)


def test_every_request_reason_is_a_dead_letter_reason() -> None:
    assert {r.value for r in RequestErrorReason} <= {r.value for r in DeadLetterReason}


def test_every_reason_is_described() -> None:
    assert set(DEAD_LETTER_REASONS) == set(DeadLetterReason)
    assert all(text.strip() for text in DEAD_LETTER_REASONS.values())


def test_every_decode_reason_is_a_dead_letter_reason() -> None:
    """The worker's decoder puts its reason codes into error-reason: they must be documented here."""
    decode = pytest.importorskip("worker.decode")
    assert set(get_args(decode.DecodeReason)) <= {r.value for r in DeadLetterReason}
