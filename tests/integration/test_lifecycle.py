"""Thresholds and models over their life, against a running worker, the real broker and real Redis.

* a threshold write is applied within one second, results carry model and threshold versions, and a
  threshold calibrated for another model version is never applied;
* ``space calibrate --write`` stores a threshold for the card's line and version;
* Redis stopped mid-stream: inspection goes on with cached values, and recovers when Redis returns;
* a promotion mid-stream: no request lost, failed or duplicated, and later results carry the new version;
* a corrupt promoted version: the worker keeps serving the old one, logs and counts the failure.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from kafka import KafkaProducer

from models.artifact import load_artifact, save_artifact
from models.detector import Detector
from tests.kafka_helpers import collect
from tests.worker_harness import request_record, running_worker
from worker import model_manager
from worker.cli import main
from worker.registry import ModelRegistry
from worker.settings import Settings
from worker.thresholds import ThresholdStore

pytestmark = [pytest.mark.kafka, pytest.mark.redis]


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
@contextmanager
def _producer(settings: Settings) -> Iterator[KafkaProducer]:
    """One producer for the whole test, so each send costs no connection set-up."""
    producer = KafkaProducer(**settings.kafka.client_kwargs(), acks="all", linger_ms=0)
    try:
        yield producer
    finally:
        producer.close(timeout=5)


class _Requests:
    """Sends requests for one line and reads their results back by message id."""

    def __init__(self, settings: Settings, producer: KafkaProducer, image: Path, line: str) -> None:
        self.settings = settings
        self.producer = producer
        self.image = image
        self.line = line
        self.sent: list[str] = []

    def send(self, message_id: str, camera: str = "cam-1") -> None:
        key, value, headers = request_record(self.image, line=self.line, camera=camera, message_id=message_id)
        self.producer.send(self.settings.kafka.requests_topic, key=key, value=value, headers=headers).get(timeout=10)
        self.sent.append(message_id)

    def results(self, *, timeout_s: float = 30, settle_s: float | None = None) -> dict[str, list[dict[str, Any]]]:
        """Every result by message id (a list, so duplicates show), once each sent id has one.

        With ``settle_s`` the topic is read again until it has been quiet that long, so a duplicate
        published after the last first result shows up too.
        """
        wanted = set(self.sent)
        topic = self.settings.kafka.results_topic
        records = collect(
            self.settings, topic, timeout_s=timeout_s,
            until=lambda recs: wanted <= {json.loads(r.value)["message_id"] for r in recs},
        )  # fmt: skip
        if settle_s is not None:
            records = collect(self.settings, topic, timeout_s=timeout_s, idle_s=settle_s)
        out: dict[str, list[dict[str, Any]]] = {}
        for record in records:
            body = json.loads(record.value)
            body["_timestamp_s"] = record.timestamp / 1000.0
            out.setdefault(body["message_id"], []).append(body)
        return out

    def one(self, message_id: str, *, timeout_s: float = 30) -> dict[str, Any]:
        self.send(message_id)
        bodies = self.results(timeout_s=timeout_s).get(message_id)
        assert bodies, f"no result for {message_id} within {timeout_s} s"
        return bodies[0]


def _good_image(data: Path) -> Path:
    return sorted((data / "test" / "good").glob("*.png"))[0]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _RedisServer:
    """A private redis-server on a free port that a test may kill and restart (never the shared one)."""

    def __init__(self, workdir: Path) -> None:
        self.port = _free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            cwd=self.workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis.from_url(self.url, socket_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                assert self.proc.poll() is None, "redis-server exited"
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.02)
        client.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[_RedisServer]:
    server = _RedisServer(tmp_path)
    server.start()
    yield server
    server.kill()


@pytest.fixture
def registry_copy(trained_model: Any, tmp_path: Path) -> Callable[..., ModelRegistry]:
    """Copies the trained registry; ``add(version, corrupt=False)`` publishes a re-versioned v1."""
    root = tmp_path / "models"
    shutil.copytree(trained_model.root, root)
    card, state = load_artifact(root / trained_model.line / trained_model.version)
    registry = ModelRegistry(str(root))

    def add(version: str, *, corrupt: bool = False) -> ModelRegistry:
        folder = save_artifact(root / trained_model.line / version, card.model_copy(update={"version": version}), state)
        if corrupt:
            weights = folder / "model.safetensors"
            data = bytearray(weights.read_bytes())
            data[len(data) // 2] ^= 0x01
            weights.write_bytes(bytes(data))
        return registry

    return add


class _LogRecorder:
    """Wraps a structlog logger and records (level, event, fields); robust to cached loggers."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Callable[..., Any]:
        method = getattr(self.inner, level)

        def record(event: str, **fields: Any) -> Any:
            self.events.append((level, event, fields))
            return method(event, **fields)

        return record


