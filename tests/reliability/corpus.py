"""A corpus of hostile inputs generated on the fly (nothing checked in): broken images, bombs, odd but
valid images, and broken CloudEvents attributes.

Each case is ``(name, headers, value, expected)`` where ``expected`` is ``"result"`` or a dead-letter
reason; ``None`` means "whatever the decoder says" (fuzzed bytes: the test asks the unit-level oracle).
"""

from __future__ import annotations

import hashlib
import json
import random
import struct
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np

from schemas.request import InspectionRequest, build_request_headers

LINE = "brick"


@dataclass(frozen=True)
class Case:
    name: str
    headers: list[tuple[str, bytes | None]]
    value: bytes | None
    expected: str | None  # "result", a dead-letter reason, or None (ask the oracle)


def headers_for(message_id: str, content_type: str = "image/png", **override: bytes | None) -> list[tuple[str, bytes | None]]:
    request = InspectionRequest(
        message_id=message_id, source="test/hostile", time=datetime.now(UTC), product_line=LINE, camera_id="cam-h",
        content_type="image/png",
    )  # fmt: skip
    out: list[tuple[str, bytes | None]] = [(k, v) for k, v in build_request_headers(request) if k != "content-type"]
    out.append(("content-type", content_type.encode()))
    for key, value in override.items():
        name = key.replace("__", "-")
        out = [(k, v) for k, v in out if k != name]
        if value is not None:
            out.append((name, value))
    return out


def png(array: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", array)
    assert ok
    return buf.tobytes()


def jpeg(array: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", array, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_with_ihdr(width: int, height: int, depth: int = 8, color: int = 2, idat: bytes = b"") -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat or zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b"")


def png_bomb(width: int, height: int) -> bytes:
    """A real, valid gray PNG of zeros: a few KB that decode to width*height bytes."""
    raw = zlib.compressobj(9)
    row = b"\0" * (width + 1)
    data = b"".join(raw.compress(row) for _ in range(height)) + raw.flush()
    return png_with_ihdr(width, height, 8, 0, data)


def jpeg_with_sof(base: bytes, width: int, height: int, precision: int = 8) -> bytes:
    """Rewrite the frame header (SOF0) of a real JPEG to declare another size or precision."""
    data = bytearray(base)
    pos = 2
    while pos < len(data):
        marker = data[pos + 1]
        length = struct.unpack_from(">H", data, pos + 2)[0]
        if marker == 0xC0:
            struct.pack_into(">BHH", data, pos + 4, precision, height, width)
            return bytes(data)
        pos += 2 + length
    raise AssertionError("no SOF0")


def tiff_header(width: int, height: int) -> bytes:
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (277, 3, 1, 1)]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + b"\0\0\0\0"
    return b"II*\x00" + struct.pack("<I", 8) + ifd


def tiff_with_tags(entries: list[tuple[int, int, int]], strip: bytes) -> bytes:
    """A little-endian TIFF with one strip; ``entries`` are ``(tag, type, value)`` written in the given order,
    with StripOffsets (273) and StripByteCounts (279) filled in to point at ``strip``."""
    fill = {273: 8 + 2 + 12 * len(entries) + 4, 279: len(strip)}
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        value = fill.get(tag, value)
        ifd += struct.pack("<HHIHH", tag, kind, 1, value, 0) if kind == 3 else struct.pack("<HHII", tag, kind, 1, value)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\0\0\0\0" + strip


def tiff_repeated_width(real_width: int, fake_width: int, height: int) -> bytes:
    """A real deflate TIFF of zeros whose first IFD lists ImageWidth twice: ``real_width`` first (what
    libtiff decodes: it ignores repeats), then ``fake_width`` (what a last-wins header probe would read)."""
    strip = zlib.compress(bytes(real_width * height), 9)
    entries = [(256, 4, real_width), (256, 3, fake_width), (257, 4, height), (258, 3, 8), (259, 3, 8), (262, 3, 1),
               (273, 4, 0), (277, 3, 1), (278, 4, height), (279, 4, 0)]  # fmt: skip
    return tiff_with_tags(entries, strip)


def bmp_header(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info), 0, 0, 14 + len(info)) + info


def jpeg_with_huge_header(base: bytes, segments: int = 16) -> bytes:
    app = b"\xff\xe1" + struct.pack(">H", 65535) + b"\0" * 65533  # 64 KB APP1 segments before the frame
    return base[:2] + app * segments + base[2:]


