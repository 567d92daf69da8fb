"""Hostile input: fuzzed and hand-made broken images, bombs, odd images, broken attributes, claim checks
to forbidden places, ids with path characters.

Unit level (hypothesis): ``decode_image``, ``parse_request`` and ``heatmap_key`` raise nothing but their
documented errors (``DecodeError``, ``RequestError``; ``heatmap_key`` never raises for any id and its key
stays inside the store root). End to end: every hostile record through a running worker ends as a dead
letter with the precise reason, or as a result for valid odd images; the worker's memory stays bounded
(a decoded bomb would need gigabytes) and it keeps serving afterwards.

What would make this fail: a decoder that trusts header sizes (MemoryError, or RSS in GB), any other
exception type escaping (a bug class the worker would only catch as ``processing-failed``), a claim
check that reads outside its root or to another bucket, a key built from an id that leaves the root.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.request import RequestError, parse_request
from tests.kafka_helpers import collect, header, produce
from tests.reliability import corpus
from tests.reliability.helpers import rss_bytes
from tests.worker_harness import request_record, running_worker
from worker.decode import DecodeError, decode_image
from worker.heatmaps import FileHeatmapStore, heatmap_key

TRIED = {"decode": 0, "parse": 0, "key": 0}
LIMITS = {"max_pixels": 4_000_000, "max_value_bytes": 4 * 1024 * 1024}
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


def _base_images() -> list[tuple[bytes, str]]:
    noise = np.random.default_rng(0).integers(0, 255, (32, 24, 3), dtype=np.uint8)
    return [(corpus.png(noise), "image/png"), (corpus.jpeg(noise), "image/jpeg"),
            (corpus.png(noise[:, :, 0]), "image/png"), (corpus.tiff_header(32, 24) + bytes(32 * 24), "image/tiff")]  # fmt: skip


BASES = _base_images()


def _decode(data: bytes, content_type: str | None) -> None:
    TRIED["decode"] += 1
    try:
        image = decode_image(data, content_type, **LIMITS)
    except DecodeError as exc:
        assert exc.reason and exc.detail  # noqa: PT017
        return
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.shape[0] * image.shape[1] <= LIMITS["max_pixels"]


@FUZZ
@given(
    data=st.binary(max_size=4096),
    content_type=st.sampled_from([None, "image/png", "image/jpeg", "image/tiff", "image/bmp", "x/y"]),
)
def test_decode_of_random_bytes_raises_only_decode_error(data: bytes, content_type: str | None) -> None:
    _decode(data, content_type)


@settings(FUZZ, max_examples=1000)
@given(
    base=st.sampled_from(range(len(BASES))),
    edits=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=24),
    cut=st.one_of(st.none(), st.integers(0, 1 << 20)),
)
def test_decode_of_mutated_images_raises_only_decode_error(
    base: int, edits: list[tuple[int, int]], cut: int | None
) -> None:
    data, content_type = BASES[base]
    buf = bytearray(data)
    for pos, byte in edits:
        buf[pos % len(buf)] = byte
    _decode(bytes(buf[: cut % (len(buf) + 1)] if cut is not None else buf), content_type)


_NAMES = st.sampled_from(["ce_id", "ce_source", "ce_type", "ce_specversion", "ce_productline", "ce_cameraid", "ce_partid",
                          "ce_time", "ce_deadline", "content-type", "CE_ID", "Content-Type", "x-trace"])  # fmt: skip
_VALUES = st.one_of(st.none(), st.binary(max_size=300), st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")),
                    st.sampled_from([b"1.0", b"space.inspection.request.v1", b"brick", b"application/json", b"image/png",
                                     b"2026-01-01T00:00:00Z", b"99999999999999999999", b"-1"]))  # fmt: skip


@FUZZ
@given(
    headers=st.lists(st.tuples(_NAMES | st.text(max_size=20), _VALUES), max_size=14),
    value=st.one_of(
        st.none(),
        st.binary(max_size=200),
        st.sampled_from([b"{}", b'{"image_uri": "s3://b/k", "sha256": "x"}', b"[" * 5000]),
    ),
)
def test_parse_request_raises_only_request_error(headers: list[tuple[str, bytes | None]], value: bytes | None) -> None:
    TRIED["parse"] += 1
    base = corpus.headers_for("fuzz")
    for hdrs in (
        headers,
        base + headers,
        [h for h in base if h[0] != headers[0][0]] + headers[:1] if headers else base,
    ):
        try:
            parse_request(hdrs, value)
        except RequestError as exc:
            assert exc.reason.value  # noqa: PT017


@FUZZ
@given(line=st.text(max_size=300), message_id=st.text(max_size=600))
def test_heatmap_key_of_any_id_stays_inside_the_store_root(tmp_path_factory, line: str, message_id: str) -> None:
    TRIED["key"] += 1
    root = tmp_path_factory.getbasetemp() / "heatmap-root"
    key = heatmap_key(line, datetime(2026, 11, 26, tzinfo=UTC), message_id, "png")
    assert key.count("/") == 4
    path = FileHeatmapStore(root).path_for(key)  # raises ValueError if it would leave the root
    assert path.is_relative_to(root.resolve())


@pytest.mark.parametrize(("real_width", "fake_width"), [(6000, 8), (20_000, 8)])
def test_tiff_whose_probe_and_decoder_would_disagree_is_refused(real_width: int, fake_width: int) -> None:
    # libtiff decodes the first of two ImageWidth tags: up to 20000x1000 pixels behind a 8x1000 header.
    data = corpus.tiff_repeated_width(real_width, fake_width, 1000)
    with pytest.raises(DecodeError) as info:
        decode_image(data, "image/tiff", **LIMITS)
    assert (info.value.reason, info.value.detail) == (
        "corrupt-image",
        "tiff: the first IFD repeats tag 256 (ImageWidth)",
    )


def test_zz_report_fuzz_counts() -> None:
    # Runs after the fuzz tests of this module (alphabetical order within the file is not guaranteed,
    # definition order is): prints how many inputs the unit fuzzers tried.
    print(f"hostile input, unit fuzz: {TRIED}")


@pytest.mark.kafka
@pytest.mark.redis
def test_hostile_records_end_as_precise_dead_letters_or_results(make_settings, topics, trained_model, tmp_path) -> None:
    rng = random.Random(6)
    claims, outside = tmp_path / "claims", tmp_path / "outside"
    good = corpus.png(np.random.default_rng(2).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    cases = (corpus.image_cases(rng, tmp_path) + corpus.attribute_cases(good)
             + corpus.claim_check_cases(good, claims, outside) + corpus.path_id_cases(good))  # fmt: skip
    settings = make_settings(
        topics, models={"root": str(trained_model.root), "preload": (trained_model.line,), "threads": 1},
        decode={**LIMITS, "claim_check_schemes": ("s3", "file"), "claim_check_buckets": ("allowed-bucket",),
                "claim_check_file_root": str(claims)},
        batching={"max_batch_size": 8, "max_wait_ms": 20}, heatmaps={"policy": "all"},
    )  # fmt: skip
    # The oracle for fuzzed cases: the unit-level parse + decode with the same limits.
    for i, case in enumerate(cases):
        if case.expected is None:
            try:
                request = parse_request(case.headers, case.value)
                decode_image(case.value or b"", request.content_type, **LIMITS)
                expected = "result"
            except (RequestError, DecodeError) as exc:
                expected = exc.reason if isinstance(exc, DecodeError) else exc.reason.value
            cases[i] = corpus.Case(case.name, case.headers, case.value, expected)
    expected = {c.name: c.expected for c in cases}
    n_results = sum(1 for e in expected.values() if e == "result")
    n_letters = len(cases) - n_results
    probe = request_record(None, line=trained_model.line, camera="after", message_id="still-serving", data=good)

    with running_worker(settings) as app:
        produce(
            settings,
            topics.requests,
            [request_record(None, line=trained_model.line, camera="w", message_id="warm", data=good)],
        )
        collect(settings, topics.results, expected=1, timeout_s=60)
        rss_before = rss_bytes()
        produce(settings, topics.requests, [(b"cam-h", c.value, c.headers) for c in cases])
        letters = collect(settings, topics.dlq, expected=n_letters, timeout_s=120, idle_s=1.0)
        results = collect(settings, topics.results, expected=1 + n_results, timeout_s=120)
        rss_after = rss_bytes()
        produce(settings, topics.requests, [probe])
        final = collect(settings, topics.results, expected=2 + n_results, timeout_s=60)
        assert app.worker._fatal is None
    import json

    got: dict[str, str] = {}
    for d in letters:
        got[_ce_id(d) or _name_of(d, cases)] = header(d, "error-reason") or "?"
    for r in results:
        got[json.loads(r.value)["message_id"]] = "result"
    got.pop("warm", None)
    wrong = {k: (expected.get(k), v) for k, v in got.items() if expected.get(k) != v}
    missing = sorted(set(expected) - set(got))
    assert not wrong and not missing, f"wrong outcome (expected, got): {wrong}; missing: {missing}"
    for r in results:
        body = json.loads(r.value)
        if body["heatmap"]:  # ids with path characters: the heatmap stays inside the store root
            store_root = Path(settings.heatmaps.store_uri.removeprefix("file://")).resolve()
            assert Path(body["heatmap"]["uri"].removeprefix("file://")).resolve().is_relative_to(store_root)
    assert "still-serving" in {json.loads(r.value)["message_id"] for r in final}
    growth_mb = (rss_after - rss_before) / 2**20
    print(f"hostile input, end to end: {len(cases)} records, {n_letters} dead letters, {n_results} results, "
          f"RSS growth {growth_mb:.1f} MiB")  # fmt: skip
    assert growth_mb < 300, f"RSS grew by {growth_mb:.0f} MiB"  # one decoded bomb alone would be GBs


def _ce_id(letter) -> str | None:
    ids = [v for k, v in letter.headers or [] if k == "ce_id"]
    if len(ids) != 1 or ids[0] is None:
        return None
    try:
        return ids[0].decode("utf-8")
    except UnicodeDecodeError:
        return None


def _name_of(letter, cases: list[corpus.Case]) -> str:
    """Dead letters of records without a usable ce_id are matched by their original headers."""
    for c in cases:
        if list(letter.headers or [])[: len(c.headers)] == [(k, v) for k, v in c.headers if v is not None] and (
            letter.value or b""
        ) == (c.value or b""):
            return c.name
    return f"unmatched-{letter.offset}"


class _RawName(str):
    """A header name kafka-python's producer writes as bytes that are not UTF-8 (what a non-Java client may send)."""

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return b"\xff\xfe" + str.encode(self, encoding, errors)


