"""Anomaly heatmaps: safe object keys, PNG/JPEG encoding and the stores they are written to.

Owns:

* :func:`heatmap_key`: ``<line>/<yyyy>/<mm>/<dd>/<id>.<digest>.<ext>`` built from untrusted message
  fields and the file's own SHA-256. Every component is sanitized so that a key never escapes the
  store's root, and two different ids never share a key (an id that had to be changed or truncated
  carries a sha256 suffix). The content digest keeps two different heatmaps apart when ids repeat
  (CloudEvents ids are unique only per source: two cameras may both send ``msg-0001``), so a
  published result's ``uri`` always holds the bytes its ``sha256`` names.
* :func:`encode_heatmap_png`: an 8-bit grayscale PNG where 128 is the decision threshold, so a viewer
  can tell "above threshold" at a glance without knowing the score scale.
* :func:`encode_overlay_jpeg`: a JET colour map blended over the input image, for humans.
* :class:`HeatmapStore` and its implementations: a local directory (atomic writes), S3 (with a
  SHA-256 checksum the server verifies) and a retrying wrapper with exponential backoff;
  :func:`open_heatmap_store` builds the configured one.
"""

from __future__ import annotations

import base64
import hashlib
import math
import os
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
import structlog
from botocore.exceptions import BotoCoreError, ClientError

from worker.s3 import make_s3_client, parse_s3_uri
from worker.settings import HeatmapSettings, S3Settings

__all__ = [
    "FileHeatmapStore",
    "HeatmapStore",
    "HeatmapStoreError",
    "RetryingHeatmapStore",
    "S3HeatmapStore",
    "StoredHeatmap",
    "downscale_keeping_peaks",
    "encode_heatmap_png",
    "encode_overlay_jpeg",
    "heatmap_key",
    "heatmap_to_uint8",
    "open_heatmap_store",
    "sanitize_component",
    "save_heatmap",
]

log = structlog.get_logger(__name__)

MAX_COMPONENT_CHARS = 128
_HASH_CHARS = 16  # 64 bits of sha256: a collision between two real ids is not a practical concern
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_HASHED_TAIL = re.compile(rf"-[0-9a-f]{{{_HASH_CHARS}}}\Z")
_EXT = re.compile(r"[a-z0-9]{1,8}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_CONTENT_DIGITS = 16  # of the file's sha256 in its key
_MAX_CACHED_DIRECTORIES = 4096  # lines x days; cleared (not evicted one by one) when full

# Heatmaps are smooth (upsampled from a coarse map): the Paeth row filter followed by zlib's run-length
# strategy encodes them about twice as fast as OpenCV's default (level 3, adaptive filters) and ~10 %
# smaller (bench/heatmaps.py prints both). ``IMWRITE_PNG_FILTER`` needs OpenCV >= 4.11; older builds
# keep libpng's adaptive filter choice, which is slower, not larger.
_PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
if hasattr(cv2, "IMWRITE_PNG_FILTER"):
    _PNG_PARAMS += [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_PAETH]


class HeatmapStoreError(Exception):
    """A heatmap could not be stored (after the configured retries, when wrapped in a retrying store)."""


def sanitize_component(text: str, max_chars: int = MAX_COMPONENT_CHARS) -> str:
    """Turn untrusted text into one safe, collision-free path component.

    Characters outside ``[A-Za-z0-9._-]`` become ``_`` and leading dots become ``_`` (so ``.``, ``..`` and
    hidden files are impossible). When anything had to change, the text is longer than ``max_chars``,
    or the text already ends like a hashed component, the result is ``<cleaned prefix>-<16 hex of sha256
    of the original>``: unchanged components never end that way, so distinct inputs never meet.

    Args:
        text: e.g. a message id or a product line.
        max_chars: length cap of the result (at least 32).

    Returns:
        A non-empty component of at most ``max_chars`` characters.
    """
    if max_chars < 32:
        raise ValueError("max_chars must be >= 32")
    cleaned = _UNSAFE.sub("_", text)
    stripped = cleaned.lstrip(".")
    cleaned = "_" * (len(cleaned) - len(stripped)) + stripped
    if cleaned == text and 0 < len(text) <= max_chars and not _HASHED_TAIL.search(text):
        return text
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_CHARS]
    stem = cleaned[: max_chars - _HASH_CHARS - 1] or "id"
    return f"{stem}-{digest}"


