"""Worker failure paths, driven through ``Worker.run`` with fakes (no broker, no model, no Redis).

A fake consumer hands out records and calls the rebalance listener as kafka-python does (assigned on
the first poll, revoked inside ``close()``); a fake producer acknowledges at once, or raises from
``send`` as kafka-python does when the topic's metadata is unknown after ``max_block_ms``. The
decode pool, sequencer, batcher, infer and publish threads, offset tracker and commits are the real
ones. Each test is a regression test of a review finding and fails without its fix.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from kafka import TopicPartition
from kafka.errors import CommitFailedError, KafkaTimeoutError, RebalanceInProgressError
from kafka.structs import MemberState
from structlog.testing import capture_logs

from schemas.request import InspectionRequest, build_request_headers
from worker.device_decode import DeviceDecodeError
from worker.heatmaps import FileHeatmapStore, RetryingHeatmapStore
from worker.model_manager import LoadedModel
from worker.service import Worker, _Listener
from worker.settings import load_settings
from worker.thresholds import ResolvedThreshold

TP = TopicPartition("inspection.requests", 0)
PNG = cv2.imencode(".png", np.zeros((16, 16, 3), np.uint8))[1].tobytes()


@dataclass
class Rec:
    offset: int
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]
    timestamp: int = 0


def request(offset: int, *, captured: datetime | None = None, timestamp: int | None = None) -> Rec:
    """A valid request record; its record timestamp is now unless given."""
    if timestamp is None:
        timestamp = int(time.time() * 1000)
    req = InspectionRequest(
        message_id=f"m{offset}", source="test/c1", time=captured, product_line="brick", camera_id="c1",
        content_type="image/png",
    )  # fmt: skip
    return Rec(offset, b"c1", PNG, build_request_headers(req), timestamp)


class FakeConsumer:
    def __init__(self, records: list[Rec]) -> None:
        self.records = list(records)
        self.listener: Any = None
        self.assigned = False
        self.commits: list[dict[TopicPartition, int]] = []

    def subscribe(self, topics: list[str], listener: Any) -> None:
        self.listener = listener

    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[TopicPartition, list[Rec]]:
        if not self.assigned:
            self.assigned = True
            self.listener.on_partitions_assigned([TP])
        if self.records:
            batch, self.records = self.records, []
            return {TP: batch}
        time.sleep(timeout_ms / 1000)
        return {}

    def commit(self, offsets: dict[TopicPartition, Any], timeout_ms: int | None = None) -> None:
        self.commits.append({tp: meta.offset for tp, meta in offsets.items()})

    def commit_async(self, offsets: dict[TopicPartition, Any], callback: Callable[[Any, Any], None]) -> None:
        self.commit(offsets)
        callback(offsets, None)

    def close(self, autocommit: bool = True, timeout_ms: int | None = None) -> None:
        self.listener.on_partitions_revoked([TP])  # kafka-python 3.0.12's close() revokes everything

    def group_metadata(self) -> Any:
        return SimpleNamespace(state=MemberState.STABLE)

    def pause(self, *tps: Any) -> None: ...
    def resume(self, *tps: Any) -> None: ...
    def highwater(self, tp: Any) -> None: ...


class _Acked:
    def add_callback(self, fn: Callable[[Any], None]) -> None:
        fn(None)

    def add_errback(self, fn: Callable[[BaseException], None]) -> None: ...


@dataclass
class FakeProducer:
    failing_topic: str | None = None
    sent: list[tuple[str, bytes]] = field(default_factory=list)
    lock_held_at_failing_send: list[bool] = field(default_factory=list)
    worker: Worker | None = None

    def send(self, topic: str, *, key: bytes | None, value: bytes, headers: list[Any]) -> _Acked:
        if topic == self.failing_topic:
            assert self.worker is not None
            self.lock_held_at_failing_send.append(self.worker._seq_lock.locked())
            raise KafkaTimeoutError("Failed to update metadata after 10.0 secs.")
        self.sent.append((topic, value))
        return _Acked()

    def results(self) -> list[dict[str, Any]]:
        return [json.loads(value) for topic, value in self.sent if topic == "inspection.results"]

    def flush(self, timeout: float | None = None) -> None: ...
    def close(self, timeout: float | None = None) -> None: ...


class FakeDetector:
    card = SimpleNamespace(name="fake", default_threshold=0.5)

    def prepare(self, image: np.ndarray) -> np.ndarray:
        return image

    def submit(self, images: list[np.ndarray]) -> Any:
        n = len(images)
        prediction = SimpleNamespace(scores=np.full(n, 0.1, np.float32), maps=np.zeros((n, 4, 4), np.float32))
        return SimpleNamespace(result=lambda: prediction)


class FakeModels:
    """Serves ``brick`` at v1 for the first ``v1_calls`` lookups, then at v2 (a hot swap)."""

    def __init__(self, v1_calls: int = 10**9) -> None:
        self.calls = 0
        self.v1_calls = v1_calls
        self.detector = FakeDetector()

    def get(self, line: str) -> LoadedModel:
        self.calls += 1
        return LoadedModel(line, "v1" if self.calls <= self.v1_calls else "v2", self.detector, 0.0)


class FakeThresholds:
    def resolve(self, line: str, model_version: str, default: float) -> ResolvedThreshold:
        return ResolvedThreshold(default, None, "model-default", model_version)

    def age_s(self, line: str) -> None:
        return None


def make_worker(
    tmp_path: Any, records: list[Rec], *, producer: FakeProducer | None = None, models: FakeModels | None = None,
    grace_s: float = 10.0, batching: dict[str, Any] | None = None, heatmap_store: Any = None,
    heatmaps: dict[str, Any] | None = None,
) -> Worker:  # fmt: skip
    settings = load_settings(
        worker={"state_dir": str(tmp_path), "shutdown_grace_s": grace_s},
        decode={"workers": 1},  # one decode thread: records decode (and meet the model manager) in order
        heatmaps={"policy": "none" if heatmap_store is None else "all", **(heatmaps or {})},
        kafka={"poll_timeout_ms": 10, "commit_interval_ms": 10},
        batching={"max_wait_ms": 1, **(batching or {})},
    )
    producer = producer or FakeProducer()
    w = Worker(settings, consumer=FakeConsumer(records), producer=producer, models=models or FakeModels(),  # type: ignore[arg-type]
               thresholds=FakeThresholds(), heatmaps=heatmap_store, fetcher=None)  # type: ignore[arg-type]  # fmt: skip
    producer.worker = w
    return w


@contextmanager
def running(w: Worker) -> Iterator[dict[str, int]]:
    """Run the worker in a thread; on exit stop it and wait (bounded) for its exit code."""
    result: dict[str, int] = {}
    thread = threading.Thread(target=lambda: result.setdefault("rc", w.run()), daemon=True)
    thread.start()
    try:
        yield result
    finally:
        w.request_stop()
        thread.join(30)
        assert not thread.is_alive()


def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def committed(w: Worker) -> list[int]:
    return [offsets[TP] for offsets in w.consumer.commits if TP in offsets]


# -- finding 1: a dead letter whose send raises on a decode thread ---------------------------------
def test_a_dead_letter_send_that_raises_on_a_decode_thread_stops_the_worker_and_commits_nothing(tmp_path) -> None:
    # Offset 0 has no CloudEvents headers (a dead letter), offset 1 is valid. kafka-python's send()
    # raises KafkaTimeoutError for the DLQ topic. Before the fix the exception vanished into the decode
    # pool's unread future (no log, no stop, commits frozen for good) and was raised while holding the
    # reorder locks, which the consumer thread needs for every record it accepts.
    producer = FakeProducer(failing_topic="inspection.dlq")
    w = make_worker(tmp_path, [Rec(0, b"c1", PNG, []), request(1)], producer=producer)
    with capture_logs() as logs, running(w) as result:
        stopped = wait_for(lambda: "rc" in result, timeout_s=5)
    assert stopped, "the worker kept running after a dead letter could not be sent"
    assert result["rc"] == 1
    assert isinstance(w._fatal, KafkaTimeoutError)
    assert producer.lock_held_at_failing_send == [False]  # sent after the reorder locks were released
    failed = [e for e in logs if e["event"] == "dead_letter_send_failed"]
    assert failed and failed[0]["log_level"] == "error" and failed[0]["offset"] == 0
    assert committed(w) == []  # offset 0 was never answered: nothing is committed past it


# -- finding 2: per-camera order across a model hot swap -------------------------------------------
def test_results_of_a_camera_keep_their_order_across_a_model_swap(tmp_path) -> None:
    # Records 0-2 meet model v1, 3-18 meet v2 (swapped meanwhile). Before the fix v2's full batch of 16
    # was published while v1's partial batch of 3 still waited for max_wait_ms.
    records = [request(i) for i in range(19)]
    w = make_worker(tmp_path, records, models=FakeModels(v1_calls=3),
                    batching={"max_batch_size": 16, "max_wait_ms": 2_000})  # fmt: skip
    with running(w) as result:
        assert wait_for(lambda: committed(w)[-1:] == [19])
    assert result["rc"] == 0
    published = w.producer.results()
    assert [r["message_id"] for r in published] == [f"m{i}" for i in range(19)]
    assert [r["model"]["version"] for r in published] == ["v1"] * 3 + ["v2"] * 16


# -- finding 3: consumer.close() revokes, and the settle wait must respect the grace period ---------
def test_graceful_stop_with_an_image_stuck_in_flight_stays_within_the_grace_period(tmp_path) -> None:
    grace_s = 2.0
    w = make_worker(tmp_path, [request(0)], grace_s=grace_s)
    gate = threading.Event()
    decode = w._decode
    w._decode = lambda item: (gate.wait(30), decode(item))  # type: ignore[method-assign]  # stuck in flight
    try:
        with running(w) as result:
            assert wait_for(lambda: w._inflight_count == 1)
            stop_at = time.monotonic()
            w.request_stop()
            assert wait_for(lambda: "rc" in result, timeout_s=3 * grace_s)
            took_s = time.monotonic() - stop_at
    finally:
        gate.set()
    assert result["rc"] == 0
    # Before the fix: the drain used the grace period, then close()'s revoke callback waited a fresh
    # settle budget (min(grace, max_poll_interval / 2)): about 2 x grace.
    assert took_s < grace_s + 1.0, f"stop took {took_s:.2f} s with shutdown_grace_s={grace_s}"


class _RebalancingConsumer(FakeConsumer):
    """Two partitions, one record each; on request, the next poll revokes the first (a rebalance)."""

    def __init__(self) -> None:
        super().__init__([])
        self.tps = [TP, TopicPartition(TP.topic, 1)]
        self.pending = {self.tps[0]: [request(0)], self.tps[1]: [request(0)]}
        self.revoke_next = threading.Event()

    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[TopicPartition, list[Rec]]:
        if not self.assigned:
            self.assigned = True
            self.listener.on_partitions_assigned(self.tps)
        if self.pending:
            batch, self.pending = self.pending, {}
            return batch
        if self.revoke_next.is_set():
            self.revoke_next.clear()
            self.listener.on_partitions_revoked(self.tps[:1])  # waits for its in-flight image (settle)
        time.sleep(timeout_ms / 1000)
        return {}

    def close(self, autocommit: bool = True, timeout_ms: int | None = None) -> None:
        self.listener.on_partitions_revoked(self.tps[1:])


def test_a_stop_during_a_rebalance_wait_still_ends_within_the_grace_period(tmp_path) -> None:
    # SIGTERM while a revoke waits for a stuck image: the grace period counts from the SIGTERM (as the
    # kubelet's does), not from the end of that wait; before, the drain started a fresh grace period
    # once the revoke gave up, and the pod was killed before it left the group.
    grace_s = 2.0
    w = make_worker(tmp_path, [], grace_s=grace_s)
    consumer = _RebalancingConsumer()
    w.consumer = consumer  # type: ignore[assignment]
    gate = threading.Event()
    decode = w._decode
    w._decode = lambda item: (gate.wait(30), decode(item))  # type: ignore[method-assign]  # both stuck
    try:
        with running(w) as result:
            assert wait_for(lambda: w._inflight_count == 2)
            consumer.revoke_next.set()
            time.sleep(0.5)  # the revoke of partition 0 is now waiting
            stop_at = time.monotonic()
            w.request_stop()
            assert wait_for(lambda: "rc" in result, timeout_s=4 * grace_s)
            took_s = time.monotonic() - stop_at
    finally:
        gate.set()
    assert result["rc"] == 0
    assert took_s < grace_s + 0.75, f"stop took {took_s:.2f} s after SIGTERM with shutdown_grace_s={grace_s}"


class _Yield:
    """What kafka-python's network sleep returns: an awaitable that hands control back to the loop."""

    def __await__(self) -> Iterator[_Yield]:
        yield self


