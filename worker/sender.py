"""A request producer for cameras, gateways, tests and the demo (``space send``).

Each image becomes one CloudEvents record (binary mode) keyed by the camera id: the value is the
encoded file as is (inline), or a JSON claim check after the file was uploaded to ``s3://`` or copied
under a ``file://`` root. ``--rate`` paces the stream with a monotonic schedule (no drift).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from pydantic import TypeAdapter, ValidationError

from schemas._wire import MAX_ID_CHARS, PRODUCT_LINE_PATTERN, Identifier, ProductLine
from schemas.request import ClaimCheck, InspectionRequest, build_claim_check_value, build_request_headers
from worker.errors import SpaceError

CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".bmp": "image/bmp",
                 ".tif": "image/tiff", ".tiff": "image/tiff"}  # fmt: skip


#: Kafka's rule for topic names (``.`` and ``..`` are reserved as well).
TOPIC_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
#: Room left in ``max_request_size`` for the CloudEvents headers, the key and the record batch framing.
RECORD_HEADROOM_BYTES = 8 * 1024
#: The latest ``ce_deadline`` a request can carry (9999-12-31T23:59:59Z).
_MAX_EPOCH_S = 253_402_300_799

_PRODUCT_LINE = TypeAdapter(ProductLine)
_IDENTIFIER = TypeAdapter(Identifier)


def check_send_options(
    *,
    product_line: str,
    camera_id: str,
    topic: str,
    limit: int | None = None,
    repeat: int = 1,
    rate_hz: float | None = None,
    deadline_ms: float | None = None,
) -> None:
    """Raise :class:`SpaceError` (one line) for ``space send`` options that cannot work.

    Product line and camera follow the request schema (``ce_productline``, ``ce_cameraid``), the topic
    Kafka's naming rule; counts, rate and deadline must be usable numbers.
    """
    try:
        _PRODUCT_LINE.validate_python(product_line)
    except ValidationError:
        raise SpaceError(
            f"--product-line must match {PRODUCT_LINE_PATTERN} (letters, digits, '.', '_', '-'), got {product_line!r}"
        ) from None
    try:
        _IDENTIFIER.validate_python(camera_id)
    except ValidationError:
        raise SpaceError(
            f"--camera must be 1-{MAX_ID_CHARS} characters without control characters, got {camera_id!r}"
        ) from None
    if not TOPIC_NAME_RE.fullmatch(topic) or topic in (".", ".."):
        raise SpaceError(f"the topic must be 1-249 characters of letters, digits, '.', '_', '-', got {topic!r}")
    if repeat < 1:
        raise SpaceError("--repeat must be >= 1")
    if limit is not None and limit < 0:
        raise SpaceError(f"--limit must be >= 0, got {limit}")
    if rate_hz is not None and not (math.isfinite(rate_hz) and rate_hz > 0):
        raise SpaceError(f"--rate must be a number > 0 (images per second), got {rate_hz:g}")
    if deadline_ms is not None and not (
        math.isfinite(deadline_ms) and deadline_ms >= 0 and time.time() + deadline_ms / 1000 < _MAX_EPOCH_S
    ):
        raise SpaceError(f"--deadline-ms must be >= 0 and end before the year 10000, got {deadline_ms:g}")


def check_inline_sizes(files: Iterable[Path], max_request_size: int) -> None:
    """Raise :class:`SpaceError` naming the first file too large to send inline (before anything is sent)."""
    limit = max_request_size - RECORD_HEADROOM_BYTES
    for path in dict.fromkeys(files):
        size = path.stat().st_size
        if size > limit:
            raise SpaceError(
                f"{path} is {size} bytes, more than an inline request can carry ({limit} bytes: "
                f"SPACE_KAFKA__MAX_REQUEST_SIZE={max_request_size} less {RECORD_HEADROOM_BYTES} for headers); "
                "send it with --claim-check s3://bucket/prefix or file:///dir"
            )


@dataclass(frozen=True)
class SentRequest:
    """What was sent for one image."""

    message_id: str
    path: Path
    camera_id: str
    partition: int
    offset: int


def image_files(directory: Path, *, recursive: bool = True) -> list[Path]:
    """Image files under ``directory`` with a known extension, sorted; a single image file is itself."""
    if directory.is_file():
        if directory.suffix.lower() not in CONTENT_TYPES:
            raise SpaceError(f"{directory} is not an image (.jpg .png .bmp .tif)")
        return [directory]
    if not directory.is_dir():
        raise SpaceError(f"{directory} is neither a folder nor an image file")
    pattern = "**/*" if recursive else "*"
    files = sorted(p for p in directory.glob(pattern) if p.is_file() and p.suffix.lower() in CONTENT_TYPES)
    if not files:
        raise SpaceError(f"no images (.jpg .png .bmp .tif) under {directory}")
    return files


def build_request(
    *,
    data: bytes,
    path: Path,
    product_line: str,
    camera_id: str,
    message_id: str | None = None,
    part_id: str | None = None,
    claim_check_uri: str | None = None,
    deadline: datetime | None = None,
) -> tuple[InspectionRequest, bytes]:
    """The request attributes and the record value for one image."""
    content_type = CONTENT_TYPES[path.suffix.lower()]
    claim = None
    value = data
    if claim_check_uri is not None:
        claim = ClaimCheck(
            image_uri=claim_check_uri, sha256=hashlib.sha256(data).hexdigest(), content_type=content_type
        )
        value = build_claim_check_value(claim)
        content_type = "application/json"
    request = InspectionRequest(
        message_id=message_id or str(uuid.uuid4()),
        source=f"space-send/{camera_id}",
        time=datetime.now(UTC),
        product_line=product_line,
        camera_id=camera_id,
        part_id=part_id,
        deadline=deadline,
        content_type=content_type,
        claim_check=claim,
    )
    return request, value


class ClaimCheckUploader:
    """Puts images where claim checks point: ``s3://bucket/prefix`` or ``file:///dir``."""

    def __init__(self, base_uri: str, s3_client_factory: Callable[[], Any] | None = None) -> None:
        self.base_uri = base_uri.rstrip("/")
        self._s3_factory = s3_client_factory
        self._s3: Any = None
        if not base_uri.startswith(("s3://", "file://")):
            raise SpaceError(f"--claim-check must be s3://bucket/prefix or file:///dir, not {base_uri!r}")

    def upload(self, path: Path, data: bytes, name: str) -> str:
        """Store ``data`` (the bytes the claim check's sha256 was computed from) and return its URI.

        Raises:
            SpaceError: the store refused it (an OS error, missing S3 credentials, an S3 error).
        """
        try:
            if self.base_uri.startswith("file://"):
                return self._upload_file(data, name)
            return self._upload_s3(data, name)
        except SpaceError:
            raise
        except Exception as exc:  # OSError, botocore's errors: one line, no traceback
            raise SpaceError(f"cannot store {path} at {self.base_uri}: {type(exc).__name__}: {exc}") from exc

    def _upload_file(self, data: bytes, name: str) -> str:
        root = Path(unquote(urlsplit(self.base_uri).path))
        root.mkdir(parents=True, exist_ok=True)
        target = root / name
        # The bytes hashed, not the file read again: a camera rewriting it meanwhile would break the checksum.
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)
        return target.resolve().as_uri()  # percent-encoded: '#', '%' or a space in the root survive

    def _upload_s3(self, data: bytes, name: str) -> str:
        if self._s3 is None:
            if self._s3_factory is None:
                raise SpaceError("an s3:// claim check needs S3 settings")
            self._s3 = self._s3_factory()
        bucket, _, prefix = self.base_uri.removeprefix("s3://").partition("/")
        key = f"{prefix}/{name}" if prefix else name
        self._s3.put_object(Bucket=bucket, Key=key, Body=data)
        return f"s3://{bucket}/{key}"