def heatmap_key(
    product_line: str, captured_at: datetime, message_id: str, ext: str, *, content_sha256: str | None = None
) -> str:
    """The store key of one image's heatmap: ``<line>/<yyyy>/<mm>/<dd>/<id>[.<digest>].<ext>``.

    Args:
        product_line: the product line (sanitized like the id).
        captured_at: capture time; converted to UTC (a naive time is taken as UTC).
        message_id: the request's message id (untrusted).
        ext: file extension without the dot, 1-8 lowercase letters or digits (``png``, ``jpg``).
        content_sha256: the file's SHA-256 (hex); its first 16 digits go into the name, so files of
            different content never share a key and writing the same file twice is idempotent.

    Returns:
        A relative key with exactly four ``/`` separators and no ``.``/``..`` components.
    """
    if not _EXT.fullmatch(ext):
        raise ValueError(f"extension {ext!r} must be 1-8 lowercase letters or digits")
    when = captured_at.astimezone(UTC) if captured_at.tzinfo else captured_at.replace(tzinfo=UTC)
    line = sanitize_component(product_line)
    name = sanitize_component(message_id)
    if content_sha256 is not None:
        if not _SHA256_HEX.fullmatch(content_sha256):
            raise ValueError("content_sha256 must be 64 lowercase hex digits")
        name = f"{name}.{content_sha256[:_CONTENT_DIGITS]}"
    return f"{line}/{when:%Y}/{when:%m}/{when:%d}/{name}.{ext}"


def heatmap_to_uint8(anomaly_map: np.ndarray, threshold: float) -> np.ndarray:
    """Scale a map to uint8 so that the threshold lands on 128.

    ``value = clip(map / (2 * threshold), 0, 1) * 255``, rounded: 0 is "no anomaly", 128 is exactly the
    threshold, 255 is twice the threshold or more. When the threshold is not a positive finite number
    (a misconfiguration that must not lose the picture), the map's maximum maps to 255 instead and 128
    has no meaning. NaN counts as 0.

    Args:
        anomaly_map: (H, W) float map in the score scale.
        threshold: the decision threshold applied to this image.

    Returns:
        (H, W) uint8.
    """
    if anomaly_map.ndim != 2:
        raise ValueError(f"anomaly_map must be (H, W), got shape {anomaly_map.shape}")
    values = np.nan_to_num(anomaly_map.astype(np.float32, copy=False), nan=0.0, posinf=np.inf, neginf=0.0)
    if math.isfinite(threshold) and threshold > 0:
        scale = 2.0 * threshold
    else:
        finite_max = float(np.max(values[np.isfinite(values)], initial=0.0))
        scale = finite_max if finite_max > 0 else 1.0
    return np.rint(np.clip(values / scale, 0.0, 1.0) * 255.0).astype(np.uint8)


def downscale_keeping_peaks(anomaly_map: np.ndarray, max_side_px: int) -> np.ndarray:
    """Shrink a map so its longer side is at most ``max_side_px``, keeping each block's maximum.

    The map is cut into f x f blocks (f = ceil(longer side / max_side_px); the last row and column of
    blocks may be partial) and each block becomes its maximum. Unlike averaging, a defect smaller than
    a block keeps its peak: the stored heatmap reaches 128 exactly where the full map reaches the
    threshold, block for block, and its maximum is the image's score. NaN counts as 0, as in
    :func:`heatmap_to_uint8`.

    Args:
        anomaly_map: (H, W) float map.
        max_side_px: the longest side wanted, >= 1.

    Returns:
        (ceil(H / f), ceil(W / f)) float32, or the map itself when it is small enough.
    """
    if anomaly_map.ndim != 2:
        raise ValueError(f"anomaly_map must be (H, W), got shape {anomaly_map.shape}")
    if max_side_px < 1:
        raise ValueError(f"max_side_px must be >= 1, got {max_side_px}")
    h, w = anomaly_map.shape
    f = math.ceil(max(h, w) / max_side_px)
    if f <= 1:
        return anomaly_map
    values = anomaly_map.astype(np.float32, copy=False)
    if np.isnan(values).any():
        values = np.nan_to_num(values, nan=0.0)
    # Dilation with an f x f kernel anchored at its top-left corner puts each block's maximum at the
    # block's first pixel (outside the map counts as -inf); keeping every f-th row and column takes
    # those. Twenty times faster than a numpy reshape-max at 256 px.
    block_max = cv2.dilate(values, np.ones((f, f), np.uint8), anchor=(0, 0), borderType=cv2.BORDER_CONSTANT,
                           borderValue=-np.inf)  # fmt: skip
    return np.ascontiguousarray(block_max[::f, ::f])


