"""``space send``: publish a folder of images as inspection requests (a camera stand-in)."""

from __future__ import annotations

import argparse

NAME = "send"
HELP = "Publish images from a folder as inspection requests (inline or as claim checks)."
EPILOG = (
    "Prints one tab-separated line per image once the broker acknowledged it: the request's message id "
    "(ce_id), partition, offset and file. The verdict arrives on the results topic (SPACE_KAFKA__RESULTS_TOPIC) "
    "with the same message_id."
)


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the sender's options."""
    parser.add_argument("--dir", required=True, help="Folder of images (searched recursively), or one image file.")
    parser.add_argument("--product-line", required=True, help="ce_productline of every request.")
    parser.add_argument("--camera", default="camera-1", help="ce_cameraid and record key (default camera-1).")
    parser.add_argument("--rate", type=float, default=None, help="Images per second (default: as fast as possible).")
    parser.add_argument(
        "--claim-check", default=None, help="Upload to s3://bucket/prefix or file:///dir and send references."
    )
    parser.add_argument("--limit", type=int, default=None, help="Send at most this many images.")
    parser.add_argument("--repeat", type=int, default=1, help="Send the folder this many times.")
    parser.add_argument("--deadline-ms", type=float, default=None, help="Set ce_deadline this far after sending.")
    parser.add_argument("--topic", default=None, help="Override SPACE_KAFKA__REQUESTS_TOPIC.")


def run(args: argparse.Namespace) -> int:
    """Send and print one line per image as it is acknowledged (message id, partition, offset, path)."""
    import itertools
    from pathlib import Path

    from kafka.errors import KafkaError

    from worker.errors import SpaceError
    from worker.kafka_clients import describe_kafka_error, make_producer
    from worker.logging import configure_logging
    from worker.s3 import make_s3_client
    from worker.sender import (
        ClaimCheckUploader,
        SentRequest,
        check_inline_sizes,
        check_send_options,
        image_files,
        send_images,
    )
    from worker.settings import load_settings

    settings = load_settings()
    configure_logging(settings.log.level, settings.log.format)
    topic = args.topic if args.topic is not None else settings.kafka.requests_topic
    check_send_options(
        product_line=args.product_line, camera_id=args.camera, topic=topic, limit=args.limit, repeat=args.repeat,
        rate_hz=args.rate, deadline_ms=args.deadline_ms,
    )  # fmt: skip
    files = image_files(Path(args.dir)) * args.repeat
    if args.limit is not None:
        files = list(itertools.islice(files, args.limit))
    uploader = ClaimCheckUploader(args.claim_check, lambda: make_s3_client(settings.s3)) if args.claim_check else None
    if uploader is None:
        check_inline_sizes(files, settings.kafka.max_request_size)

    def report(s: SentRequest) -> None:
        print(f"{s.message_id}\t{s.partition}\t{s.offset}\t{s.path}", flush=True)

    try:
        producer = make_producer(settings.kafka, client_id="space-send")
        try:
            send_images(
                producer, topic, files, product_line=args.product_line, camera_id=args.camera, rate_hz=args.rate,
                uploader=uploader, deadline_ms=args.deadline_ms, on_sent=report,
            )  # fmt: skip
        finally:
            producer.close(timeout=10)
    except KafkaError as exc:
        raise SpaceError(describe_kafka_error(exc, settings.kafka, f"sending to Kafka (topic {topic})")) from None
    return 0
