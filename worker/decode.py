"""Guarded image decoding: header probe, bomb and type checks, normalisation, claim-check fetches.

Owns everything between a record's bytes and an ``(H, W, 3)`` uint8 RGB array:

* :func:`probe_image` reads width, height, channels and bit depth from the JPEG SOF, PNG IHDR, BMP
  header or first TIFF IFD without decoding, so :func:`decode_image` can refuse a decompression bomb
  (a few KB declaring 100000x100000 pixels) before OpenCV allocates anything. It walks a JPEG's
  markers to EOI (refusing more than :data:`MAX_JPEG_SCANS` scans, each a pass of the decoder over the
  image) and reads a TIFF's tile size (the decoder allocates one tile).
* :func:`decode_image` checks size, sniffs the magic bytes against the declared content type, probes,
  decodes with ``cv2.IMREAD_UNCHANGED`` and normalises (gray -> 3 channels, 16-bit -> 8-bit, alpha
  dropped, BGR -> RGB). EXIF orientation is deliberately not applied: inspection cameras are fixed.
* :class:`ClaimCheckFetcher` downloads claim-check images from allowed sources only (``s3`` buckets,
  ``file://`` under a configured root; never http), capped in size and verified against their sha256.

Every failure is a :class:`DecodeError` with a stable kebab-case ``reason`` that goes into the dead
letter's ``error-reason`` header.

OpenCV keeps its own pixel limit, read from ``OPENCV_IO_MAX_IMAGE_PIXELS`` once, when the cv2 library
loads. The ``worker`` package sets it on import (see :mod:`worker`), before any of its modules imports
cv2; it is a second line of defence: the probe is the guard that always applies.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import cv2
import numpy as np
from botocore.exceptions import BotoCoreError, ClientError

from worker.s3 import make_s3_client, parse_s3_uri
from worker.settings import DecodeSettings, S3Settings

__all__ = [
    "CONTENT_TYPES",
    "MAX_JPEG_MARKERS",
    "MAX_JPEG_SCANS",
    "TIFF_MAX_TILE_SIDE_FLOOR",
    "ClaimCheckFetcher",
    "DecodeError",
    "DecodeReason",
    "ImageInfo",
    "check_image",
    "decode_checked",
    "decode_image",
    "probe_image",
    "sniff_format",
]

DecodeReason = Literal[
    "empty-value",
    "value-too-large",
    "unsupported-content-type",
    "content-type-mismatch",
    "corrupt-image",
    "too-many-pixels",
    "unsupported-bit-depth",
    "claim-check-denied",
    "claim-check-fetch-failed",
    "claim-check-checksum-mismatch",
]

ImageFormat = Literal["jpeg", "png", "bmp", "tiff"]

#: Accepted ``content-type`` values (parameters and case ignored) and the format each declares.
CONTENT_TYPES: dict[str, ImageFormat] = {
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",
    "image/pjpeg": "jpeg",
    "image/png": "png",
    "image/bmp": "bmp",
    "image/x-bmp": "bmp",
    "image/x-ms-bmp": "bmp",
    "image/tiff": "tiff",
    "image/tif": "tiff",
}

#: Most scans (SOS markers) a JPEG may have. libjpeg makes a pass over the whole frame per progressive
#: scan, so a file of thousands of tiny scans (44 bytes each, one end-of-band run) costs minutes of CPU:
#: 37 s for 0.5 MB at 6000x6000 (0.55 s with 100 such scans). Encoders write 1 scan (baseline), about
#: 10 (libjpeg's progressive script) or a few dozen (mozjpeg); nvImageCodec refuses more than 256.
MAX_JPEG_SCANS = 100
#: Most markers the probe's walk visits outside scan data (each is a step in Python; real files have a
#: few dozen, a few hundred with many scans; restart markers inside scan data are not counted).
MAX_JPEG_MARKERS = 10_000

_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_JPEG_SOS = 0xDA
_JPEG_EOI = 0xD9
#: Markers with a length that libjpeg reads between scans: SOFn, DHT, DAC, SOS, DQT, DNL, DRI, APPn, COM.
_JPEG_SEGMENTS = _JPEG_SOF | {0xC4, 0xCC, 0xDA, 0xDB, 0xDC, 0xDD, 0xFE} | set(range(0xE0, 0xF0))
#: Markers without a length that libjpeg skips between segments: TEM and RST0-7.
_JPEG_PARAMETERLESS = frozenset({0x01, *range(0xD0, 0xD8)})
#: A marker (its code in group 1) after any fill bytes.
_JPEG_MARKER = re.compile(rb"\xff+([^\xff])")
#: The end of entropy-coded data: FF then a code other than a stuffed zero, RSTn or fill.
_JPEG_ENTROPY_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
#: Bytes per read of a claim-check download (between deadline checks).
_FETCH_CHUNK_BYTES = 1024 * 1024
_DEPTHS_8_16 = frozenset({1, 2, 4, 8, 16})
#: The first-IFD tags the probe reads (the suffix names them in error details).
_TIFF_TAG_NAMES = {
    256: " (ImageWidth)",
    257: " (ImageLength)",
    258: " (BitsPerSample)",
    277: " (SamplesPerPixel)",
    322: " (TileWidth)",
    323: " (TileLength)",
}
_TIFF_MAX_ENTRIES = 4096  # real files carry a few dozen
#: struct formats of the integer types libtiff reads those tags as: BYTE, SHORT, LONG, SBYTE, SSHORT,
#: SLONG (a 16000 TileWidth typed SLONG made OpenCV allocate its tile), and LONG8, SLONG8 in BigTIFF.
_TIFF_INT_TYPES = {1: "B", 3: "H", 4: "I", 6: "b", 8: "h", 9: "i"}
_BIGTIFF_INT_TYPES = {**_TIFF_INT_TYPES, 16: "Q", 17: "q"}
#: Pixels: a tile side up to this always passes (writers use 256 or 512, libtiff's default is 256); a
#: longer side must not exceed the image's side rounded up to 16 (tile sides are multiples of 16). OpenCV
#: decodes a tiled TIFF through a buffer of one whole tile: a 16x16 image declaring 16000x16000 tiles
#: made it fill 1 GB.
TIFF_MAX_TILE_SIDE_FLOOR = 1024


class DecodeError(Exception):
    """An image (or its claim check) cannot be turned into pixels.

    Attributes:
        reason: stable kebab-case code (see :data:`DecodeReason`), used in dead letters and metrics.
        detail: a human-readable explanation.
    """

    def __init__(self, reason: DecodeReason, detail: str) -> None:
        """Keep the code and the explanation."""
        super().__init__(f"{reason}: {detail}")
        self.reason: DecodeReason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What an image header declares.

    Attributes:
        format: jpeg, png, bmp or tiff.
        width: pixels.
        height: pixels.
        channels: samples per pixel as stored (None when the header does not say simply).
        bit_depth: bits per sample (None when unknown).
        tile: ``(width, height)`` of a tiled TIFF's tiles (the decoder allocates one), None otherwise.
    """

    format: ImageFormat
    width: int
    height: int
    channels: int | None
    bit_depth: int | None
    tile: tuple[int, int] | None = None

    @property
    def pixels(self) -> int:
        """Width times height."""
        return self.width * self.height