def encode_heatmap_png(anomaly_map: np.ndarray, threshold: float) -> bytes:
    """Encode a map as an 8-bit grayscale PNG with the threshold at 128 (see :func:`heatmap_to_uint8`).

    Args:
        anomaly_map: (H, W) float32 map in the score scale.
        threshold: the decision threshold applied to this image.

    Returns:
        The PNG file bytes.
    """
    ok, buf = cv2.imencode(".png", heatmap_to_uint8(anomaly_map, threshold), _PNG_PARAMS)
    if not ok:  # pragma: no cover - OpenCV reports failure only for unsupported arrays
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def encode_overlay_jpeg(
    image_rgb: np.ndarray,
    anomaly_map: np.ndarray,
    threshold: float,
    *,
    alpha: float = 0.45,
    quality: int = 90,
) -> bytes:
    """Blend a JET-coloured map over the image and encode it as JPEG (blue = normal, red = anomalous).

    Args:
        image_rgb: (H, W, 3) or (H, W) uint8 input image.
        anomaly_map: (h, w) float map; resized to the image.
        threshold: the decision threshold (mid-scale of the colour map, see :func:`heatmap_to_uint8`).
        alpha: weight of the colour map in the blend.
        quality: JPEG quality 1-100.

    Returns:
        The JPEG file bytes.
    """
    if image_rgb.dtype != np.uint8 or image_rgb.ndim not in (2, 3):
        raise ValueError("image_rgb must be a (H, W[, 3]) uint8 array")
    image_bgr = cv2.cvtColor(image_rgb, cv2.COLOR_GRAY2BGR if image_rgb.ndim == 2 else cv2.COLOR_RGB2BGR)
    height, width = image_bgr.shape[:2]
    heat = cv2.resize(heatmap_to_uint8(anomaly_map, threshold), (width, height), interpolation=cv2.INTER_LINEAR)
    colored = cv2.applyColorMap(heat, cv2.COLORMAP_JET)
    blended = cv2.addWeighted(image_bgr, 1.0 - alpha, colored, alpha, 0.0)
    ok, buf = cv2.imencode(".jpg", blended, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:  # pragma: no cover
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


class HeatmapStore(Protocol):
    """Where heatmap files go."""

    def put(self, key: str, data: bytes, content_type: str) -> str:
        """Store ``data`` under ``key`` and return its URI; raise :class:`HeatmapStoreError` on failure."""
        ...


class FileHeatmapStore:
    """Heatmaps as files under a root directory, written atomically (temp file + ``os.replace``).

    Args:
        root: the directory (created on first write); resolved once, symlinks included.
        fsync: flush file contents to disk before the rename (durable across power loss, slower).
        file_mode: permissions of the written files (temp files start as 0600; readers such as a web
            server usually need more).
    """

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = False, file_mode: int = 0o644) -> None:
        """Resolve the root."""
        self.root = Path(root).resolve()
        self._fsync = fsync
        self._file_mode = file_mode
        # Directories already resolved inside the root and created: keys share a directory per line
        # and day, so a put costs no path resolution (one lstat per component) and no mkdir.
        self._directories: dict[str, Path] = {}

    def path_for(self, key: str) -> Path:
        """The file a key maps to; raises ValueError for keys that would leave the root."""
        directory, name = self._split(key)
        return self._resolve_directory(directory) / name

    @staticmethod
    def _split(key: str) -> tuple[str, str]:
        if not key or key.startswith("/") or "\\" in key or "\0" in key:
            raise ValueError(f"heatmap key {key!r} is not a relative key")
        if any(part in ("", ".", "..") for part in key.split("/")):
            raise ValueError(f"heatmap key {key!r} has an empty, '.' or '..' component")
        directory, _, name = key.rpartition("/")
        return directory, name

    def _resolve_directory(self, directory: str) -> Path:
        path = (self.root / directory).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"heatmap key directory {directory!r} escapes the store root {self.root}")
        return path

    def _directory(self, directory: str) -> Path:
        """The key's directory, resolved inside the root and created (cached once it exists)."""
        path = self._directories.get(directory)
        if path is None:
            path = self._resolve_directory(directory)
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise HeatmapStoreError(f"cannot create heatmap directory {path}: {exc}") from exc
            if len(self._directories) >= _MAX_CACHED_DIRECTORIES:
                self._directories.clear()
            self._directories[directory] = path
        return path

    def put(self, key: str, data: bytes, content_type: str) -> str:
        """Write the file atomically and return its ``file://`` URI.

        The final name is replaced with ``os.replace``, which never follows a symlink there, so only
        the directory needs resolving. A directory removed while cached (a retention job) is created
        again on the next attempt.
        """
        directory, name = self._split(key)  # a bad key is the caller's bug: ValueError, not retried
        try:
            parent = self._directory(directory)
        except ValueError as exc:  # the key is fine; a directory on its way is a symlink leading out
            raise HeatmapStoreError(f"{exc} (symlinks out of the store root are refused)") from exc
        path = parent / name
        tmp = parent / f".tmp-{secrets.token_hex(8)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileNotFoundError as exc:
            self._directories.pop(directory, None)
            raise HeatmapStoreError(f"cannot write heatmap {path}: {exc}") from exc
        except OSError as exc:
            raise HeatmapStoreError(f"cannot write heatmap {path}: {exc}") from exc
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fchmod(fd, self._file_mode)
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise HeatmapStoreError(f"cannot write heatmap {path}: {exc}") from exc
        return path.as_uri()


