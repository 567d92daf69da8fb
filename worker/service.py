"""The worker: Kafka in, decode pool, dynamic batches, model, verdicts out, at-least-once commits.

Threads and what they own:

* consumer (the caller of :meth:`Worker.run`): the only thread that touches the KafkaConsumer.
  It polls continuously, registers each record with the offset tracker and the sequencer, hands it
  to the decode pool, pauses/resumes partitions for backpressure and commits acknowledged offsets.
  The poll loop never waits for the model, so ``max_poll_interval_ms`` never depends on GPU time.
* decode pool: parses the CloudEvents headers, fetches claim checks, decodes with guards, resizes to
  the model input and releases records in per-partition order into the batcher.
* infer: forms batches (full, or the oldest waited ``max_wait_ms``) and runs the model; for each scored
  batch it resolves the threshold, decides verdicts and submits the heatmaps to their pool, so the
  pool works on batch n+1 while batch n is being sent.
* publish: waits for a batch's heatmaps and sends its results and alerts in order (dead letters are
  sent from wherever a record fails). Broker acknowledgements mark records done in the offset tracker.

Failure policy: a bad record becomes a dead letter with a reason; a record whose result cannot be
delivered (the producer gave up after ``delivery_timeout_ms``) is never committed, and the worker
exits non-zero so the orchestrator restarts it and the group re-delivers the record.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Awaitable, Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import structlog
from kafka import AsyncConsumerRebalanceListener, ConsumerRebalanceListener, TopicPartition
from kafka.errors import CommitFailedError, KafkaError, RebalanceInProgressError
from kafka.structs import MemberState, OffsetAndMetadata

import worker.kafka_patches  # noqa: F401 - installs the pause/resume fix before any consumer exists
from schemas.deadletter import DeadLetterInfo, DeadLetterReason, build_dead_letter
from schemas.request import InspectionRequest, RequestError, parse_request
from schemas.result import (
    ALERT_EVENT_TYPE,
    RESULT_EVENT_TYPE,
    HeatmapRef,
    InspectionAlert,
    InspectionResult,
    ModelRef,
    SourceRecord,
    ThresholdInfo,
    Timings,
    Verdict,
    build_result_headers,
    decide_verdict,
    make_result_id,
    normalize_score,
)
from worker.batcher import Batch, DynamicBatcher, QueueFull
from worker.decode import ClaimCheckFetcher, DecodeError, ImageInfo, check_image, decode_checked
from worker.device_decode import DeviceDecodeError, DeviceJpegDecoder
from worker.heatmaps import HeatmapStore, HeatmapStoreError, StoredHeatmap, save_heatmap
from worker.http import Heartbeats
from worker.kafka_clients import network_sleep
from worker.metrics import WorkerMetrics
from worker.model_manager import DeviceLost, LoadedModel, ModelManager, ModelUnavailable, device_lost
from worker.offsets import OffsetTracker
from worker.sequencer import Sequencer
from worker.settings import Settings
from worker.thresholds import ResolvedThreshold, ThresholdCache

if TYPE_CHECKING:
    from models.detector import PendingPrediction

log = structlog.get_logger(__name__)

#: A dead letter to send: the record, its reason, the error class and the detail.
_Letter = tuple["Item", DeadLetterReason, str, str]


@dataclass
class Item:
    """One request record on its way through the worker."""

    tp: TopicPartition
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]
    timestamp_ms: int
    polled_at: float
    nbytes: int
    token: int | None = None  # the offset tracker's token of this copy (None: any copy)
    request: InspectionRequest | None = None
    model: LoadedModel | None = None
    image: np.ndarray | None = None
    decode_s: float = 0.0
    released_at: float = 0.0
    failure: tuple[DeadLetterReason, str, str] | None = None  # reason, error class, detail
    late: bool = False
    _pending_sends: int = field(default=0, repr=False)
    _dropped: bool = field(default=False, repr=False)  # its partition was forgotten before release

    @property
    def captured_at(self) -> datetime:
        if self.request is not None and self.request.time is not None:
            return self.request.time
        return datetime.fromtimestamp(max(self.timestamp_ms, 0) / 1000, UTC)


@dataclass
class _Scored:
    batch: Batch[Item]
    items: list[Item]
    scores: np.ndarray
    maps: np.ndarray
    infer_s: float
    formed_at: float


@dataclass
class _Publishing:
    """A scored batch whose threshold and verdicts are decided and whose heatmaps are submitted."""

    scored: _Scored
    model: LoadedModel
    threshold: ResolvedThreshold
    threshold_s: float  # the lookup's time on the infer thread (a Redis read once per TTL)
    verdicts: list[Verdict]
    heatmaps: dict[int, Future[StoredHeatmap]]


@dataclass
class _InFlight:
    """A batch submitted to the model whose scores are not collected yet."""

    batch: Batch[Item]
    items: list[Item]
    model: LoadedModel
    pending: PendingPrediction
    started: float
    formed_at: float


class _Listener(AsyncConsumerRebalanceListener):
    """The rebalance callbacks, awaited by kafka-python 3 on its network thread.

    That thread also sends the group heartbeats, so the revoke's wait for in-flight images of the
    revoked partitions awaits the network loop's own sleep (``network_sleep``) instead of blocking it.
    A blocking wait longer than ``session_timeout_ms`` got the member evicted: every partition lost,
    not only the revoked ones, and the revoke's commit refused (``UnknownMemberId``), so the next owner
    re-did the images the wait was for.
    """

    def __init__(self, worker: Worker, sleep: Callable[[float], Awaitable[Any]]) -> None:
        self.worker = worker
        self.sleep = sleep

    async def on_partitions_revoked(self, revoked: Any) -> None:
        partitions = list(revoked)
        deadline = self.worker._revoke_deadline(heartbeats_blocked=False)
        while self.worker._revoke_settling(set(partitions), deadline):
            await self.sleep(0.01)
        self.worker._on_revoked(partitions, settled_by=deadline)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self.worker._on_assigned(list(assigned))

    async def on_partitions_lost(self, lost: Any) -> None:
        # Must not await: kafka-python marks the join prepared only after this returns, so a generation
        # reset that lands during an await would skip the next lost report (worker/kafka_patches.py).
        self.worker._on_lost(list(lost))


class _BlockingListener(ConsumerRebalanceListener):
    """The same callbacks for a consumer without an awaitable network loop (fakes in tests, or a
    kafka-python whose internals moved): the revoke waits in place, within a budget that ends before
    the session would time out (no heartbeat goes out while it waits)."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def on_partitions_revoked(self, revoked: Any) -> None:
        self.worker._on_revoked(list(revoked))

    def on_partitions_assigned(self, assigned: Any) -> None:
        self.worker._on_assigned(list(assigned))

    def on_partitions_lost(self, lost: Any) -> None:
        self.worker._on_lost(list(lost))