def test_the_revoke_wait_awaits_the_network_loop_instead_of_blocking_it(tmp_path) -> None:
    # kafka-python 3 awaits rebalance callbacks on its network thread, which also sends the heartbeats:
    # the wait for in-flight images must give that loop control back between checks (a blocking wait
    # past session_timeout_ms got the member evicted; tests/reliability/test_revoke_heartbeats.py).
    w = make_worker(tmp_path, [request(0)])
    # No periodic commit during the test: the one that shows up is the revoke's.
    w.settings = w.settings.model_copy(
        update={"kafka": w.settings.kafka.model_copy(update={"commit_interval_ms": 600_000})}
    )
    gate = threading.Event()
    decode = w._decode
    w._decode = lambda item: (gate.wait(30), decode(item))  # type: ignore[method-assign]  # in flight
    slept: list[float] = []

    def sleep(seconds: float) -> _Yield:
        slept.append(seconds)
        return _Yield()

    try:
        with running(w):
            assert wait_for(lambda: w._inflight_count == 1)
            revoke = _Listener(w, sleep).on_partitions_revoked([TP])
            steps = 0
            while True:
                if steps == 5:
                    gate.set()  # the image finishes while the revoke is suspended
                try:
                    revoke.send(None)
                except StopIteration:
                    break
                steps += 1
                assert steps < 3000, "the revoke never finished"
                time.sleep(0.01)
            assert TP not in w.assigned
            assert committed(w) == [1]  # the finished image was committed before the partition moved
    finally:
        gate.set()
    assert steps >= 5 and len(slept) == steps and set(slept) == {0.01}