def sniff_format(data: bytes) -> ImageFormat | None:
    """The format the magic bytes announce, or None."""
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(_PNG_SIGNATURE):
        return "png"
    if data.startswith(b"BM"):
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    return None


def _corrupt(fmt: str, detail: str) -> DecodeError:
    return DecodeError("corrupt-image", f"{fmt}: {detail}")


def _jpeg_not_a_marker(data: bytes, pos: int) -> DecodeError:
    found = data[pos : pos + 2].hex(" ").upper()
    return _corrupt("jpeg", f"expected a marker at byte {pos}, found {found}")


def _probe_jpeg(data: bytes) -> ImageInfo:
    """Walk the marker structure from SOI to EOI as libjpeg reads it; the size is the frame header's.

    Segments are skipped by their length (an EXIF thumbnail inside APP1 is never read), entropy-coded
    data by a compiled search for the next marker, so a 15 MB file is walked in milliseconds. Refused
    as ``corrupt-image``: bytes that are not a marker where one is expected (libjpeg skips them,
    ``FF 00`` included, so a walk that read them as a segment could take a fake frame header hidden in
    an APP segment for the real one), markers libjpeg does not read, a second frame header, a scan
    before the frame header, more than :data:`MAX_JPEG_SCANS` scans or :data:`MAX_JPEG_MARKERS` markers.
    A file that ends before EOI is left to the decoder (libjpeg decodes what is there).
    """
    size = len(data)
    pos = 2
    frame: ImageInfo | None = None
    scans = markers = 0
    while pos < size:
        found = _JPEG_MARKER.match(data, pos)  # fill bytes (FF FF ...) may precede a marker
        if found is None:
            if data[pos] != 0xFF:
                raise _jpeg_not_a_marker(data, pos)
            break  # only fill bytes up to the end
        marker, start, pos = found.group(1)[0], found.start(1) - 1, found.end()
        markers += 1
        if markers > MAX_JPEG_MARKERS:
            raise _corrupt("jpeg", f"more than {MAX_JPEG_MARKERS} markers (the limit; real files have a few dozen)")
        if marker == _JPEG_EOI:
            break
        if marker in _JPEG_PARAMETERLESS:
            continue
        if marker not in _JPEG_SEGMENTS:
            if marker == 0x00:
                raise _jpeg_not_a_marker(data, start)
            raise _corrupt("jpeg", f"marker FF {marker:02X} at byte {start} is not one a JPEG decoder reads here")
        if pos + 2 > size:
            break
        (length,) = struct.unpack_from(">H", data, pos)
        if length < 2:
            raise _corrupt("jpeg", f"segment length {length} at byte {start}")
        end = pos + length
        if marker in _JPEG_SOF:
            if frame is not None:
                raise _corrupt("jpeg", f"a second frame header at byte {start}")
            if length < 8:
                raise _corrupt("jpeg", f"frame header length {length} at byte {start}")
            if pos + 8 > size:
                break
            precision, height, width, components = struct.unpack_from(">BHHB", data, pos + 2)
            frame = ImageInfo("jpeg", width, height, components, precision)
        elif marker == _JPEG_SOS:
            if frame is None:
                raise _corrupt("jpeg", "no frame header before the scan data")
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise _corrupt(
                    "jpeg", f"more than {MAX_JPEG_SCANS} scans (the limit; each costs a pass over the image)"
                )
            entropy_end = _JPEG_ENTROPY_END.search(data, end)
            if entropy_end is None:
                break  # truncated in the scan data
            end = entropy_end.start()
        pos = end
    if frame is None:
        raise _corrupt("jpeg", "no frame header before the end of the data")
    return frame


