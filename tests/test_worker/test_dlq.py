"""The pure parts of ``space dlq``: time windows, letter parsing, filters, the stop rule and replay bookkeeping."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from schemas.deadletter import DeadLetterInfo, DeadLetterReason, build_dead_letter
from worker.cli import main as cli_main
from worker.dlq import (
    REPLAY_HEADER,
    LetterFilter,
    ScanProgress,
    Summary,
    check_reasons,
    parse_when,
    read_dead_letter,
    replay_dead_letters,
)
from worker.errors import SpaceError

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
REQUEST_HEADERS = [("ce_id", b"m-1"), ("ce_productline", b"brick"), ("content-type", b"image/png")]


def make_letter(*, reason: DeadLetterReason = DeadLetterReason.MODEL_UNAVAILABLE, value: bytes = b"\x89PNG....",
                max_value_bytes: int = 1024, offset: int = 7, headers: list[tuple[str, bytes]] | None = None,
                timestamp_ms: int = 1_000):  # type: ignore[no-untyped-def]  # fmt: skip
    info = DeadLetterInfo(error_class="ModelUnavailable", reason=reason, detail="v1 failed to load", worker_id="w-1",
                          time=NOW, source_topic="inspection.requests", source_partition=2, source_offset=40)  # fmt: skip
    dead = build_dead_letter(headers or REQUEST_HEADERS, value, info, max_value_bytes=max_value_bytes)
    return read_dead_letter("inspection.dlq", 0, offset, timestamp_ms, b"cam-1", dead.value, dead.headers)


def test_parse_when_reads_ages_and_rfc3339() -> None:
    assert parse_when("90m", now=NOW) == NOW - timedelta(minutes=90)
    assert parse_when("2h", now=NOW) == NOW - timedelta(hours=2)
    assert parse_when("1.5d", now=NOW) == NOW - timedelta(hours=36)
    assert parse_when("45s", now=NOW) == NOW - timedelta(seconds=45)
    assert parse_when("2026-12-01T08:00:00Z", now=NOW) == datetime(2026, 12, 1, 8, tzinfo=UTC)
    assert parse_when("2026-12-01T09:00:00+01:00", now=NOW) == datetime(2026, 12, 1, 8, tzinfo=UTC)
    assert parse_when("2026-12-01T08:00:00", now=NOW) == datetime(2026, 12, 1, 8, tzinfo=UTC)  # no offset: UTC
    for bad in ("yesterday", "5 h", "-2h", "2w", "", "99999999999d"):
        with pytest.raises(SpaceError, match="cannot read"):
            parse_when(bad, now=NOW)
    with pytest.raises(SpaceError, match="before 1970"):
        parse_when("1969-12-31T00:00:00Z", now=NOW)


def test_a_dead_letter_is_read_with_its_request_attributes() -> None:
    letter = make_letter()
    assert letter.info is not None and letter.reason == "model-unavailable"
    assert (letter.product_line, letter.message_id, letter.ref) == ("brick", "m-1", "inspection.dlq/0/7")
    assert letter.replay_blocker() is None


def test_broken_error_headers_are_reported_not_raised() -> None:
    letter = read_dead_letter("dlq", 1, 3, 0, None, b"x", [("ce_id", b"m"), ("error-reason", b"no-such-reason")])
    assert letter.info is None and letter.reason == "unreadable" and letter.problem
    assert letter.replay_blocker() == "unreadable-error-headers"
    assert (letter.product_line, letter.message_id) == ("-", "m")


def test_a_truncated_value_is_not_replayable() -> None:
    assert make_letter(value=b"\x89PNG-long-value", max_value_bytes=4).replay_blocker() == "value-truncated"


def test_replay_headers_drop_error_headers_and_earlier_replay_marks_in_order() -> None:
    headers = [*REQUEST_HEADERS, (REPLAY_HEADER, b"inspection.dlq/0/1"), ("traceparent", b"00-abc")]
    letter = make_letter(headers=headers, offset=9)
    assert letter.replay_headers() == [
        *REQUEST_HEADERS, ("traceparent", b"00-abc"), (REPLAY_HEADER, b"inspection.dlq/0/9"),
    ]  # fmt: skip


def test_filters_and_reason_check() -> None:
    letter = make_letter()
    assert LetterFilter().matches(letter)
    assert LetterFilter(frozenset({"model-unavailable"}), frozenset({"brick"})).matches(letter)
    assert not LetterFilter(frozenset({"corrupt-image"})).matches(letter)
    assert not LetterFilter(product_lines=frozenset({"coins"})).matches(letter)
    assert check_reasons(["model-unavailable", "corrupt-image"]) == {"model-unavailable", "corrupt-image"}
    with pytest.raises(SpaceError, match="unknown dead-letter reason model-unavailble"):
        check_reasons(["model-unavailble"])


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_scan_ends_at_the_end_offsets_only_after_the_idle_wait() -> None:
    clock = FakeClock()
    progress = ScanProgress({0: 5, 1: 3}, idle_s=2.0, clock=clock)
    assert not progress.finished({0: 5, 1: 3})  # at the ends, but the topic has not been quiet for 2 s
    clock.now = 2.0
    assert progress.finished({0: 5, 1: 3})
    assert not progress.finished({0: 5, 1: 2})  # partition 1 still behind its end offset
    progress.saw_records()
    assert not progress.finished({0: 9, 1: 3})  # records arrived: the wait starts again (Tansu's ends lag)
    clock.now = 4.0
    assert progress.finished({0: 9, 1: 3})


def test_a_partition_that_never_reaches_its_end_is_reported_as_stalled() -> None:
    clock = FakeClock()
    progress = ScanProgress({0: 5, 1: 3}, idle_s=1.0, clock=clock)
    clock.now = 29.0
    assert progress.stalled({0: 5, 1: 1}, stall_s=30.0) == []  # not yet
    clock.now = 30.0
    assert progress.stalled({0: 5, 1: 1}, stall_s=30.0) == [1]
    assert progress.stalled({0: 5, 1: 3}, stall_s=30.0) == []  # at the ends: finished, not stalled
    progress.saw_records()
    assert progress.stalled({0: 5, 1: 1}, stall_s=30.0) == []  # a record resets the wait


def test_a_partition_past_the_cutoff_is_done_whatever_its_position() -> None:
    clock = FakeClock()
    progress = ScanProgress({0: 100, 1: 100}, idle_s=1.0, clock=clock)
    progress.passed_cutoff(0)
    progress.passed_cutoff(1)
    assert progress.done(0) and progress.finished({0: 3, 1: 4})  # no idle wait needed: both hit the cutoff


class FakeFuture:
    def __init__(self, meta: Any = None, error: Exception | None = None) -> None:
        self.meta, self.error = meta, error

    def get(self, timeout: float | None = None) -> Any:
        if self.error is not None:
            raise self.error
        return self.meta


def test_replay_sends_replayable_letters_and_counts_skips() -> None:
    foreign = make_letter(offset=4)
    assert foreign.info is not None
    foreign = replace(foreign, info=foreign.info.model_copy(update={"source_topic": "inspection.results"}))
    letters = [make_letter(offset=1), make_letter(offset=2, value=b"0123456789", max_value_bytes=4),
               make_letter(offset=3), foreign]  # fmt: skip
    sent: list[tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]] = []
    seen: list[tuple[str, str, Any]] = []

    def send(topic: str, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]) -> FakeFuture:
        sent.append((topic, key, value, headers))
        return FakeFuture(SimpleNamespace(partition=0, offset=len(sent)))

    report = replay_dead_letters(letters, send, to_topic="inspection.requests", source_topic="inspection.requests",
                                 on_replayed=lambda ltr, t, m: seen.append((ltr.ref, t, m.offset)),
                                 flush_every=1)  # fmt: skip
    assert report.replayed == 2 and dict(report.skipped) == {"value-truncated": 1, "other-source-topic": 1}
    assert [s[0] for s in sent] == ["inspection.requests", "inspection.requests"]
    assert seen == [("inspection.dlq/0/1", "inspection.requests", 1), ("inspection.dlq/0/3", "inspection.requests", 2)]
    assert sent[0][1] == b"cam-1" and sent[0][2] == b"\x89PNG...."

    dry = replay_dead_letters(letters, None, to_topic="other", source_topic=None)  # --to: any source topic
    assert dry.replayed == 3 and dict(dry.skipped) == {"value-truncated": 1}


def test_a_chain_is_replayed_once_whatever_order_its_letters_come_in() -> None:
    """An original and the re-dead-letter of its replay (space-replay-of names the original) in one window, or a
    replay failing again while the run still reads (a worker clock behind the operator's): sent once."""
    original = make_letter(offset=1)
    again = make_letter(offset=9, headers=[*REQUEST_HEADERS, (REPLAY_HEADER, b"inspection.dlq/0/1")])
    assert again.replay_of == "inspection.dlq/0/1"
    for order in ([original, again], [again, original]):
        report = replay_dead_letters(order, None, to_topic="t", source_topic=None)
        assert report.replayed == 1 and dict(report.skipped) == {"already-replayed": 1}


def test_a_request_that_failed_after_two_replays_goes_out_once_in_any_order() -> None:
    # A failed, its replay failed as B (space-replay-of A), B's replay failed as C (space-replay-of B). The
    # chain check looked one step back: A then B then C sent A and C, the same request twice.
    from itertools import permutations

    headers = [("ce_source", b"plant/line-3/cam-1"), *REQUEST_HEADERS]
    a = make_letter(offset=1, headers=headers)
    b = make_letter(offset=5, headers=[*headers, (REPLAY_HEADER, b"inspection.dlq/0/1")])
    c = make_letter(offset=9, headers=[*headers, (REPLAY_HEADER, b"inspection.dlq/0/5")])
    for order in permutations([a, b, c]):
        report = replay_dead_letters(order, None, to_topic="t", source_topic=None)
        assert report.replayed == 1 and dict(report.skipped) == {"already-replayed": 2}, [x.ref for x in order]
    summary = Summary()
    for letter in (a, b, c):
        summary.add(letter)
    assert summary.render().splitlines()[-1].startswith("total 3 dead letters, 1 replayable")


def test_the_summary_counts_as_replayable_what_a_replay_would_send() -> None:
    foreign = make_letter(offset=4)
    assert foreign.info is not None
    foreign = replace(foreign, info=foreign.info.model_copy(update={"source_topic": "inspection.results"}))
    from worker.dlq import ReplayFilter

    summary = Summary(replay_filter=ReplayFilter("inspection.requests"))
    for letter in (make_letter(offset=1), foreign):
        summary.add(letter)
    assert summary.render().splitlines()[-1].startswith("total 2 dead letters, 1 replayable")


def test_a_failed_send_stops_the_replay_and_every_handed_record_is_reported() -> None:
    ok = SimpleNamespace(partition=0, offset=0)
    futures = iter([FakeFuture(ok), FakeFuture(error=TimeoutError("no ack")), FakeFuture(ok)])
    letters = [make_letter(offset=1), make_letter(offset=2), make_letter(offset=3), make_letter(offset=4)]
    seen: list[str] = []
    with pytest.raises(SpaceError, match=r"1 failed \(first inspection.dlq/0/2 to t: TimeoutError: no ack\); 2 repl"):
        replay_dead_letters(letters, lambda *a: next(futures), to_topic="t", source_topic=None, flush_every=3,
                            on_replayed=lambda ltr, t, m: seen.append(ltr.ref))  # fmt: skip
    assert seen == ["inspection.dlq/0/1", "inspection.dlq/0/3"]  # the third was handed over: awaited, reported

    def send(*args: object) -> FakeFuture:  # the producer itself raises (max_block_ms passed) on the third
        if len(sent) == 2:
            raise TimeoutError("metadata not available")
        sent.append(args)
        return FakeFuture(ok)

    sent: list[object] = []
    with pytest.raises(SpaceError, match=r"first inspection.dlq/0/3 to t: TimeoutError: metadata.*; 2 replayed"):
        replay_dead_letters(letters, send, to_topic="t", source_topic=None)
    assert len(sent) == 2  # nothing more was sent after the failure


def test_records_sent_before_reading_fails_are_still_awaited_and_reported() -> None:
    def letters() -> Any:
        yield make_letter(offset=1)
        yield make_letter(offset=2)
        raise ConnectionError("broker went away")

    seen: list[str] = []
    with pytest.raises(ConnectionError):
        replay_dead_letters(letters(), lambda *a: FakeFuture(SimpleNamespace(partition=0, offset=0)), to_topic="t",
                            source_topic=None, on_replayed=lambda ltr, t, m: seen.append(ltr.ref))  # fmt: skip
    assert seen == ["inspection.dlq/0/1", "inspection.dlq/0/2"]


def test_header_text_is_escaped_for_the_terminal() -> None:
    letter = make_letter(headers=[("ce_id", b"m\x1b[2J"), ("ce_productline", b"brick\ntotal 0 dead letters")])
    assert (letter.message_id, letter.product_line) == ("m\\x1b[2J", "brick\\ntotal 0 dead letters")
    summary = Summary()
    summary.add(letter)
    assert len(summary.render().splitlines()) == 3


def test_summary_counts_by_reason_and_line() -> None:
    summary = Summary()
    for letter in [make_letter(timestamp_ms=2_000, offset=1), make_letter(timestamp_ms=1_000, offset=2),
                   make_letter(reason=DeadLetterReason.CORRUPT_IMAGE, value=b"0123456789", max_value_bytes=4)]:  # fmt: skip
        summary.add(letter)
    table = summary.render().splitlines()
    assert table[0].split() == ["reason", "product_line", "count", "replayable"]
    assert table[1].split() == ["model-unavailable", "brick", "2", "2"]
    assert table[2].split() == ["corrupt-image", "brick", "1", "0"]
    assert table[3] == "total 3 dead letters, 2 replayable, from 1970-01-01T00:00:01Z to 1970-01-01T00:00:02Z"


def test_records_without_a_timestamp_stay_out_of_the_span() -> None:
    summary = Summary()
    summary.add(make_letter(timestamp_ms=-1))  # a message-format v0 record: no time, not 1969
    assert summary.render().splitlines()[-1] == "total 1 dead letters, 1 replayable, 1 without a timestamp"
    summary.add(make_letter(timestamp_ms=3_000, offset=8))
    assert summary.render().splitlines()[-1] == (
        "total 2 dead letters, 2 replayable, from 1970-01-01T00:00:03Z to 1970-01-01T00:00:03Z, 1 without a timestamp"
    )


def test_bad_options_fail_before_touching_kafka(monkeypatch, capsys) -> None:
    monkeypatch.setenv("SPACE_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:1")  # nothing listens: must not be reached
    assert cli_main(["dlq", "replay", "--reason", "model-unavailble"]) != 0
    assert "unknown dead-letter reason model-unavailble" in capsys.readouterr().err
    assert cli_main(["dlq", "summary", "--since", "yesterday"]) != 0
    assert "cannot read 'yesterday' as a time" in capsys.readouterr().err
    assert cli_main(["dlq", "summary", "--since", "1h", "--until", "2h"]) != 0
    assert "the window is empty" in capsys.readouterr().err
    assert cli_main(["dlq", "summary", "--idle-s", "0"]) != 0
    assert "--idle-s must be > 0" in capsys.readouterr().err


def test_an_unreachable_broker_fails_the_command_after_the_bootstrap_timeout(monkeypatch, capsys) -> None:
    from worker.settings import KafkaSettings

    assert KafkaSettings(bootstrap_timeout_ms=1000).client_kwargs()["bootstrap_timeout_ms"] == 1000
    monkeypatch.setenv("SPACE_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:1")
    monkeypatch.setenv("SPACE_KAFKA__BOOTSTRAP_TIMEOUT_MS", "1000")
    assert cli_main(["dlq", "summary"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        "space: error: reading dead letters from inspection.dlq at 127.0.0.1:1 failed: KafkaTimeoutError: "
        "Unable to bootstrap from ['127.0.0.1:1'] (tried for SPACE_KAFKA__BOOTSTRAP_TIMEOUT_MS=1000 ms)"
    )


def test_a_scan_whose_partition_never_fetches_fails_instead_of_waiting_forever() -> None:
    from worker.dlq import scan_dead_letters

    clock = FakeClock()

    class StuckConsumer:  # partition 0 has records up to offset 5, but no fetch ever returns (leader away)
        def partitions_for_topic(self, topic: str) -> set[int]:
            return {0}

        def assign(self, partitions: list[Any]) -> None: ...
        def seek_to_beginning(self, *partitions: Any) -> None: ...
        def end_offsets(self, partitions: list[Any]) -> dict[Any, int]:
            return {tp: 5 for tp in partitions}

        def position(self, partition: Any) -> int:
            return 0

        def poll(self, timeout_ms: int = 0) -> dict[Any, list[Any]]:
            clock.now += 1.0
            return {}

    with pytest.raises(SpaceError, match=r"dlq made no progress for 30 s .*0 at 0 of 5"):
        list(scan_dead_letters(StuckConsumer(), "dlq", since_ms=None, cutoff_ms=10**13, idle_s=1.0, clock=clock))  # type: ignore[arg-type]


def test_record_size_bound_is_never_below_what_the_producer_counts() -> None:
    # kafka-python refuses a record whose estimate exceeds max_request_size; the dead letter's bound must
    # be at least that estimate, or a letter it lets through could still be refused.
    from kafka.record.default_records import DefaultRecordBatchBuilder

    from schemas import record_size_bytes

    cases = [
        (None, b"", []),
        (b"k" * 300, b"v" * 70_000, [("ce_id", b"m" * 200), ("x", None), ("\u00e9t\u00e9", b"\x00" * 5)]),
        (b"cam-1", b"v" * 20, [(f"h{i}", b"x" * i) for i in range(300)]),
    ]
    for key, value, headers in cases:
        assert record_size_bytes(key, value, headers) >= DefaultRecordBatchBuilder.estimate_size_in_bytes(
            key, value, [(name, v or b"") for name, v in headers]
        )


def test_a_letter_with_headers_dropped_is_not_replayed() -> None:
    info = DeadLetterInfo(error_class="DecodeError", reason=DeadLetterReason.CORRUPT_IMAGE, detail="truncated",
                          worker_id="w-1", time=NOW, source_topic="inspection.requests", source_partition=2,
                          source_offset=40)  # fmt: skip
    headers = [*REQUEST_HEADERS, ("x-blob", b"b" * 4_000)]
    dead = build_dead_letter(headers, b"\x89PNG....", info, max_value_bytes=1024, max_record_bytes=2_500)
    letter = read_dead_letter("inspection.dlq", 0, 8, 1_000, b"cam-1", dead.value, dead.headers)
    assert letter.info is not None and letter.info.headers_dropped == 1
    assert letter.replay_blocker() == "headers-dropped"
    assert make_letter().replay_blocker() is None


class _ListConsumer:
    """Partition 0 holds ``records`` (offset, timestamp ms); each poll returns the next one."""

    def __init__(self, records: list[tuple[int, int]], clock: FakeClock) -> None:
        self.records, self.clock, self.pos = records, clock, 0

    def partitions_for_topic(self, topic: str) -> set[int]:
        return {0}

    def assign(self, partitions: list[Any]) -> None: ...
    def seek_to_beginning(self, *partitions: Any) -> None: ...
    def pause(self, *partitions: Any) -> None: ...
    def end_offsets(self, partitions: list[Any]) -> dict[Any, int]:
        return {tp: len(self.records) for tp in partitions}

    def position(self, partition: Any) -> int:
        return self.pos

    def poll(self, timeout_ms: int = 0) -> dict[Any, list[Any]]:
        from kafka import TopicPartition

        self.clock.now += 0.1
        if self.pos >= len(self.records):
            return {}
        offset, timestamp = self.records[self.pos]
        self.pos += 1
        dead = build_dead_letter(REQUEST_HEADERS, b"v", DeadLetterInfo(error_class="E", reason=DeadLetterReason.CORRUPT_IMAGE, detail="d", worker_id="w", time=NOW, source_topic="inspection.requests", source_partition=0, source_offset=offset), max_value_bytes=10)  # fmt: skip
        rec = SimpleNamespace(offset=offset, timestamp=timestamp, key=b"k", value=dead.value, headers=dead.headers)
        return {TopicPartition("dlq", 0): [rec]}


def test_a_letter_stamped_past_the_cutoff_does_not_hide_the_ones_after_it() -> None:
    # A worker whose clock runs ahead wrote offset 1 "in the future": the partition ended there, and offsets
    # 2 and 3 (inside the window) were never read, by summary nor replay.
    from worker.dlq import scan_dead_letters

    clock = FakeClock()
    consumer = _ListConsumer([(0, 1_000), (1, 9_000), (2, 2_000), (3, 3_000)], clock)
    got = list(scan_dead_letters(consumer, "dlq", since_ms=None, cutoff_ms=5_000, idle_s=1.0, clock=clock))  # type: ignore[arg-type]
    assert [letter.offset for letter in got] == [0, 2, 3]


def test_time_the_caller_spends_on_a_letter_is_not_a_stalled_partition() -> None:
    # A dry run piped into a pager nobody scrolls, or a flush of acknowledgements taking over 30 s: the
    # stall clock ran meanwhile and the scan aborted halfway (a re-run then duplicated what went out).
    from worker.dlq import scan_dead_letters

    clock = FakeClock()
    consumer = _ListConsumer([(o, 1_000 + o) for o in range(4)], clock)
    seen = []
    for letter in scan_dead_letters(consumer, "dlq", since_ms=None, cutoff_ms=10**13, idle_s=1.0, clock=clock):  # type: ignore[arg-type]
        seen.append(letter.offset)
        clock.now += 45.0  # the caller is slow
    assert seen == [0, 1, 2, 3]