def test_an_async_commit_counts_only_once_the_broker_accepted_it(tmp_path) -> None:
    # kafka-python reports a commit_async outcome at a later poll, to a callback only; a refused one
    # (member evicted, coordinator gone) used to pass for committed without a word.
    w = make_worker(tmp_path, [])
    w.tracker.assign([TP])
    w.tracker.track(TP, 0)
    w.tracker.ack(TP, 0)
    outcome: list[Any] = [CommitFailedError("UnknownMemberIdError")]
    w.consumer.commit_async = lambda offsets, callback: callback(offsets, outcome[0])  # type: ignore[method-assign]
    with capture_logs() as logs:
        w._commit(force=True, sync=False)
    assert [e["log_level"] for e in logs if e["event"] == "commit_failed"] == ["warning"]
    assert w.tracker.committable() == {TP: 1}  # still to commit
    outcome[0] = None
    w._commit(force=True, sync=False)
    assert w.tracker.committable() == {}


@pytest.mark.parametrize(
    ("error", "level"),
    [
        (RebalanceInProgressError("client side: the consumer is rejoining"), "debug"),
        (CommitFailedError(RebalanceInProgressError()), "debug"),  # the broker's answer, as kafka-python wraps it
        (CommitFailedError("kicked out of the group"), "warning"),
    ],
)
def test_commits_refused_during_a_rebalance_are_expected_and_not_warnings(tmp_path, error, level) -> None:
    w = make_worker(tmp_path, [])
    w.tracker.assign([TP])
    w.tracker.track(TP, 0)
    w.tracker.ack(TP, 0)

    def refuse(offsets: Any, timeout_ms: int | None = None) -> None:
        raise error

    w.consumer.commit = refuse  # type: ignore[method-assign]
    with capture_logs() as logs:
        w._commit(force=True)
    assert [e["log_level"] for e in logs if e["event"] == "commit_failed"] == [level]
    assert w.tracker.committable() == {TP: 1}


