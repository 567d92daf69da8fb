"""S3 integration against a local moto server: the heatmap store and the claim-check fetcher.

A session fixture starts ``moto_server`` (from the virtual environment) on a free loopback port and
kills it at the end; each test uses its own bucket.
"""

from __future__ import annotations

import base64
import hashlib
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from pydantic import SecretStr

from worker.decode import ClaimCheckFetcher, DecodeError, decode_image
from worker.heatmaps import (
    HeatmapStoreError,
    RetryingHeatmapStore,
    S3HeatmapStore,
    heatmap_key,
    open_heatmap_store,
    save_heatmap,
)
from worker.s3 import make_s3_client
from worker.settings import DecodeSettings, HeatmapSettings, S3Settings

pytestmark = pytest.mark.s3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = Path(sys.executable).parent / "moto_server"
    assert binary.exists(), f"{binary} missing: pip install 'moto[server]'"
    port = free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("wb")
    proc = subprocess.Popen([str(binary), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                assert proc.poll() is None, "moto_server exited"
                assert time.monotonic() < deadline, "moto_server did not start"
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait(5)
        log.close()


@pytest.fixture(scope="session")
def s3_settings(moto_endpoint: str) -> S3Settings:
    return S3Settings(endpoint_url=moto_endpoint, access_key_id=SecretStr("test"), secret_access_key=SecretStr("test"))


@pytest.fixture(scope="session")
def s3_client(s3_settings: S3Settings) -> Any:
    return make_s3_client(s3_settings, timeout_s=5)


@pytest.fixture
def bucket(s3_client: Any) -> str:
    name = f"heatmaps-{uuid.uuid4().hex[:8]}"
    s3_client.create_bucket(Bucket=name)
    return name


WHEN = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)


def test_s3_store_puts_object_with_type_and_checksum(s3_client, bucket):
    store = S3HeatmapStore(bucket, "/maps/", s3_client)
    key = heatmap_key("L1", WHEN, "cam-1/0001", "png")
    uri = store.put(key, b"\x89PNG fake", "image/png")
    assert uri == f"s3://{bucket}/maps/{key}"
    head = s3_client.head_object(Bucket=bucket, Key=f"maps/{key}", ChecksumMode="ENABLED")
    assert head["ContentType"] == "image/png"
    assert head["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(b"\x89PNG fake").digest()).decode()
    body = s3_client.get_object(Bucket=bucket, Key=f"maps/{key}")["Body"].read()
    assert body == b"\x89PNG fake"


def test_open_heatmap_store_for_s3_saves_a_readable_png(s3_settings, s3_client, bucket):
    store = open_heatmap_store(HeatmapSettings(store_uri=f"s3://{bucket}/hm"), s3_settings)
    amap = np.linspace(0, 1, 24 * 16, dtype=np.float32).reshape(16, 24)
    ref = save_heatmap(store, "L1", WHEN, "m-1", amap, threshold=0.5)
    assert ref.uri == f"s3://{bucket}/hm/L1/2026/05/04/m-1.{ref.sha256[:16]}.png"
    data = s3_client.get_object(Bucket=bucket, Key=f"hm/L1/2026/05/04/m-1.{ref.sha256[:16]}.png")["Body"].read()
    assert hashlib.sha256(data).hexdigest() == ref.sha256
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert decoded.shape == (16, 24)
    assert decoded[-1, -1] == 255


def test_missing_bucket_fails_after_retries(s3_client):
    sleeps: list[float] = []
    store = RetryingHeatmapStore(S3HeatmapStore("no-such-bucket-x", "", s3_client), 2, 1.0, sleep=sleeps.append)
    with pytest.raises(HeatmapStoreError, match="gave up after 3 attempts"):
        store.put("L/2026/01/01/a.png", b"x", "image/png")
    assert sleeps == [0.001, 0.002]


def test_unreachable_endpoint_fails_with_heatmap_store_error():
    dead = S3Settings(
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        access_key_id=SecretStr("t"),
        secret_access_key=SecretStr("t"),
    )
    store = S3HeatmapStore("bucket-x", "", make_s3_client(dead, timeout_s=0.5, max_attempts=1))
    with pytest.raises(HeatmapStoreError, match="cannot upload"):
        store.put("L/2026/01/01/a.png", b"x", "image/png")


# --- claim checks ------------------------------------------------------------------------------


@pytest.fixture
def image_object(s3_client: Any, bucket: str) -> tuple[str, bytes]:
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[:, :, 0] = 255
    ok, buf = cv2.imencode(".png", rgb[:, :, ::-1].copy())
    assert ok
    data = buf.tobytes()
    s3_client.put_object(Bucket=bucket, Key="cam/1.png", Body=data, ContentType="image/png")
    return f"s3://{bucket}/cam/1.png", data


def test_claim_check_fetch_from_s3_then_decode(s3_settings, image_object, bucket, monkeypatch):
    import worker.decode

    created: list[float] = []

    def counting_make_s3_client(settings: S3Settings, *, timeout_s: float, max_attempts: int, **kwargs: Any) -> Any:
        created.append(timeout_s)
        return make_s3_client(settings, timeout_s=timeout_s, max_attempts=max_attempts, **kwargs)

    monkeypatch.setattr(worker.decode, "make_s3_client", counting_make_s3_client)
    uri, data = image_object
    decode = DecodeSettings(claim_check_buckets=(bucket,), fetch_timeout_ms=1500)
    fetcher = ClaimCheckFetcher.from_settings(decode, s3_settings)
    fetched = fetcher.fetch(uri, hashlib.sha256(data).hexdigest())
    assert fetched == data
    fetcher.fetch(uri, hashlib.sha256(data).hexdigest())
    assert created == [1.5]  # one client, built lazily with the fetch timeout, then reused
    image = decode_image(fetched, "image/png", max_pixels=10_000, max_value_bytes=10_000)
    assert image.shape == (20, 30, 3)
    assert image[0, 0].tolist() == [255, 0, 0]


def test_claim_check_s3_failures(s3_client, image_object, bucket):
    uri, data = image_object
    digest = hashlib.sha256(data).hexdigest()

    def reason(fetcher: ClaimCheckFetcher, target: str, expected: str) -> str:
        with pytest.raises(DecodeError) as info:
            fetcher.fetch(target, expected)
        return info.value.reason

    fetcher = ClaimCheckFetcher(DecodeSettings(), lambda: s3_client)
    assert reason(fetcher, f"s3://{bucket}/cam/missing.png", digest) == "claim-check-fetch-failed"
    assert reason(fetcher, uri, hashlib.sha256(b"other").hexdigest()) == "claim-check-checksum-mismatch"
    small = ClaimCheckFetcher(DecodeSettings(max_value_bytes=10), lambda: s3_client)
    assert reason(small, uri, digest) == "value-too-large"
    other_bucket = ClaimCheckFetcher(DecodeSettings(claim_check_buckets=("someone-else",)), lambda: s3_client)
    assert reason(other_bucket, uri, digest) == "claim-check-denied"
