"""Prometheus metrics of one worker (a private registry, so tests can run several workers).

Names follow Triton's split between queue time and compute time; ``batch_size`` over
``batches_total`` is the mean batch size, ``batch_fill_ratio`` says how full batches leave.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class WorkerMetrics:
    """All metrics of a worker process."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.records_consumed = Counter("space_records_consumed", "Records polled from the requests topic.", registry=r)
        self.results_published = Counter(
            "space_results_published", "Results acknowledged by the broker.", ["product_line", "verdict"], registry=r
        )
        self.dead_letters = Counter(
            "space_dead_letters", "Records sent to the dead-letter topic.", ["reason"], registry=r
        )
        self.queue_seconds = Histogram(
            "space_queue_seconds", "Wait in the batcher queue.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.decode_seconds = Histogram(
            "space_decode_seconds", "Decode, fetch and resize of one image.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.device_decodes = Counter(
            "space_device_decodes", "JPEGs decoded and resized on the GPU (nvJPEG).", registry=r
        )
        self.decode_fallbacks = Counter(
            "space_decode_fallbacks", "JPEGs the GPU decoder refused, decoded again on the CPU.", registry=r
        )
        self.infer_seconds = Histogram(
            "space_infer_seconds",
            "Model time of one batch (submit to scores on the host).",
            ["product_line"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.publish_seconds = Histogram(
            "space_publish_seconds", "Heatmaps and result sends of one batch.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.end_to_end_seconds = Histogram(
            "space_end_to_end_seconds", "Poll to result send of one image.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "space_batch_size", "Images per model call.", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r
        )
        self.batch_fill_ratio = Histogram(
            "space_batch_fill_ratio",
            "Batch size / max_batch_size.",
            buckets=(0.1, 0.25, 0.5, 0.75, 0.9, 1.0),
            registry=r,
        )
        self.batches = Counter("space_batches", "Model calls.", ["reason"], registry=r)
        self.inflight_images = Gauge("space_inflight_images", "Polled but unanswered images.", registry=r)
        self.inflight_bytes = Gauge("space_inflight_bytes", "Bytes held by in-flight images.", registry=r)
        self.paused_partitions = Gauge("space_paused_partitions", "Partitions paused for backpressure.", registry=r)
        self.assigned_partitions = Gauge("space_assigned_partitions", "Partitions owned by this worker.", registry=r)
        self.consumer_lag = Gauge(
            "space_consumer_lag", "Records behind the high watermark.", ["topic", "partition"], registry=r
        )
        self.commits = Counter("space_commits", "Offset commits.", ["outcome"], registry=r)
        self.threshold_cache_age_seconds = Gauge(
            "space_threshold_cache_age_seconds", "Age of the cached threshold.", ["product_line"], registry=r
        )
        self.threshold_source = Counter(
            "space_threshold_source", "Thresholds applied by source.", ["source"], registry=r
        )
        self.heatmap_failures = Counter("space_heatmap_failures", "Heatmaps not stored after retries.", registry=r)
        self.model_loads = Counter("space_model_loads", "Model loads.", ["product_line", "outcome"], registry=r)
        self.late_images = Counter("space_late_images", "Images past their deadline.", registry=r)
        self.model_serving = Gauge(
            "space_model_serving",
            "1 for the model version serving each line, and the precision it scores at.",
            ["product_line", "version", "precision"],
            registry=r,
        )
        self._serving: dict[str, tuple[str, str]] = {}

    def watch_loops(self, ages: Callable[[], dict[str, float]], waiting: Callable[[], dict[str, float]]) -> None:
        """Export each loop's progress age and, while it waits on a dependency, how long (read at scrape).

        ``space_loop_progress_age_seconds`` is what ``/healthz`` judges; a refresh blocked on the model
        store shows in ``space_loop_waiting_seconds`` instead of failing liveness, so alert on that.
        """
        self.registry.register(_LoopCollector(ages, waiting))

    def set_serving(self, serving: dict[str, tuple[str, str]]) -> None:
        """Publish which (version, precision) serves each line; a line's old label set goes on a swap."""
        for line, labels in list(self._serving.items()):
            if serving.get(line) != labels:
                self.model_serving.remove(line, *labels)
                del self._serving[line]
        for line, labels in serving.items():
            self.model_serving.labels(line, *labels).set(1)
            self._serving[line] = labels


class _LoopCollector(Collector):
    def __init__(self, ages: Callable[[], dict[str, float]], waiting: Callable[[], dict[str, float]]) -> None:
        self._ages = ages
        self._waiting = waiting

    def collect(self) -> Iterator[GaugeMetricFamily]:
        age = GaugeMetricFamily(
            "space_loop_progress_age_seconds", "Seconds since each worker loop last made progress.", labels=["loop"]
        )
        for loop, seconds in sorted(self._ages().items()):
            age.add_metric([loop], seconds)
        waiting = GaugeMetricFamily(
            "space_loop_waiting_seconds",
            "Seconds a loop has been waiting on an outside dependency (model store, model load); absent when not.",
            labels=["loop"],
        )
        for loop, seconds in sorted(self._waiting().items()):
            waiting.add_metric([loop], seconds)
        yield age
        yield waiting