def test_a_revoke_that_blocks_the_heartbeats_stops_waiting_before_the_session_times_out(tmp_path) -> None:
    w = make_worker(tmp_path, [], grace_s=30)
    w.settings = w.settings.model_copy(
        update={"kafka": w.settings.kafka.model_copy(update={"session_timeout_ms": 10_000, "heartbeat_interval_ms": 1_500,
                                                              "max_poll_interval_ms": 60_000})}
    )  # fmt: skip
    now = time.monotonic()
    assert w._revoke_deadline(heartbeats_blocked=True) - now == pytest.approx(7.0, abs=0.5)
    assert w._revoke_deadline(heartbeats_blocked=False) - now == pytest.approx(30.0, abs=0.5)


# -- finding 4: a fatal error on the publish thread ------------------------------------------------
@pytest.mark.parametrize("backlog", [False, True])
def test_a_publish_failure_stops_the_worker_promptly(tmp_path, backlog: bool) -> None:
    # With a backlog the queue to the publish thread holds two prepared batches. Before the fix the publish
    # thread returned on its failure, the infer thread blocked for good putting the next batch, and the
    # exit waited out the grace period.
    w = make_worker(tmp_path, [request(i) for i in range(8 if backlog else 1)], grace_s=8.0,
                    batching={"max_batch_size": 1, "max_wait_ms": 1})  # fmt: skip

    def broken_publish(publishing: Any) -> None:
        if backlog:
            wait_for(w._scored.full, timeout_s=5)  # a slow first batch: the backlog builds up behind it
        raise RuntimeError("publish broke")

    w._publish = broken_publish  # type: ignore[method-assign]
    with running(w) as result:
        assert wait_for(lambda: w._fatal is not None)
        failed_at = time.monotonic()
        assert wait_for(lambda: "rc" in result, timeout_s=10)
        took_s = time.monotonic() - failed_at
    assert w._stop.is_set()
    assert result["rc"] == 1
    assert not any(t.is_alive() for t in w._threads)
    assert committed(w) == []
    assert took_s < 3.0, f"exit took {took_s:.2f} s after the publish failure (grace 8 s)"


def test_the_infer_loop_exits_once_the_batcher_is_closed(tmp_path) -> None:
    # Before the fix, with _fatal set but not _stop, a closed batcher's get() returned None at once and
    # the loop spun at 100 % CPU until _shutdown's join gave up.
    w = make_worker(tmp_path, [])
    iterations = [0]
    beat = w.heartbeats.beat
    w.heartbeats.beat = lambda name: (iterations.__setitem__(0, iterations[0] + 1), beat(name))  # type: ignore[method-assign]
    thread = threading.Thread(target=w._infer_loop, daemon=True)
    thread.start()
    w._fatal = RuntimeError("publish_failed")
    w.batcher.close()
    thread.join(2)
    assert not thread.is_alive()
    assert iterations[0] < 100


# -- finding 5: record timestamps that are no date -------------------------------------------------
FAR = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)


@pytest.mark.parametrize(
    ("timestamp", "captured", "deadline_ms"),
    [
        pytest.param(2**62, None, None, id="create-time-past-year-9999"),
        pytest.param(2**62, None, 60_000, id="create-time-past-year-9999-with-default-deadline"),
        pytest.param(None, FAR, 60_000, id="ce-time-at-year-9999-with-default-deadline"),
    ],
)
def test_a_record_timestamp_past_year_9999_is_scored_without_crashing_the_worker(
    tmp_path, timestamp: int | None, captured: datetime | None, deadline_ms: float | None
) -> None:
    # A producer-set CreateTime of 2**62 ms made Item.captured_at raise ValueError on the publish (or
    # infer) thread: exit 1, and the uncommitted record then stopped every next owner of the partition.
    w = make_worker(tmp_path, [request(0, captured=captured, timestamp=timestamp), request(1)],
                    batching={"deadline_ms": deadline_ms})  # fmt: skip
    before = datetime.now(UTC)
    with capture_logs() as logs, running(w) as result:
        assert wait_for(lambda: committed(w)[-1:] == [2]), f"not committed; fatal={w._fatal!r}"
    assert result["rc"] == 0
    published = w.producer.results()
    assert [r["message_id"] for r in published] == ["m0", "m1"]
    assert all(not r["late"] for r in published)
    captured_at = datetime.fromisoformat(published[0]["captured_at"])
    if captured is None:  # the record timestamp was replaced by the time the worker received it
        assert before - timedelta(seconds=1) <= captured_at <= datetime.now(UTC)
        warned = [e for e in logs if e["event"] == "record_timestamp_out_of_range"]
        assert len(warned) == 1 and warned[0]["log_level"] == "warning" and warned[0]["offset"] == 0
    else:
        assert captured_at == captured