class Worker:
    """One worker process's streaming pipeline.

    Args:
        settings: The settings tree.
        consumer: A kafka-python consumer (from :func:`worker.kafka_clients.make_consumer`).
        producer: A kafka-python producer (idempotent, acks=all).
        models: Serving models per product line.
        thresholds: Threshold cache (Redis-backed in production).
        heatmaps: Heatmap store.
        fetcher: Claim-check fetcher.
        metrics: Prometheus metrics.
        heartbeats: Progress of each loop, for /healthz.
        device_decoder: nvJPEG decoder for JPEGs (``SPACE_DECODE__DEVICE``), or None for OpenCV.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        consumer: Any,
        producer: Any,
        models: ModelManager,
        thresholds: ThresholdCache,
        heatmaps: HeatmapStore,
        fetcher: ClaimCheckFetcher,
        metrics: WorkerMetrics | None = None,
        heartbeats: Heartbeats | None = None,
        device_decoder: DeviceJpegDecoder | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.consumer = consumer
        self.producer = producer
        self.models = models
        self.thresholds = thresholds
        self.heatmaps = heatmaps
        self.fetcher = fetcher
        self.metrics = metrics or WorkerMetrics()
        self.heartbeats = heartbeats or Heartbeats()
        self.device_decoder = device_decoder
        self._clock = clock
        b = settings.batching
        self.batcher: DynamicBatcher[Item] = DynamicBatcher(
            max_batch_size=b.max_batch_size,
            max_wait_ms=b.max_wait_ms,
            max_queue_items=b.max_queue_images,
            clock=clock,
            group=_product_line,  # keys are (line, version): a camera's order holds across a model swap
        )
        self.tracker: OffsetTracker[TopicPartition] = OffsetTracker()
        self.sequencer: Sequencer[Item] = Sequencer()
        # Items registered with the sequencer but not yet released, per partition. Forgetting a partition
        # (revoke after the settle budget, or lost) must finish these too, or their in-flight count and
        # bytes leak for good and backpressure eventually pauses every partition (reliability issue 8).
        # The lock makes "forget + finish" and "complete + release" of one item mutually exclusive.
        self._seq_lock = threading.Lock()
        self._registered: dict[TopicPartition, dict[int, Item]] = {}
        self._decode_pool = ThreadPoolExecutor(settings.decode.workers, thread_name_prefix="decode")
        self._heatmap_pool = ThreadPoolExecutor(settings.heatmaps.threads, thread_name_prefix="heatmap")
        self._scored: queue.Queue[_Publishing | None] = queue.Queue(maxsize=2)
        self._inflight_lock = threading.Lock()
        self._inflight_count = 0
        self._inflight_bytes = 0
        self._paused: set[TopicPartition] = set()
        self._stop = threading.Event()
        self._infer_done = threading.Event()
        self._fatal: BaseException | None = None
        # Set by the stop request (SIGTERM: the grace period counts from there) or when _shutdown starts
        # after a failure; bounds every later wait, a revoke's settle wait already running included.
        self._shutdown_deadline: float | None = None
        self._last_commit = 0.0
        self._last_lag = 0.0
        self._assigned: set[TopicPartition] = set()
        # Assigned partitions not yet checked for a committed offset (see _commit_start_positions).
        self._unchecked: set[TopicPartition] = set()
        self._joined = False
        self._polled = False  # the consumer was polled once (it may be in the group)
        self._threads: list[threading.Thread] = []
        self.worker_id = settings.worker.id

    # ------------------------------------------------------------------------------------------
    # lifecycle
    # ------------------------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Begin a graceful shutdown (SIGTERM/SIGINT handler calls this); the grace period starts now."""
        if self._shutdown_deadline is None:
            self._shutdown_deadline = time.monotonic() + self.settings.worker.shutdown_grace_s
        self._stop.set()

    def stop_requested(self) -> bool:
        """Whether a stop was asked for (also before :meth:`run`)."""
        return self._stop.is_set()

    @property
    def assigned(self) -> set[TopicPartition]:
        return set(self._assigned)

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """/readyz: preloaded models warm, the group joined (with or without partitions), not stopping.

        A member the group gives no partition (more pods than partitions, e.g. the surge pod of a
        rollout at full scale) is ready too: otherwise the rollout waits on it forever. So is a pod
        whose preload of a line failed (``failed_models``): it serves the other lines, and a startup
        probe waiting on that line would restart it for nothing.
        """
        loaded = self.models.loaded()
        failed = self.models.preload_failures()
        missing = [line for line in self.settings.models.preload if line not in loaded and line not in failed]
        detail = {
            "models": {line: m.version for line, m in loaded.items()},
            "missing_models": missing,
            "failed_models": failed,
            "joined": self._joined,
            "assigned_partitions": len(self._assigned),
            "stopping": self._stop.is_set(),
        }
        return (not missing and self._joined and not self._stop.is_set(), detail)

    def run(self) -> int:
        """Consume until stopped; returns the process exit code."""
        k = self.settings.kafka
        sleep = network_sleep(self.consumer)
        listener = _BlockingListener(self) if sleep is None else _Listener(self, sleep)
        self.consumer.subscribe([k.requests_topic], listener=listener)
        infer = threading.Thread(target=self._infer_loop, name="infer", daemon=True)
        publish = threading.Thread(target=self._publish_loop, name="publish", daemon=True)
        self._threads = [infer, publish]
        for t in self._threads:
            t.start()
        log.info("worker_started", worker_id=self.worker_id, topic=k.requests_topic, group_id=k.group_id)
        try:
            while not self._stop.is_set() and self._fatal is None:
                self._poll_once()
        except Exception as exc:
            log.exception("consumer_loop_failed")
            self._fatal = exc
        return self._shutdown()

    def _shutdown(self) -> int:
        grace = self.settings.worker.shutdown_grace_s
        if self._shutdown_deadline is None:
            self._shutdown_deadline = time.monotonic() + grace
        deadline = self._shutdown_deadline
        log.info("worker_draining", inflight=self._inflight_count, grace_s=grace)
        try:
            if self._assigned:
                self.consumer.pause(*self._assigned)
            # Keep polling (membership, listener callbacks) while in-flight images finish.
            while self._fatal is None and self._inflight_count > 0 and time.monotonic() < deadline:
                self.consumer.poll(timeout_ms=50)
                self._commit(force=True)
        except Exception:
            log.exception("drain_failed")
        self.batcher.close()
        for t in self._threads:
            t.join(timeout=max(0.1, deadline - time.monotonic()))
        exit_code = 0
        try:
            self.producer.flush(timeout=max(1.0, deadline - time.monotonic()))
        except KafkaError as exc:
            log.error("producer_flush_failed", error=str(exc))
            exit_code = 1
        left = self._inflight_count
        self._settle_join(deadline)
        if self._fatal is None:
            # After the join settles: in the middle of a rebalance the broker refuses commits
            # (REBALANCE_IN_PROGRESS), and close() below does not commit (autocommit=False).
            self._commit(force=True)
        try:
            # LeaveGroup: partitions move at once, not after session timeout. Bounded by what is left of
            # the grace period, so an unreachable broker cannot hold the exit for request_timeout_ms.
            budget_ms = max(1000, int((deadline - time.monotonic()) * 1000))
            self.consumer.close(autocommit=False, timeout_ms=min(budget_ms, 2000) if self._fatal else budget_ms)
        except Exception:
            log.exception("consumer_close_failed")
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        self._heatmap_pool.shutdown(wait=False, cancel_futures=True)
        try:
            self.producer.close(timeout=5)
        except Exception:
            log.exception("producer_close_failed")
        if self._fatal is not None:
            log.error("worker_stopped_on_error", error=repr(self._fatal), uncommitted_inflight=left)
            return 1
        log.info("worker_stopped", uncommitted_inflight=left, exit_code=exit_code)
        return exit_code

    def _settle_join(self, deadline: float) -> None:
        """Finish a group join in progress (within the grace period) so that closing sends a LeaveGroup.

        A member that exits while the coordinator holds its JoinGroup (after its partitions were lost,
        or in the middle of a rebalance) leaves no trace the coordinator acts on: the member stays in the
        join round and the others wait for partitions until it expires (more than a minute on Tansu, up
        to the rebalance timeout on Kafka). Polling here completes the round; records it returns are
        dropped uncommitted (partitions assigned now are paused at once, see :meth:`_on_assigned`).
        """
        if not self._polled or self._group_stable():
            # Never polled (stopped before it started, e.g. SIGTERM during preload): no join to finish,
            # and polling here would join the group only to leave it (two rebalances for the others).
            return
        start = time.monotonic()
        try:
            while not self._group_stable() and time.monotonic() < deadline:
                self.consumer.poll(timeout_ms=100)
        except Exception as exc:  # noqa: BLE001 - best effort: the exit must not depend on the broker
            log.warning("group_join_not_settled", error=repr(exc))
            return
        settled = self._group_stable()
        log.info("group_join_settled", settled=settled, waited_ms=round((time.monotonic() - start) * 1000, 1))

    def _group_stable(self) -> bool:
        """The consumer is a settled group member (kafka-python's MemberState.STABLE)."""
        return self.consumer.group_metadata().state == MemberState.STABLE

    # ------------------------------------------------------------------------------------------
    # consumer thread
    # ------------------------------------------------------------------------------------------
    def _poll_once(self) -> None:
        k, b = self.settings.kafka, self.settings.batching
        room = b.max_inflight_images - self._inflight_count
        self._polled = True
        records = self.consumer.poll(timeout_ms=k.poll_timeout_ms, max_records=max(1, min(k.max_poll_records, room)))
        self.heartbeats.beat("poll")
        if not self._joined and self._group_stable():
            # A member given no partition gets no assignment callback (cooperative protocol): the
            # settled group is what counts.
            self._joined = True
            log.info("group_joined", assigned_partitions=len(self._assigned))
        for tp, recs in records.items():
            for rec in recs:
                self._accept(tp, rec)
        if self._unchecked:
            self._commit_start_positions()
        self._apply_backpressure()
        self._commit()
        self._update_lag()

    def _update_lag(self) -> None:
        now = time.monotonic()
        if now - self._last_lag < 1.0:
            return
        self._last_lag = now
        for tp in list(self._assigned):
            highwater = self.consumer.highwater(tp)  # cached from fetch responses: no request
            if highwater is None:
                continue
            try:
                position = self.consumer.position(tp, timeout_ms=0)
            except Exception:  # noqa: BLE001, S112 - lag is best effort; never disturb the poll loop
                continue
            if position is not None:
                self.metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(max(0, highwater - position))

    def _accept(self, tp: TopicPartition, rec: Any) -> None:
        tracked = self.tracker.track(tp, rec.offset)
        if tracked is None:
            return  # a record of a partition we no longer own
        if tracked.reread:
            self._drop_from(tp, rec.offset)
        value = rec.value
        nbytes = len(value) if value else 0
        item = Item(
            tp=tp, offset=rec.offset, key=rec.key, value=value, headers=list(rec.headers or []),
            timestamp_ms=self._record_timestamp_ms(tp, rec), polled_at=self._clock(), nbytes=nbytes,
            token=tracked.token,
        )  # fmt: skip
        with self._inflight_lock:
            self._inflight_count += 1
            self._inflight_bytes += nbytes
        self.metrics.records_consumed.inc()
        with self._seq_lock:
            self._registered.setdefault(tp, {})[rec.offset] = item
            self.sequencer.register(tp, rec.offset)
        self._decode_pool.submit(self._decode, item)

    def _drop_from(self, tp: TopicPartition, offset: int) -> None:
        """The partition's position moved back (kafka-python re-reads it after log truncation, or resets it
        to the earliest offset): earlier copies of the records from ``offset`` on are polled again.

        Copies not yet scored are dropped and finished here; those being scored or published finish as
        usual, but their acknowledgements no longer count (the tracker's tokens), since after an unclean
        leader election the record now at an offset may be another message.
        """
        log.warning("partition_position_moved_back", partition=f"{tp.topic}/{tp.partition}", offset=offset)
        with self._seq_lock:
            self.sequencer.drop_from(tp, offset)
            registered = self._registered.get(tp, {})
            self._abandon([registered.pop(o) for o in list(registered) if o >= offset])
        for item in self.batcher.remove(lambda it: it.tp == tp and it.offset >= offset):
            self._finish(item)

    def _abandon(self, items: list[Item]) -> None:
        """Finish items still decoding or waiting in the sequencer (call with ``_seq_lock`` held)."""
        for item in items:
            item._dropped = True  # its decode may still run: it must not be released, nor finished again
            self._finish(item)

    def _record_timestamp_ms(self, tp: TopicPartition, rec: Any) -> int:
        """The record's timestamp, or the time it was received when it is no representable date.

        CreateTime is chosen by the producer. One past year 9999 would make ``Item.captured_at`` raise on
        the infer and publish threads: the worker would exit 1 and the uncommitted record would stop every
        next owner of its partition (a poison pill for the group).
        """
        timestamp = rec.timestamp
        try:
            datetime.fromtimestamp(max(timestamp, 0) / 1000, UTC)
        except (TypeError, ValueError, OverflowError, OSError):
            received_ms = int(time.time() * 1000)
            log.warning(
                "record_timestamp_out_of_range", topic=tp.topic, partition=tp.partition, offset=rec.offset,
                timestamp=repr(timestamp)[:40], replaced_by_ms=received_ms,
            )  # fmt: skip
            return received_ms
        return int(timestamp)

    def _apply_backpressure(self) -> None:
        b = self.settings.batching
        count, nbytes = self._inflight_count, self._inflight_bytes
        self.metrics.inflight_images.set(count)
        self.metrics.inflight_bytes.set(nbytes)
        over = count >= b.max_inflight_images or nbytes >= b.max_inflight_bytes
        under = (
            count <= b.max_inflight_images * b.resume_fraction and nbytes <= b.max_inflight_bytes * b.resume_fraction
        )
        if over and not self._paused and self._assigned:
            self._paused = set(self._assigned)
            self.consumer.pause(*self._paused)
            log.info("partitions_paused", inflight=count, inflight_bytes=nbytes, partitions=len(self._paused))
        elif self._paused and under:
            resume = [tp for tp in self._paused if tp in self._assigned]
            if resume:
                self.consumer.resume(*resume)
            log.info("partitions_resumed", inflight=count, inflight_bytes=nbytes, partitions=len(resume))
            self._paused = set()
        self.metrics.paused_partitions.set(len(self._paused))

    def _commit(self, *, force: bool = False, only: set[TopicPartition] | None = None, sync: bool = True) -> None:
        now = time.monotonic()
        if not force and now - self._last_commit < self.settings.kafka.commit_interval_ms / 1000:
            return
        self._last_commit = now
        offsets = {tp: off for tp, off in self.tracker.committable().items() if only is None or tp in only}
        if not offsets:
            return
        payload = {tp: OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()}
        try:
            if sync:
                self.consumer.commit(payload, timeout_ms=self.settings.kafka.commit_timeout_ms)
            else:
                self.consumer.commit_async(payload, callback=partial(self._on_async_commit, offsets))
                return
        except (CommitFailedError, KafkaError) as exc:
            self.metrics.commits.labels("failed").inc()
            # While a join round is in flight every periodic commit fails this way (5 warnings a second
            # per worker at 200 ms, for the seconds a rebalance takes); the offsets stay pending and the
            # first commit after the join carries them. Expected, so not a warning.
            # The broker's refusal arrives wrapped: CommitFailedError(RebalanceInProgressError()).
            expected = any(isinstance(e, RebalanceInProgressError) for e in (exc, *exc.args))
            (log.debug if expected else log.warning)("commit_failed", error=str(exc), partitions=len(payload))
            return
        self._committed(offsets)

    def _on_async_commit(self, offsets: dict[TopicPartition, int], _sent: Any, result: Any) -> None:
        """Outcome of a ``commit_async`` (the revoke's): kafka-python reports it at a later poll, and
        only to a callback; without one a refused commit (evicted member, coordinator gone) vanished."""
        if isinstance(result, BaseException):
            self.metrics.commits.labels("failed").inc()
            log.warning("commit_failed", error=str(result), partitions=len(offsets))
            return
        self._committed(offsets)

    def _committed(self, offsets: dict[TopicPartition, int]) -> None:
        """Record offsets the broker accepted."""
        self.tracker.mark_committed(offsets)
        self.metrics.commits.labels("ok").inc()
        log.debug("offsets_committed", offsets={f"{tp.topic}/{tp.partition}": o for tp, o in offsets.items()})

    def _commit_start_positions(self) -> None:
        """Commit where reading starts on partitions the group never committed.

        A partition whose records all expired before this group first read it (a first deployment on
        an old topic, a new group id, offsets expired while the group was empty) returns nothing, so
        nothing is ever committed there, and KEDA's Kafka scaler then counts its whole log-end offset
        as lag for good (``offsetResetPolicy: earliest``): replicas pinned at the maximum. Committing
        the start position is what the first processed record would have done anyway; only partitions
        with nothing in flight qualify (their position is past every record handed out), so no
        record is skipped. One OffsetFetch per newly assigned partition.
        """
        timeout_ms = self.settings.kafka.commit_timeout_ms
        for tp in sorted(self._unchecked, key=lambda t: (t.topic, t.partition)):
            if self._stop.is_set() or self._fatal is not None:
                return
            if self.tracker.inflight({tp}):
                self._unchecked.discard(tp)  # its records will be committed as they are answered
                continue
            try:
                if self.consumer.committed(tp, timeout_ms=timeout_ms) is not None:
                    self._unchecked.discard(tp)
                    continue
                position = self.consumer.position(tp, timeout_ms=timeout_ms)
                if self.tracker.inflight({tp}) or position is None:
                    continue  # try again at the next poll
                self.consumer.commit({tp: OffsetAndMetadata(position, "", -1)}, timeout_ms=timeout_ms)
            except KafkaError as exc:
                log.debug("start_position_commit_failed", partition=f"{tp.topic}/{tp.partition}", error=str(exc))
                return  # a rebalance or an unreachable coordinator: the next poll tries again
            self._unchecked.discard(tp)
            log.info("start_position_committed", partition=f"{tp.topic}/{tp.partition}", offset=position)

    # Rebalance callbacks run on kafka-python's network thread while the consumer thread waits in poll().
    def _on_assigned(self, assigned: list[TopicPartition]) -> None:
        self._joined = True
        self.tracker.assign(assigned)
        self._assigned.update(assigned)
        self._unchecked.update(assigned)
        if self._paused:  # keep backpressure consistent for new partitions
            self.consumer.pause(*assigned)
            self._paused.update(assigned)
        elif self._stop.is_set() or self._fatal is not None:
            self.consumer.pause(*assigned)  # joined only to leave cleanly (_settle_join): fetch nothing
        self.metrics.assigned_partitions.set(len(self._assigned))
        log.info("partitions_assigned", partitions=sorted(f"{tp.topic}/{tp.partition}" for tp in assigned))

    def _revoke_deadline(self, *, heartbeats_blocked: bool) -> float:
        """When a revoke stops waiting for in-flight images of its partitions.

        Within the grace period and half the rebalance timeout; when the wait blocks the heartbeats
        (:class:`_BlockingListener`), also two heartbeats short of the session timeout, so the wait
        itself cannot get the member evicted.
        """
        k = self.settings.kafka
        budget_s = min(self.settings.worker.shutdown_grace_s, k.max_poll_interval_ms / 2000)
        if heartbeats_blocked:
            budget_s = min(budget_s, max(0.0, (k.session_timeout_ms - 2 * k.heartbeat_interval_ms) / 1000))
        return time.monotonic() + budget_s

    def _revoke_settling(self, revoked: set[TopicPartition], deadline: float) -> bool:
        """Whether a revoke still waits: images of ``revoked`` in flight, time left, no fatal error."""
        return bool(
            self.tracker.inflight(revoked) and time.monotonic() < self._settle_until(deadline) and self._fatal is None
        )

    def _on_revoked(self, revoked: list[TopicPartition], settled_by: float | None = None) -> None:
        # Settle: let in-flight images of these partitions finish (bounded), commit them, forget.
        # ``settled_by``: the deadline a listener already waited for (without blocking the heartbeats).
        revoked_set = set(revoked)
        if settled_by is None:
            deadline = self._revoke_deadline(heartbeats_blocked=True)
            while self._revoke_settling(revoked_set, deadline):
                time.sleep(0.01)
        left = self.tracker.inflight(revoked_set)
        # A blocking commit inside a rebalance callback raises in kafka-python 3: commit_async.
        self._commit(force=True, only=revoked_set, sync=False)
        self._forget(revoked)
        log.info(
            "partitions_revoked",
            partitions=sorted(f"{tp.topic}/{tp.partition}" for tp in revoked),
            abandoned_inflight=left,
        )

    def _settle_until(self, deadline: float) -> float:
        """``deadline``, or what is left of the grace period when a stop was requested (checked anew each
        time: SIGTERM may come while a revoke waits; consumer.close() revokes every partition)."""
        stop_at = self._shutdown_deadline
        return deadline if stop_at is None else min(deadline, stop_at)

    def _on_lost(self, lost: list[TopicPartition]) -> None:
        # Lost (evicted): another member may own them already; never commit for them.
        self._forget(lost)
        log.warning("partitions_lost", partitions=sorted(f"{tp.topic}/{tp.partition}" for tp in lost))

    def _forget(self, partitions: list[TopicPartition]) -> None:
        gone = set(partitions)
        self.tracker.revoke(gone)
        with self._seq_lock:
            for tp in gone:
                self.sequencer.forget(tp)
                self._abandon(list(self._registered.pop(tp, {}).values()))
        for item in self.batcher.remove(lambda it: it.tp in gone):
            self._finish(item)
        self._assigned.difference_update(gone)
        self._unchecked.difference_update(gone)
        self._paused.difference_update(gone)
        for tp in gone:
            with contextlib.suppress(KeyError):
                self.metrics.consumer_lag.remove(tp.topic, str(tp.partition))
        self.metrics.assigned_partitions.set(len(self._assigned))

    # ------------------------------------------------------------------------------------------
    # decode pool
    # ------------------------------------------------------------------------------------------
    def _decode(self, item: Item) -> None:
        start = time.monotonic()
        d = self.settings.decode
        try:
            item.request = parse_request(item.headers, item.value)
            model = self.models.get(item.request.product_line)
            if item.request.claim_check is not None:
                cc = item.request.claim_check
                data = self.fetcher.fetch(cc.image_uri, cc.sha256)
                content_type: str | None = cc.content_type if getattr(cc, "content_type", None) else None
            else:
                data = item.value or b""
                content_type = item.request.content_type
            info = check_image(data, content_type, max_pixels=d.max_pixels, max_value_bytes=d.max_value_bytes)
            item.image = self._decode_on_device(data, info, model)
            if item.image is None:
                item.image = model.detector.prepare(decode_checked(data, info, max_pixels=d.max_pixels))
            item.model = model
        except RequestError as exc:
            item.failure = (DeadLetterReason(exc.reason.value), type(exc).__name__, str(exc))
        except DecodeError as exc:
            item.failure = (DeadLetterReason(exc.reason), type(exc).__name__, str(exc))
        except DeviceLost as exc:
            # Nothing on this device will work again in this process: stop uncommitted (re-delivered).
            log.error(
                "device_failed", stage=exc.args[0] if exc.args else "decode", topic=item.tp.topic,
                partition=item.tp.partition, offset=item.offset, error=str(exc.__cause__ or exc)[:1000],
                hint="CUDA errors are sticky: stopping without committing; if every restart fails on the "
                "same record during decode, set SPACE_DECODE__DEVICE=cpu",
            )  # fmt: skip
            self._fatal = exc
            self._stop.set()
            return
        except ModelUnavailable as exc:
            reason = DeadLetterReason.UNKNOWN_PRODUCT_LINE if exc.unknown_line else DeadLetterReason.MODEL_UNAVAILABLE
            item.failure = (reason, type(exc).__name__, str(exc))
        except Exception as exc:
            log.exception("decode_unexpected_error", offset=item.offset, partition=item.tp.partition)
            item.failure = (DeadLetterReason.PROCESSING_FAILED, type(exc).__name__, str(exc))
        item.decode_s = time.monotonic() - start
        self.metrics.decode_seconds.observe(item.decode_s)
        letters: list[_Letter] = []
        with self._seq_lock:
            if item._dropped:
                return  # the partition was forgotten meanwhile; _forget finished the item
            self.sequencer.complete(item.tp, item.offset, item, partial(self._release, letters))
        self._send_dead_letters(letters)

    def _decode_on_device(self, data: bytes, info: ImageInfo, model: LoadedModel) -> np.ndarray | None:
        """The image at model size from the GPU decoder, or None when the CPU must decode it."""
        decoder = self.device_decoder
        if decoder is None or not decoder.accepts(info):
            return None
        try:
            image = decoder.decode_prepared(data, model.detector.input_size, probed_hw=(info.height, info.width))
        except DeviceDecodeError as exc:
            if device_lost(exc):  # nvJPEG left the context broken: the CPU path would only hide it
                raise DeviceLost("decode") from exc.__cause__ or exc
            self.metrics.decode_fallbacks.inc()
            log.info("device_decode_fallback", error=str(exc)[:200])
            return None
        self.metrics.device_decodes.inc()
        return image

    def _release(self, letters: list[_Letter], item: Item) -> None:
        """Called in per-partition order (under the sequencer's lock and ``_seq_lock``).

        Failed records are only collected into ``letters``: the caller sends them once both locks are
        released, since ``producer.send`` may block up to ``max_block_ms`` (and raise).
        """
        registered = self._registered.get(item.tp)
        if registered is not None and registered.get(item.offset) is item:
            del registered[item.offset]
        if item.failure is not None:
            letters.append((item, *item.failure))
            return
        assert item.model is not None
        item.released_at = self._clock()
        try:
            self.batcher.put(item.model.key, item)
        except QueueFull as exc:  # settings make this impossible (queue >= in-flight cap); never drop
            letters.append((item, DeadLetterReason.PROCESSING_FAILED, "QueueFull", str(exc)))

    def _send_dead_letters(self, letters: list[_Letter]) -> None:
        """Send the dead letters of released records (decode pool, no lock held).

        kafka-python's ``send`` raises synchronously (KafkaTimeoutError after ``max_block_ms`` while the
        DLQ topic's metadata is unknown, IllegalStateError once closed). On this thread the exception
        would vanish into an unread future, leaving the record unacknowledged and its partition's commits
        frozen; the worker stops with an error instead, the record stays uncommitted and is re-delivered.
        """
        for item, reason, error_class, detail in letters:
            try:
                self._dead_letter(item, reason, error_class, detail)
            except Exception as exc:
                log.exception("dead_letter_send_failed", topic=item.tp.topic, partition=item.tp.partition,
                              offset=item.offset)  # fmt: skip
                self._fatal = exc
                self._stop.set()
                return

    # ------------------------------------------------------------------------------------------
    # inference thread
    # ------------------------------------------------------------------------------------------
    def _infer_loop(self) -> None:
        """Form batches and score them, keeping one batch in flight on an accelerator.

        When the next batch is ready at once (a backlog), it is submitted before the previous one is
        collected, so its upload and the host work around it overlap the device's compute; when
        nothing is waiting, the batch in flight is collected right away (no latency is added).
        """
        inflight: _InFlight | None = None
        try:
            while True:
                batch = self.batcher.get(timeout_s=0.0 if inflight is not None else 0.2)
                self.heartbeats.beat("infer")
                if batch is None:
                    if inflight is not None:
                        self._collect(inflight)
                        inflight = None
                        continue
                    if self.batcher.closed:
                        # _shutdown's drain is over; what is still queued stays uncommitted. Not earlier,
                        # even with nothing in flight: the poll that a stop interrupts may still return
                        # records, and the drain answers them.
                        break
                    if self.batcher.pending() == 0 and self._stop.is_set() and self._fatal is not None:
                        break
                    continue
                if self._fatal is not None:
                    break  # nothing more will be committed; the group re-delivers these records
                started = self._submit(batch)
                if inflight is not None:
                    self._collect(inflight)
                inflight = started
        except Exception as exc:
            log.exception("infer_loop_failed")
            self._fatal = exc
        finally:
            self._hand_to_publish(None)

    def _submit(self, batch: Batch[Item]) -> _InFlight | None:
        """Drop revoked and late items, then hand the batch to the model (None if nothing is left)."""
        formed_at = self._clock()
        items = []
        for item in batch.items:
            if not self.tracker.owns(item.tp):
                self._finish(item)  # revoked meanwhile: the new owner answers it
                continue
            if self._is_late(item):
                item.late = True
                self.metrics.late_images.inc()
                if self.settings.batching.late_policy == "dead_letter":
                    self._dead_letter(
                        item, DeadLetterReason.DEADLINE_EXPIRED, "DeadlineExpired", "deadline passed before inference"
                    )
                    continue
            items.append(item)
        if not items:
            return None
        model = items[0].model
        assert model is not None
        # (h, w, 3) uint8 each; every item that reached a batch was decoded (failures became dead letters).
        # A list, not a stack: the runner copies each image straight into its pinned bucket buffer.
        images = [cast(np.ndarray, it.image) for it in items]
        start = time.monotonic()
        try:
            pending = model.detector.submit(images)
        except Exception as exc:  # noqa: BLE001 - any model failure dead-letters the batch, the loop goes on
            self._fail_inference(model, items, exc)
            return None
        return _InFlight(batch, items, model, pending, start, formed_at)

    def _collect(self, inflight: _InFlight) -> None:
        """Wait for a submitted batch, dead-letter non-finite scores, queue the rest for publishing."""
        items, model = inflight.items, inflight.model
        try:
            prediction = inflight.pending.result()
            scores = np.asarray(prediction.scores, dtype=np.float32)
            maps = np.asarray(prediction.maps, dtype=np.float32)
        except Exception as exc:  # noqa: BLE001 - any model failure dead-letters the batch, the loop goes on
            self._fail_inference(model, items, exc)
            return
        # Outside the try: a dead letter whose send raises is fatal, as everywhere else (not a model failure
        # that would dead-letter the batch's good images and finish the bad ones twice).
        finite = np.isfinite(scores)
        if not finite.all():
            for it, ok in zip(list(items), finite, strict=True):
                if not ok:
                    self._dead_letter(
                        it, DeadLetterReason.INFERENCE_FAILED, "NonFiniteScore", "the model returned a non-finite score"
                    )
            items = [it for it, ok in zip(items, finite, strict=True) if ok]
            scores, maps = scores[finite], maps[finite]
            if not items:
                return
        infer_s = time.monotonic() - inflight.started
        batch = inflight.batch
        self.metrics.infer_seconds.labels(model.line).observe(infer_s)
        self.metrics.batch_size.observe(len(items))
        self.metrics.batch_fill_ratio.observe(len(items) / self.settings.batching.max_batch_size)
        self.metrics.batches.labels(batch.reason).inc()
        for it in items:
            self.metrics.queue_seconds.observe(max(0.0, inflight.formed_at - it.released_at))
        self._hand_to_publish(self._prepare(_Scored(batch, items, scores, maps, infer_s, inflight.formed_at)))

    def _hand_to_publish(self, publishing: _Publishing | None) -> None:
        """Queue a prepared batch (None: the end) for the publish thread.

        A full queue means the publish thread is busy, usually waiting on the heatmap store: the infer
        loop then counts as waiting too, not as stalled, or a slow store would fail /healthz through it
        and restart the pod (the publish loop's own heartbeat still catches a wedged publish thread).
        """
        try:
            self._scored.put_nowait(publishing)
        except queue.Full:
            with self.heartbeats.waiting("infer", "publish queue"):
                self._scored.put(publishing)

    def _fail_inference(self, model: LoadedModel, items: list[Item], exc: Exception) -> None:
        """Dead-letter a batch the model failed on; a lost device instead stops the worker uncommitted.

        After a CUDA error every later batch fails the same way (the error is sticky): dead-lettering
        would drain the whole topic into the dead-letter topic while /healthz stayed green. Raising
        ends the infer loop as a fatal error; nothing more is committed, the process exits 1, and the
        group re-delivers these records to a process with a fresh CUDA context.
        """
        if device_lost(exc):
            log.error(
                "device_failed", stage="inference", product_line=model.line, model_version=model.version,
                size=len(items), error=f"{type(exc).__name__}: {exc}"[:1000],
                hint="CUDA errors are sticky: stopping without committing; the records are re-delivered",
            )  # fmt: skip
            raise exc
        log.exception("inference_failed", product_line=model.line, model_version=model.version, size=len(items))
        for it in items:
            self._dead_letter(it, DeadLetterReason.INFERENCE_FAILED, type(exc).__name__, str(exc))

    def _is_late(self, item: Item) -> bool:
        deadline = item.request.deadline if item.request is not None else None
        if deadline is None and self.settings.batching.deadline_ms is not None:
            try:
                deadline = item.captured_at + timedelta(milliseconds=self.settings.batching.deadline_ms)
            except OverflowError:
                return False  # captured near year 9999: the deadline lies past any representable time
        return deadline is not None and datetime.now(UTC) > deadline

    # ------------------------------------------------------------------------------------------
    # publish thread
    # ------------------------------------------------------------------------------------------
    def _publish_loop(self) -> None:
        while True:
            try:
                publishing = self._scored.get(timeout=0.5)
            except queue.Empty:
                self.heartbeats.beat("publish")  # idle is healthy: /healthz must not fail overnight
                continue
            if publishing is None:
                return
            if self._fatal is not None:
                for future in publishing.heatmaps.values():
                    future.cancel()  # the worker exits without committing: more work would only delay it
                continue
            try:
                self._publish(publishing)
            except Exception as exc:
                log.exception("publish_failed")
                self._fatal = exc
                self._stop.set()  # as a failed send does: the consumer loop ends and the infer loop exits
                # Keep draining until the infer loop's None: it may be blocked putting a prepared batch.
                continue
            self.heartbeats.beat("publish")

    def _prepare(self, scored: _Scored) -> _Publishing:
        """Resolve the threshold, decide verdicts and submit the batch's heatmaps to the pool.

        Called by the infer thread as soon as a batch is scored, so the pool starts on batch n+1's
        heatmaps while the publish thread still waits for batch n's and sends its results: the pool
        does not idle between batches. The queue to the publish thread (two batches) bounds how many
        prepared batches exist. The threshold comes from the cache; a reload from Redis (once per
        TTL) happens here, and with Redis down it costs at most ``socket_timeout_ms`` x (1 + retries)
        once per back-off before the last known value serves (tests/reliability/test_redis_faults.py).
        """
        model = scored.items[0].model
        assert model is not None
        lookup_start = time.monotonic()
        threshold = self.thresholds.resolve(model.line, model.version, model.default_threshold)
        threshold_s = time.monotonic() - lookup_start
        self.metrics.threshold_source.labels(threshold.source).inc(len(scored.items))
        age = self.thresholds.age_s(model.line)
        if age is not None:
            self.metrics.threshold_cache_age_seconds.labels(model.line).set(age)
        verdicts = [decide_verdict(float(s), threshold.value) for s in scored.scores]
        policy = self.settings.heatmaps.policy
        futures: dict[int, Future[StoredHeatmap]] = {}
        for i, it in enumerate(scored.items):
            if policy == "all" or (policy == "anomalous" and verdicts[i] == "anomalous"):
                assert it.request is not None
                futures[i] = self._heatmap_pool.submit(
                    save_heatmap,
                    self.heatmaps,
                    model.line,
                    it.captured_at,
                    it.request.message_id,
                    scored.maps[i],
                    threshold.value,
                    self.settings.heatmaps.max_side_px,
                )
        return _Publishing(scored, model, threshold, threshold_s, verdicts, futures)

    def _publish(self, publishing: _Publishing) -> None:
        """Wait for a prepared batch's heatmaps and send its results and alerts (batch order)."""
        scored, model, threshold = publishing.scored, publishing.model, publishing.threshold
        verdicts, futures = publishing.verdicts, publishing.heatmaps
        start = time.monotonic()  # publish_ms: this thread's time on the batch, not its wait in the queue
        heatmaps_due = start + self.settings.heatmaps.wait_s
        k = self.settings.kafka
        anomalous = 0
        for i, it in enumerate(scored.items):
            assert it.request is not None
            if not self.tracker.owns(it.tp):
                self._finish(it)
                continue
            heatmap = None
            heatmap_error = None
            if i in futures:
                future = futures[i]
                # A slow object store is no reason for a liveness restart (results go out once its
                # retries and the circuit breaker give up); a wedged publish thread still is.
                waiting = (
                    contextlib.nullcontext() if future.done() else self.heartbeats.waiting("publish", "heatmap store")
                )
                try:
                    with waiting:
                        stored = future.result(timeout=max(0.0, heatmaps_due - time.monotonic()))
                    heatmap = HeatmapRef(uri=stored.uri, width=stored.width, height=stored.height, sha256=stored.sha256)
                except TimeoutError:  # the put goes on in the pool; the result does not wait for it
                    self.metrics.heatmap_failures.inc()
                    heatmap_error = f"not stored within SPACE_HEATMAPS__WAIT_S={self.settings.heatmaps.wait_s:g} s"
                    log.warning("heatmap_not_stored", message_id=it.request.message_id, error=heatmap_error)
                except (HeatmapStoreError, OSError) as exc:
                    self.metrics.heatmap_failures.inc()
                    heatmap_error = str(exc)[:1000]
                    log.warning("heatmap_not_stored", message_id=it.request.message_id, error=heatmap_error)
                except Exception as exc:  # a bug, or a reference the result schema refuses: the result still goes out
                    self.metrics.heatmap_failures.inc()
                    heatmap_error = f"{type(exc).__name__}: {exc}"[:1000]
                    log.error("heatmap_failed", message_id=it.request.message_id, error=heatmap_error, exc_info=True)
            score = float(scored.scores[i])
            now_wall = datetime.now(UTC)
            total_ms = (self._clock() - it.polled_at) * 1000
            result = InspectionResult(
                result_id=make_result_id(it.tp.topic, it.tp.partition, it.offset, model.version),
                message_id=it.request.message_id,
                product_line=model.line,
                camera_id=it.request.camera_id,
                part_id=it.request.part_id,
                captured_at=it.captured_at,
                model=ModelRef(name=model.name, version=model.version),
                score=score,
                normalized_score=normalize_score(score, threshold.value),
                threshold=ThresholdInfo(
                    value=threshold.value,
                    version=threshold.version,
                    source=threshold.source,
                    model_version=threshold.model_version,
                ),
                verdict=verdicts[i],
                late=it.late,
                heatmap=heatmap,
                heatmap_error=heatmap_error,
                timings=Timings(
                    queue_ms=max(0.0, (scored.formed_at - it.released_at) * 1000),
                    decode_ms=it.decode_s * 1000,
                    infer_ms=scored.infer_s * 1000,
                    publish_ms=(time.monotonic() - start) * 1000,
                    total_ms=max(0.0, total_ms),
                ),
                batch_size=len(scored.items),
                worker_id=self.worker_id,
                source=SourceRecord(topic=it.tp.topic, partition=it.tp.partition, offset=it.offset),
                produced_at=now_wall,
            )
            body = result.model_dump_json().encode()
            sends = [(k.results_topic, build_result_headers(result, RESULT_EVENT_TYPE))]
            if result.verdict == "anomalous":
                anomalous += 1
                alert = InspectionAlert.from_result(result)
                sends.append((k.alerts_topic, build_result_headers(alert, ALERT_EVENT_TYPE)))
            self._send_all(
                it,
                [(topic, it.key, body, headers) for topic, headers in sends],
                on_done=partial(self.metrics.results_published.labels(model.line, result.verdict).inc),
            )
            self.metrics.end_to_end_seconds.observe(total_ms / 1000)
        publish_s = time.monotonic() - start
        self.metrics.publish_seconds.observe(publish_s)
        log.info(
            "batch_done",
            product_line=model.line,
            model_version=model.version,
            size=len(scored.items),
            reason=scored.batch.reason,
            oldest_wait_ms=round(scored.batch.oldest_wait_s * 1000, 2),
            infer_ms=round(scored.infer_s * 1000, 2),
            publish_ms=round(publish_s * 1000, 2),
            anomalous=anomalous,
            threshold=threshold.value,
            threshold_version=threshold.version,
            threshold_source=threshold.source,
            threshold_ms=round(publishing.threshold_s * 1000, 2),
            partitions=sorted({it.tp.partition for it in scored.items}),
            first_offset=min(it.offset for it in scored.items),
        )

    # ------------------------------------------------------------------------------------------
    # sends, acks and accounting
    # ------------------------------------------------------------------------------------------
    def _send_all(
        self, item: Item, sends: list[tuple[str, bytes | None, bytes, list[Any]]], *, on_done: Callable[[], None]
    ) -> None:
        """Send records for one item; the item is acknowledged once the broker accepted all of them."""
        lock = threading.Lock()
        item._pending_sends = len(sends)

        def on_ok(_meta: Any) -> None:
            with lock:
                item._pending_sends -= 1
                done = item._pending_sends == 0
            if done:
                on_done()
                self.tracker.ack(item.tp, item.offset, item.token)
                self._finish(item)

        def on_error(exc: BaseException) -> None:
            # The producer retried until delivery_timeout_ms: the record stays uncommitted and the
            # worker stops with an error so the group re-delivers it.
            log.error(
                "send_failed", topic=item.tp.topic, partition=item.tp.partition, offset=item.offset, error=repr(exc)
            )
            self._fatal = exc
            self._stop.set()

        for topic, key, value, headers in sends:
            future = self.producer.send(topic, key=key, value=value, headers=headers)
            future.add_callback(on_ok)
            future.add_errback(on_error)

    def _dead_letter(self, item: Item, reason: DeadLetterReason, error_class: str, detail: str) -> None:
        self.metrics.dead_letters.labels(reason.value).inc()
        log.warning(
            "dead_letter", reason=reason.value, error_class=error_class, detail=detail[:300],
            topic=item.tp.topic, partition=item.tp.partition, offset=item.offset,
        )  # fmt: skip
        info = DeadLetterInfo(
            error_class=error_class[:256] or "Error",
            reason=reason,
            detail=detail or reason.value,
            worker_id=self.worker_id,
            time=datetime.now(UTC),
            source_topic=item.tp.topic,
            source_partition=item.tp.partition,
            source_offset=item.offset,
        )
        k = self.settings.kafka
        letter = build_dead_letter(
            item.headers, item.value, info, max_value_bytes=k.dlq_max_value_bytes,
            max_record_bytes=k.max_request_size, key=item.key,
        )  # fmt: skip
        self._send_all(
            item, [(self.settings.kafka.dlq_topic, item.key, letter.value or b"", letter.headers)], on_done=lambda: None
        )

    def _finish(self, item: Item) -> None:
        with self._inflight_lock:
            self._inflight_count -= 1
            self._inflight_bytes -= item.nbytes
        item.image = None
        item.value = None


def _product_line(key: Hashable) -> Hashable:
    """The batcher's ordering group of a ``(line, version)`` key: its product line."""
    return cast(tuple[str, str], key)[0]