def _probe_png(data: bytes) -> ImageInfo:
    if len(data) < 33:
        raise _corrupt("png", "truncated before the IHDR chunk")
    length, chunk_type, width, height, depth, color_type = struct.unpack_from(">I4sIIBB", data, 8)
    if chunk_type != b"IHDR" or length != 13:
        raise _corrupt("png", "the first chunk is not IHDR")
    return ImageInfo("png", width, height, _PNG_CHANNELS.get(color_type), depth)


def _probe_bmp(data: bytes) -> ImageInfo:
    if len(data) < 26:
        raise _corrupt("bmp", "truncated header")
    (header_size,) = struct.unpack_from("<I", data, 14)
    if header_size == 12:  # BITMAPCOREHEADER (OS/2)
        width, height, _planes, bpp = struct.unpack_from("<HHHH", data, 18)
    elif header_size >= 40 and len(data) >= 30:
        width, height, _planes, bpp = struct.unpack_from("<iiHH", data, 18)
        height = abs(height)  # negative = top-down rows
    else:
        raise _corrupt("bmp", f"unknown header size {header_size}")
    if width <= 0:
        raise _corrupt("bmp", f"width {width}")
    channels = {24: 3, 32: 4, 16: 3}.get(bpp, 3 if bpp in (1, 4, 8) else None)
    return ImageInfo("bmp", width, height, channels, 8 if channels else None)