@pytest.mark.kafka
@pytest.mark.redis
def test_a_header_name_that_is_not_utf8_neither_stops_the_partition_nor_the_worker(
    make_settings, topics, trained_model
) -> None:
    # Before the fix kafka-python raised CorruptRecordError from every poll at that offset: the worker exited,
    # and each worker that took the partition over did the same.
    good = corpus.png(np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    settings = make_settings(topics, models={"root": str(trained_model.root), "preload": (trained_model.line,)})
    records = []
    for message_id, data in (("odd-name-ok", good), ("odd-name-corrupt", good[:40]), ("after", good)):
        key, value, headers = request_record(
            None, line=trained_model.line, camera="c1", message_id=message_id, data=data
        )
        records.append((key, value, [*headers, (_RawName("x-vendor"), b"1")] if message_id != "after" else headers))
    with running_worker(settings) as app:
        produce(settings, topics.requests, records)
        results = collect(settings, topics.results, expected=2, timeout_s=60)
        letters = collect(settings, topics.dlq, expected=1, timeout_s=60)
        assert app.worker._fatal is None
    import json

    assert sorted(json.loads(r.value)["message_id"] for r in results) == ["after", "odd-name-ok"]
    assert header(letters[0], "ce_id") == "odd-name-corrupt" and header(letters[0], "error-reason") == "corrupt-image"
    assert ("\ufffd\ufffdx-vendor", b"1") in letters[0].headers  # kept, as the Java client would read it


@pytest.mark.kafka
@pytest.mark.redis
def test_snappy_compressed_requests_are_scored(make_settings, topics, trained_model) -> None:
    # kafka-python reads snappy batches only with python-snappy installed; without it poll() raised
    # UnsupportedCodecError at that offset, for every worker that took the partition over.
    from kafka import KafkaProducer

    good = corpus.png(np.random.default_rng(4).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    settings = make_settings(topics, models={"root": str(trained_model.root), "preload": (trained_model.line,)})
    producer = KafkaProducer(**settings.kafka.client_kwargs(), acks="all", compression_type="snappy")
    try:
        for i in range(3):
            key, value, headers = request_record(
                None, line=trained_model.line, camera="c1", message_id=f"snappy-{i}", data=good
            )
            producer.send(topics.requests, key=key, value=value, headers=headers)
        producer.flush(30)
    finally:
        producer.close(timeout=5)
    with running_worker(settings) as app:
        results = collect(settings, topics.results, expected=3, timeout_s=60)
        assert app.worker._fatal is None
    import json

    assert sorted(json.loads(r.value)["message_id"] for r in results) == ["snappy-0", "snappy-1", "snappy-2"]
