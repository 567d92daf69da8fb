"""Builds a running worker from settings: clients, stores, caches, threads, HTTP, signals.

``space serve`` and the integration tests both use :func:`build_app`, so tests run exactly the
production wiring against the embedded broker and Redis.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from worker.decode import ClaimCheckFetcher
from worker.device_decode import DeviceJpegDecoder
from worker.errors import ConfigError
from worker.heatmaps import open_heatmap_store
from worker.http import HealthServer, Heartbeats
from worker.kafka_clients import make_consumer, make_producer
from worker.metrics import WorkerMetrics
from worker.model_manager import ModelManager
from worker.redis_client import make_redis
from worker.registry import ModelRegistry
from worker.s3 import make_s3_client
from worker.service import Worker
from worker.settings import Settings
from worker.thresholds import ThresholdCache, ThresholdStore, ThresholdWatcher

log = structlog.get_logger(__name__)

#: Seconds between heartbeats of the model-refresh loop while it waits for its next pass.
_IDLE_BEAT_S = 1.0


def load_detector(settings: Settings) -> Any:
    """A loader ``path -> Detector`` honoring the model runtime settings."""
    from models.detector import Detector

    m = settings.models

    def load(path: Path) -> Any:
        return Detector.load(
            path,
            device=m.device,
            precision=m.precision,
            channels_last=m.channels_last,
            max_batch=settings.batching.max_batch_size,
            cuda_graphs=m.cuda_graphs,
            compile_mode=m.compile,
            concurrent_branches=m.concurrent_branches,
        )

    return load


@dataclass
class App:
    """A wired worker and the background services around it."""

    settings: Settings
    worker: Worker
    http: HealthServer | None
    watcher: ThresholdWatcher
    redis: Any
    registry: ModelRegistry
    models: ModelManager
    _stop: threading.Event = field(default_factory=threading.Event)
    _refresher: threading.Thread | None = None

    def run(self) -> int:
        """Start the side services, run the worker until it stops, tear down. Returns the exit code."""
        self.watcher.start()
        if self.http is not None:
            self.http.start()
            log.info("http_listening", port=self.http.port)
        self._refresher = threading.Thread(target=self._refresh_loop, name="model-refresh", daemon=True)
        self._refresher.start()
        try:
            if self.settings.models.preload:
                self.models.preload(self.settings.models.preload, stop=self.worker.stop_requested)
            self.publish_serving()
            return self.worker.run()
        finally:
            self._stop.set()
            self.watcher.stop()
            if self.http is not None:
                self.http.stop()
            self.redis.close()

    def stop(self) -> None:
        """Ask the worker to drain and stop."""
        self.worker.request_stop()

    def _refresh_loop(self) -> None:
        interval = self.settings.models.refresh_interval_s
        beats = self.worker.heartbeats
        due = time.monotonic() + interval
        # The wait between passes beats each second: idle is healthy, whatever the interval (one of 60 s
        # left the loop's last beat older than /healthz's 30 s for half of every minute).
        while not self._stop.wait(min(_IDLE_BEAT_S, max(0.0, due - time.monotonic()))):
            beats.beat("model-refresh")
            if time.monotonic() < due:
                continue
            start = time.monotonic()
            try:
                # Registry reads and loads count as waiting: a slow store or a long warm-up is no reason
                # for a liveness restart (the new pod would block on the same store).
                self.models.refresh(waiting=lambda on: beats.waiting("model-refresh", on))
                beats.beat("model-refresh")
                self.publish_serving()
            except Exception:
                log.exception("model_refresh_failed")
            took_s = time.monotonic() - start
            due = time.monotonic() + interval
            if took_s > self.settings.http.healthy_after_s:
                log.warning(
                    "model_refresh_slow", took_s=round(took_s, 1), healthy_after_s=self.settings.http.healthy_after_s
                )

    def publish_serving(self) -> None:
        """Set ``space_model_serving`` from the loaded models (after preload, then on every refresh)."""
        loaded = self.models.loaded()
        self.worker.metrics.set_serving({line: (m.version, m.precision) for line, m in loaded.items()})

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT start a graceful drain (main thread only)."""

        def handle(signum: int, _frame: Any) -> None:
            log.info("signal_received", signal=signal.Signals(signum).name)
            self.stop()

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)


