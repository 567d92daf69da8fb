"""Reading and replaying the dead-letter topic (the library behind ``space dlq``).

A dead letter is the original request (value, key, headers) plus ``error-*`` headers
(:mod:`schemas.deadletter`). Replaying one produces the original record again, ``error-*`` headers
removed and a ``space-replay-of`` header naming the dead letter, to the requests topic (letters from
another ``error-source-topic`` are skipped unless the operator names a target).

Reading stops on its own, also on a dead-letter topic that workers keep writing to:

* the window is ``[since, cutoff)`` in record timestamps; ``cutoff`` is at the latest the moment the
  command started, so records dead-lettered *during* a replay (a replayed image failing again) are
  never read back and replayed in a loop;
* a partition is finished when it yields a record at or past ``cutoff``, or when its position has
  reached the end offset read at the start and nothing arrived for ``idle_s`` (the idle wait covers
  brokers whose end offsets lag, such as the embedded Tansu);
* a partition that stays short of its end offset with nothing arriving for ``max(30 s, 10 idle_s)``
  (its leader unavailable) ends the scan with an error instead of waiting forever.

:class:`ScanProgress` holds that rule as plain logic with an injected clock.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from schemas import header_text
from schemas.deadletter import DeadLetterInfo, DeadLetterReason, is_error_header, parse_dead_letter_headers
from worker.errors import SpaceError

#: Header added to a replayed request: ``<dlq topic>/<partition>/<offset>`` of the dead letter it came from.
REPLAY_HEADER = "space-replay-of"

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h|d)$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def parse_when(text: str, *, now: datetime) -> datetime:
    """A point in time: RFC 3339 (``2026-12-01T08:00:00Z``; no offset means UTC) or an age (``90m``, ``2h``, ``3d``).

    Raises:
        SpaceError: The text is neither.
    """
    match = _DURATION.match(text.strip())
    try:
        if match:
            when = now - timedelta(seconds=float(match.group(1)) * _UNIT_S[match.group(2)])
        else:
            when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except (ValueError, OverflowError):
        raise SpaceError(
            f"cannot read {text!r} as a time: use RFC 3339 (2026-12-01T08:00:00Z) or an age (45s, 90m, 2h, 3d)"
        ) from None
    when = when if when.tzinfo is not None else when.replace(tzinfo=UTC)
    if when < _EPOCH:
        raise SpaceError(f"{text!r} is before 1970: Kafka record times start at the Unix epoch")
    return when


def to_ms(when: datetime) -> int:
    """Kafka timestamp (ms since the epoch) of an aware datetime."""
    return int(when.timestamp() * 1000)


@dataclass(frozen=True)
class DeadLetterRecord:
    """One record of the dead-letter topic, its ``error-*`` headers parsed."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    info: DeadLetterInfo | None  # None when the error-* headers cannot be read (``problem`` says why)
    problem: str | None = None

    @property
    def reason(self) -> str:
        """The ``error-reason`` code, or ``unreadable`` when the error headers are broken."""
        return self.info.reason.value if self.info is not None else "unreadable"

    @property
    def product_line(self) -> str:
        """The request's ``ce_productline`` header, or ``-`` when it has none."""
        return _printable(header_text(self.headers, "ce_productline") or "-")

    @property
    def message_id(self) -> str:
        """The request's ``ce_id`` header, or ``-``."""
        return _printable(header_text(self.headers, "ce_id") or "-")

    @property
    def replay_of(self) -> str | None:
        """The ``space-replay-of`` header: the dead letter this record was a replay of, or None."""
        return header_text(self.headers, REPLAY_HEADER)

    @property
    def identity(self) -> tuple[str, str] | None:
        """The request's CloudEvents identity (``ce_source``, ``ce_id``), or None when a header is missing."""
        source, event_id = header_text(self.headers, "ce_source"), header_text(self.headers, "ce_id")
        return (source, event_id) if source is not None and event_id is not None else None

    @property
    def ref(self) -> str:
        """``<topic>/<partition>/<offset>``: where this dead letter is."""
        return f"{self.topic}/{self.partition}/{self.offset}"

    def replay_blocker(self) -> str | None:
        """Why this dead letter cannot be replayed, or None.

        ``value-truncated`` or ``headers-dropped`` (an incomplete record), ``unreadable-error-headers``.
        """
        if self.info is None:
            return "unreadable-error-headers"
        if self.info.value_truncated_from is not None:
            return "value-truncated"
        if self.info.headers_dropped is not None:
            return "headers-dropped"
        return None

    def replay_headers(self) -> list[tuple[str, bytes]]:
        """The original headers: ``error-*`` and any earlier ``space-replay-of`` removed, this one's appended."""
        kept = [(k, v) for k, v in self.headers if not is_error_header(k) and k.lower() != REPLAY_HEADER]
        return [*kept, (REPLAY_HEADER, self.ref.encode())]


