"""Issue 4's failover guarantees: SIGKILL + restart, a member leaving, SIGTERM drain."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.kafka_helpers import collect, produce
from tests.worker_harness import request_record, running_worker
from worker.kafka_clients import make_consumer
from worker.malloc import glibc
from worker.settings import Settings

pytestmark = [pytest.mark.kafka, pytest.mark.redis]


def _images(data: Path) -> list[Path]:
    return sorted((data / "test").glob("*/*.png"))


def _records(trained_model, n: int, prefix: str) -> list:
    imgs = _images(trained_model.data)
    return [
        request_record(imgs[i % len(imgs)], line=trained_model.line, camera=f"cam-{i % 4}", message_id=f"{prefix}-{i}")
        for i in range(n)
    ]


def _env(settings: Settings) -> dict[str, str]:
    k = settings.kafka
    env = {key: value for key, value in os.environ.items() if not key.startswith("SPACE_")}
    env.update(
        SPACE_KAFKA__BOOTSTRAP_SERVERS=k.bootstrap_servers,
        SPACE_KAFKA__GROUP_ID=k.group_id,
        SPACE_KAFKA__REQUESTS_TOPIC=k.requests_topic,
        SPACE_KAFKA__RESULTS_TOPIC=k.results_topic,
        SPACE_KAFKA__ALERTS_TOPIC=k.alerts_topic,
        SPACE_KAFKA__DLQ_TOPIC=k.dlq_topic,
        SPACE_KAFKA__SESSION_TIMEOUT_MS="6000",
        SPACE_KAFKA__HEARTBEAT_INTERVAL_MS="1000",
        SPACE_KAFKA__COMMIT_INTERVAL_MS="200",
        SPACE_REDIS__URL=settings.redis.url,
        SPACE_REDIS__KEY_PREFIX=settings.redis.key_prefix,
        SPACE_MODELS__ROOT=settings.models.root,
        SPACE_MODELS__PRELOAD=",".join(settings.models.preload),
        SPACE_MODELS__THREADS="1",
        SPACE_HEATMAPS__STORE_URI=settings.heatmaps.store_uri,
        SPACE_HTTP__PORT="0",
        SPACE_HTTP__HOST="127.0.0.1",
        SPACE_WORKER__STATE_DIR=str(settings.worker.state_dir),
        SPACE_WORKER__SHUTDOWN_GRACE_S="20",
        SPACE_BATCHING__MAX_BATCH_SIZE="4",
        SPACE_LOG__FORMAT="json",
    )
    return env


def _serve(settings: Settings, log_path: Path) -> subprocess.Popen[bytes]:
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the child process
    return subprocess.Popen([sys.executable, "-m", "worker", "serve"], env=_env(settings), stdout=log, stderr=log)


def _committed(settings: Settings, topic: str) -> dict[int, int]:
    from kafka import TopicPartition

    consumer = make_consumer(settings.kafka)
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        out = {}
        for p in parts:
            off = consumer.committed(TopicPartition(topic, p))
            if off is not None:
                out[p] = off
        return out
    finally:
        consumer.close()


def test_sigkill_mid_stream_then_restart_answers_every_request(make_settings, topics, trained_model, tmp_path) -> None:
    settings = make_settings(topics, models={"root": str(trained_model.root), "preload": (trained_model.line,)})
    records = _records(trained_model, 60, "k")
    produce(settings, topics.requests, records)
    first = _serve(settings, tmp_path / "worker1.log")
    try:
        got = collect(settings, topics.results, until=lambda rs: len(rs) >= 15, timeout_s=120)
        assert len(got) >= 15, (tmp_path / "worker1.log").read_text()[-2000:]
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    second = _serve(settings, tmp_path / "worker2.log")
    try:
        results = collect(
            settings,
            topics.results,
            until=lambda rs: {json.loads(r.value)["message_id"] for r in rs} >= {f"k-{i}" for i in range(60)},
            timeout_s=120,
        )
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0
    bodies = [json.loads(r.value) for r in results]
    assert {b["message_id"] for b in bodies} == {f"k-{i}" for i in range(60)}
    # Duplicates are allowed (uncommitted window) but carry the same idempotency key.
    by_message: dict[str, set[str]] = {}
    for b in bodies:
        by_message.setdefault(b["message_id"], set()).add(b["result_id"])
    assert all(len(ids) == 1 for ids in by_message.values())


def test_sigterm_drains_publishes_and_commits_everything(make_settings, topics, trained_model, tmp_path) -> None:
    settings = make_settings(topics, models={"root": str(trained_model.root), "preload": (trained_model.line,)})
    produce(settings, topics.requests, _records(trained_model, 24, "t"))
    proc = _serve(settings, tmp_path / "worker.log")
    try:
        collect(settings, topics.results, until=lambda rs: len(rs) >= 4, timeout_s=120)
    finally:
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
    assert rc == 0, (tmp_path / "worker.log").read_text()[-2000:]
    assert time.monotonic() - start < 20
    results = collect(settings, topics.results, idle_s=1.0, timeout_s=20)
    answered = {(r.partition, json.loads(r.value)["source"]["offset"]) for r in results}
    committed = _committed(settings, topics.requests)
    # Every offset below a committed position has a result: the commit never passes an unanswered image.
    by_partition: dict[int, set[int]] = {}
    for r in results:
        body = json.loads(r.value)
        by_partition.setdefault(body["source"]["partition"], set()).add(body["source"]["offset"])
    assert committed, "nothing committed on SIGTERM"
    for partition, position in committed.items():
        assert set(range(position)) <= by_partition.get(partition, set())
    assert answered
    log_lines = [json.loads(line) for line in (tmp_path / "worker.log").read_text().splitlines() if line.startswith("{")]
    events = [e["event"] for e in log_lines]
    assert "worker_draining" in events
    assert "worker_stopped" in events
    malloc = next(e for e in log_lines if e["event"] == "malloc_configured")  # the default, SPACE_MODELS__MALLOC=retain
    assert malloc["malloc"] == "retain" and malloc["applied"] is (glibc() is not None)


def test_two_workers_one_leaves_mid_stream_every_request_answered(make_settings, topics, trained_model) -> None:
    settings = make_settings(topics, models={"root": str(trained_model.root), "preload": (trained_model.line,)})
    records = _records(trained_model, 80, "r")
    with running_worker(settings) as stay:
        with running_worker(settings.model_copy(update={"worker": settings.worker.model_copy(update={"id": "leaver"})})):
            produce(settings, topics.requests, records[:40])
            collect(settings, topics.results, until=lambda rs: len(rs) >= 10, timeout_s=120)
        # The leaver drained, committed and left; the survivor takes its partitions.
        produce(settings, topics.requests, records[40:])
        results = collect(
            settings,
            topics.results,
            until=lambda rs: {json.loads(r.value)["message_id"] for r in rs} >= {f"r-{i}" for i in range(80)},
            timeout_s=180,
        )
        assert stay.worker.assigned
    assert {json.loads(r.value)["message_id"] for r in results} == {f"r-{i}" for i in range(80)}