class S3HeatmapStore:
    """Heatmaps as S3 objects ``<prefix>/<key>`` with Content-Type and a SHA-256 checksum.

    Args:
        bucket: the bucket.
        prefix: key prefix (no leading or trailing ``/`` needed); may be empty.
        client: a boto3 S3 client (see :func:`worker.s3.make_s3_client`).
    """

    def __init__(self, bucket: str, prefix: str, client: Any) -> None:
        """Keep the target."""
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._client = client

    def object_key(self, key: str) -> str:
        """The full object key of a store key."""
        if not key or key.startswith("/") or any(p in ("", ".", "..") for p in key.split("/")):
            raise ValueError(f"heatmap key {key!r} is not a clean relative key")
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes, content_type: str) -> str:
        """Upload the object (the server verifies the checksum) and return its ``s3://`` URI."""
        object_key = self.object_key(key)
        checksum = base64.b64encode(hashlib.sha256(data).digest()).decode("ascii")
        try:
            self._client.put_object(
                Bucket=self.bucket,
                Key=object_key,
                Body=data,
                ContentType=content_type,
                # Our own digest, not one botocore computes from the same buffer: S3 rejects the
                # upload when the bytes it received differ (moto stores it without checking).
                ChecksumAlgorithm="SHA256",
                ChecksumSHA256=checksum,
            )
        except (BotoCoreError, ClientError) as exc:
            raise HeatmapStoreError(f"cannot upload heatmap s3://{self.bucket}/{object_key}: {exc}") from exc
        return f"s3://{self.bucket}/{object_key}"


