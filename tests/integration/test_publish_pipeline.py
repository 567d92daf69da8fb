"""The heatmap pool stays busy across batches, and results still leave in order.

With ``policy=all`` the heatmap pool is what limits a GPU pod (docs/performance.md), so the infer
thread submits a scored batch's heatmaps at once, while the publish thread still waits for the
previous batch's heatmaps and sends its results. The test slows every heatmap write down and records,
on the running worker, when each write starts and when each result is handed to the producer.

What would make this fail: heatmaps of batch n+1 submitted only after batch n is sent (the pool idles
while the publish thread waits for batch n's slowest heatmap and sends its results: at the first
result send, only the first batch's writes have started; it failed so before the infer thread took
over submitting them), results sent out of batch order, or a result lost.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest

from tests.kafka_helpers import produce
from tests.reliability.helpers import TopicTail
from tests.worker_harness import request_record, running_worker

pytestmark = [pytest.mark.kafka, pytest.mark.redis]

WRITE_S = 1.5  # longer than the model takes for a batch on a CPU (~0.2 s per 128 px image)
BATCH = 2


def _record(app: Any, events: list[tuple[float, str, str]]) -> None:
    """Slow the heatmap store down and log (time, what, message_id) for writes and result sends."""
    lock = threading.Lock()
    inner = app.worker.heatmaps.inner
    original_put = inner.put

    def put(key: str, data: bytes, content_type: str) -> str:
        with lock:
            events.append((time.monotonic(), "put", key.rsplit("/", 1)[-1].split(".")[0]))  # <id>.<digest>.png
        time.sleep(WRITE_S)
        return original_put(key, data, content_type)

    inner.put = put
    producer = app.worker.producer
    original_send = producer.send
    results_topic = app.settings.kafka.results_topic

    def send(topic: str, *args: Any, **kwargs: Any) -> Any:
        if topic == results_topic:
            with lock:
                events.append((time.monotonic(), "send", ""))
        return original_send(topic, *args, **kwargs)

    producer.send = send


def test_next_batch_heatmaps_start_before_this_batch_is_sent(make_settings, topics, trained_model) -> None:
    settings = make_settings(
        topics, models={"root": str(trained_model.root), "preload": (trained_model.line,), "threads": 1},
        batching={"max_batch_size": BATCH, "max_wait_ms": 500},
        heatmaps={"policy": "all", "threads": 4 * BATCH},
    )  # fmt: skip
    image = next((trained_model.data / "test" / "good").glob("*.png"))
    n = 3 * BATCH
    ids = [f"pipe-{i:02d}" for i in range(n)]
    events: list[tuple[float, str, str]] = []
    with running_worker(settings, customize=lambda app: _record(app, events)) as app, \
            TopicTail(settings, topics.results) as tail:  # fmt: skip
        # One camera (one key, one partition): records arrive, decode and batch in offset order.
        produce(settings, topics.requests,
                [request_record(image, line=trained_model.line, camera="c", message_id=m) for m in ids])  # fmt: skip
        records = tail.wait(lambda r: len(r) >= n, 90, "results")
        assert app.worker._fatal is None
    bodies = [json.loads(r.value) for r in records]
    assert [b["message_id"] for b in bodies] == ids, "results out of order or missing"
    assert all(b["heatmap"] is not None for b in bodies)
    first_batch = bodies[0]["batch_size"]
    assert first_batch < n, "everything came in one batch: the test needs several"
    events.sort()
    timeline = [(round(t - events[0][0], 2), what, m) for t, what, m in events]
    first_send = next(t for t, what, _ in events if what == "send")
    started = [m for t, what, m in events if what == "put" and t < first_send]
    # Every write of the first batch starts before its results go; a pipelined publish thread has
    # also started the next batch's writes by then (they run while it waits for the first batch's).
    assert set(ids[:first_batch]) <= set(started)
    assert len(started) > first_batch, (
        f"at the first result send only {len(started)} heatmap writes had started (first batch: {first_batch}):"
        f" the pool idled while the publish thread finished a batch: {timeline}"
    )