def paced(items: Iterable[Any], rate_hz: float | None, clock: Callable[[], float] = time.monotonic,
          sleep: Callable[[float], None] = time.sleep) -> Iterator[Any]:  # fmt: skip
    """Yield items no faster than ``rate_hz`` on a fixed schedule (no cumulative drift)."""
    start = clock()
    for i, item in enumerate(items):
        if rate_hz:
            delay = start + i / rate_hz - clock()
            if delay > 0:
                sleep(delay)
        yield item


def send_images(
    producer: Any,
    topic: str,
    files: Iterable[Path],
    *,
    product_line: str,
    camera_id: str,
    rate_hz: float | None = None,
    uploader: ClaimCheckUploader | None = None,
    deadline_ms: float | None = None,
    on_sent: Callable[[SentRequest], None] | None = None,
) -> list[SentRequest]:
    """Publish one request per file and wait for every acknowledgement.

    ``on_sent`` is called for each request as soon as it (and every request before it) is
    acknowledged, in sending order. A failure part way (a refused send, an unreadable file, the claim
    check store) stops sending, and every request already handed to the producer is still awaited and
    reported, so the output lists exactly what went out.

    Raises:
        SpaceError: a file could not be read or stored.
        Exception: the first refused acknowledgement's error (kafka-python's), once the others are awaited.
    """
    pending: list[tuple[str, Path, Any]] = []
    sent: list[SentRequest] = []
    failed: list[BaseException] = []

    def acknowledge(*, wait: bool) -> None:
        while pending and (wait or pending[0][2].is_done):
            message_id, path, future = pending.pop(0)
            try:
                meta = future.get(timeout=30)
            except Exception as exc:  # noqa: BLE001 - each request is reported on its own
                failed.append(exc)
                continue
            item = SentRequest(message_id, path, camera_id, meta.partition, meta.offset)
            sent.append(item)
            if on_sent is not None:
                on_sent(item)

    try:
        for path in paced(files, rate_hz):
            if failed:
                break
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise SpaceError(f"cannot read {path}: {exc.strerror or exc}") from exc
            message_id = str(uuid.uuid4())
            uri = uploader.upload(path, data, f"{message_id}{path.suffix.lower()}") if uploader else None
            deadline = None
            if deadline_ms is not None:
                deadline = datetime.fromtimestamp(time.time() + deadline_ms / 1000, UTC)
            request, value = build_request(
                data=data, path=path, product_line=product_line, camera_id=camera_id, message_id=message_id,
                claim_check_uri=uri, deadline=deadline,
            )  # fmt: skip
            future = producer.send(topic, key=camera_id.encode(), value=value, headers=build_request_headers(request))
            pending.append((message_id, path, future))
            acknowledge(wait=False)
    finally:
        with contextlib.suppress(Exception):  # the acknowledgements below say what did not go out
            producer.flush()
        acknowledge(wait=True)
    if failed:
        raise failed[0]
    return sent
