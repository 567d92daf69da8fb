"""Broker outage: the broker dies mid-stream and comes back on the same port.

Documented behavior (docs/reliability.md, "Broker outage"):

* The consumer and producer reconnect by themselves (kafka-python retries with backoff); an idle
  worker rides out an outage without restarting.
* A result that cannot be delivered within ``delivery_timeout_ms`` is never committed: the worker stops
  with exit code 1 (bounded by ``delivery_timeout_ms`` + ``shutdown_grace_s``), and the orchestrator
  restarts it; the group re-delivers every uncommitted record (at-least-once).

The embedded Tansu keeps topics in memory, so a restarted broker is empty: the test recreates the
topics and shows that a restarted worker serves again. Re-delivery after the outage is what the crash
test proves (same commit path) on a broker that keeps its data.

What would make this fail: an errback that only logs (the worker would run on with a hole it later
commits past), a shutdown that blocks on the dead broker, or a consumer that does not reconnect.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

import pytest
from kafka.errors import KafkaError

from tests.kafka_helpers import produce
from tests.reliability.helpers import TopicTail
from tests.worker_harness import request_record
from worker.app import build_app
from worker.kafka_clients import ensure_topics
from worker.stack import Stack, free_port

pytestmark = [pytest.mark.kafka, pytest.mark.redis]


class _Broker:
    """A private Tansu on a fixed port (adopts the shared Redis, never stops it)."""

    def __init__(self, state_dir: Path, redis_url: str) -> None:
        self.port = free_port()
        self.stack = Stack(state_dir, redis_url=redis_url)

    def up(self) -> None:
        self.stack.up(kafka_port=self.port)

    def kill(self) -> None:
        self.stack.down(timeout_s=0.2)  # SIGTERM, SIGKILL after 0.2 s: a crash, not a clean stop

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"


def _topics(settings) -> None:
    k = settings.kafka
    ensure_topics(k, {k.requests_topic: 2, k.results_topic: 2, k.alerts_topic: 1, k.dlq_topic: 1})


def _settings(make_settings, broker: _Broker, trained_model, *, kafka: dict, **sections):
    """A worker on ``broker`` with topics of its own, the trained line preloaded and no heatmaps."""
    suffix = uuid.uuid4().hex[:8]
    return make_settings(
        kafka={"bootstrap_servers": broker.bootstrap, "requests_topic": f"req-{suffix}", "results_topic": f"res-{suffix}",
               "alerts_topic": f"al-{suffix}", "dlq_topic": f"dlq-{suffix}", **kafka},
        models={"root": str(trained_model.root), "preload": (trained_model.line,), "threads": 1},
        heatmaps={"policy": "none"}, **sections,
    )  # fmt: skip


def _run(app) -> tuple[threading.Thread, dict]:
    out: dict = {}
    thread = threading.Thread(target=lambda: out.setdefault("rc", app.run()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not app.worker.readiness()[0]:
        assert thread.is_alive() and time.monotonic() < deadline, app.worker.readiness()[1]
        time.sleep(0.05)
    return thread, out


def test_outage_with_results_in_flight_exits_nonzero_then_a_restart_serves(
    stack, make_settings, trained_model, tmp_path
) -> None:
    broker = _Broker(tmp_path / "broker", stack.redis_url)
    broker.up()
    try:
        settings = _settings(
            make_settings, broker, trained_model,
            kafka={"delivery_timeout_ms": 3000, "request_timeout_ms": 1000, "linger_ms": 5},
            batching={"max_batch_size": 4, "max_wait_ms": 20}, worker={"shutdown_grace_s": 5},
        )  # fmt: skip
        _topics(settings)
        image = next((trained_model.data / "test" / "good").glob("*.png"))
        records = [request_record(image, line=trained_model.line, camera=f"c{i % 2}", message_id=f"a-{i}") for i in range(60)]
        produce(settings, settings.kafka.requests_topic, records)

        app = build_app(settings)
        thread, out = _run(app)
        with TopicTail(settings, settings.kafka.results_topic) as tail:
            tail.wait(lambda recs: len(recs) >= 1, 60, "first result")
        killed_at = time.monotonic()
        broker.kill()
        thread.join(3 + 5 + 20)  # delivery_timeout + grace + slack for a loaded machine
        exit_s = time.monotonic() - killed_at
        assert not thread.is_alive(), "the worker did not stop after its results could not be delivered"
        assert out["rc"] == 1
        assert isinstance(app.worker._fatal, KafkaError), repr(app.worker._fatal)
        print(f"broker outage: worker exited with 1 after {exit_s:.1f} s (delivery_timeout 3 s, grace 5 s)")

        # The orchestrator restarts the worker; the broker is back (empty: memory storage).
        broker.up()
        _topics(settings)
        produce(settings, settings.kafka.requests_topic,
                [request_record(image, line=trained_model.line, camera="c0", message_id=f"b-{i}") for i in range(4)])  # fmt: skip
        app2 = build_app(settings)
        thread2, out2 = _run(app2)
        with TopicTail(settings, settings.kafka.results_topic) as tail:
            recs = tail.wait(lambda r: len(r) >= 4, 60, "results after the restart")
        app2.stop()
        thread2.join(30)
        assert out2.get("rc") == 0
        assert sorted(json.loads(r.value)["message_id"] for r in recs) == [f"b-{i}" for i in range(4)]
    finally:
        broker.kill()


def test_idle_worker_survives_an_outage_and_nothing_is_lost_after_it(stack, make_settings, trained_model, tmp_path) -> None:
    """An idle worker keeps running through the outage (its clients reconnect). Once the broker is back,
    either the same process serves, or - when the broker lost the idempotent producer's state, as the
    memory-backed Tansu does - the first send fails (OutOfOrderSequenceNumber), the worker exits 1
    without committing, and a restarted worker answers the same records. Nothing is lost either way."""
    broker = _Broker(tmp_path / "broker", stack.redis_url)
    broker.up()
    try:
        settings = _settings(
            make_settings, broker, trained_model,
            kafka={"delivery_timeout_ms": 3000, "request_timeout_ms": 1000,
                   # A member that dies while a join round is in flight is waited for up to the
                   # rebalance timeout (= max_poll_interval_ms, 300 s by default): keep it short.
                   "max_poll_interval_ms": 10_000},
            worker={"shutdown_grace_s": 5},
        )  # fmt: skip
        _topics(settings)
        image = next((trained_model.data / "test" / "good").glob("*.png"))
        app = build_app(settings)
        thread, out = _run(app)
        try:
            produce(settings, settings.kafka.requests_topic, [request_record(image, line=trained_model.line, camera="c", message_id="before")])
            with TopicTail(settings, settings.kafka.results_topic) as tail:
                tail.wait(lambda r: len(r) >= 1, 60, "result before the outage")
            broker.kill()
            time.sleep(3)  # the worker polls against a dead broker
            assert thread.is_alive(), "an idle worker must not die because the broker is away"
            assert app.worker.heartbeats  # /healthz data keeps flowing (poll returns)
            broker.up()
            _topics(settings)
            # The restarted broker is empty: the records land at offsets 0.. again. Other keys go to the
            # other partition, whose consumer position is still 0, so they are not skipped either way.
            after = [request_record(image, line=trained_model.line, camera=f"k{i}", message_id=f"after-{i}") for i in range(6)]
            produce(settings, settings.kafka.requests_topic, after)
            wanted = {f"after-{i}" for i in range(6)}
            with TopicTail(settings, settings.kafka.results_topic) as tail:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and thread.is_alive():
                    if wanted <= {json.loads(x.value)["message_id"] for x in tail.snapshot()}:
                        break
                    time.sleep(0.1)
                path = "same process"
                if not thread.is_alive():  # the restart an orchestrator would do
                    assert out["rc"] == 1
                    path = f"exit 1 ({app.worker._fatal!r}) and restart"
                    app = build_app(settings)
                    thread, out = _run(app)
                recs = tail.wait(lambda r: wanted <= {json.loads(x.value)["message_id"] for x in r}, 60, "answers after the outage")
            print(f"idle outage: {path}; answered {len({json.loads(r.value)['message_id'] for r in recs})} of {len(wanted)}")
        finally:
            app.stop()
            thread.join(30)
        assert out.get("rc") == 0
    finally:
        broker.kill()


def test_a_worker_stopped_while_rejoining_leaves_the_group_so_its_successor_is_assigned_promptly(
    stack, make_settings, trained_model, tmp_path
) -> None:
    """The flake this pins down: the broker came back, the worker lost its partitions and sent a new
    JoinGroup, and a send failure stopped it while that join was still held by the coordinator. It
    exited without a LeaveGroup, and the coordinator kept the vanished member in the join round, so the
    restarted worker waited well past a minute for partitions. Here the stop is requested exactly when
    the partitions are lost; the worker must settle its join within the grace period and then leave."""
    broker = _Broker(tmp_path / "broker", stack.redis_url)
    broker.up()
    try:
        settings = _settings(
            make_settings, broker, trained_model,
            kafka={"request_timeout_ms": 1000, "max_poll_interval_ms": 10_000}, worker={"shutdown_grace_s": 8},
        )  # fmt: skip
        _topics(settings)
        app = build_app(settings)
        lost = threading.Event()
        on_lost = app.worker._on_lost

        def lose_then_stop(partitions: list) -> None:  # the moment the failing send arrived in the flake
            on_lost(partitions)
            lost.set()
            app.worker.request_stop()

        app.worker._on_lost = lose_then_stop  # type: ignore[method-assign]
        thread, out = _run(app)
        broker.kill()
        broker.up()  # empty: the group and its members are gone, the worker's next heartbeat finds out
        _topics(settings)
        assert lost.wait(30), "the worker never noticed that its group was gone"
        thread.join(settings.worker.shutdown_grace_s + 10)
        assert not thread.is_alive() and out["rc"] == 0

        successor = build_app(settings)
        started = time.monotonic()
        thread2, out2 = _run(successor)  # readiness = partitions assigned
        waited_s = time.monotonic() - started
        successor.stop()
        thread2.join(30)
        print(f"stopped mid-join: successor assigned after {waited_s:.1f} s")
        # Without a LeaveGroup the coordinator holds the successor for the vanished member (> 60 s on
        # Tansu; up to the rebalance timeout on Kafka). A clean leave lets it in after the join delay.
        assert waited_s < 20, f"successor waited {waited_s:.1f} s for partitions"
        assert out2.get("rc") == 0
    finally:
        broker.kill()