def png_with_huge_text(base: bytes, size: int = 1 << 20) -> bytes:
    return base[:33] + _chunk(b"tEXt", b"comment\0" + b"A" * size) + base[33:]


def image_cases(rng: random.Random, tmp: Path) -> list[Case]:
    """Broken, bombed and odd images (inline values)."""
    noise = np.random.default_rng(rng.randrange(1 << 30)).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    good_png, good_jpeg = png(noise), jpeg(noise)
    cases: list[Case] = []
    n = 0

    def add(value: bytes | None, expected: str | None, content_type: str = "image/png", label: str = "") -> None:
        nonlocal n
        mid = f"img-{n:03d}-{label}"
        n += 1
        cases.append(Case(mid, headers_for(mid, content_type), value, expected))

    # Truncations and corruption of real files (the oracle decides: a truncated JPEG may still decode).
    for cut in (0, 3, 8, 20, 32, 40, len(good_png) // 2, len(good_png) - 12):
        add(good_png[:cut], "empty-value" if cut == 0 else None, label=f"png-cut{cut}")
    for cut in (2, 4, 30, len(good_jpeg) // 3, len(good_jpeg) - 2):
        add(good_jpeg[:cut], None, "image/jpeg", label=f"jpeg-cut{cut}")
    for i in range(12):
        for base, ctype in ((good_png, "image/png"), (good_jpeg, "image/jpeg")):
            data = bytearray(base)
            for _ in range(rng.randint(1, 20)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            add(bytes(data), None, ctype, label=f"flip{i}")
    # Decompression bombs: a tiny file declaring a huge image, and real ones that are valid but too big.
    add(png_with_ihdr(100_000, 100_000), "too-many-pixels", label="png-ihdr-bomb")
    add(png_bomb(3000, 3000), "too-many-pixels", label="png-real-bomb")
    add(jpeg_with_sof(good_jpeg, 65_000, 65_000), "too-many-pixels", "image/jpeg", label="jpeg-sof-bomb")
    add(tiff_header(100_000, 100_000), "too-many-pixels", "image/tiff", label="tiff-bomb")
    add(bmp_header(100_000, 100_000), "too-many-pixels", "image/bmp", label="bmp-bomb")
    # 6000x1000 behind a second ImageWidth of 8: under OpenCV's own limit, over the worker's.
    add(tiff_repeated_width(6000, 8, 1000), "corrupt-image", "image/tiff", label="tiff-repeated-width")
    add(png_with_ihdr(0, 10), "corrupt-image", label="png-zero-width")
    add(jpeg_with_sof(good_jpeg, 64, 64, precision=12), "unsupported-bit-depth", "image/jpeg", label="jpeg-12bit")
    # Odd but valid: 16-bit, gray, RGBA, gray+16-bit, a large (allowed) image, huge headers.
    wide = np.random.default_rng(1).integers(0, 65535, (48, 40, 3), dtype=np.uint16)
    add(png(wide), "result", label="png-16bit-rgb")
    add(png(wide[:, :, 0]), "result", label="png-16bit-gray")
    add(png(noise[:, :, 0]), "result", label="png-gray")
    add(png(np.dstack([noise, noise[:, :, :1]])), "result", label="png-rgba")
    add(jpeg(noise[:, :, 0]), "result", "image/jpeg", label="jpeg-gray")
    add(png_bomb(1500, 1500), "result", label="png-large-allowed")
    add(png_with_huge_text(good_png), "result", label="png-1mb-text-chunk")
    add(jpeg_with_huge_header(good_jpeg), "result", "image/jpeg", label="jpeg-1mb-app-segments")
    # Type confusion.
    add(good_jpeg, "content-type-mismatch", "image/png", label="jpeg-as-png")
    add(b"GIF89a" + b"\0" * 100, "corrupt-image", "image/png", label="gif-as-png")
    add(good_png, "unsupported-content-type", "image/gif", label="gif-type")
    add(b"\0", "corrupt-image", "image/png", label="one-zero-byte")
    return cases


def attribute_cases(good_png: bytes) -> list[Case]:
    """Broken CloudEvents attributes on an otherwise valid image."""
    specs: list[tuple[str, dict[str, bytes | None], bytes | None, str]] = [
        ("no-id", {"ce_id": None}, good_png, "missing-attribute"),
        ("no-source", {"ce_source": None}, good_png, "missing-attribute"),
        ("no-line", {"ce_productline": None}, good_png, "missing-attribute"),
        ("old-spec", {"ce_specversion": b"0.3"}, good_png, "unsupported-specversion"),
        ("wrong-type", {"ce_type": b"com.example.other"}, good_png, "wrong-event-type"),
        ("bad-utf8-camera", {"ce_cameraid": b"\xff\xfe\xfa"}, good_png, "invalid-header-encoding"),
        ("bad-utf8-id", {"ce_id": b"abc\xc3\x28"}, good_png, "invalid-header-encoding"),
        ("line-traversal", {"ce_productline": b"../../etc"}, good_png, "invalid-attribute"),
        ("control-chars", {"ce_cameraid": b"cam\x00\x1b[31m"}, good_png, "invalid-attribute"),
        ("huge-partid", {"ce_partid": b"p" * 1_000_000}, good_png, "invalid-attribute"),
        ("bad-time", {"ce_time": b"yesterday"}, good_png, "invalid-attribute"),
        ("text-type", {"content-type": b"text/plain"}, good_png, "unsupported-content-type"),
        ("zero-bytes", {}, b"", "empty-value"),
        ("tombstone", {}, None, "empty-value"),
        ("unknown-line", {"ce_productline": b"no-such-line"}, good_png, "unknown-product-line"),
    ]
    cases = []
    for name, override, value, expected in specs:
        mid = f"attr-{name}"
        cases.append(Case(mid, headers_for(mid, **override), value, expected))
    dup = [*headers_for("attr-dup-id"), ("ce_id", b"other")]
    cases.append(Case("attr-dup-id", dup, good_png, "duplicate-attribute"))
    return cases


def claim_check_cases(good_png: bytes, claims_root: Path, outside: Path) -> list[Case]:
    """Claim checks to disallowed schemes, buckets and paths, plus one allowed file claim."""
    digest = hashlib.sha256(good_png).hexdigest()
    claims_root.mkdir(parents=True, exist_ok=True)
    (claims_root / "ok.png").write_bytes(good_png)
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "secret.png").write_bytes(good_png)
    link = claims_root / "link.png"
    if not link.exists():
        link.symlink_to(outside / "secret.png")
    specs: list[tuple[str, bytes, str]] = [
        ("http", json.dumps({"image_uri": "http://169.254.169.254/latest", "sha256": digest}).encode(), "invalid-claim-check"),
        ("ftp", json.dumps({"image_uri": "ftp://host/x.png", "sha256": digest}).encode(), "invalid-claim-check"),
        ("bucket", json.dumps({"image_uri": "s3://someone-elses/x.png", "sha256": digest}).encode(), "claim-check-denied"),
        ("etc-passwd", json.dumps({"image_uri": "file:///etc/passwd", "sha256": digest}).encode(), "claim-check-denied"),
        ("dotdot", json.dumps({"image_uri": f"file://{claims_root}/../{outside.name}/secret.png", "sha256": digest}).encode(),
         "claim-check-denied"),
        ("encoded-dotdot", json.dumps({"image_uri": f"file://{claims_root}/%2e%2e/{outside.name}/secret.png",
                                       "sha256": digest}).encode(), "claim-check-denied"),
        ("symlink-out", json.dumps({"image_uri": f"file://{link}", "sha256": digest}).encode(), "claim-check-denied"),
        ("nul-byte", json.dumps({"image_uri": f"file://{claims_root}/ok%00.png", "sha256": digest}).encode(),
         "claim-check-denied"),
        ("remote-host", json.dumps({"image_uri": f"file://evil.example{claims_root}/ok.png", "sha256": digest}).encode(),
         "claim-check-denied"),
        ("bad-sha", json.dumps({"image_uri": f"file://{claims_root}/ok.png", "sha256": "0" * 64}).encode(),
         "claim-check-checksum-mismatch"),
        ("not-json", b"{not json", "invalid-claim-check"),
        ("json-bomb", b"[" * 100_000, "invalid-claim-check"),
        ("ok", json.dumps({"image_uri": f"file://{claims_root}/ok.png", "sha256": digest}).encode(), "result"),
    ]  # fmt: skip
    return [Case(f"claim-{n}", headers_for(f"claim-{n}", "application/json"), v, e) for n, v, e in specs]


def path_id_cases(good_png: bytes) -> list[Case]:
    """Valid images whose ids carry path characters: results, with the heatmap inside the store."""
    ids = ["../../../../tmp/evil", "/etc/cron.d/x", "a/b/../../c", "..", "C:\\Windows\\x", "%2e%2e%2fx", "~/.ssh/id"]
    return [Case(i, headers_for(i), good_png, "result") for i in ids]