def _printable(text: str) -> str:
    """Header text for a terminal: control characters escaped (a header is whatever a sender wrote)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def read_dead_letter(topic: str, partition: int, offset: int, timestamp_ms: int, key: bytes | None,
                     value: bytes | None, headers: Iterable[tuple[str, bytes | None]]) -> DeadLetterRecord:  # fmt: skip
    """Wrap one consumed record; broken ``error-*`` headers are reported, not raised."""
    clean = tuple((k, b"" if v is None else bytes(v)) for k, v in headers)
    try:
        info: DeadLetterInfo | None = parse_dead_letter_headers(clean)
        problem = None
    except ValueError as exc:
        info, problem = None, str(exc).splitlines()[0]
    return DeadLetterRecord(topic, partition, offset, timestamp_ms, key, value, clean, info, problem)


@dataclass(frozen=True)
class LetterFilter:
    """Which dead letters a command acts on; an empty set means any."""

    reasons: frozenset[str] = frozenset()
    product_lines: frozenset[str] = frozenset()

    def matches(self, letter: DeadLetterRecord) -> bool:
        """Whether ``letter`` passes the reason and product-line filters."""
        if self.reasons and letter.reason not in self.reasons:
            return False
        return not self.product_lines or letter.product_line in self.product_lines


def check_reasons(reasons: Iterable[str]) -> frozenset[str]:
    """The reason codes, each checked against :class:`DeadLetterReason` (``SpaceError`` names a bad one)."""
    known = {r.value for r in DeadLetterReason}
    chosen = frozenset(reasons)
    unknown = sorted(chosen - known)
    if unknown:
        raise SpaceError(f"unknown dead-letter reason {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return chosen


@dataclass
class ScanProgress:
    """When reading the dead-letter topic is done (see the module docstring); pure logic, injected clock.

    ``end_offsets`` are the partitions' end offsets read at the start.
    """

    end_offsets: Mapping[int, int]
    idle_s: float
    clock: Callable[[], float] = time.monotonic
    _done: set[int] = field(default_factory=set)
    _last_record_at: float = field(init=False)

    def __post_init__(self) -> None:
        self._last_record_at = self.clock()

    def saw_records(self) -> None:
        """Records arrived (from any partition): the idle wait starts again."""
        self._last_record_at = self.clock()

    def passed_cutoff(self, partition: int) -> None:
        """``partition`` yielded a record at or past the cutoff: nothing more to read there."""
        self._done.add(partition)

    def done(self, partition: int) -> bool:
        """Whether ``partition`` was finished by :meth:`passed_cutoff`."""
        return partition in self._done

    def stalled(self, positions: Mapping[int, int], stall_s: float) -> list[int]:
        """Partitions still short of their end offset after ``stall_s`` without a record (else empty)."""
        if self.clock() - self._last_record_at < stall_s:
            return []
        return [p for p, end in self.end_offsets.items() if p not in self._done and positions.get(p, 0) < end]

    def finished(self, positions: Mapping[int, int]) -> bool:
        """Every partition is past the cutoff, or at its start-time end offset with the topic idle."""
        idle = self.clock() - self._last_record_at >= self.idle_s
        for partition, end in self.end_offsets.items():
            if partition in self._done:
                continue
            if not idle or positions.get(partition, 0) < end:
                return False
        return True


class _Consumer(Protocol):
    def partitions_for_topic(self, topic: str) -> set[int] | None: ...
    def assign(self, partitions: list[Any]) -> None: ...
    def offsets_for_times(self, timestamps: dict[Any, int]) -> dict[Any, Any]: ...
    def end_offsets(self, partitions: list[Any]) -> dict[Any, int]: ...
    def seek(self, partition: Any, offset: int) -> None: ...
    def seek_to_beginning(self, *partitions: Any) -> None: ...
    def seek_to_end(self, *partitions: Any) -> None: ...
    def pause(self, *partitions: Any) -> None: ...
    def position(self, partition: Any) -> int: ...
    def poll(self, timeout_ms: int = 0) -> dict[Any, list[Any]]: ...


def scan_dead_letters(
    consumer: _Consumer, topic: str, *, since_ms: int | None, cutoff_ms: int, idle_s: float = 3.0,
    poll_timeout_ms: int = 200, clock: Callable[[], float] = time.monotonic,
) -> Iterator[DeadLetterRecord]:  # fmt: skip
    """Yield the dead letters of ``topic`` with ``since_ms <= timestamp < cutoff_ms``, partition by partition in order.

    ``consumer`` is a group-less ``KafkaConsumer``; this assigns it every partition of ``topic``.

    Raises:
        SpaceError: The topic does not exist.
    """
    from kafka import TopicPartition

    partitions = sorted(consumer.partitions_for_topic(topic) or ())
    if not partitions:
        raise SpaceError(f"topic {topic} does not exist (set SPACE_KAFKA__DLQ_TOPIC or pass --topic)")
    tps = [TopicPartition(topic, p) for p in partitions]
    consumer.assign(tps)
    if since_ms is None:
        consumer.seek_to_beginning(*tps)
    else:  # a shortcut on Kafka; brokers that answer 0 (Tansu) only cost a longer scan, the filter below decides
        found = consumer.offsets_for_times({tp: since_ms for tp in tps})
        for tp in tps:
            hit = found.get(tp)
            if hit is None:
                consumer.seek_to_end(tp)
            else:
                consumer.seek(tp, hit.offset)
    ends = consumer.end_offsets(tps)
    progress = ScanProgress({tp.partition: ends.get(tp, 0) for tp in tps}, idle_s, clock)
    stall_s = max(30.0, 10 * idle_s)
    while not progress.finished(positions := {tp.partition: consumer.position(tp) for tp in tps}):
        stuck = progress.stalled(positions, stall_s)
        if stuck:
            behind = ", ".join(f"{p} at {positions[p]} of {progress.end_offsets[p]}" for p in stuck)
            raise SpaceError(
                f"reading {topic} made no progress for {stall_s:.0f} s with partitions short of their end "
                f"(partition at position of end offset: {behind}): is the partition's leader available?"
            )
        batch = consumer.poll(timeout_ms=poll_timeout_ms)
        if not any(batch.values()):
            continue
        progress.saw_records()
        for tp, records in sorted(batch.items(), key=lambda item: item[0].partition):
            for record in records:
                if progress.done(tp.partition):
                    break
                if record.timestamp >= cutoff_ms:
                    if record.offset < progress.end_offsets[tp.partition]:
                        continue  # written before the scan began by a clock running ahead: later ones may be in
                    progress.passed_cutoff(tp.partition)
                    consumer.pause(tp)
                    break
                if since_ms is not None and record.timestamp < since_ms:
                    continue
                yield read_dead_letter(
                    topic, tp.partition, record.offset, record.timestamp, record.key, record.value, record.headers or ()
                )
        # The stall clock counts time spent polling only, not the caller's work on what was yielded (a
        # slow pipe, a flush of acknowledgements): resuming here is progress too.
        progress.saw_records()


class ReplayFilter:
    """What a replay would skip, and why: one rule for ``space dlq replay`` and the summary's count.

    Skipped: letters that cannot be replayed (:meth:`DeadLetterRecord.replay_blocker`); with
    ``source_topic`` set, letters whose ``error-source-topic`` is another topic (``other-source-topic``:
    a forged or foreign header must not steer records elsewhere); and letters of a request this run
    already takes (``already-replayed``): the same CloudEvents identity (``ce_source``, ``ce_id``), or,
    for letters without one, a ref or ``space-replay-of`` this run took or named. So a request that
    failed again after earlier replays (A, its replay's letter B, B's replay's letter C, in any order)
    goes out once per run.
    """

    def __init__(self, source_topic: str | None) -> None:
        self.source_topic = source_topic
        self._refs: set[str] = set()
        self._identities: set[tuple[str, str]] = set()

    def blocker(self, letter: DeadLetterRecord) -> str | None:
        """Why ``letter`` is skipped, or None: then it counts as taken (later copies are skipped)."""
        blocker = letter.replay_blocker()
        if blocker is None and self.source_topic is not None:
            assert letter.info is not None
            blocker = "other-source-topic" if letter.info.source_topic != self.source_topic else None
        identity = letter.identity
        if blocker is None and (
            (identity is not None and identity in self._identities)
            or letter.ref in self._refs
            or letter.replay_of in self._refs
        ):
            blocker = "already-replayed"
        if blocker is None:
            self._refs.add(letter.ref)
            if letter.replay_of:
                self._refs.add(letter.replay_of)
            if identity is not None:
                self._identities.add(identity)
        return blocker


@dataclass
class Summary:
    """Counts of dead letters by (reason, product line), with the replayable share and the time span.

    Replayable: what ``space dlq replay`` over the same letters would send (:class:`ReplayFilter`, with
    the requests topic as ``source_topic`` as replay has by default).
    """

    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    replayable: Counter[tuple[str, str]] = field(default_factory=Counter)
    first_ms: int | None = None
    last_ms: int | None = None
    untimed: int = 0  # records without a timestamp (-1: a pre-0.10 message format), kept out of the span
    replay_filter: ReplayFilter = field(default_factory=lambda: ReplayFilter(None))

    def add(self, letter: DeadLetterRecord) -> None:
        """Count one dead letter."""
        group = (letter.reason, letter.product_line)
        self.counts[group] += 1
        if self.replay_filter.blocker(letter) is None:
            self.replayable[group] += 1
        if letter.timestamp_ms < 0:
            self.untimed += 1
            return
        self.first_ms = letter.timestamp_ms if self.first_ms is None else min(self.first_ms, letter.timestamp_ms)
        self.last_ms = letter.timestamp_ms if self.last_ms is None else max(self.last_ms, letter.timestamp_ms)

    @property
    def total(self) -> int:
        """All dead letters counted."""
        return sum(self.counts.values())

    def render(self) -> str:
        """A fixed-width table, one row per (reason, product line), largest first, then a total line."""
        rows = [("reason", "product_line", "count", "replayable")]
        for (reason, line), n in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0])):
            rows.append((reason, line, str(n), str(self.replayable[(reason, line)])))
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        span = ""
        if self.first_ms is not None and self.last_ms is not None:
            span = f", from {_iso(self.first_ms)} to {_iso(self.last_ms)}"
        if self.untimed:
            span += f", {self.untimed} without a timestamp"
        lines.append(f"total {self.total} dead letters, {sum(self.replayable.values())} replayable{span}")
        return "\n".join(lines) + "\n"


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class _Future(Protocol):
    def get(self, timeout: float | None = None) -> Any: ...


#: ``send(topic, key, value, headers)`` -> a future; its ``get`` returns the metadata (``partition``, ``offset``).
Send = Callable[[str, bytes | None, bytes | None, list[tuple[str, bytes]]], _Future]


@dataclass
class ReplayReport:
    """What a replay did: records acknowledged (or listed, in a dry run), failed, and skipped by cause."""

    replayed: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (dead-letter ref, error)
    skipped: Counter[str] = field(default_factory=Counter)


def replay_dead_letters(
    letters: Iterable[DeadLetterRecord], send: Send | None, *, to_topic: str, source_topic: str | None,
    on_replayed: Callable[[DeadLetterRecord, str, Any], None] = lambda letter, topic, meta: None,
    flush_every: int = 500, flush_bytes: int = 64 * 1024 * 1024, ack_timeout_s: float = 150.0,
) -> ReplayReport:  # fmt: skip
    """Produce each replayable letter to ``to_topic``; ``send=None`` is a dry run.

    Skipped (counted in ``skipped``): what :class:`ReplayFilter` skips with ``source_topic``, so neither a
    replay that fails again while the run reads (a worker clock behind the operator's) nor an original
    and its re-dead-lettered replays in one window send the request twice.

    Acknowledgements are awaited every ``flush_every`` records or ``flush_bytes`` of values and at the end;
    ``on_replayed`` sees each acknowledged record (metadata ``None`` in a dry run). After the first failure
    nothing more is sent, every record already handed to the producer is awaited and reported, and
    :class:`SpaceError` says how many were replayed and which failed; the same happens (then the original
    error propagates) when reading stops with an exception.
    """
    report = ReplayReport()
    window: list[tuple[DeadLetterRecord, str, _Future]] = []
    window_bytes = 0
    replay_filter = ReplayFilter(source_topic)

    def settle() -> None:
        nonlocal window_bytes
        for letter, topic, future in window:
            try:
                meta = future.get(timeout=ack_timeout_s)
            except Exception as exc:  # noqa: BLE001 - reported per record, then the replay stops
                report.failed.append((letter.ref, f"{type(exc).__name__}: {exc}"))
                continue
            report.replayed += 1
            on_replayed(letter, topic, meta)
        window.clear()
        window_bytes = 0

    try:
        for letter in letters:
            blocker = replay_filter.blocker(letter)
            if blocker is not None:
                report.skipped[blocker] += 1
                continue
            if send is None:
                report.replayed += 1
                on_replayed(letter, to_topic, None)
                continue
            try:
                future = send(to_topic, letter.key, letter.value, letter.replay_headers())
            except Exception as exc:  # noqa: BLE001 - e.g. max_block_ms passed: reported like a failed ack
                report.failed.append((letter.ref, f"{type(exc).__name__}: {exc}"))
                break
            window.append((letter, to_topic, future))
            window_bytes += len(letter.value or b"")
            if len(window) >= flush_every or window_bytes >= flush_bytes:
                settle()
                if report.failed:
                    break
    finally:
        settle()  # also when reading raised: what was handed to the producer is awaited and reported
    if report.failed:
        ref, error = report.failed[0]
        raise SpaceError(
            f"replay stopped: {len(report.failed)} failed (first {ref} to {to_topic}: {error}); "
            f"{report.replayed} replayed (listed above); later dead letters were not sent"
        )
    return report