def build_app(settings: Settings, *, detector_loader: Any | None = None) -> App:
    """Wire a worker from settings (connects lazily; nothing is consumed until :meth:`App.run`).

    Raises:
        ConfigError: settings the model runtime cannot honour here (torch.compile on a CPU without a
            C++ compiler, or on a device that is not there), named before anything starts.
    """
    if settings.models.threads:
        import torch

        torch.set_num_threads(settings.models.threads)
    if settings.models.compile != "off" and detector_loader is None:
        from models.detector import DetectorError, check_compile_toolchain, resolve_device

        try:
            check_compile_toolchain(settings.models.compile, resolve_device(settings.models.device))
        except DetectorError as exc:
            raise ConfigError(str(exc)) from None
    metrics = WorkerMetrics()
    heartbeats = Heartbeats()
    metrics.watch_loops(
        heartbeats.ages, lambda: {loop: float(w["for_s"]) for loop, w in heartbeats.waiting_on().items()}
    )
    s3_factory = lambda: make_s3_client(settings.s3)  # noqa: E731 - a lazily called factory
    registry = ModelRegistry(
        settings.models.root, s3_client_factory=s3_factory, cache_dir=settings.worker.state_dir / "model-cache"
    )
    if registry.local_root is not None and not registry.local_root.is_dir():
        # Every image would be dead-lettered as unknown-product-line, with advice that cannot work.
        raise ConfigError(
            f"SPACE_MODELS__ROOT={settings.models.root}: no such directory (train and promote a model into it "
            "with `space train` and `space models promote`, or point SPACE_MODELS__ROOT at the registry)"
        )
    models = ModelManager(
        registry,
        detector_loader or load_detector(settings),
        max_loaded=settings.models.max_loaded,
        warmup_batch_sizes=settings.models.warmup_batch_sizes if settings.models.warmup else (),
        on_load=lambda line, outcome: metrics.model_loads.labels(line, outcome).inc(),
        negative_ttl_s=settings.models.negative_ttl_s,
        swap_retry_s=settings.models.swap_retry_s,
    )
    redis_client = make_redis(settings.redis)
    store = ThresholdStore.from_settings(redis_client, settings)
    cache = ThresholdCache(
        store.get,
        settings.thresholds.cache_ttl_s,
        load_earlier=store.latest_for,
        retry_interval_s=settings.thresholds.retry_interval_s,
    )
    watcher = ThresholdWatcher(
        lambda: make_redis(settings.redis), store.channel, cache, backoff_max_s=settings.thresholds.watch_backoff_max_s
    )
    heatmaps = open_heatmap_store(settings.heatmaps, settings.s3)
    fetcher = ClaimCheckFetcher.from_settings(settings.decode, settings.s3)
    consumer = make_consumer(settings.kafka, client_id=f"{settings.kafka.client_id}-{settings.worker.id}")
    producer = make_producer(settings.kafka, client_id=f"{settings.kafka.client_id}-{settings.worker.id}")
    worker = Worker(
        settings,
        consumer=consumer,
        producer=producer,
        models=models,
        thresholds=cache,
        heatmaps=heatmaps,
        fetcher=fetcher,
        metrics=metrics,
        heartbeats=heartbeats,
        device_decoder=DeviceJpegDecoder.create(settings.decode.device),
    )
    http = None
    if settings.http.enabled:
        http = HealthServer(
            settings.http.host,
            settings.http.port,
            metrics.registry,
            heartbeats,
            settings.http.healthy_after_s,
            worker.readiness,
        )
    return App(settings, worker, http, watcher, redis_client, registry, models)