def _wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, f"{what} did not happen within {timeout_s} s"
        time.sleep(0.05)
    return time.monotonic() - start


# ------------------------------------------------------------------------------------------------
# thresholds
# ------------------------------------------------------------------------------------------------
def test_threshold_update_applies_within_a_second_and_only_to_its_model_version(
    make_settings, topics, trained_model, redis_client
) -> None:
    settings = make_settings(
        topics, models={"root": str(trained_model.root), "preload": (trained_model.line,)},
        batching={"max_batch_size": 1, "max_wait_ms": 0}, thresholds={"cache_ttl_s": 300},
    )  # fmt: skip
    store = ThresholdStore(redis_client, settings.redis.key_prefix, 100)
    line = trained_model.line
    with running_worker(settings), _producer(settings) as producer:
        requests = _Requests(settings, producer, _good_image(trained_model.data), line)
        first = requests.one("before")
        assert first["model"]["version"] == "v1"
        assert first["threshold"]["source"] == "model-default" and first["threshold"]["version"] is None
        default = first["threshold"]["value"]

        # Calibrated for another model version: scores of v0 are on another scale, never applied.
        store.set(line, -5.0, model_version="v0", method="quantile", updated_by="test", force=True)
        other = requests.one("other-model")
        assert other["threshold"] == {
            "value": default,
            "version": None,
            "source": "model-default",
            "model_version": "v1",
        }

        lags = []
        for i, value in enumerate((-1.0, 1e6)):
            record = store.set(line, value, model_version="v1", method="manual", updated_by="test", force=True)
            set_at = time.time()
            body = requests.one(f"after-{i}")  # sent right after the write: no sleep
            lags.append(body["_timestamp_s"] - set_at)
            assert body["threshold"] == {
                "value": value,
                "version": record.version,
                "source": "redis",
                "model_version": "v1",
            }
            assert body["verdict"] == ("anomalous" if value < 0 else "ok")
            assert body["model"] == {"name": body["model"]["name"], "version": "v1"}

        # The next version's threshold written before its promotion: v1 keeps its last own value.
        store.set(line, -7.0, model_version="v2", method="quantile", updated_by="test", force=True)
        ahead = requests.one("next-version-first")
        assert ahead["threshold"] == {"value": 1e6, "version": record.version, "source": "redis", "model_version": "v1"}
        assert ahead["verdict"] == "ok"
    assert max(lags) < 1.0, f"threshold writes took {lags} s to reach results"