def _tiff_entries(data: bytes, order: str, big: bool) -> Iterator[tuple[int, int, int]]:
    """``(tag, type, offset of the value field)`` of each entry of the first IFD, in file order.

    The TIFF specification requires ascending tags; a repeated tag is where decoders disagree (libtiff
    keeps the first copy and ignores the rest), so a probe that read another copy than the decoder
    would pass a bomb. Anything but strictly ascending tags is refused as corrupt.
    """
    if big:  # BigTIFF: 8-byte offsets, 20-byte entries
        if len(data) < 16:
            raise _corrupt("tiff", "truncated header")
        (ifd,) = struct.unpack_from(order + "Q", data, 8)
        count_fmt, entry_size, value_size = "Q", 20, 8
    else:
        if len(data) < 8:
            raise _corrupt("tiff", "truncated header")
        (ifd,) = struct.unpack_from(order + "I", data, 4)
        count_fmt, entry_size, value_size = "H", 12, 4
    count_size = struct.calcsize(count_fmt)
    if ifd + count_size > len(data):
        raise _corrupt("tiff", "first IFD offset lies beyond the data")
    (count,) = struct.unpack_from(order + count_fmt, data, ifd)
    if count > _TIFF_MAX_ENTRIES:
        raise _corrupt("tiff", f"the first IFD lists {count} entries (at most {_TIFF_MAX_ENTRIES} are read)")
    seen: set[int] = set()
    previous = -1
    for index in range(count):
        entry = ifd + count_size + index * entry_size
        if entry + entry_size > len(data):
            raise _corrupt("tiff", "truncated IFD")
        tag, kind = struct.unpack_from(order + "HH", data, entry)
        if tag in seen:
            raise _corrupt("tiff", f"the first IFD repeats tag {tag}{_TIFF_TAG_NAMES.get(tag, '')}")
        if tag < previous:
            raise _corrupt("tiff", f"the first IFD's tags are not in ascending order ({tag} after {previous})")
        seen.add(tag)
        previous = tag
        yield tag, kind, entry + entry_size - value_size