class _GatedStore:
    """A heatmap store whose puts wait until ``gate`` is set (an object store timing out and retrying)."""

    def __init__(self) -> None:
        self.gate = threading.Event()

    def put(self, key: str, data: bytes, content_type: str) -> str:
        self.gate.wait(30)
        return f"file:///heatmaps/{key}"


def test_publish_waiting_on_a_slow_heatmap_store_is_not_a_stalled_loop(tmp_path) -> None:
    # An object store that takes its time (timeouts, retries) must not read as a wedged publish thread
    # in /healthz: a restart would not make the store faster, and the results go out when it answers.
    store = _GatedStore()
    w = make_worker(tmp_path, [request(0)], heatmap_store=store)
    try:
        with running(w):
            assert wait_for(lambda: "publish" in w.heartbeats.waiting_on())
            assert w.heartbeats.waiting_on()["publish"]["on"] == "heatmap store"
            assert "publish" not in w.heartbeats.stale(0.0)  # waiting, not stale, however long it takes
            store.gate.set()
            assert wait_for(lambda: len(w.producer.sent) >= 1)
            assert "publish" not in w.heartbeats.waiting_on()
    finally:
        store.gate.set()


def test_results_wait_for_their_heatmaps_at_most_wait_s(tmp_path) -> None:
    # A store answering a byte at a time stays within every per-request timeout: the results waited for it
    # without end (the publish thread counting as waiting, so no liveness restart either).
    store = _GatedStore()  # never opened
    w = make_worker(tmp_path, [request(i) for i in range(3)], heatmap_store=store, heatmaps={"wait_s": 0.5},
                    batching={"max_batch_size": 3, "max_wait_ms": 200})  # fmt: skip
    try:
        with running(w):
            assert wait_for(lambda: committed(w)[-1:] == [3], timeout_s=5)
        results = w.producer.results()
        assert [r["message_id"] for r in results] == ["m0", "m1", "m2"]
        assert all(r["heatmap"] is None and "SPACE_HEATMAPS__WAIT_S=0.5 s" in r["heatmap_error"] for r in results)
    finally:
        store.gate.set()


def test_inference_held_up_by_a_slow_heatmap_store_is_waiting_not_stalled(tmp_path) -> None:
    # With a backlog the queue to the publish thread fills while it waits on the store; the infer loop,
    # blocked putting the next batch, went stale and /healthz restarted the pod before the breaker opened.
    store = _GatedStore()
    w = make_worker(tmp_path, [request(i) for i in range(8)], heatmap_store=store,
                    batching={"max_batch_size": 1, "max_wait_ms": 1})  # fmt: skip
    try:
        with running(w):
            assert wait_for(lambda: "infer" in w.heartbeats.waiting_on())
            assert w.heartbeats.waiting_on()["infer"]["on"] == "publish queue"
            time.sleep(0.2)
            assert w.heartbeats.stale(0.1) == {}  # consumer beats, publish and infer wait
            store.gate.set()
            assert wait_for(lambda: committed(w)[-1:] == [8])
            assert "infer" not in w.heartbeats.waiting_on()
    finally:
        store.gate.set()


class _BrokenStore:
    """A store that fails with something other than a store error (a bug, an odd URI)."""

    def __init__(self, uri: str | None = None) -> None:
        self.uri = uri

    def put(self, key: str, data: bytes, content_type: str) -> str:
        if self.uri is None:
            raise RuntimeError("boom")
        return self.uri


@pytest.mark.parametrize(
    ("store", "error"),
    [
        (_BrokenStore(), "RuntimeError: boom"),
        # Stored, but the reference is one the result schema refuses: the result goes out without it.
        (_BrokenStore("s3://bucket/line heatmaps/k.png"), "ValidationError"),
    ],
    ids=["store-raises", "reference-refused"],
)
def test_any_heatmap_failure_gives_a_result_with_heatmap_error_not_a_fatal_stop(tmp_path, store, error) -> None:
    # Only HeatmapStoreError/OSError were caught: anything else from the heatmap stage stopped the worker
    # without committing, and the redelivered records stopped every restart the same way.
    w = make_worker(tmp_path, [request(i) for i in range(3)], heatmap_store=store)
    with running(w):
        assert wait_for(lambda: committed(w)[-1:] == [3], timeout_s=5)
    assert w._fatal is None
    results = w.producer.results()
    assert [r["message_id"] for r in results] == ["m0", "m1", "m2"]
    assert all(r["heatmap"] is None and r["heatmap_error"].startswith(error) for r in results)


