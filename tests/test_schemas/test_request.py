"""Request parsing: round trips, every rejection reason with its field, fuzzing, CloudEvents interop."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import (
    ClaimCheck,
    InspectionRequest,
    RequestError,
    RequestErrorReason,
    build_claim_check_value,
    build_request_headers,
    parse_request,
)
from schemas.request import MAX_CLAIM_CHECK_BYTES, REQUEST_EVENT_TYPE
from tests.test_schemas.samples import PNG_BYTES, SHA

Headers = list[tuple[str, bytes | None]]
R = RequestErrorReason


def replace(headers: Headers, name: str, value: bytes | None) -> Headers:
    """Headers with ``name`` set to ``value`` (appended when absent)."""
    out = [(n, value if n == name else v) for n, v in headers]
    return out if any(n == name for n, _ in headers) else [*out, (name, value)]


def drop(headers: Headers, name: str) -> Headers:
    return [(n, v) for n, v in headers if n != name]


@pytest.fixture
def headers(make_request: Callable[..., InspectionRequest]) -> Headers:
    return list(build_request_headers(make_request()))


# --- round trips and accepted variants ---------------------------------------------------------


def test_image_request_round_trips(make_request: Callable[..., InspectionRequest]) -> None:
    request = make_request()
    assert parse_request(build_request_headers(request), PNG_BYTES) == request


def test_minimal_request_round_trips(make_request: Callable[..., InspectionRequest]) -> None:
    request = make_request(time=None, part_id=None, deadline=None, content_type="image/tiff")
    headers = build_request_headers(request)
    assert {name for name, _ in headers} == {
        "ce_specversion",
        "ce_id",
        "ce_source",
        "ce_type",
        "ce_productline",
        "ce_cameraid",
        "content-type",
    }
    assert parse_request(headers, b"II*\x00") == request


def test_claim_check_request_round_trips(
    make_request: Callable[..., InspectionRequest], claim_check: ClaimCheck
) -> None:
    request = make_request(content_type="application/json", claim_check=claim_check)
    value = build_claim_check_value(claim_check)
    parsed = parse_request(build_request_headers(request), value)
    assert parsed == request
    assert parsed.is_claim_check
    assert json.loads(value) == {
        "image_uri": claim_check.image_uri,
        "sha256": SHA,
        "width": 1024,
        "height": 768,
    }


def test_header_names_are_case_insensitive(
    headers: Headers, make_request: Callable[..., InspectionRequest]
) -> None:
    shouted = [(name.upper(), value) for name, value in headers]
    assert parse_request(shouted, PNG_BYTES) == make_request()


def test_foreign_headers_are_ignored_even_binary_or_repeated(
    headers: Headers, make_request: Callable[..., InspectionRequest]
) -> None:
    extra: Headers = [
        ("traceparent", b"\xff\xfe"),
        ("traceparent", None),
        ("x-vendor", b"1"),
        ("ce_lens", b"wide"),
    ]
    assert parse_request(extra + headers, PNG_BYTES) == make_request()


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (b"image/PNG; charset=binary", "image/png"),
        (b"image/jpg", "image/jpeg"),
        (b"image/x-ms-bmp", "image/bmp"),
        (b"image/tif", "image/tiff"),
    ],
)
def test_content_type_parameters_case_and_aliases(headers: Headers, header: bytes, expected: str) -> None:
    assert parse_request(replace(headers, "content-type", header), PNG_BYTES).content_type == expected


def test_claim_check_content_type_may_carry_charset(headers: Headers, claim_check: ClaimCheck) -> None:
    headers = replace(headers, "content-type", b"application/json; charset=utf-8")
    assert parse_request(headers, build_claim_check_value(claim_check)).claim_check == claim_check


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-26T13:00:00+01:00", datetime(2026, 11, 26, 12, 0, tzinfo=UTC)),
        ("2026-11-26t12:00:00.123456789z", datetime(2026, 11, 26, 12, 0, 0, 123456, tzinfo=UTC)),
        ("2026-11-26 12:00:00.5Z", datetime(2026, 11, 26, 12, 0, 0, 500000, tzinfo=UTC)),
    ],
)
def test_time_is_rfc3339_converted_to_utc(headers: Headers, text: str, expected: datetime) -> None:
    parsed = parse_request(replace(headers, "ce_time", text.encode()), PNG_BYTES)
    assert parsed.time == expected
    assert parsed.time.utcoffset() == timedelta(0)


def test_deadline_accepts_epoch_milliseconds(headers: Headers) -> None:
    parsed = parse_request(replace(headers, "ce_deadline", b"1764158405250"), PNG_BYTES)
    assert parsed.deadline == datetime(2025, 11, 26, 12, 0, 5, 250000, tzinfo=UTC)


def test_header_values_may_be_bytearray_or_memoryview(
    headers: Headers, make_request: Callable[..., InspectionRequest]
) -> None:
    mixed = [(n, bytearray(v) if i % 2 else memoryview(v)) for i, (n, v) in enumerate(headers) if v]
    assert parse_request(mixed, bytearray(PNG_BYTES)) == make_request()  # type: ignore[arg-type]


def test_build_request_headers_writes_utc_times(make_request: Callable[..., InspectionRequest]) -> None:
    request = make_request(time=datetime(2026, 11, 26, 13, 0, tzinfo=timezone(timedelta(hours=1))))
    assert dict(build_request_headers(request))["ce_time"] == b"2026-11-26T12:00:00Z"


def test_model_rejects_claim_check_without_json(
    make_request: Callable[..., InspectionRequest], claim_check: ClaimCheck
) -> None:
    with pytest.raises(ValueError, match="claim_check"):
        make_request(claim_check=claim_check)
    with pytest.raises(ValueError, match="claim_check"):
        make_request(content_type="application/json")


def test_request_error_pickles_with_its_fields() -> None:
    error = RequestError(R.INVALID_ATTRIBUTE, "ce_id", "too long")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.reason, copy.field, copy.detail, str(copy)) == (
        R.INVALID_ATTRIBUTE,
        "ce_id",
        "too long",
        "invalid-attribute [ce_id]: too long",
    )


# --- rejections: reason and field ----------------------------------------------------------------

HEADER_CASES: list[tuple[str, Callable[[Headers], Headers], RequestErrorReason, str | None]] = [
    ("no specversion", lambda h: drop(h, "ce_specversion"), R.MISSING_ATTRIBUTE, "ce_specversion"),
    (
        "specversion 0.3",
        lambda h: replace(h, "ce_specversion", b"0.3"),
        R.UNSUPPORTED_SPECVERSION,
        "ce_specversion",
    ),
    ("no type", lambda h: drop(h, "ce_type"), R.MISSING_ATTRIBUTE, "ce_type"),
    ("other type", lambda h: replace(h, "ce_type", b"com.example.order"), R.WRONG_EVENT_TYPE, "ce_type"),
    (
        "result type",
        lambda h: replace(h, "ce_type", b"space.inspection.result.v1"),
        R.WRONG_EVENT_TYPE,
        "ce_type",
    ),
    ("no content-type", lambda h: drop(h, "content-type"), R.MISSING_ATTRIBUTE, "content-type"),
    ("gif", lambda h: replace(h, "content-type", b"image/gif"), R.UNSUPPORTED_CONTENT_TYPE, "content-type"),
    (
        "structured mode",
        lambda h: replace(h, "content-type", b"application/cloudevents+json"),
        R.UNSUPPORTED_CONTENT_TYPE,
        "content-type",
    ),
    ("no id", lambda h: drop(h, "ce_id"), R.MISSING_ATTRIBUTE, "ce_id"),
    ("no source", lambda h: drop(h, "ce_source"), R.MISSING_ATTRIBUTE, "ce_source"),
    ("no product line", lambda h: drop(h, "ce_productline"), R.MISSING_ATTRIBUTE, "ce_productline"),
    ("no camera", lambda h: drop(h, "ce_cameraid"), R.MISSING_ATTRIBUTE, "ce_cameraid"),
    ("empty id", lambda h: replace(h, "ce_id", b""), R.INVALID_ATTRIBUTE, "ce_id"),
    ("long id", lambda h: replace(h, "ce_id", b"a" * 257), R.INVALID_ATTRIBUTE, "ce_id"),
    ("newline in id", lambda h: replace(h, "ce_id", b"a\nb"), R.INVALID_ATTRIBUTE, "ce_id"),
    (
        "C1 control in camera",
        lambda h: replace(h, "ce_cameraid", "cam\u0085".encode()),
        R.INVALID_ATTRIBUTE,
        "ce_cameraid",
    ),
    ("NUL in camera", lambda h: replace(h, "ce_cameraid", b"cam\x00"), R.INVALID_ATTRIBUTE, "ce_cameraid"),
    (
        "path in line",
        lambda h: replace(h, "ce_productline", b"../etc"),
        R.INVALID_ATTRIBUTE,
        "ce_productline",
    ),
    (
        "space in line",
        lambda h: replace(h, "ce_productline", b"bottle cap"),
        R.INVALID_ATTRIBUTE,
        "ce_productline",
    ),
    ("colon in line", lambda h: replace(h, "ce_productline", b"a:b"), R.INVALID_ATTRIBUTE, "ce_productline"),
    ("long line", lambda h: replace(h, "ce_productline", b"a" * 65), R.INVALID_ATTRIBUTE, "ce_productline"),
    ("long source", lambda h: replace(h, "ce_source", b"s" * 1025), R.INVALID_ATTRIBUTE, "ce_source"),
    ("empty part", lambda h: replace(h, "ce_partid", b""), R.INVALID_ATTRIBUTE, "ce_partid"),
    ("time word", lambda h: replace(h, "ce_time", b"yesterday"), R.INVALID_ATTRIBUTE, "ce_time"),
    ("naive time", lambda h: replace(h, "ce_time", b"2026-11-26T12:00:00"), R.INVALID_ATTRIBUTE, "ce_time"),
    ("date only", lambda h: replace(h, "ce_time", b"2026-11-26"), R.INVALID_ATTRIBUTE, "ce_time"),
    ("month 13", lambda h: replace(h, "ce_time", b"2026-13-26T12:00:00Z"), R.INVALID_ATTRIBUTE, "ce_time"),
    ("time as ms", lambda h: replace(h, "ce_time", b"1764158405000"), R.INVALID_ATTRIBUTE, "ce_time"),
    (
        "time overflows UTC",
        lambda h: replace(h, "ce_time", b"0001-01-01T00:00:00+01:00"),
        R.INVALID_ATTRIBUTE,
        "ce_time",
    ),
    (
        "offset 24h",
        lambda h: replace(h, "ce_time", b"2026-01-01T00:00:00+24:00"),
        R.INVALID_ATTRIBUTE,
        "ce_time",
    ),
    ("deadline word", lambda h: replace(h, "ce_deadline", b"soon"), R.INVALID_ATTRIBUTE, "ce_deadline"),
    ("deadline overflow", lambda h: replace(h, "ce_deadline", b"9" * 16), R.INVALID_ATTRIBUTE, "ce_deadline"),
    ("negative deadline", lambda h: replace(h, "ce_deadline", b"-5"), R.INVALID_ATTRIBUTE, "ce_deadline"),
    ("null id", lambda h: replace(h, "ce_id", None), R.INVALID_ATTRIBUTE, "ce_id"),
    ("null content-type", lambda h: replace(h, "content-type", None), R.INVALID_ATTRIBUTE, "content-type"),
    (
        "latin-1 camera",
        lambda h: replace(h, "ce_cameraid", b"cam\xe9"),
        R.INVALID_HEADER_ENCODING,
        "ce_cameraid",
    ),
    ("latin-1 type", lambda h: replace(h, "ce_type", b"\xff"), R.INVALID_HEADER_ENCODING, "ce_type"),
    ("duplicate camera", lambda h: [*h, ("CE_CameraId", b"cam-9")], R.DUPLICATE_ATTRIBUTE, "ce_cameraid"),
    (
        "duplicate content-type",
        lambda h: [*h, ("Content-Type", b"image/png")],
        R.DUPLICATE_ATTRIBUTE,
        "content-type",
    ),
    ("not a pair", lambda h: [*h, ("ce_id",)], R.INVALID_HEADER_ENCODING, None),  # type: ignore[list-item]
]


@pytest.mark.parametrize(
    ("mutate", "reason", "field"), [c[1:] for c in HEADER_CASES], ids=[c[0] for c in HEADER_CASES]
)
def test_header_rejections_name_reason_and_field(
    headers: Headers, mutate: Callable[[Headers], Headers], reason: RequestErrorReason, field: str | None
) -> None:
    with pytest.raises(RequestError) as info:
        parse_request(mutate(headers), PNG_BYTES)
    assert info.value.reason is reason
    assert info.value.field == field
    assert str(info.value).startswith(f"{reason.value} [{field}]: " if field else f"{reason.value}: ")


@pytest.mark.parametrize("value", [None, b""])
def test_empty_value_is_rejected(headers: Headers, value: bytes | None) -> None:
    with pytest.raises(RequestError) as info:
        parse_request(headers, value)
    assert (info.value.reason, info.value.field) == (R.EMPTY_VALUE, "value")


def _json(document: object) -> bytes:
    return json.dumps(document).encode()


VALID_CLAIM = {"image_uri": "s3://bucket/key.png", "sha256": SHA}
CLAIM_CASES: list[tuple[str, bytes, str]] = [
    ("not json", b"{nope", "value"),
    ("not utf-8", b'{"image_uri": "\xff"}', "value"),
    ("array", b"[1, 2]", "value"),
    ("no sha256", _json({"image_uri": "s3://bucket/key.png"}), "value.sha256"),
    ("short sha256", _json({**VALID_CLAIM, "sha256": "abc"}), "value.sha256"),
    ("sha256 not hex", _json({**VALID_CLAIM, "sha256": "g" * 64}), "value.sha256"),
    ("no uri", _json({"sha256": SHA}), "value.image_uri"),
    ("http uri", _json({**VALID_CLAIM, "image_uri": "http://cam/img.png"}), "value.image_uri"),
    ("relative uri", _json({**VALID_CLAIM, "image_uri": "img.png"}), "value.image_uri"),
    ("space in uri", _json({**VALID_CLAIM, "image_uri": "s3://b/a b.png"}), "value.image_uri"),
    ("width zero", _json({**VALID_CLAIM, "width": 0}), "value.width"),
    ("height string", _json({**VALID_CLAIM, "height": "tall"}), "value.height"),
    ("json content type", _json({**VALID_CLAIM, "content_type": "application/json"}), "value.content_type"),
    ("unknown field", _json({**VALID_CLAIM, "owner": "me"}), "value.owner"),
    (
        "duplicate key",
        b'{"image_uri": "s3://b/k", "image_uri": "s3://b/j", "sha256": "' + SHA.encode() + b'"}',
        "value",
    ),
    ("too large", _json({**VALID_CLAIM, "pad": "x" * MAX_CLAIM_CHECK_BYTES}), "value"),
]


@pytest.mark.parametrize(("value", "field"), [c[1:] for c in CLAIM_CASES], ids=[c[0] for c in CLAIM_CASES])
def test_claim_check_rejections_name_the_value_field(headers: Headers, value: bytes, field: str) -> None:
    headers = replace(headers, "content-type", b"application/json")
    with pytest.raises(RequestError) as info:
        parse_request(headers, value)
    assert (info.value.reason, info.value.field) == (R.INVALID_CLAIM_CHECK, field)
    assert f"[{field}]" in str(info.value)


def test_claim_check_sha256_is_lowercased(headers: Headers) -> None:
    headers = replace(headers, "content-type", b"application/json")
    parsed = parse_request(headers, _json({**VALID_CLAIM, "sha256": SHA.upper()}))
    assert parsed.claim_check is not None
    assert parsed.claim_check.sha256 == SHA


def test_checks_run_in_a_fixed_order(headers: Headers) -> None:
    """Several faults: the earliest check in the documented order decides the reason."""
    broken = replace(replace(drop(headers, "ce_id"), "ce_type", b"other"), "ce_specversion", b"0.3")
    with pytest.raises(RequestError) as info:
        parse_request(broken, None)
    assert info.value.reason is R.UNSUPPORTED_SPECVERSION


# --- fuzzing --------------------------------------------------------------------------------------


def outcome_of(headers: Headers, value: bytes | None) -> InspectionRequest | RequestError:
    """Parse; a RequestError is returned, any other exception propagates and fails the test."""
    try:
        return parse_request(headers, value)
    except RequestError as exc:
        return exc


_KNOWN = [
    "ce_specversion",
    "ce_id",
    "ce_source",
    "ce_type",
    "ce_time",
    "ce_productline",
    "ce_cameraid",
    "ce_partid",
    "ce_deadline",
    "content-type",
    "CE_ID",
    "Content-Type",
]
_names = st.one_of(st.sampled_from(_KNOWN), st.text(max_size=20))
_values = st.one_of(
    st.none(),
    st.binary(max_size=40),
    st.sampled_from([b"1.0", REQUEST_EVENT_TYPE.encode(), b"image/png", b"application/json", b"bottle"]),
    st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.from_regex(r"\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d:\d\d(\.\d{1,12})?([Zz]|[+-]\d\d:\d\d)", fullmatch=True).map(
        str.encode
    ),
    st.from_regex(r"[0-9]{1,20}", fullmatch=True).map(str.encode),
)
_payloads = st.one_of(
    st.none(), st.binary(max_size=64), st.just(_json(VALID_CLAIM)), st.text().map(str.encode)
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(headers=st.lists(st.tuples(_names, _values), max_size=14), value=_payloads)
def test_fuzz_random_headers_raise_only_request_error(headers: Headers, value: bytes | None) -> None:
    outcome = outcome_of(headers, value)
    if isinstance(outcome, RequestError):
        assert outcome.reason in set(RequestErrorReason)
    else:
        assert isinstance(outcome, InspectionRequest)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    index=st.integers(min_value=0, max_value=20),
    replacement=_values,
    value=_payloads,
    json_value=st.booleans(),
)
def test_fuzz_one_corrupted_header_raises_only_request_error(
    headers: Headers, index: int, replacement: bytes | None, value: bytes | None, json_value: bool
) -> None:
    if json_value:
        headers = replace(headers, "content-type", b"application/json")
    name = headers[index % len(headers)][0]
    outcome = outcome_of(replace(headers, name, replacement), value)
    if isinstance(outcome, RequestError):
        field = outcome.field
        assert field is None or field in {*_KNOWN, "value"} or field.startswith("value.")


_ids = st.text(alphabet=st.characters(blacklist_categories=["Cc", "Cs"]), min_size=1, max_size=256)


@settings(max_examples=150, deadline=None)
@given(
    message_id=_ids,
    camera_id=_ids,
    part_id=st.none() | _ids,
    product_line=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True),
    time=st.none() | st.datetimes(timezones=st.timezones(), min_value=datetime(1970, 1, 2)),
)
def test_any_valid_request_round_trips(
    message_id: str, camera_id: str, part_id: str | None, product_line: str, time: datetime | None
) -> None:
    request = InspectionRequest(
        message_id=message_id,
        source="cam",
        time=time,
        product_line=product_line,
        camera_id=camera_id,
        part_id=part_id,
        content_type="image/bmp",
    )
    assert parse_request(build_request_headers(request), b"BM") == request


# --- CloudEvents SDK interop (binary mode) ----------------------------------------------------------

kafka = pytest.importorskip("cloudevents.core.bindings.kafka")
JSONFormat = pytest.importorskip("cloudevents.core.formats.json").JSONFormat
CloudEvent = pytest.importorskip("cloudevents.core.v1.event").CloudEvent


def test_sdk_reads_what_we_write(make_request: Callable[..., InspectionRequest]) -> None:
    request = make_request()
    message = kafka.KafkaMessage(headers=dict(build_request_headers(request)), key=b"cam-3", value=PNG_BYTES)
    event = kafka.from_binary(message, JSONFormat(), CloudEvent)
    assert event.get_id() == request.message_id
    assert event.get_source() == request.source
    assert event.get_type() == REQUEST_EVENT_TYPE
    assert event.get_specversion() == "1.0"
    assert event.get_time() == request.time
    assert event.get_datacontenttype() == "image/png"
    assert event.get_extension("productline") == "bottle"
    assert event.get_extension("cameraid") == "cam-3"
    assert event.get_extension("partid") == "SN-4711"
    assert event.get_extension("deadline") == "2026-11-26T12:00:05Z"
    assert event.get_data() == PNG_BYTES


def test_we_read_what_the_sdk_writes() -> None:
    event = CloudEvent(
        attributes={
            "id": "m-42",
            "source": "urn:cam:9",
            "type": REQUEST_EVENT_TYPE,
            "time": datetime(2026, 1, 1, 1, 2, 3, 456000, tzinfo=timezone(timedelta(hours=2))),
            "productline": "gear.v2",
            "cameraid": "cam-9",
            "partid": "P9",
            "deadline": "1764158405000",
            "datacontenttype": "image/jpeg",
        },
        data=b"\xff\xd8\xff\xe0",
    )
    message = kafka.to_binary(event, JSONFormat())
    parsed = parse_request(list(message.headers.items()), message.value)
    assert parsed.message_id == "m-42"
    assert parsed.time == datetime(2025, 12, 31, 23, 2, 3, 456000, tzinfo=UTC)
    assert (parsed.product_line, parsed.camera_id, parsed.part_id) == ("gear.v2", "cam-9", "P9")
    assert parsed.deadline == datetime(2025, 11, 26, 12, 0, 5, tzinfo=UTC)
    assert parsed.content_type == "image/jpeg"


def test_we_read_an_sdk_claim_check() -> None:
    event = CloudEvent(
        attributes={
            "id": "m-43",
            "source": "urn:cam:9",
            "type": REQUEST_EVENT_TYPE,
            "productline": "gear",
            "cameraid": "cam-9",
            "datacontenttype": "application/json",
        },
        data=VALID_CLAIM,
    )
    message = kafka.to_binary(event, JSONFormat())
    parsed = parse_request(list(message.headers.items()), message.value)
    assert parsed.claim_check == ClaimCheck(**VALID_CLAIM)
