"""Unit tests of heatmap keys, encodings and the file/retrying stores (no network)."""

from __future__ import annotations

import hashlib
import shutil
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path, PurePosixPath

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.heatmaps import (
    FileHeatmapStore,
    HeatmapStoreError,
    RetryingHeatmapStore,
    S3HeatmapStore,
    downscale_keeping_peaks,
    encode_heatmap_png,
    encode_overlay_jpeg,
    heatmap_key,
    heatmap_to_uint8,
    open_heatmap_store,
    sanitize_component,
    save_heatmap,
)
from worker.settings import HeatmapSettings, S3Settings

WHEN = datetime(2026, 3, 7, 23, 30, tzinfo=UTC)

# --- keys --------------------------------------------------------------------------------------


def test_key_layout_for_a_clean_id():
    assert heatmap_key("line-A", WHEN, "msg-0001", "png") == "line-A/2026/03/07/msg-0001.png"


def test_key_date_is_utc():
    local = datetime(2026, 3, 8, 1, 30, tzinfo=timezone(timedelta(hours=2)))
    assert heatmap_key("L", local, "m", "png").startswith("L/2026/03/07/")
    assert heatmap_key("L", datetime(2026, 3, 8, 1, 30), "m", "png").startswith("L/2026/03/08/")


@pytest.mark.parametrize("message_id", ["../../etc/passwd", "..", ".", ".hidden", "a/b", "a\\b", "", "x" * 500, "é"])
def test_unsafe_ids_are_sanitized_and_hashed(message_id):
    name = heatmap_key("L", WHEN, message_id, "png").split("/")[-1]
    stem = name.removesuffix(".png")
    digest = hashlib.sha256(message_id.encode()).hexdigest()[:16]
    assert stem.endswith(f"-{digest}")
    assert not name.startswith(".")
    assert len(stem) <= 128


def test_ids_that_look_hashed_are_hashed_again_so_they_cannot_collide():
    changed = sanitize_component("a/b")
    assert changed != "a/b"
    assert sanitize_component(changed) != changed  # the literal id "a_b-<hash>" gets its own key


@pytest.mark.parametrize("ext", ["", "PNG", "p/g", ".png", "toolongext"])
def test_bad_extensions_are_refused(ext):
    with pytest.raises(ValueError, match="extension"):
        heatmap_key("L", WHEN, "m", ext)


