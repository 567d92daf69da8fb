"""Unit tests of the header probe, the guarded decode (reason codes, bombs, fuzz) and claim checks."""

from __future__ import annotations

import hashlib
import io
import json
import os
import resource
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any, get_args

import cv2
import numpy as np
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.decode import (
    MAX_JPEG_MARKERS,
    MAX_JPEG_SCANS,
    ClaimCheckFetcher,
    DecodeError,
    DecodeReason,
    ImageInfo,
    check_image,
    decode_image,
    probe_image,
    sniff_format,
)
from worker.settings import DecodeSettings

LIMITS = {"max_pixels": 1_000_000, "max_value_bytes": 1_000_000}
REPO = Path(__file__).resolve().parents[2]


def encode(ext: str, image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(ext, image)
    assert ok
    return buf.tobytes()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_bomb(width: int, height: int) -> bytes:
    """A valid-looking gray PNG of a few KB that declares width x height pixels."""
    rows = zlib.compress(b"\x00" * (width + 1) * 8, 9)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", rows) + png_chunk(b"IEND", b"")


def patch_jpeg_sof(data: bytes, *, width: int | None = None, height: int | None = None, precision: int | None = None):
    pos = data.index(b"\xff\xc0")
    out = bytearray(data)
    if precision is not None:
        out[pos + 4] = precision
    if height is not None:
        out[pos + 5 : pos + 7] = struct.pack(">H", height)
    if width is not None:
        out[pos + 7 : pos + 9] = struct.pack(">H", width)
    return bytes(out)


def tiff_from_entries(entries: list[tuple[int, int, int]], strip: bytes = b"") -> bytes:
    """A little-endian TIFF with one strip whose first IFD lists ``(tag, type, value)`` in the given order.

    StripOffsets (273) and StripByteCounts (279) are filled in to point at ``strip``.
    """
    fill = {273: 8 + 2 + 12 * len(entries) + 4, 279: len(strip)}
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        value = fill.get(tag, value)  # SHORT values sit at the start of the 4-byte value field
        ifd += struct.pack("<HHIHH", tag, kind, 1, value, 0) if kind == 3 else struct.pack("<HHII", tag, kind, 1, value)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00" * 4 + strip


def gray_tiff_entries(width: int, height: int) -> list[tuple[int, int, int]]:
    """One deflate strip of 8-bit gray, in ascending tag order."""
    return [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 8), (262, 3, 1), (273, 4, 0),
            (277, 3, 1), (278, 4, height), (279, 4, 0)]  # fmt: skip


RNG = np.random.default_rng(7)
RGB = RNG.integers(0, 256, (32, 48, 3), dtype=np.uint8)
BGR = np.ascontiguousarray(RGB[:, :, ::-1])
SAMPLES = {
    "jpeg": encode(".jpg", BGR),
    "png": encode(".png", BGR),
    "bmp": encode(".bmp", BGR),
    "tiff": encode(".tiff", BGR),
}
CONTENT_TYPE = {"jpeg": "image/jpeg", "png": "image/png", "bmp": "image/bmp", "tiff": "image/tiff"}


# --- probe -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", sorted(SAMPLES))
def test_probe_reads_dimensions_without_decoding(fmt):
    info = probe_image(SAMPLES[fmt])
    assert (info.format, info.width, info.height, info.channels) == (fmt, 48, 32, 3)
    assert info.pixels == 48 * 32


def test_probe_png_depth_and_channels():
    gray16 = encode(".png", np.zeros((5, 7), np.uint16))
    assert probe_image(gray16) == ImageInfo("png", 7, 5, 1, 16)
    rgba = encode(".png", np.zeros((5, 7, 4), np.uint8))
    assert probe_image(rgba) == ImageInfo("png", 7, 5, 4, 8)


def test_probe_big_endian_and_bigtiff():
    # Hand-made headers: big-endian classic TIFF with SHORT tags, and a little-endian BigTIFF with LONG8 tags.
    entries = struct.pack(">HHIHH", 256, 3, 1, 640, 0) + struct.pack(">HHIHH", 257, 3, 1, 480, 0)
    classic = b"MM\x00*" + struct.pack(">I", 8) + struct.pack(">H", 2) + entries + b"\x00" * 4
    assert probe_image(classic) == ImageInfo("tiff", 640, 480, 1, 1)
    big_entries = struct.pack("<HHQQ", 256, 16, 1, 70000) + struct.pack("<HHQQ", 257, 4, 1, 3)
    bigtiff = b"II+\x00" + struct.pack("<HHQ", 8, 0, 16) + struct.pack("<Q", 2) + big_entries
    assert probe_image(bigtiff) == ImageInfo("tiff", 70000, 3, 1, 1)