def test_a_symlinked_line_directory_leading_out_of_the_store_gives_results_with_heatmap_error(tmp_path) -> None:
    root, elsewhere = tmp_path / "heatmaps", tmp_path / "bigdisk"
    root.mkdir()
    elsewhere.mkdir()
    (root / "brick").symlink_to(elsewhere)
    store = RetryingHeatmapStore(FileHeatmapStore(root), retries=1, backoff_ms=1)
    w = make_worker(tmp_path, [request(i) for i in range(3)], heatmap_store=store)
    with running(w):
        assert wait_for(lambda: committed(w)[-1:] == [3], timeout_s=5)
    assert w._fatal is None
    results = w.producer.results()
    assert len(results) == 3 and all("escapes the store root" in r["heatmap_error"] for r in results)
    assert list(elsewhere.iterdir()) == []


# -- review 2026-12-01: shutdown races and a dead letter that fails after scoring ------------------
class _LateRecordConsumer(FakeConsumer):
    """Its poll is blocked when the stop request comes and returns a record only after that."""

    def __init__(self) -> None:
        super().__init__([])
        self.worker: Worker | None = None
        self.delivered = False
        self.polling = threading.Event()

    def committed(self, tp: TopicPartition, timeout_ms: int | None = None) -> int:
        return 0  # the group has read here before: no start position to commit

    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[TopicPartition, list[Rec]]:
        if not self.assigned:
            return super().poll(timeout_ms, max_records)
        assert self.worker is not None
        self.polling.set()
        if not self.delivered and self.worker._stop.wait(5.0):  # a long poll, under way when the stop comes
            self.delivered = True
            time.sleep(0.5)  # the infer thread sees "stopping, nothing in flight" meanwhile
            return {TP: [request(0)]}
        return {}


def test_a_record_returned_by_the_poll_a_stop_interrupts_is_answered_before_the_exit(tmp_path) -> None:
    # Before the fix the infer thread left as soon as stop was set with nothing in flight; the record
    # the interrupted poll then returned was never scored and the exit waited out the whole grace period.
    w = make_worker(tmp_path, [], grace_s=8.0)
    consumer = _LateRecordConsumer()
    consumer.worker = w
    w.consumer = consumer
    with running(w) as result:
        assert consumer.polling.wait(5)
        stop_at = time.monotonic()
    took_s = time.monotonic() - stop_at
    assert result["rc"] == 0
    assert [r["message_id"] for r in w.producer.results()] == ["m0"]
    assert committed(w)[-1:] == [1]
    assert took_s < 5.0, f"stop took {took_s:.2f} s (grace 8 s)"


class _NonFiniteDetector(FakeDetector):
    def submit(self, images: list[np.ndarray]) -> Any:
        n = len(images)
        scores = np.array([np.nan, np.nan, 0.1][:n], np.float32)
        prediction = SimpleNamespace(scores=scores, maps=np.zeros((n, 4, 4), np.float32))
        return SimpleNamespace(result=lambda: prediction)


@dataclass
class _SecondDeadLetterFails(FakeProducer):
    dead_letters: int = 0

    def send(self, topic: str, *, key: bytes | None, value: bytes, headers: list[Any]) -> _Acked:
        if topic == "inspection.dlq":
            self.dead_letters += 1
            if self.dead_letters == 2:
                raise KafkaTimeoutError("Failed to update metadata after 10.0 secs.")
        return super().send(topic, key=key, value=value, headers=headers)


def test_a_dead_letter_send_failing_after_scoring_stops_the_worker_instead_of_failing_the_batch(tmp_path) -> None:
    # Two non-finite scores and one good one; the second dead letter's send raises. Before the fix that
    # was handled as a model failure: the batch was dead-lettered again (the first image twice, the good
    # one as inference-failed), an item was finished twice and the in-flight count went negative.
    models = FakeModels()
    models.detector = _NonFiniteDetector()
    producer = _SecondDeadLetterFails()
    w = make_worker(tmp_path, [request(i) for i in range(3)], producer=producer, models=models,
                    batching={"max_batch_size": 3, "max_wait_ms": 500})  # fmt: skip
    with running(w) as result:
        assert wait_for(lambda: "rc" in result, timeout_s=10)
    assert result["rc"] == 1
    assert isinstance(w._fatal, KafkaTimeoutError)
    assert producer.dead_letters == 2  # the first letter, then the one that raised: nothing sent again
    assert producer.results() == []
    assert w._inflight_count >= 0
    assert max(committed(w), default=0) <= 1  # at most the first dead letter's record, which was acked


@dataclass
class _SizeCheckingProducer(FakeProducer):
    """Refuses records over ``max_request_size`` as kafka-python's send() does (MessageSizeTooLargeError)."""

    max_request_size: int = 16 * 1024 * 1024

    def send(self, topic: str, *, key: bytes | None, value: bytes, headers: list[Any]) -> _Acked:
        from kafka.errors import MessageSizeTooLargeError
        from kafka.record.default_records import DefaultRecordBatchBuilder

        if DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers) > self.max_request_size:
            raise MessageSizeTooLargeError("The message is larger than max_request_size")
        return super().send(topic, key=key, value=value, headers=headers)