def _probe_tiff(data: bytes) -> ImageInfo:
    order = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\x00", b"\x00+")
    int_types = _BIGTIFF_INT_TYPES if big else _TIFF_INT_TYPES
    tags: dict[int, int] = {}
    for tag, kind, value_at in _tiff_entries(data, order, big):
        if tag not in _TIFF_TAG_NAMES:
            continue
        if kind not in int_types:  # libtiff reads any integer type: one the probe skipped could hide a bomb
            readable = ", ".join(map(str, int_types))
            raise _corrupt("tiff", f"tag {tag}{_TIFF_TAG_NAMES[tag]} has type {kind} (read: types {readable})")
        # The first value sits at the start of the value field.
        (value,) = struct.unpack_from(order + int_types[kind], data, value_at)
        if value < 0:
            raise _corrupt("tiff", f"tag {tag}{_TIFF_TAG_NAMES[tag]} is {value}")
        tags[tag] = value
    if 256 not in tags or 257 not in tags:
        raise _corrupt("tiff", "no ImageWidth/ImageLength in the first IFD")
    width, height = tags[256], tags[257]
    samples = tags.get(277, 1)
    # With several samples BitsPerSample is an offset to an array, not a value: report it when simple.
    depth = tags.get(258, 1) if samples == 1 else None
    tile = None
    if 322 in tags or 323 in tags:
        tile = (tags.get(322, width), tags.get(323, height))
        limit = (
            max(TIFF_MAX_TILE_SIDE_FLOOR, -(-width // 16) * 16),
            max(TIFF_MAX_TILE_SIDE_FLOOR, -(-height // 16) * 16),
        )
        if tile[0] > limit[0] or tile[1] > limit[1]:
            raise _corrupt(
                "tiff",
                f"tiles of {tile[0]}x{tile[1]} pixels for a {width}x{height} image (at most {limit[0]}x{limit[1]}: "
                f"{TIFF_MAX_TILE_SIDE_FLOOR} or the image side rounded up to 16)",
            )
    return ImageInfo("tiff", width, height, samples, depth, tile)


_PROBES: dict[ImageFormat, Callable[[bytes], ImageInfo]] = {
    "jpeg": _probe_jpeg,
    "png": _probe_png,
    "bmp": _probe_bmp,
    "tiff": _probe_tiff,
}


def probe_image(data: bytes) -> ImageInfo:
    """Read an image's dimensions from its header without decoding it.

    Args:
        data: the encoded file (JPEG, PNG, BMP or TIFF).

    Returns:
        The declared format, size, channels and bit depth.

    Raises:
        DecodeError: ``unsupported-content-type`` for unknown magic bytes, ``corrupt-image`` for a
            truncated or malformed header.
    """
    fmt = sniff_format(data)
    if fmt is None:
        raise DecodeError("unsupported-content-type", "not a JPEG, PNG, BMP or TIFF file")
    try:
        info = _PROBES[fmt](data)
    except struct.error as exc:
        raise _corrupt(fmt, f"truncated header ({exc})") from exc
    if info.width <= 0 or info.height <= 0:
        raise _corrupt(fmt, f"declares {info.width}x{info.height} pixels")
    return info


def _declared_format(content_type: str | None) -> ImageFormat | None:
    if content_type is None:
        return None
    media = content_type.split(";", 1)[0].strip().lower()
    if media not in CONTENT_TYPES:
        raise DecodeError("unsupported-content-type", f"content-type {content_type!r} is not an accepted image type")
    return CONTENT_TYPES[media]


def _check_depth(info: ImageInfo) -> None:
    allowed = {8} if info.format == "jpeg" else _DEPTHS_8_16
    if info.bit_depth is not None and info.bit_depth not in allowed:
        raise DecodeError("unsupported-bit-depth", f"{info.format} with {info.bit_depth} bits per sample")


def check_image(data: bytes, content_type: str | None, *, max_pixels: int, max_value_bytes: int) -> ImageInfo:
    """Every guard :func:`decode_image` applies before decoding, without decoding.

    Args:
        data: the encoded file.
        content_type: the declared media type (``image/jpeg``...); None trusts the magic bytes.
        max_pixels: refuse images declaring more pixels (checked on the header).
        max_value_bytes: refuse larger inputs.

    Returns:
        What the header declares; the data may now be handed to a decoder.

    Raises:
        DecodeError: with reason ``empty-value``, ``value-too-large``, ``unsupported-content-type``,
            ``content-type-mismatch``, ``too-many-pixels``, ``unsupported-bit-depth`` or ``corrupt-image``.
    """
    if not data:
        raise DecodeError("empty-value", "the image is empty")
    if len(data) > max_value_bytes:
        raise DecodeError("value-too-large", f"{len(data)} bytes is over the limit of {max_value_bytes}")
    declared = _declared_format(content_type)
    sniffed = sniff_format(data)
    if declared is not None and sniffed != declared:
        if sniffed is None:
            raise _corrupt(declared, "the data does not start with the format's magic bytes")
        raise DecodeError("content-type-mismatch", f"declared {content_type!r} but the data is {sniffed}")
    info = probe_image(data)
    if info.pixels > max_pixels:
        raise DecodeError("too-many-pixels", f"{info.width}x{info.height} is over the limit of {max_pixels} pixels")
    if info.tile is not None and info.tile[0] * info.tile[1] > max_pixels:
        tile_w, tile_h = info.tile
        raise DecodeError("too-many-pixels", f"tiles of {tile_w}x{tile_h} are over the limit of {max_pixels} pixels")
    _check_depth(info)
    return info


def decode_checked(data: bytes, info: ImageInfo, *, max_pixels: int) -> np.ndarray:
    """Decode data that :func:`check_image` accepted into an ``(H, W, 3)`` uint8 RGB array.

    Raises:
        DecodeError: ``corrupt-image``, ``too-many-pixels`` (the decoder disagreed with the header)
            or ``unsupported-bit-depth``.
    """
    try:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise _corrupt(info.format, f"OpenCV refused it ({str(exc).strip().splitlines()[-1]})") from exc
    if image is None or image.size == 0:
        raise _corrupt(info.format, "OpenCV could not decode it (truncated or corrupt)")
    if image.shape[0] * image.shape[1] > max_pixels:  # a decoder that disagreed with the header
        raise DecodeError("too-many-pixels", f"decoded {image.shape[1]}x{image.shape[0]} pixels")
    return _to_rgb8(image, info.format)


def decode_image(data: bytes, content_type: str | None, *, max_pixels: int, max_value_bytes: int) -> np.ndarray:
    """Decode an image into an ``(H, W, 3)`` uint8 RGB array, refusing anything unsafe first.

    :func:`check_image` then :func:`decode_checked`; see them for the arguments and the reasons.

    Returns:
        A C-contiguous ``(H, W, 3)`` uint8 RGB array.

    Raises:
        DecodeError: with reason ``empty-value``, ``value-too-large``, ``unsupported-content-type``,
            ``content-type-mismatch``, ``too-many-pixels``, ``unsupported-bit-depth`` or ``corrupt-image``.
    """
    info = check_image(data, content_type, max_pixels=max_pixels, max_value_bytes=max_value_bytes)
    return decode_checked(data, info, max_pixels=max_pixels)


def _to_rgb8(image: np.ndarray, fmt: str) -> np.ndarray:
    if image.dtype == np.uint16:
        image = cv2.convertScaleAbs(image, alpha=255.0 / 65535.0)  # rounds and saturates
    elif image.dtype != np.uint8:
        raise DecodeError("unsupported-bit-depth", f"{fmt} decodes to {image.dtype} samples")
    if image.ndim == 3 and image.shape[2] in (1, 2):
        image = image[:, :, 0]  # gray (+ alpha)
    if image.ndim == 2:
        rgb = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    elif image.shape[2] == 4:
        rgb = cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    elif image.shape[2] == 3:
        rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    else:
        raise DecodeError("unsupported-bit-depth", f"{fmt} decodes to {image.shape[2]} channels")
    return np.ascontiguousarray(rgb)


class ClaimCheckFetcher:
    """Fetches claim-check images from allowed sources, size-capped and sha256-verified.

    Allowed: ``s3://bucket/key`` when ``s3`` is in ``claim_check_schemes`` (and the bucket is in
    ``claim_check_buckets`` when that list is not empty); ``file:///path`` when ``file`` is in
    ``claim_check_schemes`` and ``claim_check_file_root`` is set and the resolved path (symlinks
    followed) stays under it. ``http(s)`` is never fetched: the worker must not become a proxy into the
    plant network (SSRF). The size cap is ``max_value_bytes``, the same as for inline images.

    Args:
        settings: the ``decode`` settings section.
        s3_client_factory: builds a boto3 S3 client (called once, on the first ``s3://`` fetch); give it
            a timeout of ``fetch_timeout_ms``, e.g. ``make_s3_client(s3, timeout_s=...)``.
    """

    def __init__(self, settings: DecodeSettings, s3_client_factory: Callable[[], Any]) -> None:
        """Keep the policy; nothing connects yet."""
        self._settings = settings
        self._s3_client_factory = s3_client_factory
        self._s3_client: Any = None
        self._lock = threading.Lock()
        root = settings.claim_check_file_root
        self._file_root = root.resolve() if root is not None else None

    @classmethod
    def from_settings(cls, decode: DecodeSettings, s3: S3Settings) -> ClaimCheckFetcher:
        """A fetcher whose S3 client is built from ``s3`` with ``decode.fetch_timeout_ms`` as timeout."""
        timeout_s = decode.fetch_timeout_ms / 1000.0
        return cls(
            decode,
            lambda: make_s3_client(s3, timeout_s=timeout_s, max_attempts=2, max_pool_connections=decode.workers),
        )

    def fetch(self, uri: str, sha256: str) -> bytes:
        """Download a claim-check image and verify it.

        Args:
            uri: ``s3://bucket/key`` or ``file:///path``.
            sha256: expected lowercase hex digest of the bytes.

        Returns:
            The encoded image bytes.

        Raises:
            DecodeError: ``claim-check-denied`` (source not allowed), ``claim-check-fetch-failed``,
                ``value-too-large``, ``empty-value`` or ``claim-check-checksum-mismatch``.
        """
        expected = sha256.strip().lower()
        if not _SHA256_HEX.fullmatch(expected):
            raise DecodeError("claim-check-checksum-mismatch", f"{sha256!r} is not a sha256 hex digest")
        try:
            scheme = urlsplit(uri).scheme.lower()
        except ValueError as exc:  # e.g. "Invalid IPv6 URL" for s3://[x/k
            raise DecodeError("claim-check-denied", f"{uri!r} is not a URI: {exc}") from None
        if scheme in ("http", "https"):
            raise DecodeError("claim-check-denied", f"{scheme}:// claim checks are not supported")
        if scheme not in self._settings.claim_check_schemes:
            allowed = ", ".join(self._settings.claim_check_schemes) or "none"
            raise DecodeError("claim-check-denied", f"scheme {scheme!r} is not allowed (allowed: {allowed})")
        if scheme == "s3":
            data = self._fetch_s3(uri)
        elif scheme == "file":
            data = self._fetch_file(uri)
        else:
            raise DecodeError("claim-check-denied", f"scheme {scheme!r} is not supported")
        if not data:
            raise DecodeError("empty-value", f"{uri} is empty")
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise DecodeError("claim-check-checksum-mismatch", f"{uri} has sha256 {actual}, not {expected}")
        return data

    def _too_large(self, uri: str, size: int) -> DecodeError:
        limit = self._settings.max_value_bytes
        return DecodeError("value-too-large", f"{uri} is {size} bytes, over the limit of {limit}")

    def _client(self) -> Any:
        with self._lock:
            if self._s3_client is None:
                self._s3_client = self._s3_client_factory()
            return self._s3_client

    def _fetch_s3(self, uri: str) -> bytes:
        try:
            bucket, key = parse_s3_uri(uri)
        except ValueError as exc:
            raise DecodeError("claim-check-denied", str(exc)) from exc
        if not key:
            raise DecodeError("claim-check-denied", f"{uri} names no object")
        buckets = self._settings.claim_check_buckets
        if buckets and bucket not in buckets:
            raise DecodeError("claim-check-denied", f"bucket {bucket!r} is not in the allowed claim-check buckets")
        limit = self._settings.max_value_bytes
        # botocore's timeouts bound each socket read, not the download: a server sending a byte every
        # half second held a decode thread for minutes. The body is read in chunks against a deadline.
        deadline = time.monotonic() + 2 * self._settings.fetch_timeout_ms / 1000.0
        try:
            response = self._client().get_object(Bucket=bucket, Key=key)
            announced = response.get("ContentLength")
            size = int(announced or 0)
            if size > limit:
                response["Body"].close()
                raise self._too_large(uri, size)
            body = response["Body"]

            def in_time(received: int) -> None:
                if time.monotonic() > deadline:
                    raise DecodeError(
                        "claim-check-fetch-failed",
                        f"{uri}: {received} bytes after {2 * self._settings.fetch_timeout_ms} ms "
                        "(twice SPACE_DECODE__FETCH_TIMEOUT_MS): too slow",
                    )

            try:
                data = _read_up_to(body.read, limit + 1, after_chunk=in_time)
            finally:
                body.close()
        except (BotoCoreError, ClientError) as exc:
            raise DecodeError("claim-check-fetch-failed", f"{uri}: {exc}") from exc
        if len(data) > limit:
            raise self._too_large(uri, len(data))
        if announced is not None and len(data) != size:  # the connection ended early: not a checksum problem
            raise DecodeError("claim-check-fetch-failed", f"{uri}: {len(data)} of {size} bytes received")
        return data

    def _fetch_file(self, uri: str) -> bytes:
        if self._file_root is None:
            raise DecodeError("claim-check-denied", "file:// claim checks need SPACE_DECODE__CLAIM_CHECK_FILE_ROOT")
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise DecodeError("claim-check-denied", f"file:// host {parts.netloc!r} is not local")
        raw = unquote(parts.path)
        if "\x00" in raw:  # %00: no file has it in its name, and Path.resolve() raises ValueError on it
            raise DecodeError("claim-check-denied", f"{uri} holds a NUL byte")
        try:
            path = Path(raw).resolve()
        except (OSError, RuntimeError) as exc:  # a symlink loop (RuntimeError before Python 3.13)
            raise DecodeError("claim-check-denied", f"{uri}: {exc}") from exc
        if not path.is_relative_to(self._file_root):
            raise DecodeError("claim-check-denied", f"{path} is outside the claim-check root {self._file_root}")
        limit = self._settings.max_value_bytes
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer; O_NOFOLLOW: not a link made since resolve().
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise DecodeError("claim-check-fetch-failed", f"{uri}: {exc.strerror or exc}") from exc
        try:
            opened = _opened_path(fd)
            if opened is not None and not opened.is_relative_to(self._file_root):
                # A folder swapped for a link between resolve() and open(): refused, its bytes unread.
                raise DecodeError("claim-check-denied", f"{uri} led outside the claim-check root {self._file_root}")
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):  # a FIFO or a device would block or never end
                raise DecodeError("claim-check-denied", f"{path} is not a regular file")
            if info.st_size > limit:
                raise self._too_large(uri, info.st_size)
            data = _read_up_to(lambda size: os.read(fd, size), limit + 1)
        except OSError as exc:
            raise DecodeError("claim-check-fetch-failed", f"{uri}: {exc.strerror or exc}") from exc
        finally:
            os.close(fd)
        if len(data) > limit:
            raise self._too_large(uri, len(data))
        return data


def _opened_path(fd: int) -> Path | None:
    """The path the kernel opened for ``fd`` (Linux ``/proc``), or None where it cannot say."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return None


def _read_up_to(
    read: Callable[[int], bytes], size: int, *, after_chunk: Callable[[int], None] = lambda received: None
) -> bytes:
    """At most ``size`` bytes from ``read`` (a file descriptor's or an HTTP body's), in chunks.

    ``after_chunk`` sees the bytes received so far after each chunk (a deadline check raises there).
    """
    chunks: list[bytes] = []
    received = 0
    while received < size:
        chunk = read(min(size - received, _FETCH_CHUNK_BYTES))
        if not chunk:
            break
        chunks.append(chunk)
        received += len(chunk)
        after_chunk(received)
    return b"".join(chunks)