def test_probe_bmp_core_header_and_top_down():
    core = b"BM" + b"\x00" * 12 + struct.pack("<IHHHH", 12, 300, 200, 1, 24)
    assert probe_image(core) == ImageInfo("bmp", 300, 200, 3, 8)
    top_down = bytearray(SAMPLES["bmp"])
    top_down[22:26] = struct.pack("<i", -32)
    assert probe_image(bytes(top_down)).height == 32
    assert decode_image(bytes(top_down), "image/bmp", **LIMITS).shape == (32, 48, 3)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"GIF89a....", "unsupported-content-type"),
        (b"\xff\xd8\xff\xd9", "corrupt-image"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "corrupt-image"),
        (b"BM\x00\x00", "corrupt-image"),
        (b"II*\x00\xff\xff\x00\x00", "corrupt-image"),
        (SAMPLES["jpeg"][:20], "corrupt-image"),
        (patch_jpeg_sof(SAMPLES["jpeg"], height=0), "corrupt-image"),
    ],
)
def test_probe_refuses_broken_headers(data, reason):
    with pytest.raises(DecodeError) as info:
        probe_image(data)
    assert info.value.reason == reason


def test_tiff_repeating_image_width_is_refused_before_decoding():
    # libtiff decodes the first ImageWidth (2000), a last-wins probe would read 8: 2M pixels behind 8k.
    entries = gray_tiff_entries(2000, 1000)
    entries.insert(1, (256, 3, 8))
    data = tiff_from_entries(entries, zlib.compress(bytes(2000 * 1000), 9))
    with pytest.raises(DecodeError) as info:
        probe_image(data)
    assert info.value.reason == "corrupt-image"
    assert info.value.detail == "tiff: the first IFD repeats tag 256 (ImageWidth)"
    assert reason_of(data, "image/tiff") == "corrupt-image"


def test_tiff_tags_out_of_ascending_order_are_refused():
    entries = gray_tiff_entries(40, 30)
    entries[0], entries[1] = entries[1], entries[0]  # ImageLength before ImageWidth
    data = tiff_from_entries(entries, zlib.compress(bytes(40 * 30)))
    with pytest.raises(DecodeError) as info:
        probe_image(data)
    assert info.value.reason == "corrupt-image"
    assert "not in ascending order (256 after 257)" in info.value.detail
    in_order = tiff_from_entries(gray_tiff_entries(40, 30), zlib.compress(bytes(40 * 30)))
    assert decode_image(in_order, "image/tiff", **LIMITS).shape == (30, 40, 3)


# --- JPEG marker walk (scan count, non-markers) and TIFF tiles ---------------------------------


