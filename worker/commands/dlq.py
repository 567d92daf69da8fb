"""``space dlq``: count dead letters, and replay them once their cause is fixed."""

from __future__ import annotations

import argparse
from functools import partial
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kafka import KafkaProducer

    from worker.dlq import DeadLetterRecord

NAME = "dlq"
HELP = "Count the dead letters by reason and line, or replay chosen ones to the requests topic."


def _add_window(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--topic", default=None, help="Dead-letter topic (default SPACE_KAFKA__DLQ_TOPIC).")
    parser.add_argument(
        "--since", default=None, metavar="WHEN",
        help="Only dead letters written at or after WHEN: RFC 3339 (2026-12-01T08:00:00Z) or an age (90m, 2h, 3d).",
    )  # fmt: skip
    parser.add_argument(
        "--until", default=None, metavar="WHEN",
        help="Only dead letters written before WHEN (default and latest: when the command starts).",
    )  # fmt: skip
    parser.add_argument(
        "--product-line", action="append", default=[], metavar="LINE", help="Only this ce_productline (repeatable)."
    )
    parser.add_argument(
        "--idle-s", type=float, default=3.0,
        help="Stop reading a partition at its end offset once nothing arrived for this long (default 3).",
    )  # fmt: skip


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``summary`` and ``replay`` actions."""
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    summary = sub.add_parser("summary", help="Count dead letters by reason and product line.")
    _add_window(summary)
    summary.add_argument("--reason", action="append", default=[], help="Only this error-reason (repeatable).")
    replay = sub.add_parser(
        "replay",
        help="Produce chosen dead letters again (original value, key and headers) to the requests topic.",
        description="Produce chosen dead letters again: the original value, key and headers, error-* headers "
        "removed and space-replay-of=<dlq topic>/<partition>/<offset> added, to SPACE_KAFKA__REQUESTS_TOPIC "
        "(letters from another error-source-topic are skipped unless --to is given). Truncated dead letters are "
        "skipped, and so is a letter of a chain this run already replayed. Replaying the same window in two "
        "runs sends the requests twice.",
    )
    _add_window(replay)
    replay.add_argument(
        "--reason", action="append", required=True,
        help="Replay dead letters with this error-reason (repeatable; required: replaying an invalid request "
        "only dead-letters it again).",
    )  # fmt: skip
    replay.add_argument(
        "--to", default=None, metavar="TOPIC",
        help="Produce to TOPIC, whatever each letter's error-source-topic says (default: SPACE_KAFKA__REQUESTS_TOPIC, "
        "and letters from another source topic are skipped).",
    )  # fmt: skip
    replay.add_argument("--dry-run", action="store_true", help="List what would be replayed; produce nothing.")


def _send(producer: KafkaProducer, topic: str, key: bytes | None, value: bytes | None,
          headers: list[tuple[str, bytes]]) -> Any:  # fmt: skip
    return producer.send(topic, key=key, value=value, headers=headers)


def run(args: argparse.Namespace) -> int:
    """Scan the window and print the summary table, or replay and print one line per record."""
    from datetime import UTC, datetime

    from kafka.errors import KafkaError

    from worker.dlq import (
        LetterFilter,
        ReplayFilter,
        Summary,
        check_reasons,
        parse_when,
        replay_dead_letters,
        scan_dead_letters,
        to_ms,
    )
    from worker.errors import SpaceError
    from worker.kafka_clients import describe_kafka_error, make_consumer, make_producer
    from worker.logging import configure_logging
    from worker.settings import load_settings

    settings = load_settings()
    configure_logging(settings.log.level, settings.log.format)
    topic = args.topic or settings.kafka.dlq_topic
    now = datetime.now(UTC)
    since_ms = to_ms(parse_when(args.since, now=now)) if args.since else None
    cutoff_ms = to_ms(now)
    if args.until:
        cutoff_ms = min(cutoff_ms, to_ms(parse_when(args.until, now=now)))
    if since_ms is not None and since_ms >= cutoff_ms:
        raise SpaceError(f"--since ({args.since}) is not before --until/now: the window is empty")
    if args.idle_s <= 0:
        raise SpaceError("--idle-s must be > 0")
    chosen = LetterFilter(check_reasons(args.reason), frozenset(args.product_line))

    action = f"reading dead letters from {topic}"
    try:
        consumer = make_consumer(settings.kafka, client_id="space-dlq", group_id=None, auto_offset_reset="earliest")
        producer = None
        try:
            letters = (
                letter
                for letter in scan_dead_letters(
                    consumer, topic, since_ms=since_ms, cutoff_ms=cutoff_ms, idle_s=args.idle_s
                )
                if chosen.matches(letter)
            )
            if args.action == "summary":
                summary = Summary(replay_filter=ReplayFilter(settings.kafka.requests_topic))
                for letter in letters:
                    summary.add(letter)
                print(summary.render(), end="")
                return 0
            if not args.dry_run:
                producer = make_producer(settings.kafka, client_id="space-dlq-replay")
                action = f"replaying dead letters from {topic}"

            def report(letter: DeadLetterRecord, target: str, meta: Any) -> None:
                where = f"{target}/{meta.partition}/{meta.offset}" if meta is not None else f"{target} (dry run)"
                print(f"{letter.ref}\t{letter.reason}\t{letter.product_line}\t{letter.message_id}\t{where}", flush=True)

            send = None if producer is None else partial(_send, producer)
            result = replay_dead_letters(
                letters, send, to_topic=args.to or settings.kafka.requests_topic,
                source_topic=None if args.to else settings.kafka.requests_topic, on_replayed=report,
                ack_timeout_s=settings.kafka.delivery_timeout_ms / 1000 + 10,
            )  # fmt: skip
        finally:
            consumer.close()
            if producer is not None:
                producer.close(timeout=10)
    except KafkaError as exc:
        raise SpaceError(describe_kafka_error(exc, settings.kafka, action)) from None
    skipped = ", ".join(f"{n} {cause}" for cause, n in sorted(result.skipped.items())) or "none"
    verb = "would replay" if args.dry_run else "replayed"
    print(f"{verb} {result.replayed} dead letters; skipped: {skipped}")
    return 0