def test_calibrate_writes_a_threshold_for_the_cards_line_and_version(
    stack, trained_model, redis_client, key_prefix, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("SPACE_REDIS__URL", stack.redis_url)
    monkeypatch.setenv("SPACE_REDIS__KEY_PREFIX", key_prefix)
    monkeypatch.setattr("worker.logging.configure_logging", lambda *args, **kwargs: None)
    model_dir = trained_model.root / trained_model.line / trained_model.version
    argv = ["calibrate", "--model", str(model_dir), "--data", str(trained_model.data), "--json"]
    first = ["--precision", "fp32", "--target-fpr", "0.05", "--write", "--by", "qe-anna", "--note", "first calibration"]
    assert main([*argv, *first]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{\n") :])
    assert result["normal_source"] == "validation" and result["n_normal"] == 8 and result["n_defect"] == 12
    assert result["expected_fpr"] <= 0.05 and 0.0 <= result["recall"] <= 1.0
    assert result["written_version"] == 1

    record = ThresholdStore(redis_client, key_prefix, 10).get(trained_model.line)
    assert record is not None
    assert (record.value, record.model_version, record.method) == (result["threshold"], "v1", "quantile")
    assert (record.updated_by, record.note) == ("qe-anna", "first calibration")
    assert result["inference_precision"] == "fp32"

    # Scored at the workers' precision (SPACE_MODELS__PRECISION=bf16): a threshold of its own, noted in the history.
    assert main([*argv, "--precision", "bf16", "--target-fpr", "0.05", "--write", "--by", "qe-anna"]) == 0
    out = capsys.readouterr().out
    bf16 = json.loads(out[out.index("{\n") :])
    assert bf16["inference_precision"] == "bf16" and bf16["written_version"] == 2
    assert abs(bf16["threshold"] - result["threshold"]) <= 0.1 * abs(result["threshold"])
    record = ThresholdStore(redis_client, key_prefix, 10).get(trained_model.line)
    assert record is not None and record.value == bf16["threshold"]
    assert record.note is not None and record.note.startswith("space calibrate (scored in bf16): ")

    # The default (auto) scores where a worker on this machine serves: the card's precision if native, else fp32.
    assert main(argv) == 0
    out = capsys.readouterr().out
    auto = json.loads(out[out.index("{\n") :])
    assert auto["inference_precision"] == Detector.load(model_dir, device="cpu").precision
    assert auto["threshold"] == (bf16 if auto["inference_precision"] == "bf16" else result)["threshold"]


def test_redis_outage_serves_cached_thresholds_and_recovers(make_settings, topics, trained_model, own_redis) -> None:
    settings = make_settings(
        topics, models={"root": str(trained_model.root), "preload": (trained_model.line,)},
        batching={"max_batch_size": 1, "max_wait_ms": 0}, redis={"url": own_redis.url},
        thresholds={"cache_ttl_s": 0.3, "retry_interval_s": 0.2, "watch_backoff_max_s": 0.3},
    )  # fmt: skip
    line = trained_model.line

    def write(value: float) -> int:
        client = redis.Redis.from_url(own_redis.url, decode_responses=True)
        try:
            store = ThresholdStore(client, settings.redis.key_prefix, 10)
            return store.set(line, value, model_version="v1", method="manual", updated_by="test", force=True).version
        finally:
            client.close()

    version = write(-1.0)
    with running_worker(settings) as app, _producer(settings) as producer:
        requests = _Requests(settings, producer, _good_image(trained_model.data), line)
        assert requests.one("up")["threshold"]["source"] == "redis"

        own_redis.kill()
        time.sleep(0.4)  # past the cache TTL: the next lookup has to ask the dead Redis
        for i in range(3):
            requests.send(f"down-{i}")
        down = requests.results()
        for i in range(3):
            (body,) = down[f"down-{i}"]
            assert body["threshold"] == {"value": -1.0, "version": version, "source": "cache", "model_version": "v1"}
            assert body["verdict"] == "anomalous"

        own_redis.start()  # same port, empty (no persistence): the engineer writes the value again
        version = write(-2.0)
        deadline = time.monotonic() + 15
        recovered = None
        for i in range(100):
            body = requests.one(f"back-{i}")
            if body["threshold"]["source"] == "redis":
                recovered = body
                break
            assert body["threshold"]["source"] == "cache"
            assert time.monotonic() < deadline, "the worker did not read Redis again within 15 s"
            time.sleep(0.1)
        assert recovered is not None
        assert recovered["threshold"] == {"value": -2.0, "version": version, "source": "redis", "model_version": "v1"}
        assert app.worker.metrics.registry.get_sample_value("space_threshold_source_total", {"source": "cache"}) >= 3
    everything = requests.results(settle_s=0.5)
    assert sorted(everything) == sorted(requests.sent) and all(len(v) == 1 for v in everything.values())


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------
def test_promotion_mid_stream_loses_nothing_and_switches_version(
    make_settings, topics, trained_model, registry_copy
) -> None:
    registry = registry_copy("v2")
    settings = make_settings(
        topics, models={"root": registry.root, "preload": (trained_model.line,), "refresh_interval_s": 0.2},
        batching={"max_batch_size": 4, "max_wait_ms": 10},
    )  # fmt: skip
    line = trained_model.line
    with running_worker(settings) as app, _producer(settings) as producer:
        precision = app.models.loaded()[line].precision
        assert precision in ("fp32", "bf16")  # auto: the card's (bf16 on a CPU with bf16 kernels) or fp32
        assert _serving(app) == {(line, "v1", precision): 1.0}  # published right after preload
        requests = _Requests(settings, producer, _good_image(trained_model.data), line)
        stop = threading.Event()

        def stream() -> None:
            i = 0
            while not stop.is_set():
                requests.send(f"m-{i:03d}", camera=f"cam-{i % 3}")
                i += 1
                time.sleep(0.08)

        sender = threading.Thread(target=stream, name="stream", daemon=True)
        sender.start()
        # Promote only once the stream is served: m-000 was published by v1 before the promotion.
        collect(settings, topics.results, timeout_s=30, until=lambda recs: any(b"m-000" in r.value for r in recs))
        registry.verify(line, "v2")
        registry.promote(line, "v2", by="test")
        swap_s = _wait_until(lambda: app.models.loaded()[line].version == "v2", 10, "the swap to v2")
        _wait_until(lambda: _serving(app) == {(line, "v2", precision): 1.0}, 2, "space_model_serving on v2")
        time.sleep(0.5)  # keep streaming on v2
        stop.set()
        sender.join(10)
        results = requests.results(settle_s=0.5)
    assert swap_s < 3.0
    assert sorted(results) == sorted(requests.sent), "a request has no result"
    assert all(len(bodies) == 1 for bodies in results.values()), "a request has two results"
    versions = [results[mid][0]["model"]["version"] for mid in requests.sent]
    assert versions[0] == "v1" and set(versions) == {"v1", "v2"}
    assert versions[-5:] == ["v2"] * 5  # sent at least 0.5 s after the swap
    assert app.worker.metrics.registry.get_sample_value(
        "space_model_loads_total", {"product_line": line, "outcome": "failed"}
    ) in (None, 0.0)
    assert not collect(settings, topics.dlq, idle_s=0.5, timeout_s=5)


def _serving(app: Any) -> dict[tuple[str, str, str], float]:
    """The ``space_model_serving`` series of a running worker: (line, version, precision) -> value."""
    (family,) = [f for f in app.worker.metrics.registry.collect() if f.name == "space_model_serving"]
    return {(s.labels["product_line"], s.labels["version"], s.labels["precision"]): s.value for s in family.samples}


def test_corrupt_promoted_version_keeps_the_old_one_serving(
    make_settings, topics, trained_model, registry_copy, monkeypatch
) -> None:
    registry = registry_copy("v3", corrupt=True)
    recorder = _LogRecorder(model_manager.log)
    monkeypatch.setattr(model_manager, "log", recorder)
    settings = make_settings(
        topics, models={"root": registry.root, "preload": (trained_model.line,), "refresh_interval_s": 0.2},
        batching={"max_batch_size": 1, "max_wait_ms": 0},
    )  # fmt: skip
    line = trained_model.line
    with running_worker(settings) as app, _producer(settings) as producer:
        requests = _Requests(settings, producer, _good_image(trained_model.data), line)
        assert requests.one("before")["model"]["version"] == "v1"

        def failed_loads() -> float:
            labels = {"product_line": line, "outcome": "failed"}
            return app.worker.metrics.registry.get_sample_value("space_model_loads_total", labels) or 0.0

        registry.promote(line, "v3", by="test")  # straight to the registry: no CLI check
        _wait_until(lambda: failed_loads() >= 1, 10, "the failed load of v3")
        for i in range(3):
            requests.send(f"after-{i}")
        results = requests.results()
        assert [results[f"after-{i}"][0]["model"]["version"] for i in range(3)] == ["v1"] * 3
        assert app.models.loaded()[line].version == "v1"
        time.sleep(0.5)  # several refresh intervals: the broken version is not reloaded each time
        assert failed_loads() == 1
    swap_failures = [f for level, event, f in recorder.events if event == "model_swap_failed"]
    assert swap_failures and swap_failures[0]["serving_version"] == "v1" and swap_failures[0]["wanted_version"] == "v3"
    assert "sha256" in swap_failures[0]["error"]
    assert not collect(settings, topics.dlq, idle_s=0.5, timeout_s=5)