def jpeg_with_tiny_scans(extra_scans: int, side: int = 256) -> bytes:
    """A gray progressive JPEG cut after its DC scan, then ``extra_scans`` 12-byte AC scans and EOI.

    Each added scan is one end-of-band run over all ``(side / 8)²`` blocks (``side`` a power of two
    from 8 to 256): a few bytes that libjpeg answers with a pass over the whole frame.
    """
    ok, enc = cv2.imencode(".jpg", np.full((side, side), 128, np.uint8), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    assert ok
    data = enc.tobytes()
    first_scan = data.index(b"\xff\xda")
    end = first_scan + 2 + struct.unpack_from(">H", data, first_scan + 2)[0]
    while not (data[end] == 0xFF and data[end + 1] not in (0x00, *range(0xD0, 0xD8))):
        end += 1
    run_bits = (side // 8 * side // 8).bit_length() - 1  # EOBn covers 2**n blocks
    dht = b"\xff\xc4\x00\x14\x10" + bytes([1] + [0] * 15) + bytes([run_bits << 4])  # one AC code "0"
    bits = "0" + "0" * run_bits
    bits += "1" * (-len(bits) % 8)  # pad the last byte with 1s
    entropy = int(bits, 2).to_bytes(len(bits) // 8, "big")
    scan = b"\xff\xda\x00\x08\x01\x01\x00\x01\x3f\x00" + entropy  # component 1, AC 1-63, first pass
    return data[:end] + dht + scan * extra_scans + b"\xff\xd9"


def jpeg_with_hidden_frame(width: int, height: int) -> bytes:
    """A JPEG whose ``FF 00`` where a marker belongs, read as a segment, leads to a fake 16x16 frame header.

    libjpeg skips the ``FF 00`` and the bytes after it and decodes the real ``width`` x ``height`` frame;
    the fake one sits in an APP15 segment after it (from the review's reproduction).
    """
    real = encode(".jpg", np.full((height, width, 3), 128, np.uint8))
    sof_at = real.index(b"\xff\xc0")
    sof_end = sof_at + 2 + struct.unpack_from(">H", real, sof_at + 2)[0]
    sof = real[sof_at:sof_end]
    fake_sof = b"\xff\xc0" + struct.pack(">HBHHB", len(sof) - 2, 8, 16, 16, 3) + sof[10:]
    app15 = b"\xff\xef" + struct.pack(">H", 2 + len(fake_sof)) + fake_sof
    skip = 2 + len(sof) + 4  # from the fake length: over the real SOF and APP15's marker and length
    return real[:sof_at] + b"\xff\x00" + struct.pack(">H", skip) + sof + app15 + real[sof_end:]


def jpeg_with_exif_thumbnail(image: np.ndarray, thumbnail: np.ndarray) -> bytes:
    """``image`` as a JPEG whose APP1 Exif segment carries ``thumbnail`` as a JPEG (IFD1), as cameras write."""
    thumb = encode(".jpg", thumbnail)
    ifd1 = struct.pack("<HHHII", 2, 0x0201, 4, 1, 44) + struct.pack("<HHII", 0x0202, 4, 1, len(thumb))  # offset, length
    exif = b"Exif\x00\x00" + b"II*\x00" + struct.pack("<IHI", 8, 0, 14) + ifd1 + struct.pack("<I", 0) + thumb
    main = encode(".jpg", image)
    return main[:2] + b"\xff\xe1" + struct.pack(">H", 2 + len(exif)) + exif + main[2:]


def tiled_tiff(
    image: np.ndarray, tile: tuple[int, int], *, declared_tile: tuple[int, int] | None = None, tile_type: int = 4
) -> bytes:
    """An uncompressed little-endian tiled TIFF of a uint8 gray or RGB image, tiles row by row.

    ``declared_tile`` writes other TileWidth/TileLength values than the tiles stored (a lying header),
    ``tile_type`` their TIFF type (3 SHORT, 4 LONG, 8 SSHORT, 9 SLONG, 11 FLOAT).
    """
    height, width = image.shape[:2]
    samples = 1 if image.ndim == 2 else image.shape[2]
    tile_w, tile_h = tile
    tiles = []
    for y in range(0, height, tile_h):
        for x in range(0, width, tile_w):
            block = np.zeros((tile_h, tile_w, samples), np.uint8)
            part = image[y : y + tile_h, x : x + tile_w].reshape(-1, min(tile_w, width - x), samples)
            block[: part.shape[0], : part.shape[1]] = part
            tiles.append(block.tobytes())
    declared_w, declared_h = declared_tile or tile
    n = len(tiles)
    # (tag, type, values); arrays over 4 bytes go to the data area after the IFD.
    entries = [(256, 4, [width]), (257, 4, [height]), (258, 3, [8] * samples), (259, 3, [1]),
               (262, 3, [1 if samples == 1 else 2]), (277, 3, [samples]), (284, 3, [1]),
               (322, tile_type, [declared_w]), (323, tile_type, [declared_h]), (324, 4, [0] * n), (325, 4, [len(t) for t in tiles])]  # fmt: skip
    formats = {3: "H", 4: "I", 8: "h", 9: "i", 11: "f"}

    def pack(kind: int, values: list[int]) -> bytes:
        return struct.pack(f"<{len(values)}{formats[kind]}", *values)

    extra_at = 8 + 2 + 12 * len(entries) + 4
    tile_at = extra_at + sum(len(pack(k, v)) for _, k, v in entries if len(pack(k, v)) > 4)
    offsets = [tile_at + sum(len(t) for t in tiles[:i]) for i in range(n)]
    ifd, arrays = struct.pack("<H", len(entries)), b""
    for tag, kind, declared in entries:
        values = offsets if tag == 324 else declared
        packed = pack(kind, values)
        if len(packed) > 4:
            ifd += struct.pack("<HHII", tag, kind, len(values), extra_at + len(arrays))
            arrays += packed
        else:
            ifd += struct.pack("<HHI", tag, kind, len(values)) + packed.ljust(4, b"\x00")
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00" * 4 + arrays + b"".join(tiles)


@pytest.mark.parametrize(
    "data",
    [
        encode(".jpg", BGR),
        cv2.imencode(".jpg", BGR, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes(),
        cv2.imencode(".jpg", BGR[:, :, 0].copy(), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes(),
        cv2.imencode(".jpg", BGR, [cv2.IMWRITE_JPEG_OPTIMIZE, 1, cv2.IMWRITE_JPEG_RST_INTERVAL, 1])[1].tobytes(),
        jpeg_with_exif_thumbnail(BGR, np.zeros((8, 8, 3), np.uint8)),
        SAMPLES["jpeg"] + b"trailing bytes after EOI \xff\x00\xff\xda",
    ],
    ids=["baseline", "progressive", "progressive-gray", "restart-markers", "exif-thumbnail", "after-eoi"],
)
def test_the_marker_walk_passes_real_jpegs(data):
    info = probe_image(data)
    assert (info.width, info.height) == (48, 32)
    assert decode_image(data, "image/jpeg", **LIMITS).shape == (32, 48, 3)


def test_the_marker_walk_passes_what_libjpeg_skips_between_segments():
    dht = SAMPLES["jpeg"].index(b"\xff\xc4")
    for inserted in (b"\xff\xff\xff", b"\xff\xd3", b"\xff\x01"):  # fill bytes, an RST and a TEM marker
        data = SAMPLES["jpeg"][:dht] + inserted + SAMPLES["jpeg"][dht:]
        assert probe_image(data).pixels == 48 * 32
        assert decode_image(data, "image/jpeg", **LIMITS).shape == (32, 48, 3)
    sos = SAMPLES["jpeg"].index(b"\xff\xda")
    filled = SAMPLES["jpeg"][:-2] + b"\xff" * 5 + b"\xff\xd9"  # fill bytes before EOI in the scan data
    assert probe_image(filled).pixels == 48 * 32
    # Truncated in the scan data or before EOI: left to the decoder (OpenCV refuses it, libjpeg alone would not).
    assert probe_image(SAMPLES["jpeg"][: sos + 30]).pixels == 48 * 32
    assert probe_image(SAMPLES["jpeg"][:-2]).pixels == 48 * 32


def test_a_jpeg_with_more_scans_than_the_limit_is_refused_before_decoding():
    at_limit = jpeg_with_tiny_scans(MAX_JPEG_SCANS - 1)  # the DC scan + 99
    assert decode_image(at_limit, "image/jpeg", **LIMITS).shape == (256, 256, 3)
    over = jpeg_with_tiny_scans(MAX_JPEG_SCANS)
    with pytest.raises(DecodeError) as info:
        probe_image(over)
    assert info.value.reason == "corrupt-image"
    assert info.value.detail == f"jpeg: more than {MAX_JPEG_SCANS} scans (the limit; each costs a pass over the image)"
    many = jpeg_with_tiny_scans(5000)  # 60 KB; at 6000x6000 pixels such a file kept libjpeg busy for minutes
    started = time.perf_counter()
    assert reason_of(many, "image/jpeg") == "corrupt-image"
    assert time.perf_counter() - started < 0.1


def test_a_jpeg_with_more_markers_than_the_limit_is_refused():
    dht = SAMPLES["jpeg"].index(b"\xff\xc4")
    comments = b"\xff\xfe\x00\x02" * MAX_JPEG_MARKERS
    data = SAMPLES["jpeg"][:dht] + comments + SAMPLES["jpeg"][dht:]
    assert reason_of(data, "image/jpeg") == "corrupt-image"
    fewer = SAMPLES["jpeg"][:dht] + comments[: 4 * (MAX_JPEG_MARKERS - 20)] + SAMPLES["jpeg"][dht:]
    assert probe_image(fewer).pixels == 48 * 32


def test_a_frame_header_hidden_behind_ff00_is_refused():
    data = jpeg_with_hidden_frame(300, 200)
    with pytest.raises(DecodeError) as info:
        probe_image(data)
    assert info.value.reason == "corrupt-image"
    assert info.value.detail.startswith("jpeg: expected a marker at byte ")
    assert info.value.detail.endswith(", found FF 00")
    assert reason_of(data, "image/jpeg", max_pixels=1000) == "corrupt-image"


@pytest.mark.parametrize(
    ("edit", "detail"),
    [
        (lambda d, sof: d[:sof] + b"\x00" + d[sof:], "expected a marker at byte"),
        (lambda d, sof: d[:sof] + b"\xff\x02" + d[sof:], "marker FF 02 at byte"),
        (lambda d, sof: d[:sof] + b"\xff\xd8" + d[sof:], "marker FF D8 at byte"),
        (lambda d, sof: d[:sof] + d[sof : sof + 19] + d[sof:], "a second frame header at byte"),
        (lambda d, sof: d[:sof] + b"\xff\xda\x00\x02" + d[sof:], "no frame header before the scan data"),
        (lambda d, sof: d[:sof] + b"\xff\xd9" + d[sof:], "no frame header before the end of the data"),
    ],
    ids=["stray-byte", "unknown-marker", "second-soi", "second-sof", "scan-before-frame", "eoi-before-frame"],
)
def test_the_marker_walk_refuses_what_is_not_a_jpeg_structure(edit, detail):
    sof = SAMPLES["jpeg"].index(b"\xff\xc0")
    with pytest.raises(DecodeError) as info:
        probe_image(edit(SAMPLES["jpeg"], sof))
    assert info.value.reason == "corrupt-image"
    assert detail in info.value.detail


@pytest.mark.parametrize("samples", [1, 3])
def test_small_tiled_tiffs_with_ordinary_tiles_decode(samples):
    image = RNG.integers(0, 256, (16, 16, samples)[: 2 if samples == 1 else 3], dtype=np.uint8)
    data = tiled_tiff(image, (256, 256))
    assert probe_image(data).tile == (256, 256)
    out = decode_image(data, "image/tiff", **LIMITS)
    np.testing.assert_array_equal(out, np.dstack([image] * 3) if samples == 1 else image)
    wide = RNG.integers(0, 256, (40, 300, 3), dtype=np.uint8)  # two tiles across, cut at the image edge
    np.testing.assert_array_equal(decode_image(tiled_tiff(wide, (256, 256)), "image/tiff", **LIMITS), wide)


def probe_error(data: bytes) -> str:
    with pytest.raises(DecodeError) as info:
        probe_image(data)
    assert info.value.reason == "corrupt-image"
    return info.value.detail


def test_tiff_tiles_far_larger_than_the_image_are_refused_before_decoding():
    image = np.zeros((16, 16), np.uint8)
    data = tiled_tiff(image, (4096, 4096))  # 16 MB of tile for 256 pixels: OpenCV fills a 64 MB buffer
    with pytest.raises(DecodeError) as info:
        probe_image(data)
    assert info.value.reason == "corrupt-image"
    assert info.value.detail == (
        "tiff: tiles of 4096x4096 pixels for a 16x16 image (at most 1024x1024: 1024 or the image side rounded up to 16)"
    )
    lying = tiled_tiff(image, (16, 16), declared_tile=(16000, 16000))  # the review's 1 GB case, header only
    assert reason_of(lying, "image/tiff", max_pixels=40_000_000) == "corrupt-image"
    for tile_type in (3, 8, 9):  # libtiff reads TileWidth of any integer type
        typed = tiled_tiff(image, (32, 32), declared_tile=(4096, 4096), tile_type=tile_type)
        assert reason_of(typed, "image/tiff") == "corrupt-image"
    assert "has type 11 (read: types 1, 3, 4, 6, 8, 9)" in probe_error(tiled_tiff(image, (32, 32), tile_type=11))
    tall = tiled_tiff(np.zeros((2001, 16), np.uint8), (16, 16), declared_tile=(16, 2016))  # rounded up: passes
    assert probe_image(tall).tile == (16, 2016)


def test_tiff_tiles_over_the_pixel_limit_are_refused():
    data = tiled_tiff(np.zeros((64, 64), np.uint8), (16, 16), declared_tile=(1024, 1024))
    assert reason_of(data, "image/tiff", max_pixels=100_000) == "too-many-pixels"
    with pytest.raises(DecodeError, match=r"tiles of 1024x1024 are over the limit of 100000 pixels"):
        check_image(data, "image/tiff", max_pixels=100_000, max_value_bytes=10**6)


def test_tiff_rows_per_strip_beyond_the_image_height_decodes_without_inflating_memory():
    # Measured with OpenCV 5.0: strips are read into a buffer sized by RowsPerStrip, but libtiff fills only
    # the image's rows (the pages are never touched) and OpenCV refuses buffers of 1 GB or more, so the
    # probe does not limit RowsPerStrip.
    entries = [(t, k, 4_000_000 if t == 278 else v) for t, k, v in gray_tiff_entries(64, 1)]
    data = tiff_from_entries(entries, zlib.compress(bytes(64)))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert decode_image(data, "image/tiff", **LIMITS).shape == (1, 64, 3)
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024 < 50


# --- decode: success paths ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["png", "bmp", "tiff"])
def test_lossless_formats_decode_to_the_exact_rgb_pixels(fmt):
    out = decode_image(SAMPLES[fmt], CONTENT_TYPE[fmt], **LIMITS)
    assert out.dtype == np.uint8
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, RGB)


def test_jpeg_decodes_to_rgb_close_to_the_source():
    flat = np.zeros((16, 16, 3), np.uint8)
    flat[:] = (200, 30, 10)  # RGB red-ish: the channel order must survive
    out = decode_image(encode(".jpg", flat[:, :, ::-1].copy()), "image/jpeg; charset=binary", **LIMITS)
    assert out.shape == (16, 16, 3)
    assert np.abs(out.astype(int) - flat).max() <= 8


def test_gray_becomes_three_equal_channels():
    gray = RNG.integers(0, 256, (9, 11), dtype=np.uint8)
    out = decode_image(encode(".png", gray), "image/png", **LIMITS)
    assert out.shape == (9, 11, 3)
    for channel in range(3):
        np.testing.assert_array_equal(out[:, :, channel], gray)


def test_sixteen_bit_is_scaled_to_eight_bit():
    gray16 = np.array([[0, 257, 65535], [32896, 1000, 65000]], np.uint16)
    out = decode_image(encode(".png", gray16), "image/png", **LIMITS)
    assert out[:, :, 0].tolist() == [[0, 1, 255], [128, 4, 253]]


def test_alpha_is_dropped():
    bgra = np.dstack([BGR, np.full((32, 48), 7, np.uint8)])
    out = decode_image(encode(".png", bgra), "image/png", **LIMITS)
    np.testing.assert_array_equal(out, RGB)


def test_content_type_none_trusts_the_magic_bytes():
    assert decode_image(SAMPLES["png"], None, **LIMITS).shape == (32, 48, 3)


# --- decode: every reason code -----------------------------------------------------------------


def reason_of(data: bytes, content_type: str | None, **limits: int) -> str:
    with pytest.raises(DecodeError) as info:
        decode_image(data, content_type, **{**LIMITS, **limits})
    assert str(info.value).startswith(info.value.reason + ": ")
    assert info.value.detail
    return info.value.reason


def test_reason_empty_value():
    assert reason_of(b"", "image/png") == "empty-value"


def test_reason_value_too_large():
    assert reason_of(SAMPLES["png"], "image/png", max_value_bytes=100) == "value-too-large"


@pytest.mark.parametrize("content_type", ["image/webp", "text/plain", "application/octet-stream", ""])
def test_reason_unsupported_content_type(content_type):
    assert reason_of(SAMPLES["png"], content_type) == "unsupported-content-type"


def test_reason_unsupported_content_type_for_unknown_bytes_without_a_declared_type():
    assert reason_of(b"RIFF\x00\x00\x00\x00WEBPVP8 ", None) == "unsupported-content-type"


@pytest.mark.parametrize(("fmt", "declared"), [("png", "image/jpeg"), ("jpeg", "image/png"), ("bmp", "image/tiff")])
def test_reason_content_type_mismatch(fmt, declared):
    assert reason_of(SAMPLES[fmt], declared) == "content-type-mismatch"


def test_declared_image_type_with_no_image_inside_is_corrupt():
    assert reason_of(b"hello, not an image", "image/jpeg") == "corrupt-image"


@pytest.mark.parametrize("fmt", sorted(SAMPLES))
def test_reason_corrupt_image_when_truncated(fmt):
    data = SAMPLES[fmt]
    assert reason_of(data[: len(data) // 2], CONTENT_TYPE[fmt]) == "corrupt-image"


def test_reason_too_many_pixels():
    assert reason_of(SAMPLES["png"], "image/png", max_pixels=48 * 32 - 1) == "too-many-pixels"
    assert decode_image(SAMPLES["png"], "image/png", max_pixels=48 * 32, max_value_bytes=10**6).shape[:2] == (
        32,
        48,
    )


def test_decompression_bomb_is_refused_fast_with_bounded_memory():
    bomb = png_bomb(100_000, 100_000)
    assert len(bomb) < 20_000
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    assert reason_of(bomb, "image/png", max_pixels=40_000_000) == "too-many-pixels"
    elapsed = time.perf_counter() - started
    rss_growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert elapsed < 0.1
    assert rss_growth_mb < 50  # the decoded image would be 10 GB


def test_jpeg_bomb_header_is_refused():
    bomb = patch_jpeg_sof(SAMPLES["jpeg"], width=65_000, height=65_000)
    assert reason_of(bomb, "image/jpeg", max_pixels=40_000_000) == "too-many-pixels"


@pytest.mark.parametrize(
    "data",
    [
        patch_jpeg_sof(SAMPLES["jpeg"], precision=12),
        encode(".tiff", np.zeros((4, 4), np.float32)),
    ],
    ids=["jpeg-12-bit", "tiff-float32"],
)
def test_reason_unsupported_bit_depth(data):
    assert reason_of(data, None) == "unsupported-bit-depth"


_FIRST_CV2_IMPORT = """
import json, os, sys

seen = {}


class Spy:
    def find_spec(self, name, path=None, target=None):
        if name == "cv2" and not seen:
            seen["limit"] = os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS")
        return None


sys.meta_path.insert(0, Spy())
import worker.cli

worker.cli.build_parser()  # what `space serve` does first: imports every command module
import worker.decode

print(json.dumps({"seen": seen, "cv2": "cv2" in sys.modules}))
"""


@pytest.mark.parametrize(("setting", "limit"), [(None, None), ("1234", "1234"), ("abc", None)])
def test_opencv_pixel_limit_is_set_before_the_cli_first_imports_cv2(setting, limit):
    # OpenCV reads OPENCV_IO_MAX_IMAGE_PIXELS once, when cv2 loads; a bad setting must not abort cv2's load
    # (OpenCV's stoull) but reach load_settings, which names it.
    expected = limit or str(DecodeSettings.model_fields["max_pixels"].default)
    env = {k: v for k, v in os.environ.items() if k not in ("OPENCV_IO_MAX_IMAGE_PIXELS", "SPACE_DECODE__MAX_PIXELS")}
    if setting is not None:
        env["SPACE_DECODE__MAX_PIXELS"] = setting
    proc = subprocess.run(
        [sys.executable, "-c", _FIRST_CV2_IMPORT], env=env, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["cv2"]
    assert report["seen"] == {"limit": expected}


# --- fuzz --------------------------------------------------------------------------------------

FUZZ_LIMITS = {"max_pixels": 64 * 64, "max_value_bytes": 64 * 1024}
MAGICS = [b"", b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"II*\x00", b"MM\x00*", b"II+\x00"]


def check_decodes_safely(data: bytes, content_type: str | None) -> None:
    try:
        out = decode_image(data, content_type, **FUZZ_LIMITS)
    except DecodeError as exc:
        assert exc.reason in get_args(DecodeReason)  # noqa: PT017 - fuzz: any DecodeError is fine
        return
    assert out.dtype == np.uint8
    assert out.ndim == 3
    assert out.shape[2] == 3
    assert out.shape[0] * out.shape[1] <= FUZZ_LIMITS["max_pixels"]


@settings(database=None, max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    magic=st.sampled_from(MAGICS),
    tail=st.binary(max_size=600),
    declared=st.sampled_from([None, *CONTENT_TYPE.values()]),
)
def test_fuzz_random_bytes_only_raise_decode_error(magic, tail, declared):
    check_decodes_safely(magic + tail, declared)


@settings(database=None, max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fmt=st.sampled_from(sorted(SAMPLES)),
    cut=st.integers(min_value=0, max_value=10_000),
    flips=st.lists(st.tuples(st.integers(min_value=0, max_value=10_000), st.integers(1, 255)), max_size=6),
    declared=st.booleans(),
)
def test_fuzz_mutated_images_only_raise_decode_error(fmt, cut, flips, declared):
    data = bytearray(SAMPLES[fmt])
    for index, mask in flips:
        data[index % len(data)] ^= mask
    mutated = bytes(data[: max(1, len(data) - cut % len(data))])
    check_decodes_safely(mutated, CONTENT_TYPE[fmt] if declared else None)


# --- claim checks (file:// and policy; S3 against moto lives in tests/integration) ---------------


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def no_s3() -> Any:
    raise AssertionError("the S3 client must not be created for this claim check")


@pytest.fixture
def claim_root(tmp_path: Path) -> Path:
    root = tmp_path / "claims"
    root.mkdir()
    (root / "img.png").write_bytes(SAMPLES["png"])
    (tmp_path / "secret.png").write_bytes(SAMPLES["png"])
    return root


def file_fetcher(root: Path | None, **overrides: Any) -> ClaimCheckFetcher:
    decode = DecodeSettings(claim_check_schemes=("s3", "file"), claim_check_file_root=root, **overrides)
    return ClaimCheckFetcher(decode, no_s3)


def claim_reason(fetcher: ClaimCheckFetcher, uri: str, digest: str) -> str:
    with pytest.raises(DecodeError) as info:
        fetcher.fetch(uri, digest)
    return info.value.reason


def test_file_claim_check_under_the_root_is_fetched_and_verified(claim_root):
    data = file_fetcher(claim_root).fetch((claim_root / "img.png").as_uri(), sha(SAMPLES["png"]).upper())
    assert data == SAMPLES["png"]


def test_file_claim_check_outside_the_root_is_denied(claim_root, tmp_path):
    fetcher = file_fetcher(claim_root)
    digest = sha(SAMPLES["png"])
    assert claim_reason(fetcher, (tmp_path / "secret.png").as_uri(), digest) == "claim-check-denied"
    assert claim_reason(fetcher, f"file://{claim_root}/../secret.png", digest) == "claim-check-denied"
    assert claim_reason(fetcher, f"file://{claim_root}/%2e%2e/secret.png", digest) == "claim-check-denied"
    (claim_root / "link.png").symlink_to(tmp_path / "secret.png")
    assert claim_reason(fetcher, (claim_root / "link.png").as_uri(), digest) == "claim-check-denied"
    assert claim_reason(fetcher, f"file://otherhost{claim_root}/img.png", digest) == "claim-check-denied"


def test_file_claim_check_needs_a_root_and_the_scheme(claim_root):
    uri, digest = (claim_root / "img.png").as_uri(), sha(SAMPLES["png"])
    assert claim_reason(file_fetcher(None), uri, digest) == "claim-check-denied"
    default = ClaimCheckFetcher(DecodeSettings(claim_check_file_root=claim_root), no_s3)  # schemes = ("s3",)
    assert claim_reason(default, uri, digest) == "claim-check-denied"


@pytest.mark.parametrize("uri", ["http://10.0.0.1/img.png", "https://example.com/a.png", "ftp://x/y", "img.png"])
def test_other_schemes_are_denied_even_when_listed(claim_root, uri):
    # Listing them is refused at load (test_settings); were they listed anyway, the fetcher still denies them.
    listed = DecodeSettings.model_construct(claim_check_schemes=("s3", "http", "https", "ftp"))
    fetcher = ClaimCheckFetcher(listed, no_s3)
    assert claim_reason(fetcher, uri, sha(b"x")) == "claim-check-denied"


def test_file_claim_check_with_a_nul_byte_or_a_symlink_loop_is_a_decode_error(claim_root):
    fetcher = file_fetcher(claim_root)
    digest = sha(SAMPLES["png"])
    assert claim_reason(fetcher, f"file://{claim_root}/img%00.png", digest) == "claim-check-denied"
    (claim_root / "loop-a").symlink_to(claim_root / "loop-b")
    (claim_root / "loop-b").symlink_to(claim_root / "loop-a")
    # Python 3.11 raises RuntimeError resolving a loop (denied); later versions fail at open (fetch-failed).
    assert claim_reason(fetcher, (claim_root / "loop-a").as_uri(), digest) in (
        "claim-check-denied",
        "claim-check-fetch-failed",
    )


def test_checksum_mismatch_and_bad_digest(claim_root):
    fetcher = file_fetcher(claim_root)
    uri = (claim_root / "img.png").as_uri()
    assert claim_reason(fetcher, uri, sha(b"other")) == "claim-check-checksum-mismatch"
    assert claim_reason(fetcher, uri, "not-a-digest") == "claim-check-checksum-mismatch"


def test_file_claim_check_size_cap_missing_and_empty(claim_root):
    digest = sha(SAMPLES["png"])
    uri = (claim_root / "img.png").as_uri()
    assert claim_reason(file_fetcher(claim_root, max_value_bytes=100), uri, digest) == "value-too-large"
    missing = (claim_root / "missing.png").as_uri()
    assert claim_reason(file_fetcher(claim_root), missing, digest) == "claim-check-fetch-failed"
    (claim_root / "empty.png").write_bytes(b"")
    assert claim_reason(file_fetcher(claim_root), (claim_root / "empty.png").as_uri(), sha(b"")) == "empty-value"


class FakeBody(io.BytesIO):
    pass


class FakeS3:
    def __init__(self, data: bytes = b"", error: Exception | None = None, length: int | None = None) -> None:
        self.data, self.error, self.length = data, error, length
        self.calls: list[tuple[str, str]] = []

    def get_object(self, Bucket: str, Key: str) -> dict[str, Any]:
        self.calls.append((Bucket, Key))
        if self.error:
            raise self.error
        return {
            "ContentLength": len(self.data) if self.length is None else self.length,
            "Body": FakeBody(self.data),
        }


def s3_fetcher(client: FakeS3, **overrides: Any) -> ClaimCheckFetcher:
    return ClaimCheckFetcher(DecodeSettings(**overrides), lambda: client)


def test_s3_bucket_allow_list_is_checked_before_any_request():
    client = FakeS3(SAMPLES["png"])
    fetcher = s3_fetcher(client, claim_check_buckets=("plant-a",))
    assert claim_reason(fetcher, "s3://plant-b/img.png", sha(SAMPLES["png"])) == "claim-check-denied"
    assert claim_reason(fetcher, "s3://plant-a/", sha(SAMPLES["png"])) == "claim-check-denied"
    assert client.calls == []
    assert fetcher.fetch("s3://plant-a/x/img.png", sha(SAMPLES["png"])) == SAMPLES["png"]
    assert client.calls == [("plant-a", "x/img.png")]


@pytest.mark.parametrize(
    "error",
    [
        ClientError({"Error": {"Code": "NoSuchKey", "Message": "gone"}}, "GetObject"),
        EndpointConnectionError(endpoint_url="http://s3.local"),
    ],
)
def test_s3_errors_become_fetch_failed(error):
    assert claim_reason(s3_fetcher(FakeS3(error=error)), "s3://b-1/k", sha(b"x")) == "claim-check-fetch-failed"


def test_s3_size_cap_uses_the_declared_length_and_the_bytes_read():
    declared_big = FakeS3(b"tiny", length=10**9)
    assert claim_reason(s3_fetcher(declared_big, max_value_bytes=1000), "s3://b-1/k", sha(b"tiny")) == "value-too-large"
    lying = FakeS3(b"x" * 2000, length=10)
    assert claim_reason(s3_fetcher(lying, max_value_bytes=1000), "s3://b-1/k", sha(b"x" * 2000)) == "value-too-large"


def test_a_fifo_or_device_under_the_root_is_denied_without_blocking(claim_root):
    # Opening a FIFO waited for a writer for good: two such records stopped every decode thread.
    os.mkfifo(claim_root / "pipe.png")
    fetcher = file_fetcher(claim_root)
    done: list[str] = []
    thread = threading.Thread(
        target=lambda: done.append(claim_reason(fetcher, (claim_root / "pipe.png").as_uri(), sha(b"x")))
    )
    thread.start()
    thread.join(5)
    assert done == ["claim-check-denied"]


def test_a_folder_swapped_for_a_link_after_the_check_is_not_read(claim_root, tmp_path, monkeypatch):
    # resolve() then open(): a writer of the shared root could swap a folder for a link in between.
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "img.png").write_bytes(SAMPLES["png"])
    (claim_root / "cam").mkdir()
    (claim_root / "cam" / "img.png").write_bytes(SAMPLES["png"])
    real_resolve = Path.resolve

    def resolve_then_swap(self: Path, strict: bool = False) -> Path:
        resolved = real_resolve(self, strict)
        if self.name == "img.png" and (claim_root / "cam").is_dir() and not (claim_root / "cam").is_symlink():
            (claim_root / "cam" / "img.png").unlink()
            (claim_root / "cam").rmdir()
            (claim_root / "cam").symlink_to(outside)
        return resolved

    monkeypatch.setattr(Path, "resolve", resolve_then_swap)
    reason = claim_reason(file_fetcher(claim_root), (claim_root / "cam" / "img.png").as_uri(), sha(SAMPLES["png"]))
    assert reason == "claim-check-denied"


@pytest.mark.parametrize("uri", ["s3://[x/k", "file://[/p"])
def test_a_uri_urlsplit_cannot_read_is_denied_not_a_processing_failure(uri):
    assert claim_reason(s3_fetcher(FakeS3()), uri, sha(b"x")) == "claim-check-denied"


def test_s3_keys_keep_question_marks_and_hashes():
    client = FakeS3(SAMPLES["png"])
    s3_fetcher(client, claim_check_buckets=("plant-a",)).fetch(
        "s3://plant-a/q.png?x=../../secret/x.png", sha(SAMPLES["png"])
    )
    assert client.calls == [("plant-a", "q.png?x=../../secret/x.png")]


def test_a_download_cut_short_is_a_fetch_failure_not_a_checksum_mismatch():
    short = FakeS3(b"x" * 10, length=100)  # Content-Length 100, the connection closed after 10 bytes
    assert claim_reason(s3_fetcher(short), "s3://b-1/k", sha(b"x" * 100)) == "claim-check-fetch-failed"


def test_a_download_slower_than_its_budget_is_cut_off():
    # botocore's timeouts bound each read: a server sending a byte at a time kept a decode thread for minutes.
    class Dripping(io.RawIOBase):
        def read(self, size: int = -1) -> bytes:
            time.sleep(0.05)
            return b"x"

        def close(self) -> None: ...

    class SlowS3(FakeS3):
        def get_object(self, Bucket: str, Key: str) -> dict[str, Any]:
            return {"ContentLength": 10_000, "Body": Dripping()}

    start = time.monotonic()
    reason = claim_reason(s3_fetcher(SlowS3(), fetch_timeout_ms=200), "s3://b-1/k", sha(b"x"))
    assert reason == "claim-check-fetch-failed" and time.monotonic() - start < 2.0


def test_every_reason_is_a_dead_letter_reason():
    from schemas.deadletter import DeadLetterReason

    assert set(get_args(DecodeReason)) <= {r.value for r in DeadLetterReason}


def test_sniff_format():
    assert [sniff_format(SAMPLES[f]) for f in sorted(SAMPLES)] == sorted(SAMPLES)
    assert sniff_format(b"") is None
