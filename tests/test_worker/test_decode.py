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
    ClaimCheckFetcher,
    DecodeError,
    DecodeReason,
    ImageInfo,
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
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", rows) + png_chunk(b"IEND", b"")
    )


def patch_jpeg_sof(
    data: bytes, *, width: int | None = None, height: int | None = None, precision: int | None = None
):
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


@pytest.mark.parametrize(
    ("fmt", "declared"), [("png", "image/jpeg"), ("jpeg", "image/png"), ("bmp", "image/tiff")]
)
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


@pytest.mark.parametrize(
    "uri", ["http://10.0.0.1/img.png", "https://example.com/a.png", "ftp://x/y", "img.png"]
)
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
    assert (
        claim_reason(file_fetcher(claim_root), (claim_root / "empty.png").as_uri(), sha(b"")) == "empty-value"
    )


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
    assert (
        claim_reason(s3_fetcher(FakeS3(error=error)), "s3://b-1/k", sha(b"x")) == "claim-check-fetch-failed"
    )


def test_s3_size_cap_uses_the_declared_length_and_the_bytes_read():
    declared_big = FakeS3(b"tiny", length=10**9)
    assert (
        claim_reason(s3_fetcher(declared_big, max_value_bytes=1000), "s3://b-1/k", sha(b"tiny"))
        == "value-too-large"
    )
    lying = FakeS3(b"x" * 2000, length=10)
    assert (
        claim_reason(s3_fetcher(lying, max_value_bytes=1000), "s3://b-1/k", sha(b"x" * 2000))
        == "value-too-large"
    )


def test_every_reason_is_a_dead_letter_reason():
    from schemas.deadletter import DeadLetterReason

    assert set(get_args(DecodeReason)) <= {r.value for r in DeadLetterReason}


def test_sniff_format():
    assert [sniff_format(SAMPLES[f]) for f in sorted(SAMPLES)] == sorted(SAMPLES)
    assert sniff_format(b"") is None