class RetryingHeatmapStore:
    """Retries another store with exponential backoff (``backoff_ms``, doubled after each failure),
    behind a circuit breaker.

    After ``breaker_failures`` puts in a row failed (each after its retries), the store is not asked
    for ``breaker_cooldown_s``: puts fail at once, so results go out with ``heatmap_error`` at full
    speed instead of each batch waiting out every retry and timeout of a dead object store (up to
    minutes per batch with S3's connect timeouts). After the cooldown one put is let through; its
    success closes the breaker, its failure opens it again.

    Args:
        inner: the store to call.
        retries: attempts after the first failure (0 = no retry).
        backoff_ms: wait before the first retry.
        sleep: ``time.sleep`` (injected in tests).
        breaker_failures: failed puts in a row that open the breaker (0 = never open).
        breaker_cooldown_s: how long an open breaker refuses puts.
        clock: monotonic seconds (injected in tests).
    """

    def __init__(
        self,
        inner: HeatmapStore,
        retries: int,
        backoff_ms: float,
        sleep: Callable[[float], None] = time.sleep,
        *,
        breaker_failures: int = 0,
        breaker_cooldown_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Keep the policy."""
        if retries < 0 or backoff_ms < 0 or breaker_failures < 0 or breaker_cooldown_s < 0:
            raise ValueError("retries, backoff_ms, breaker_failures and breaker_cooldown_s must be >= 0")
        self.inner = inner
        self.retries = retries
        self.backoff_ms = backoff_ms
        self._sleep = sleep
        self._breaker_failures = breaker_failures
        self._breaker_cooldown_s = breaker_cooldown_s
        self._clock = clock
        self._lock = threading.Lock()
        self._failures_in_row = 0
        self._open_until: float | None = None  # set while the breaker is open
        self._probing = False  # one put is trying the store after a cooldown

    def put(self, key: str, data: bytes, content_type: str) -> str:
        """Store through the inner store; raise :class:`HeatmapStoreError` after the last attempt fails,
        or at once while the breaker is open."""
        self._admit()
        try:
            uri = self._put_with_retries(key, data, content_type)
        except HeatmapStoreError:
            self._record(ok=False)
            raise
        except BaseException:
            self._record(ok=None)  # not the store's verdict (an interrupt): leave the count alone
            raise
        self._record(ok=True)
        return uri

    @property
    def breaker_open(self) -> bool:
        """Whether puts are refused right now."""
        with self._lock:
            return self._open_until is not None and (self._probing or self._clock() < self._open_until)

    def _admit(self) -> None:
        with self._lock:
            if self._open_until is None:
                return
            if self._probing or self._clock() < self._open_until:
                raise HeatmapStoreError(
                    f"heatmap store not tried: {self._failures_in_row} puts in a row failed "
                    f"(circuit open, retried after {self._breaker_cooldown_s:g} s)"
                )
            self._probing = True  # this put tries the store; the others keep failing fast meanwhile

    def _record(self, *, ok: bool | None) -> None:
        with self._lock:
            probing, self._probing = self._probing, False
            if ok is None:
                return
            if ok:
                if self._open_until is not None:
                    log.info("heatmap_store_circuit_closed", failures_in_row=self._failures_in_row)
                self._failures_in_row, self._open_until = 0, None
                return
            self._failures_in_row += 1
            if self._breaker_failures and (probing or self._failures_in_row >= self._breaker_failures):
                if self._open_until is None or probing:
                    log.error(
                        "heatmap_store_circuit_open",
                        failures_in_row=self._failures_in_row,
                        cooldown_s=self._breaker_cooldown_s,
                    )
                self._open_until = self._clock() + self._breaker_cooldown_s

    def _put_with_retries(self, key: str, data: bytes, content_type: str) -> str:
        attempts = self.retries + 1
        for attempt in range(attempts):
            try:
                return self.inner.put(key, data, content_type)
            except HeatmapStoreError as exc:
                if attempt + 1 == attempts:
                    raise HeatmapStoreError(f"{exc} (gave up after {attempts} attempts)") from exc
                delay_s = self.backoff_ms * (2**attempt) / 1000.0
                log.warning("heatmap_store_retry", key=key, attempt=attempt + 1, delay_s=delay_s, error=str(exc))
                self._sleep(delay_s)
        raise AssertionError("unreachable")  # pragma: no cover


@dataclass(frozen=True, slots=True)
class StoredHeatmap:
    """Where a heatmap went and what it is (the result's heatmap reference)."""

    uri: str
    format: str
    width: int
    height: int
    sha256: str


def save_heatmap(
    store: HeatmapStore,
    product_line: str,
    captured_at: datetime,
    message_id: str,
    anomaly_map: np.ndarray,
    threshold: float,
    max_side_px: int | None = None,
) -> StoredHeatmap:
    """Encode a map as PNG (threshold at 128) and store it under :func:`heatmap_key`.

    With ``max_side_px`` the map is first shrunk by :func:`downscale_keeping_peaks`; the stored
    width and height are the shrunk ones.

    Raises:
        HeatmapStoreError: the store failed (after its retries).
    """
    if max_side_px is not None:
        anomaly_map = downscale_keeping_peaks(anomaly_map, max_side_px)
    data = encode_heatmap_png(anomaly_map, threshold)
    digest = hashlib.sha256(data).hexdigest()
    uri = store.put(heatmap_key(product_line, captured_at, message_id, "png", content_sha256=digest), data, "image/png")
    height, width = anomaly_map.shape
    return StoredHeatmap(uri, "png", int(width), int(height), digest)


def open_heatmap_store(heatmaps: HeatmapSettings, s3: S3Settings, *, s3_client: Any | None = None) -> HeatmapStore:
    """Build the configured store (``file://DIR`` or ``s3://bucket/prefix``) wrapped in retries.

    Args:
        heatmaps: the ``heatmaps`` settings section (store URI, retries, backoff).
        s3: the ``s3`` settings section (used for ``s3://``).
        s3_client: an existing boto3 client to share; built from ``s3`` when None.

    Returns:
        A :class:`RetryingHeatmapStore` around the file or S3 store.
    """
    uri = heatmaps.store_uri
    inner: HeatmapStore
    if uri.startswith("file://"):
        # file://relative/dir and file:///absolute/dir are both accepted (netloc is not a host here).
        inner = FileHeatmapStore(uri.removeprefix("file://"))
    else:
        bucket, prefix = parse_s3_uri(uri)
        client = s3_client if s3_client is not None else make_s3_client(s3, max_pool_connections=heatmaps.threads)
        inner = S3HeatmapStore(bucket, prefix, client)
    return RetryingHeatmapStore(
        inner,
        heatmaps.retries,
        heatmaps.backoff_ms,
        breaker_failures=heatmaps.breaker_failures,
        breaker_cooldown_s=heatmaps.breaker_cooldown_s,
    )
