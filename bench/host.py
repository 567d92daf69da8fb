"""Host ceiling: how many images a second the worker moves when the model costs (almost) nothing.

On a GPU pod the model is fast (bench/gpu.py: ~1,900 images/s for EfficientAD-S at batch 64 on an
H100) and what limits a pod is the host around it: kafka-python fetches, decode, batching, result
JSON, sends, heatmaps, all in one Python process. ``bench/e2e.py`` can only show that on a GPU host;
this benchmark shows it anywhere, by swapping the model for a **stand-in device**:

* ``Detector.submit`` is replaced, in this process only, by a serial device that takes
  ``batch / --model-ips`` seconds per batch (a sleep, which like a GPU sync releases the GIL; batches
  queue behind each other as on one CUDA stream) and returns anomaly maps the real model computed on
  the bench images at start-up (PNG cost depends on map content, so the maps must be real);
  ``--model-ips 0`` makes it instant: the pure host ceiling;
* the uint8 batch is still copied into a preallocated buffer, as the CUDA runner copies it into
  pinned memory;
* ``--store-latency-ms`` adds a round trip to every heatmap write (a sleep before the real file
  write), as an object store (S3, MinIO) has: then the heatmap threads wait on I/O, not on a core.

Everything else is the real worker on the embedded broker: consumer, decode pool, batcher, publish
thread, heatmap pool and store, producer, offset commits. Each case drains the same backlog of
encoded requests; cases run in one process, one after the other, ``--repeats`` times interleaved
(median reported).

Usage::

    .venv/bin/python bench/host.py [--px 256] [--batch 64] [--images 2000] [--model-ips 0,2000]
                                   [--heatmaps none,all] [--heatmap-threads 4] [--decode-workers 2]

Prints a table and a JSON line; figures go to docs/performance.md with the machine they came from.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.e2e import CONTENT_TYPE, encoded_images, requests, run_worker_on, train_model


class StandInDevice:
    """A serial device that takes ``n / images_per_s`` seconds per batch and returns recorded maps."""

    def __init__(self, maps: np.ndarray, images_per_s: float, max_batch: int) -> None:
        self.maps = maps
        self.images_per_s = images_per_s
        self._free_at = 0.0
        self._next = 0
        self._lock = threading.Lock()
        h, w = maps.shape[1:]
        self._upload = np.empty((max_batch, h, w, 3), np.uint8)  # the runner's pinned buffer

    def submit(self, batch: np.ndarray) -> Any:
        from models.detector import Detector, PendingPrediction

        n = len(batch)
        with self._lock:
            now = time.monotonic()
            cost = n / self.images_per_s if self.images_per_s > 0 else 0.0
            self._free_at = max(now, self._free_at) + cost
            done_at = self._free_at
            idx = [(self._next + i) % len(self.maps) for i in range(n)]
            self._next = (self._next + n) % len(self.maps)
        self._upload[:n] = batch
        maps = self.maps[idx]

        def wait() -> Any:
            delay = done_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            return Detector._finish(maps, None)

        return PendingPrediction(wait)


def with_store_latency(latency_s: float) -> Any:
    """An app customizer that makes every heatmap write wait ``latency_s`` first (an object store's round trip)."""

    def customize(app: Any) -> None:
        inner = app.worker.heatmaps.inner
        put = inner.put

        def slow_put(key: str, data: bytes, content_type: str) -> str:
            time.sleep(latency_s)
            return put(key, data, content_type)

        inner.put = slow_put

    return customize


def recorded_maps(detector: Any, images: list[bytes], count: int) -> np.ndarray:
    """The real model's maps for the first ``count`` distinct bench images."""
    decoded = [cv2.cvtColor(cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
               for b in images[:count]]  # fmt: skip
    batch = np.stack([detector.prepare(img) for img in decoded])
    return np.asarray(detector.predict(batch).maps, dtype=np.float32)


def produced_span_s(results: list[dict[str, Any]]) -> float:
    """Seconds from the first to the last result the worker produced (its own clock, ``produced_at``).

    The reading consumer can fall behind a fast worker and fetch results in bursts, so arrival times
    would overstate the rate; the worker's stamps do not depend on the reader.
    """
    from datetime import datetime

    stamps = sorted(datetime.fromisoformat(r["produced_at"]).timestamp() for r in results)
    return stamps[-1] - stamps[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--px", type=int, default=256, help="Model input and encoded image size (px).")
    p.add_argument("--batch", type=int, default=64, help="max_batch_size of the worker.")
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--images", type=int, default=2000, help="Backlog size per case.")
    p.add_argument("--model-ips", default="0", help="Comma list of stand-in device speeds (images/s; 0 = instant).")
    p.add_argument("--heatmaps", default="none,all", help="Comma list of heatmap policies.")
    p.add_argument("--heatmap-threads", type=int, default=4)
    p.add_argument("--store-latency-ms", type=float, default=0.0, help="Added to every heatmap write.")
    p.add_argument("--decode-workers", type=int, default=2)
    p.add_argument("--format", default="jpeg", choices=["png", "jpeg"])
    p.add_argument("--repeats", type=int, default=1, help="Interleaved rounds of all cases (median reported).")
    p.add_argument("--steps", type=int, default=3, help="Training steps of the throwaway model (maps only).")
    p.add_argument("--model-root", default=None, help="Use this registry (line brick must be promoted).")
    p.add_argument("--out", default=None, help="Also write the JSON report here.")
    args = p.parse_args()
    speeds = [float(s) for s in args.model_ips.split(",")]
    policies = [s.strip() for s in args.heatmaps.split(",") if s.strip()]

    import torch

    from models.detector import Detector
    from tests.kafka_helpers import produce
    from worker.kafka_clients import ensure_topics
    from worker.logging import configure_logging
    from worker.registry import ModelRegistry
    from worker.settings import load_settings
    from worker.stack import Stack

    configure_logging("WARNING", "console")
    work = Path(tempfile.mkdtemp(prefix="space-host-"))
    if args.model_root:
        root, line = Path(args.model_root), "brick"
        version = ModelRegistry(str(root)).active_version(line)
    else:
        line, version = train_model(work, args.px, args.steps, "cpu")
        root = work / "registry"
    images = encoded_images(args.px, args.images, args.format)
    detector = Detector.load(root / line / version, device="cpu", max_batch=args.batch)
    maps = recorded_maps(detector, images, 32)
    del detector

    real_submit = Detector.submit
    stack = Stack(work / "stack", redis_url=os.environ.get("SPACE_REDIS__URL", "redis://127.0.0.1:6379/0"))
    stack.up()
    env = stack.env()
    report: dict[str, Any] = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()} cpus={os.cpu_count()}",
        "python": platform.python_version(), "px": args.px, "batch": args.batch, "images": args.images,
        "format": args.format, "encoded_kib_mean": round(statistics.mean(len(b) for b in images) / 1024, 1),
        "decode_workers": args.decode_workers, "heatmap_threads": args.heatmap_threads, "repeats": args.repeats,
        "torch": torch.__version__, "store_latency_ms": args.store_latency_ms,
    }  # fmt: skip

    def settings_for(policy: str) -> Any:
        suffix = uuid.uuid4().hex[:6]
        s = load_settings(
            kafka={"bootstrap_servers": env["SPACE_KAFKA__BOOTSTRAP_SERVERS"], "group_id": f"host-{suffix}",
                   "requests_topic": f"host-req-{suffix}", "results_topic": f"host-res-{suffix}",
                   "alerts_topic": f"host-alert-{suffix}", "dlq_topic": f"host-dlq-{suffix}",
                   "session_timeout_ms": 6000, "heartbeat_interval_ms": 1000},
            redis={"url": env["SPACE_REDIS__URL"], "key_prefix": f"host-{suffix}"},
            models={"root": str(root), "preload": (line,), "device": "cpu", "warmup_batch_sizes": (1,)},
            batching={"max_batch_size": args.batch, "max_wait_ms": args.max_wait_ms},
            decode={"workers": args.decode_workers},
            heatmaps={"store_uri": f"file://{work / 'heatmaps'}", "policy": policy,
                      "threads": args.heatmap_threads},
            http={"enabled": False}, worker={"state_dir": str(work / "state")},
        )  # fmt: skip
        ensure_topics(
            s.kafka,
            {s.kafka.requests_topic: 8, s.kafka.results_topic: 8, s.kafka.alerts_topic: 1, s.kafka.dlq_topic: 1},
        )
        return s

    cases = list(itertools.product(speeds, policies))
    figures: dict[tuple[float, str], list[float]] = {c: [] for c in cases}
    batches: dict[tuple[float, str], list[float]] = {c: [] for c in cases}
    try:
        for _ in range(args.repeats):
            for speed, policy in cases:
                device = StandInDevice(maps, speed, args.batch)
                Detector.submit = lambda self, batch, device=device: device.submit(self._stack(batch))  # type: ignore[method-assign]
                try:
                    s = settings_for(policy)
                    recs = requests(images, line, content_type=CONTENT_TYPE[args.format])
                    produce(s, s.kafka.requests_topic, recs)
                    customize = with_store_latency(args.store_latency_ms / 1000) if args.store_latency_ms else None
                    _, results = run_worker_on(s, lambda: None, len(recs), timeout_s=900, customize=customize)
                finally:
                    Detector.submit = real_submit  # type: ignore[method-assign]
                ips = (len(results) - 1) / produced_span_s(results)
                figures[(speed, policy)].append(ips)
                batches[(speed, policy)].append(statistics.mean(r["batch_size"] for r in results))
                print(f"  stand-in {speed or 'instant'} images/s, heatmaps={policy}: {ips:,.1f} images/s", flush=True)
    finally:
        stack.down()

    rows = []
    for speed, policy in cases:
        ips = statistics.median(figures[(speed, policy)])
        row = {"model_images_per_s": speed or None, "heatmaps": policy, "images_per_s": round(ips, 1),
               "runs": [round(v, 1) for v in figures[(speed, policy)]],
               "mean_batch": round(statistics.mean(batches[(speed, policy)]), 1),
               "per_core_images_per_s": round(ips / (os.cpu_count() or 1), 1)}  # fmt: skip
        if speed:
            row["over_model"] = round(ips / speed, 3)
        rows.append(row)
    report["cases"] = rows
    print("\nspace-worker host ceiling (stand-in device, real worker and broker)")
    for k, v in report.items():
        if k != "cases":
            print(f"  {k:18} {v}")
    print(f"\n  {'device images/s':>16} {'heatmaps':>9} {'worker images/s':>16} {'/ device':>9} {'mean batch':>11}")
    for r in rows:
        ratio = f"{r['over_model']:.2f}" if "over_model" in r else "-"
        dev = f"{r['model_images_per_s']:,.0f}" if r["model_images_per_s"] else "instant"
        print(f"  {dev:>16} {r['heatmaps']:>9} {r['images_per_s']:>16,.1f} {ratio:>9} {r['mean_batch']:>11}")
    line_json = json.dumps(report)
    print("JSON " + line_json)
    if args.out:
        Path(args.out).write_text(line_json + "\n")


if __name__ == "__main__":
    main()
