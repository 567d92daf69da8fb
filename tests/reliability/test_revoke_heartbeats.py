"""A revoke that waits for in-flight images longer than the session timeout keeps the member in the group.

kafka-python 3 runs rebalance callbacks on its network thread, the one that sends heartbeats. The
worker's revoke waits (bounded) for the images of the revoked partitions still in flight, so that it can
commit them before the partitions move. When that wait blocked the thread, a wait past
``session_timeout_ms`` got the member evicted: every partition lost (not only the revoked ones), the
revoke's commit refused with ``UnknownMemberId``, and the next owner scored the same images again. Here
A holds eight images in flight (decode held) when B joins, for longer than the session timeout; A must
stay in the group, finish and publish all eight, commit them, and hand over the revoked partitions with
nothing to redo.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
from kafka import KafkaProducer

from tests.reliability.helpers import InProcessWorker, TopicTail, committed_offsets
from tests.worker_harness import request_record
from worker.app import build_app

pytestmark = [pytest.mark.kafka, pytest.mark.redis]

SESSION_TIMEOUT_MS = 6_000
HOLD_S = SESSION_TIMEOUT_MS / 1000 + 3.0  # how long the revoke waits: past the session timeout, within its 15 s budget


def test_a_revoke_waiting_past_the_session_timeout_is_not_evicted(
    make_settings, topics, trained_model, tmp_path
) -> None:
    base = make_settings(topics)
    group = base.kafka.group_id

    def app_for(name: str) -> Any:
        settings = make_settings(
            topics,
            kafka={"group_id": group, "session_timeout_ms": SESSION_TIMEOUT_MS, "max_poll_interval_ms": 30_000},
            models={"root": str(trained_model.root), "preload": (trained_model.line,), "threads": 1},
            batching={"max_batch_size": 4, "max_wait_ms": 50}, heatmaps={"policy": "none"},
            worker={"id": name, "state_dir": str(tmp_path / name), "shutdown_grace_s": 20},
        )  # fmt: skip
        return build_app(settings)

    a_app = app_for("A")
    lost: list[list[int]] = []
    orig_lost = a_app.worker._on_lost
    a_app.worker._on_lost = lambda tps: (lost.append(sorted(tp.partition for tp in tps)), orig_lost(tps))  # type: ignore[method-assign]
    gate = threading.Event()
    orig_decode = a_app.worker._decode

    def held_decode(item: Any) -> None:
        gate.wait(60)
        orig_decode(item)

    a_app.worker._decode = held_decode  # type: ignore[method-assign]
    revoke_started = threading.Event()
    orig_deadline = a_app.worker._revoke_deadline

    def revoke_deadline(**kw: Any) -> float:  # the start of a revoke's wait
        revoke_started.set()
        return orig_deadline(**kw)

    a_app.worker._revoke_deadline = revoke_deadline  # type: ignore[method-assign]
    image = next((trained_model.data / "test" / "good").glob("*.png"))
    workers: list[InProcessWorker] = []
    with TopicTail(base, topics.results) as tail:
        try:
            workers.append(InProcessWorker(a_app).start())
            a = a_app.worker
            producer = KafkaProducer(
                **base.kafka.client_kwargs(), acks="all", max_request_size=base.kafka.max_request_size
            )
            try:
                for i in range(8):
                    key, value, headers = request_record(
                        image, line=trained_model.line, camera="c", message_id=f"h-{i}"
                    )
                    producer.send(topics.requests, key=key, value=value, headers=headers, partition=i % 4).get(
                        timeout=30
                    )
            finally:
                producer.close(timeout=5)
            deadline = time.monotonic() + 30
            while a._inflight_count < 8:
                assert time.monotonic() < deadline, f"A holds {a._inflight_count} of 8 images in flight"
                time.sleep(0.05)
            b = InProcessWorker(app_for("B"))
            workers.append(b)
            b.thread.start()  # B joins: A must revoke two partitions whose images are all in flight
            assert revoke_started.wait(60), "A never started revoking"
            time.sleep(HOLD_S)
            gate.set()
            results = tail.wait(lambda recs: len(recs) >= 8, 60, "8 results")
            deadline = time.monotonic() + 40
            while not (len(a.assigned) == 2 and len(b.app.worker.assigned) == 2):
                assert time.monotonic() < deadline, f"A {a.assigned}, B {b.app.worker.assigned}, lost {lost}"
                time.sleep(0.05)
            time.sleep(2.0)  # B would score anything A failed to commit
            results = tail.snapshot()
        finally:
            for w in reversed(workers):
                if w.thread.is_alive():
                    w.stop()
    assert lost == [], f"A was evicted while its revoke waited (lost {lost})"
    got = [(json.loads(r.value)["message_id"], json.loads(r.value)["worker_id"]) for r in results]
    assert sorted(got) == [(f"h-{i}", "A") for i in range(8)], got
    assert committed_offsets(base, topics.requests) == {0: 2, 1: 2, 2: 2, 3: 2}