def test_a_request_whose_dead_letter_would_be_too_large_is_dead_lettered_without_its_largest_header(tmp_path) -> None:
    # The request fits in a request (8 MB header + 8 MiB corrupt value); with the error-* headers added its
    # dead letter would not, and a refused dead letter stops every worker that meets the record in turn.
    from kafka.record.default_records import DefaultRecordBatchBuilder

    corrupt = PNG[:16] + b"\0" * (8 * 1024 * 1024 - 16)
    headers = request(0).headers
    fits = DefaultRecordBatchBuilder.estimate_size_in_bytes(b"c1", corrupt, [*headers, ("x-blob", b"")])
    bad = Rec(0, b"c1", corrupt, [*headers, ("x-blob", b"b" * (16 * 1024 * 1024 - fits - 100))])
    producer = _SizeCheckingProducer()
    w = make_worker(tmp_path, [bad, request(1)], producer=producer)
    with running(w) as result:
        assert wait_for(lambda: committed(w)[-1:] == [2])
    assert result["rc"] == 0 and w._fatal is None
    letters = [value for topic, value in producer.sent if topic == "inspection.dlq"]
    assert len(letters) == 1 and len(letters[0]) == len(corrupt)  # the value whole: dropping x-blob was enough
    assert [r["message_id"] for r in producer.results()] == ["m1"]


# -- review 2026-12-01: a partition whose position moves back while its records are in flight ----------
def _request_as(offset: int, message_id: str) -> Rec:
    rec = request(offset)
    headers = [(k, message_id.encode() if k == "ce_id" else v) for k, v in rec.headers]
    return Rec(offset, rec.key, rec.value, headers, rec.timestamp)


class _RereadConsumer(FakeConsumer):
    """Delivers offsets 0-3, then 2-3 again with other messages once the first batch is being scored."""

    def __init__(self, scoring: threading.Event) -> None:
        super().__init__([_request_as(o, f"m{o}") for o in range(4)])
        self.scoring = scoring
        self.reread = False
        self.producer: FakeProducer | None = None
        self.sent_at_commit: list[tuple[int, set[str]]] = []

    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[TopicPartition, list[Rec]]:
        if not self.reread and self.scoring.is_set():
            self.reread = True
            return {TP: [_request_as(2, "m2-after-truncation"), _request_as(3, "m3-after-truncation")]}
        return super().poll(timeout_ms, max_records)

    def commit(self, offsets: dict[TopicPartition, Any], timeout_ms: int | None = None) -> None:
        super().commit(offsets, timeout_ms)
        assert self.producer is not None
        answered = {r["message_id"] for r in self.producer.results()}
        self.sent_at_commit.append((offsets[TP].offset, answered))


class _HeldDetector(FakeDetector):
    """Its first batch is held until the consumer has re-read the partition."""

    def __init__(self, scoring: threading.Event, reread: Callable[[], bool]) -> None:
        self.scoring = scoring
        self.reread = reread

    def submit(self, images: list[np.ndarray]) -> Any:
        pending = super().submit(images)
        if self.scoring.is_set():
            return pending
        self.scoring.set()

        def result() -> Any:
            wait_for(self.reread, timeout_s=5)
            time.sleep(0.1)  # the re-read records are accepted meanwhile
            return pending.result()

        return SimpleNamespace(result=result)


def test_a_copy_scored_before_the_position_moved_back_does_not_commit_the_new_records(tmp_path) -> None:
    scoring = threading.Event()
    consumer = _RereadConsumer(scoring)
    models = FakeModels()
    models.detector = _HeldDetector(scoring, lambda: consumer.reread)
    w = make_worker(tmp_path, [], models=models, batching={"max_batch_size": 4, "max_wait_ms": 200})
    w.consumer = consumer
    consumer.producer = w.producer
    with running(w) as result:
        assert wait_for(lambda: committed(w)[-1:] == [4])
        assert wait_for(lambda: w._inflight_count == 0)
    assert result["rc"] == 0
    answered = {r["message_id"] for r in w.producer.results()}
    assert {"m0", "m1", "m2-after-truncation", "m3-after-truncation"} <= answered
    for offset, answered_then in consumer.sent_at_commit:
        # At-least-once: offset 3 is committed only once the record now at 2 (4: at 3) was answered.
        assert offset <= 2 or "m2-after-truncation" in answered_then, (offset, answered_then)
        assert offset <= 3 or "m3-after-truncation" in answered_then, (offset, answered_then)


# -- review 2026-12-02: a pod stopped while warming up; a preloaded line that failed ----------------
class _UnjoinedConsumer(FakeConsumer):
    """Not in the group until polled (kafka-python joins inside poll)."""

    def __init__(self) -> None:
        super().__init__([])
        self.polls = 0

    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[TopicPartition, list[Rec]]:
        self.polls += 1
        return super().poll(timeout_ms, max_records)

    def group_metadata(self) -> Any:
        return SimpleNamespace(state=MemberState.STABLE if self.polls else MemberState.UNJOINED)


def test_a_worker_stopped_before_it_ran_never_joins_the_group(tmp_path) -> None:
    # SIGTERM during preload: _settle_join polled the never-joined consumer until the group settled,
    # i.e. joined it (taking partitions from the others) only to leave at once: two rebalances.
    w = make_worker(tmp_path, [])
    consumer = _UnjoinedConsumer()
    w.consumer = consumer  # type: ignore[assignment]
    w.request_stop()
    assert w.stop_requested()
    assert w.run() == 0
    assert consumer.polls == 0


