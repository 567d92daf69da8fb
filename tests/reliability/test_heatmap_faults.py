"""Heatmap store failures: retries with backoff, then a result without heatmap and with heatmap_error.

A result is never lost (nor dead-lettered) because its heatmap could not be stored. The store's
attempts are recorded by wrapping the inner store of the running worker, so the test sees the retries
and the backoff between them, not only the outcome.

What would make this fail: an exception from the store escaping the publish path (the worker would
stop, the result would be missing), no retry, retries without delay, or a result that claims a heatmap
that was never written.
"""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path
from typing import Any

import boto3
import pytest

from tests.kafka_helpers import produce
from tests.reliability.helpers import TopicTail, start_moto_server
from tests.worker_harness import request_record, running_worker
from worker.heatmaps import HeatmapStoreError, open_heatmap_store
from worker.settings import HeatmapSettings, S3Settings

pytestmark = [pytest.mark.kafka, pytest.mark.redis]

RETRIES, BACKOFF_MS = 2, 40


def _record_attempts(app: Any) -> list[tuple[float, str, bool]]:
    attempts: list[tuple[float, str, bool]] = []
    lock = threading.Lock()
    inner = app.worker.heatmaps.inner
    original = inner.put

    def put(key: str, data: bytes, content_type: str) -> str:
        try:
            uri = original(key, data, content_type)
        except Exception:
            with lock:
                attempts.append((time.monotonic(), key, False))
            raise
        with lock:
            attempts.append((time.monotonic(), key, True))
        return uri

    inner.put = put
    return attempts


def _check_backoff(attempts: list[tuple[float, str, bool]], key: str) -> None:
    times = [t for t, k, ok in attempts if k == key]
    assert len(times) == RETRIES + 1, f"{key}: {len(times)} attempts"
    gaps = [b - a for a, b in itertools.pairwise(times)]
    for i, gap in enumerate(gaps):
        assert gap >= BACKOFF_MS * 2**i / 1000 * 0.9, f"{key}: retry {i + 1} after {gap * 1000:.0f} ms"


def _settings(make_settings, topics, trained_model, **heatmaps: Any):
    return make_settings(
        topics, models={"root": str(trained_model.root), "preload": (trained_model.line,), "threads": 1},
        batching={"max_batch_size": 4, "max_wait_ms": 20},
        heatmaps={"policy": "all", "retries": RETRIES, "backoff_ms": BACKOFF_MS, **heatmaps.pop("heatmaps", {})},
        **heatmaps,
    )  # fmt: skip


def test_unwritable_file_store_gives_results_with_heatmap_error(make_settings, topics, trained_model, tmp_path) -> None:
    # Running as root, permissions do not stop writes; a store root below a regular file fails for
    # everyone (ENOTDIR), like a read-only or vanished volume.
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"")
    settings = _settings(make_settings, topics, trained_model, heatmaps={"store_uri": f"file://{blocker}/heatmaps"})
    image = next((trained_model.data / "test" / "good").glob("*.png"))
    n = 5
    with running_worker(settings) as app, TopicTail(settings, topics.results) as tail:
        attempts = _record_attempts(app)
        produce(settings, topics.requests,
                [request_record(image, line=trained_model.line, camera="c", message_id=f"h-{i}") for i in range(n)])  # fmt: skip
        tail.wait(lambda r: len(r) >= n, 60, "results")
        bodies = tail.bodies()
        assert app.worker._fatal is None
    assert sorted(b["message_id"] for b in bodies) == [f"h-{i}" for i in range(n)]
    for b in bodies:
        assert b["heatmap"] is None
        assert "Not a directory" in b["heatmap_error"] and f"gave up after {RETRIES + 1} attempts" in b["heatmap_error"]
    for key in {k for _, k, _ in attempts}:
        _check_backoff(attempts, key)
    assert not any(ok for *_, ok in attempts)


def test_s3_store_that_dies_mid_run_and_a_bad_bucket(make_settings, topics, trained_model, tmp_path) -> None:
    moto = start_moto_server(tmp_path / "moto")
    try:
        endpoint = f"http://127.0.0.1:{moto.port}"
        s3 = {"endpoint_url": endpoint, "access_key_id": "test", "secret_access_key": "test"}
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                              region_name="us-east-1")  # fmt: skip
        client.create_bucket(Bucket="heat")

        # A bucket that does not exist: the store gives up after its retries with HeatmapStoreError.
        bad = open_heatmap_store(HeatmapSettings(store_uri="s3://no-such-bucket/x", retries=1, backoff_ms=1), S3Settings(**s3))
        with pytest.raises(HeatmapStoreError, match="gave up after 2 attempts"):
            bad.put("brick/2026/01/01/a.png", b"png", "image/png")

        settings = _settings(make_settings, topics, trained_model, heatmaps={"store_uri": "s3://heat/maps"}, s3=s3)
        image = next((trained_model.data / "test" / "good").glob("*.png"))
        with running_worker(settings) as app, TopicTail(settings, topics.results) as tail:
            attempts = _record_attempts(app)
            produce(settings, topics.requests,
                    [request_record(image, line=trained_model.line, camera="c", message_id=f"up-{i}") for i in range(3)])  # fmt: skip
            tail.wait(lambda r: len(r) >= 3, 60, "results while S3 is up")
            up = tail.bodies()
            keys = [o["Key"] for o in client.list_objects_v2(Bucket="heat").get("Contents", [])]
            moto.stop()  # S3 goes away mid-run
            produce(settings, topics.requests,
                    [request_record(image, line=trained_model.line, camera="c", message_id=f"down-{i}") for i in range(3)])  # fmt: skip
            tail.wait(lambda r: len(r) >= 6, 90, "results while S3 is down")
            bodies = tail.bodies()
            assert app.worker._fatal is None
    finally:
        moto.stop()
    assert all(b["heatmap"] and b["heatmap"]["uri"].startswith("s3://heat/maps/") for b in up)
    assert sorted(k for k in keys) == sorted(b["heatmap"]["uri"].removeprefix("s3://heat/") for b in up)
    down = [b for b in bodies if b["message_id"].startswith("down-")]
    assert sorted(b["message_id"] for b in down) == [f"down-{i}" for i in range(3)]
    for b in down:
        assert b["heatmap"] is None and b["heatmap_error"], b
    failed_keys = {k for _, k, ok in attempts if not ok}
    assert len(failed_keys) == 3
    for key in failed_keys:
        _check_backoff(attempts, key)
    print(f"heatmap faults: S3 attempts={len(attempts)} failed keys={len(failed_keys)}")


def test_keys_from_hostile_ids_stay_inside_the_store_root(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from worker.heatmaps import FileHeatmapStore, heatmap_key

    store = FileHeatmapStore(tmp_path / "root")
    for mid in ["../../etc/passwd", "/abs/path", "a/../../b", "..", ".", "x\x00y", "C:\\win\\sys", "%2e%2e%2f", "~root"]:
        uri = store.put(heatmap_key("brick", datetime(2026, 1, 1, tzinfo=UTC), mid, "png"), b"x", "image/png")
        assert Path(uri.removeprefix("file://")).resolve().is_relative_to((tmp_path / "root").resolve()), mid