@settings(database=None, max_examples=300, deadline=None)
@given(line=st.text(max_size=80), message_id=st.text(max_size=300))
def test_key_never_escapes_the_root_and_the_id_part_has_no_slash(line, message_id):
    key = heatmap_key(line, WHEN, message_id, "png")
    parts = key.split("/")
    assert len(parts) == 5
    assert all(part not in ("", ".", "..") and not part.startswith(".") for part in parts)
    assert all(set(part) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-") for part in parts)
    assert len(parts[-1]) <= 128 + len(".png")
    assert not PurePosixPath(key).is_absolute()
    root = Path("/srv/heatmaps")
    assert (root / key).resolve().is_relative_to(root)


@settings(database=None, max_examples=300, deadline=None)
@given(a=st.text(max_size=200), b=st.text(max_size=200))
def test_distinct_ids_never_share_a_key(a, b):
    if a != b:
        assert heatmap_key("L", WHEN, a, "png") != heatmap_key("L", WHEN, b, "png")


def test_distinct_ids_that_sanitize_alike_get_distinct_keys():
    ids = ["a/b", "a:b", "a_b", "a b", "a" * 200, "a" * 201]
    keys = {heatmap_key("L", WHEN, i, "png") for i in ids}
    assert len(keys) == len(ids)


# --- encoding ----------------------------------------------------------------------------------


def test_threshold_maps_to_128_and_twice_the_threshold_to_255():
    amap = np.array([[0.0, 0.25, 0.5], [1.0, 2.0, np.nan]], dtype=np.float32)
    assert heatmap_to_uint8(amap, 0.5).tolist() == [[0, 64, 128], [255, 255, 0]]


def test_scaling_leaves_the_callers_map_untouched():
    # heatmap_to_uint8 scales in place for speed: in a copy, never in the model's output buffer.
    amap = np.array([[0.0, 0.25, np.nan], [1.0, -1.0, np.inf]], dtype=np.float32)
    before = amap.copy()
    heatmap_to_uint8(amap, 0.5)
    np.testing.assert_array_equal(amap, before)


@pytest.mark.parametrize("threshold", [0.0, -1.0, float("nan"), float("inf")])
def test_non_positive_threshold_falls_back_to_the_map_maximum(threshold):
    amap = np.array([[0.0, 1.0], [2.0, 4.0]], dtype=np.float32)
    assert heatmap_to_uint8(amap, threshold).tolist() == [[0, 64], [128, 255]]
    assert heatmap_to_uint8(np.zeros((2, 2), np.float32), threshold).tolist() == [[0, 0], [0, 0]]


def test_png_is_8bit_gray_and_round_trips():
    rng = np.random.default_rng(0)
    amap = rng.random((37, 53), dtype=np.float32)
    data = encode_heatmap_png(amap, 0.3)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert decoded.dtype == np.uint8
    assert decoded.shape == (37, 53)
    np.testing.assert_array_equal(decoded, heatmap_to_uint8(amap, 0.3))


@settings(max_examples=200, deadline=None)
@given(
    h=st.integers(1, 90), w=st.integers(1, 90), side=st.integers(1, 40),
    y=st.floats(0, 0.999), x=st.floats(0, 0.999), peak=st.floats(0.31, 5.0),
)  # fmt: skip
def test_downscaled_heatmap_keeps_every_threshold_crossing_in_its_block(h, w, side, y, x, peak):
    # A one-pixel defect anywhere (the worst case for averaging) stays above threshold, in the block
    # that holds it, and nowhere else; the shrunk map's maximum is the full map's (the image score).
    threshold = 0.3
    amap = np.random.default_rng(h * 100 + w).random((h, w), dtype=np.float32) * 0.29
    py, px = int(y * h), int(x * w)
    amap[py, px] = peak
    small = downscale_keeping_peaks(amap, side)
    f = -(-max(h, w) // side)
    assert max(small.shape) <= side or f == 1
    assert small.shape == (-(-h // f), -(-w // f))
    assert small.max() == amap.max()
    pixels = heatmap_to_uint8(small, threshold)
    assert [tuple(p) for p in np.argwhere(pixels >= 128)] == [(py // f, px // f)]


def test_downscaling_gives_each_block_its_maximum_and_leaves_small_maps_alone():
    amap = np.arange(36, dtype=np.float32).reshape(6, 6)
    np.testing.assert_array_equal(downscale_keeping_peaks(amap, 3), [[7, 9, 11], [19, 21, 23], [31, 33, 35]])
    # 6 x 5 into at most 2 px: blocks of 3, the last column padded with its edge values.
    np.testing.assert_array_equal(downscale_keeping_peaks(amap[:, :5], 2), [[14, 16], [32, 34]])
    # Partial blocks take the maximum of what they hold, also below zero (no padding value leaks in).
    np.testing.assert_array_equal(downscale_keeping_peaks(-amap[:, :5] - 1, 2), [[-1, -4], [-19, -22]])
    assert downscale_keeping_peaks(amap, 6) is amap
    with_nan = amap.copy()
    with_nan[5, 5] = np.nan
    assert downscale_keeping_peaks(with_nan, 3)[2, 2] == 34  # NaN counts as 0, as in the PNG scaling
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        downscale_keeping_peaks(np.zeros((1, 4, 4), np.float32), 2)


def test_png_refuses_maps_that_are_not_2d():
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        encode_heatmap_png(np.zeros((1, 4, 4), np.float32), 0.5)


def test_overlay_is_a_jpeg_of_the_image_size_and_red_where_anomalous():
    image = np.full((64, 96, 3), 128, np.uint8)
    amap = np.zeros((16, 24), np.float32)
    amap[:, 12:] = 10.0  # right half far above the threshold
    data = encode_overlay_jpeg(image, amap, threshold=0.5, alpha=0.6)
    decoded = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert decoded.shape == (64, 96, 3)
    left, right = decoded[:, :40].reshape(-1, 3).mean(0), decoded[:, 56:].reshape(-1, 3).mean(0)
    assert right[0] > right[2] + 50  # red dominates where the map is high (JET top)
    assert left[2] > left[0] + 50  # blue dominates where it is zero (JET bottom)
    gray = encode_overlay_jpeg(np.full((8, 8), 10, np.uint8), np.zeros((8, 8), np.float32), 0.5)
    assert gray.startswith(b"\xff\xd8")


# --- stores ------------------------------------------------------------------------------------


def test_file_store_writes_atomically_and_returns_a_file_uri(tmp_path):
    store = FileHeatmapStore(tmp_path / "hm")
    key = heatmap_key("L1", WHEN, "m1", "png")
    uri = store.put(key, b"one", "image/png")
    target = (tmp_path / "hm" / key).resolve()
    assert uri == target.as_uri()
    assert target.read_bytes() == b"one"
    store.put(key, b"two", "image/png")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["m1.png"]  # no temp files left behind
    assert target.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("key", ["../x.png", "a/../../x.png", "/etc/x.png", "a//b.png", "./a.png", "", "a\\..\\b"])
def test_file_store_refuses_keys_that_escape_the_root(tmp_path, key):
    store = FileHeatmapStore(tmp_path / "hm")
    with pytest.raises(ValueError):
        store.put(key, b"x", "image/png")
    assert not (tmp_path / "x.png").exists()


def test_file_store_refuses_a_symlink_that_leads_out(tmp_path):
    (tmp_path / "hm").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "hm" / "L1").symlink_to(tmp_path / "outside")
    # A store error (the setup, not the key, is wrong): the result goes out with heatmap_error and the
    # circuit breaker counts it, where a ValueError used to stop the worker (and every restart).
    with pytest.raises(HeatmapStoreError, match="escapes"):
        FileHeatmapStore(tmp_path / "hm").put("L1/x.png", b"x", "image/png")
    assert list((tmp_path / "outside").iterdir()) == []


def test_file_store_replaces_a_symlinked_name_instead_of_writing_through_it(tmp_path):
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"keep")
    store = FileHeatmapStore(tmp_path / "hm")
    key = heatmap_key("L1", WHEN, "m1", "png")
    store.path_for(key).parent.mkdir(parents=True)
    store.path_for(key).symlink_to(outside)
    store.put(key, b"new", "image/png")
    assert outside.read_bytes() == b"keep"
    assert not store.path_for(key).is_symlink() and store.path_for(key).read_bytes() == b"new"


def test_file_store_recreates_a_directory_removed_while_cached(tmp_path):
    # A retention job deletes old day folders; the store's cache of created directories must not
    # turn that into failures for good: the failing attempt forgets the directory, the retry makes it.
    store = RetryingHeatmapStore(FileHeatmapStore(tmp_path / "hm"), retries=1, backoff_ms=0, sleep=lambda s: None)
    first, second = heatmap_key("L1", WHEN, "a", "png"), heatmap_key("L1", WHEN, "b", "png")
    store.put(first, b"a", "image/png")
    shutil.rmtree(tmp_path / "hm" / "L1")
    uri = store.put(second, b"b", "image/png")
    assert Path(uri.removeprefix("file://")).read_bytes() == b"b"


def test_file_store_failure_leaves_no_temp_file(tmp_path):
    store = FileHeatmapStore(tmp_path / "hm")
    key = heatmap_key("L1", WHEN, "m1", "png")
    store.path_for(key).mkdir(parents=True)  # a directory where the file should go: os.replace fails
    with pytest.raises(HeatmapStoreError, match="cannot write heatmap"):
        store.put(key, b"x", "image/png")
    assert [p.name for p in store.path_for(key).parent.iterdir()] == ["m1.png"]


class FlakyStore:
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def put(self, key: str, data: bytes, content_type: str) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise HeatmapStoreError(f"boom {self.calls}")
        return f"mem://{key}"


def test_retrying_store_backs_off_exponentially_then_succeeds():
    sleeps: list[float] = []
    inner = FlakyStore(failures=2)
    store = RetryingHeatmapStore(inner, retries=3, backoff_ms=50, sleep=sleeps.append)
    assert store.put("k", b"x", "image/png") == "mem://k"
    assert inner.calls == 3
    assert sleeps == [0.05, 0.1]


def test_retrying_store_gives_up_after_the_last_attempt():
    sleeps: list[float] = []
    inner = FlakyStore(failures=100)
    store = RetryingHeatmapStore(inner, retries=3, backoff_ms=10, sleep=sleeps.append)
    with pytest.raises(HeatmapStoreError, match=r"boom 4 \(gave up after 4 attempts\)"):
        store.put("k", b"x", "image/png")
    assert inner.calls == 4
    assert sleeps == [0.01, 0.02, 0.04]


def test_retrying_store_does_not_retry_a_bad_key(tmp_path):
    sleeps: list[float] = []
    store = RetryingHeatmapStore(FileHeatmapStore(tmp_path), retries=3, backoff_ms=10, sleep=sleeps.append)
    with pytest.raises(ValueError):
        store.put("../x.png", b"x", "image/png")
    assert sleeps == []


def test_unwritable_root_fails_with_heatmap_store_error_after_retries(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"a file where the root directory should be")
    sleeps: list[float] = []
    store = RetryingHeatmapStore(FileHeatmapStore(blocker / "hm"), retries=2, backoff_ms=5, sleep=sleeps.append)
    with pytest.raises(HeatmapStoreError, match="gave up after 3 attempts"):
        store.put(heatmap_key("L", WHEN, "m", "png"), b"x", "image/png")
    assert len(sleeps) == 2


def test_save_heatmap_describes_what_it_stored(tmp_path):
    store = FileHeatmapStore(tmp_path)
    amap = np.zeros((12, 20), np.float32)
    ref = save_heatmap(store, "L1", WHEN, "m/1", amap, 0.5)
    path = Path(ref.uri.removeprefix("file://"))
    assert (ref.format, ref.width, ref.height) == ("png", 20, 12)
    assert ref.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert path.is_relative_to(tmp_path.resolve())


def test_two_maps_under_one_message_id_keep_their_own_files(tmp_path):
    # CloudEvents ids are unique per source only: two cameras of a line may both send msg-0001 on one
    # day, and a redelivery scored after a threshold move encodes the same map differently. Each
    # published result must still find the bytes its sha256 names at its uri.
    store = FileHeatmapStore(tmp_path)
    first = save_heatmap(store, "L1", WHEN, "msg-0001", np.full((8, 8), 0.2, np.float32), 0.5)
    second = save_heatmap(store, "L1", WHEN, "msg-0001", np.full((8, 8), 0.9, np.float32), 0.5)
    assert first.uri != second.uri
    for ref in (first, second):
        assert hashlib.sha256(Path(ref.uri.removeprefix("file://")).read_bytes()).hexdigest() == ref.sha256
    again = save_heatmap(store, "L1", WHEN, "msg-0001", np.full((8, 8), 0.2, np.float32), 0.5)
    assert again.uri == first.uri  # the same file written twice (a redelivery) is one file


def test_key_names_the_content_digest_after_the_id():
    digest = hashlib.sha256(b"png").hexdigest()
    key = heatmap_key("L", WHEN, "msg-0001", "png", content_sha256=digest)
    assert key == f"L/2026/03/07/msg-0001.{digest[:16]}.png"
    with pytest.raises(ValueError, match="64 lowercase hex"):
        heatmap_key("L", WHEN, "m", "png", content_sha256="../x")


def test_save_heatmap_with_a_size_cap_stores_the_shrunk_map(tmp_path):
    store = FileHeatmapStore(tmp_path)
    amap = np.zeros((256, 200), np.float32)
    amap[101, 37] = 1.5  # 3x the threshold: 255
    ref = save_heatmap(store, "L1", WHEN, "m/2", amap, 0.5, max_side_px=64)
    decoded = cv2.imread(ref.uri.removeprefix("file://"), cv2.IMREAD_UNCHANGED)
    assert (ref.width, ref.height) == (50, 64) and decoded.shape == (64, 50)
    assert decoded[101 // 4, 37 // 4] == 255 and np.count_nonzero(decoded) == 1


def test_open_heatmap_store_from_settings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    relative = open_heatmap_store(HeatmapSettings(store_uri="file://.space/hm", retries=4, backoff_ms=7), S3Settings())
    assert isinstance(relative, RetryingHeatmapStore)
    assert (relative.retries, relative.backoff_ms) == (4, 7)
    assert relative.inner.root == tmp_path.resolve() / ".space" / "hm"
    absolute = open_heatmap_store(HeatmapSettings(store_uri=f"file://{tmp_path}/abs"), S3Settings())
    assert absolute.inner.root == tmp_path.resolve() / "abs"
    s3 = open_heatmap_store(HeatmapSettings(store_uri="s3://bucket-a/some/prefix/"), S3Settings(), s3_client=object())
    assert isinstance(s3.inner, S3HeatmapStore)
    assert s3.inner.object_key("L/x.png") == "some/prefix/L/x.png"
    assert s3.inner.bucket == "bucket-a"


class _DeadStore:
    """Fails every put (an unreachable object store), counting the calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.up = False

    def put(self, key: str, data: bytes, content_type: str) -> str:
        self.calls += 1
        if self.up:
            return f"mem://{key}"
        raise HeatmapStoreError("connect timeout")


def test_breaker_stops_asking_a_dead_store_then_probes_it_after_the_cooldown():
    now = [0.0]
    inner = _DeadStore()
    store = RetryingHeatmapStore(
        inner, retries=2, backoff_ms=1, sleep=lambda s: None, breaker_failures=3, breaker_cooldown_s=30,
        clock=lambda: now[0],
    )  # fmt: skip
    for _ in range(3):  # three puts, each with its retries: 9 calls
        with pytest.raises(HeatmapStoreError, match="gave up after 3 attempts"):
            store.put("L/a.png", b"x", "image/png")
    assert inner.calls == 9 and store.breaker_open
    for _ in range(50):  # open: fail at once, the store is not asked
        with pytest.raises(HeatmapStoreError, match="circuit open"):
            store.put("L/a.png", b"x", "image/png")
    assert inner.calls == 9
    now[0] = 31.0  # cooldown over: one probe; it fails, so the breaker opens again at once
    with pytest.raises(HeatmapStoreError, match="gave up"):
        store.put("L/a.png", b"x", "image/png")
    assert inner.calls == 12
    with pytest.raises(HeatmapStoreError, match="circuit open"):
        store.put("L/a.png", b"x", "image/png")
    now[0] = 62.0
    inner.up = True  # the store is back: the probe succeeds and closes the breaker
    assert store.put("L/a.png", b"x", "image/png") == "mem://L/a.png"
    assert not store.breaker_open
    assert store.put("L/b.png", b"x", "image/png") == "mem://L/b.png"


def test_breaker_off_and_isolated_failures_never_open_it():
    inner = _DeadStore()
    always = RetryingHeatmapStore(inner, retries=0, backoff_ms=0, breaker_failures=0)
    for _ in range(20):
        with pytest.raises(HeatmapStoreError, match="gave up"):
            always.put("L/a.png", b"x", "image/png")
    assert inner.calls == 20 and not always.breaker_open
    flaky = _DeadStore()
    store = RetryingHeatmapStore(flaky, retries=0, backoff_ms=0, breaker_failures=2)
    for _ in range(5):  # fail, succeed, fail, succeed...: never two in a row
        flaky.up = False
        with pytest.raises(HeatmapStoreError):
            store.put("L/a.png", b"x", "image/png")
        flaky.up = True
        store.put("L/a.png", b"x", "image/png")
    assert not store.breaker_open