class _PreloadModels(FakeModels):
    def __init__(self, loaded: list[str], failed: dict[str, str]) -> None:
        super().__init__()
        self._loaded, self._failed = loaded, failed

    def loaded(self) -> dict[str, LoadedModel]:
        return {line: LoadedModel(line, "v1", self.detector, 0.0) for line in self._loaded}

    def preload_failures(self) -> dict[str, str]:
        return dict(self._failed)


@pytest.mark.parametrize(
    ("loaded", "failed", "ready", "missing"),
    [
        (["brick", "tile"], {}, True, []),
        (["brick"], {}, False, ["tile"]),  # still loading
        (["brick"], {"tile": "no active version"}, True, []),  # failed: serve brick, report tile
    ],
)
def test_readiness_waits_for_preloaded_lines_but_not_for_one_that_failed(
    tmp_path, loaded, failed, ready, missing
) -> None:
    w = make_worker(tmp_path, [], models=_PreloadModels(loaded, failed))
    w.settings = w.settings.model_copy(
        update={"models": w.settings.models.model_copy(update={"preload": ("brick", "tile")})}
    )
    w._joined = True
    ok, detail = w.readiness()
    assert (ok, detail["missing_models"], detail["failed_models"]) == (ready, missing, failed)


class _LostDevice(FakeDetector):
    """The GPU fell off the bus after the first batch: every later call raises a CUDA error."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.calls = 0

    def submit(self, images: list[np.ndarray]) -> Any:
        self.calls += 1
        if self.calls > 1:
            raise self.error
        return super().submit(images)


@pytest.mark.parametrize(
    ("error", "context_lost", "fatal"),
    [
        (RuntimeError("CUDA error: an illegal memory access was encountered"), True, True),
        (RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"), True, True),
        # Recoverable: the context still runs (a failed pinned allocation, a refused capture).
        (getattr(torch, "AcceleratorError", RuntimeError)("CUDA error: out of memory"), False, False),
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True, False),
        (ValueError("images are (128, 128, 3) uint8, expected (256, 256, 3)"), False, False),
    ],
    ids=["illegal-address", "cudnn-wrapper", "recoverable-accelerator-error", "out-of-memory", "other"],
)
def test_a_lost_device_stops_the_worker_uncommitted_instead_of_dead_lettering_the_backlog(
    tmp_path, monkeypatch, error, context_lost, fatal
) -> None:
    # A sticky CUDA error fails every later batch: each was dead-lettered and committed while /healthz
    # stayed green, draining the topic into the DLQ. Now the worker stops; the group re-delivers. Which
    # errors are sticky is asked of the context (models.hardware.cuda_context_lost), not read from the type.
    monkeypatch.setattr("models.hardware.cuda_context_lost", lambda: context_lost)
    models = FakeModels()
    models.detector = _LostDevice(error)
    w = make_worker(tmp_path, [request(i) for i in range(6)], models=models, batching={"max_batch_size": 2})
    with running(w) as rc:
        if fatal:
            assert wait_for(lambda: "rc" in rc, timeout_s=10)
        else:
            assert wait_for(lambda: committed(w)[-1:] == [6], timeout_s=10)
    dead = [value for topic, value in w.producer.sent if topic == "inspection.dlq"]
    if fatal:
        assert rc["rc"] == 1 and dead == []
        assert max(committed(w), default=0) <= 2  # at most the first batch, answered before the fault
        assert w._fatal is error
    else:
        assert len(dead) == 4 and rc["rc"] == 0  # other failures dead-letter their batch and go on


class _FaultingDecoder:
    """A GPU JPEG decoder whose decode broke the CUDA context."""

    @staticmethod
    def accepts(info: Any) -> bool:
        return True

    def decode_prepared(self, data: bytes, size_hw: Any, probed_hw: Any = None) -> np.ndarray:
        raise DeviceDecodeError("CUDA error: unspecified launch failure")


@pytest.mark.parametrize("context_lost", [True, False])
def test_a_decode_that_broke_the_device_stops_the_worker_and_names_the_record(
    tmp_path, monkeypatch, context_lost
) -> None:
    monkeypatch.setattr("models.hardware.cuda_context_lost", lambda: context_lost)
    monkeypatch.setattr(FakeDetector, "input_size", (16, 16), raising=False)
    w = make_worker(tmp_path, [request(i) for i in range(3)])
    w.device_decoder = _FaultingDecoder()  # type: ignore[assignment]
    with capture_logs() as logs, running(w) as rc:
        if context_lost:
            assert wait_for(lambda: "rc" in rc, timeout_s=10)
        else:  # an ordinary nvJPEG refusal: the CPU decodes it
            assert wait_for(lambda: committed(w)[-1:] == [3], timeout_s=10)
    if context_lost:
        assert rc["rc"] == 1 and w.producer.sent == [] and committed(w) in ([], [0])
        failed = next(e for e in logs if e["event"] == "device_failed")
        assert (failed["stage"], failed["offset"]) == ("decode", 0)
    else:
        assert len(w.producer.results()) == 3
