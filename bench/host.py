"""Host ceiling: how many images a second worker processes move when the model costs (almost) nothing.

On a GPU pod the model is fast (bench/gpu.py: ~1,900 images/s for EfficientAD-S at batch 64 on an
H100) and what limits a pod is the host around it: kafka-python fetches, decode, batching, result
JSON, sends, heatmaps, in Python processes. ``bench/e2e.py`` can only show that on a GPU host; this
benchmark shows it anywhere, by swapping the model for a **stand-in device** inside each worker:

* ``Detector.submit`` is replaced, in the worker processes started here only, by a serial device
  that takes ``batch / --model-ips`` seconds per batch (a sleep, which like a GPU sync releases the
  GIL; batches queue behind each other as on one CUDA stream) and returns anomaly maps the real
  model computed on the bench images (PNG cost depends on map content, so the maps must be real);
  ``--model-ips 0`` makes it instant: the pure host ceiling. The images are still copied into a
  preallocated buffer (``models.gpu.fill_batch``), as the CUDA runner copies them into pinned memory;
* ``--store-latency-ms`` adds a round trip to every heatmap write (a sleep before the real file
  write), as an object store (S3, MinIO) has: then the heatmap threads wait on I/O, not on a core.

Everything else is the real worker (``space serve``) on the embedded broker. Per case: a backlog of
encoded requests is produced first, then ``--processes`` workers start in one group; the window
opens once the group has settled (every process holds partitions, all are covered) and the rate is
taken over the middle 90 % of the results produced after that (``bench/fleet.py``), so joins and
uneven tails do not count. It also reports the workers' CPU time per image (from /proc): on a shared
machine that moves less than throughput does, and on a GPU host it says how many cores a pod needs.
Cases run one after the other, ``--repeats`` rounds interleaved (median reported).

``--real-model`` runs plain ``space serve`` instead (the trained model on ``--device`` with
``--precision`` and ``--cuda-graphs``): on a GPU host that is the end-to-end figure for N worker
processes sharing one card, which ``bench/gpu.sh`` records next to the model's own figure.

Usage::

    .venv/bin/python bench/host.py [--px 256] [--batch 64] [--images 6000] [--processes 1,2]
                                   [--model-ips 0] [--heatmaps none,all] [--heatmap-threads 4]

Prints a table and a JSON line; figures go to docs/performance.md with the machine they came from.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.e2e import CONTENT_TYPE, encoded_images, pipelined_throughput, requests, train_model
from bench.fleet import Fleet, steady_rate

PARTITIONS = 8
CAMERAS = 64  # keys spread over the partitions about evenly


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

    def submit(self, batch: np.ndarray | list[np.ndarray]) -> Any:
        from models.detector import Detector, PendingPrediction
        from models.gpu import fill_batch

        n = len(batch)
        with self._lock:
            now = time.monotonic()
            cost = n / self.images_per_s if self.images_per_s > 0 else 0.0
            self._free_at = max(now, self._free_at) + cost
            done_at = self._free_at
            idx = [(self._next + i) % len(self.maps) for i in range(n)]
            self._next = (self._next + n) % len(self.maps)
        fill_batch(self._upload, batch)  # as the runner fills its pinned bucket buffer
        maps = self.maps[idx]

        def wait() -> Any:
            delay = done_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            return Detector._finish(maps, None)

        return PendingPrediction(wait)


def serve_with_standin(maps_path: str, images_per_s: float, max_batch: int, store_latency_ms: float) -> int:
    """Child mode: patch the model (and the heatmap store's latency) in this process, run ``space serve``."""
    from models.detector import Detector
    from worker.cli import main
    from worker.heatmaps import FileHeatmapStore

    device = StandInDevice(np.load(maps_path), images_per_s, max_batch)
    Detector.submit = lambda self, batch: device.submit(batch if isinstance(batch, list) else self._stack(batch))  # type: ignore[method-assign]
    if store_latency_ms > 0:
        put = FileHeatmapStore.put

        def slow_put(self: Any, key: str, data: bytes, content_type: str) -> str:
            time.sleep(store_latency_ms / 1000)
            return put(self, key, data, content_type)

        FileHeatmapStore.put = slow_put  # type: ignore[method-assign]
    return main(["serve"])


def recorded_maps(detector: Any, images: list[bytes], count: int) -> np.ndarray:
    """The real model's maps for the first ``count`` distinct bench images."""
    decoded = [cv2.cvtColor(cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
               for b in images[:count]]  # fmt: skip
    batch = np.stack([detector.prepare(img) for img in decoded])
    return np.asarray(detector.predict(batch).maps, dtype=np.float32)


def read_results(settings: Any, expected: int, timeout_s: float, fleet: Fleet) -> tuple[list[dict[str, Any]], float]:
    """All ``expected`` results from the start of the results topic, and the fleet's CPU seconds at the last."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(**settings.kafka.client_kwargs(), group_id=None, enable_auto_commit=False)
    topic = settings.kafka.results_topic
    consumer.assign([TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)])
    consumer.seek_to_beginning()
    results: list[dict[str, Any]] = []
    cpu_at_last = 0.0
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) < expected and time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=200)
            if batch:
                cpu_at_last = fleet.cpu_seconds()
            for recs in batch.values():
                results.extend(json.loads(r.value) for r in recs)
    finally:
        consumer.close()
    if len(results) < expected:
        raise RuntimeError(f"only {len(results)} of {expected} results within {timeout_s} s")
    return results, cpu_at_last


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--px", type=int, default=256, help="Model input and encoded image size (px).")
    p.add_argument("--batch", type=int, default=64, help="max_batch_size of the workers.")
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--images", type=int, default=6000, help="Backlog size per case.")
    p.add_argument("--processes", default="1", help="Comma list of worker process counts (one group each case).")
    p.add_argument("--model-ips", default="0", help="Comma list of stand-in device speeds (images/s; 0 = instant).")
    p.add_argument("--heatmaps", default="none,all", help="Comma list of heatmap policies.")
    p.add_argument("--heatmap-threads", type=int, default=4)
    p.add_argument("--store-latency-ms", type=float, default=0.0, help="Added to every heatmap write.")
    p.add_argument("--decode-workers", type=int, default=2)
    p.add_argument("--session-timeout-ms", type=int, default=6000,
                   help="Group session; Tansu holds every join for half of it (ENVIRONMENT.md).")  # fmt: skip
    p.add_argument("--format", default="jpeg", choices=["png", "jpeg"])
    p.add_argument("--repeats", type=int, default=1, help="Interleaved rounds of all cases (median reported).")
    p.add_argument("--steps", type=int, default=3, help="Training steps of the throwaway model (maps only).")
    p.add_argument("--model-root", default=None, help="Use this registry (line brick must be promoted).")
    p.add_argument("--work", default=None, help="Working folder (default: a new temp folder); the trained "
                   "registry lands in WORK/registry for a later --model-root.")  # fmt: skip
    p.add_argument("--real-model", action="store_true", help="Serve the real model instead of the stand-in.")
    p.add_argument("--device", default="cpu", help="SPACE_MODELS__DEVICE with --real-model.")
    p.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16", "fp16"], help="With --real-model.")
    p.add_argument("--cuda-graphs", action="store_true", help="SPACE_MODELS__CUDA_GRAPHS with --real-model.")
    p.add_argument("--model-seconds", type=float, default=3.0,
                   help="Timing of the model alone (--real-model); 0 skips it.")  # fmt: skip
    p.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Extra SPACE_* setting for the workers (repeatable), to compare settings.",
    )
    p.add_argument("--out", default=None, help="Also write the JSON report here (rewritten after every case).")
    p.add_argument("--serve-standin", metavar="MAPS_NPY", default=None, help=argparse.SUPPRESS)  # child mode
    args = p.parse_args()
    if args.serve_standin:
        raise SystemExit(
            serve_with_standin(args.serve_standin, float(args.model_ips), args.batch, args.store_latency_ms)
        )
    # `timeout` (bench/gpu.sh) sends SIGTERM: exit through the finally blocks, which stop the workers
    # and the stack (its broker and Redis run in their own sessions and would outlive this process).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    counts = [int(s) for s in args.processes.split(",")]
    speeds = [0.0] if args.real_model else [float(s) for s in args.model_ips.split(",")]
    policies = [s.strip() for s in args.heatmaps.split(",") if s.strip()]

    from models.detector import Detector
    from tests.kafka_helpers import produce
    from worker.kafka_clients import ensure_topics
    from worker.logging import configure_logging
    from worker.registry import ModelRegistry
    from worker.settings import load_settings
    from worker.stack import Stack

    configure_logging("WARNING", "console")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="space-host-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.model_root:
        root, line = Path(args.model_root), "brick"
        version = ModelRegistry(str(root)).active_version(line)
    else:
        line, version = train_model(work, args.px, args.steps, "cpu")
        root = work / "registry"
    images = encoded_images(args.px, args.images, args.format)
    maps_path = work / "maps.npy"
    if not args.real_model:  # the stand-in device's maps
        detector = Detector.load(root / line / version, device="cpu", max_batch=args.batch)
        np.save(maps_path, recorded_maps(detector, images, 32))
        del detector
    model_ips = None
    if args.real_model and args.model_seconds > 0:  # the model's own figure on the device, before the workers take it
        detector = Detector.load(root / line / version, device=args.device, precision=args.precision,
                                 max_batch=args.batch, cuda_graphs=args.cuda_graphs)  # fmt: skip
        model_ips = pipelined_throughput(detector, args.batch, args.model_seconds)
        print(f"model alone: {model_ips:,.1f} images/s at batch {args.batch} (two batches in flight)", flush=True)
        del detector
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    stack = Stack(work / "stack", redis_url=os.environ.get("SPACE_REDIS__URL", "redis://127.0.0.1:6379/0"))
    try:
        stack.up()
    except BaseException:  # SIGTERM or a failed start: stop what did start (its own sessions outlive us)
        stack.down()
        raise
    env = stack.env()
    report: dict[str, Any] = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()} cpus={os.cpu_count()}",
        "python": platform.python_version(), "px": args.px, "batch": args.batch, "images": args.images,
        "format": args.format, "encoded_kib_mean": round(statistics.mean(len(b) for b in images) / 1024, 1),
        "decode_workers": args.decode_workers, "heatmap_threads": args.heatmap_threads, "repeats": args.repeats,
        "store_latency_ms": args.store_latency_ms, "partitions": PARTITIONS,
        "model": f"real on {args.device}, {args.precision}, graphs={args.cuda_graphs}" if args.real_model else "stand-in",
        "model_alone_images_per_s": round(model_ips, 1) if model_ips else None, "worker_env": args.worker_env,
    }  # fmt: skip

    def settings_for(policy: str) -> Any:
        suffix = uuid.uuid4().hex[:6]
        s = load_settings(
            kafka={"bootstrap_servers": env["SPACE_KAFKA__BOOTSTRAP_SERVERS"], "group_id": f"host-{suffix}",
                   "requests_topic": f"host-req-{suffix}", "results_topic": f"host-res-{suffix}",
                   "alerts_topic": f"host-alert-{suffix}", "dlq_topic": f"host-dlq-{suffix}",
                   "session_timeout_ms": args.session_timeout_ms, "heartbeat_interval_ms": 1000},
            redis={"url": env["SPACE_REDIS__URL"], "key_prefix": f"host-{suffix}"},
            batching={"max_batch_size": args.batch, "max_wait_ms": args.max_wait_ms},
            heatmaps={"store_uri": f"file://{work / 'heatmaps' / suffix}", "policy": policy},
            worker={"state_dir": str(work / "state")},
        )  # fmt: skip
        ensure_topics(
            s.kafka,
            {s.kafka.requests_topic: PARTITIONS, s.kafka.results_topic: PARTITIONS, s.kafka.alerts_topic: 1,
             s.kafka.dlq_topic: 1},
        )  # fmt: skip
        return s

    def run_case(n: int, speed: float, policy: str) -> dict[str, float]:
        s = settings_for(policy)
        recs = requests(images, line, cameras=CAMERAS, content_type=CONTENT_TYPE[args.format])
        produce(s, s.kafka.requests_topic, recs)  # the backlog exists before any worker starts
        extra = {
            "SPACE_DECODE__WORKERS": str(args.decode_workers),
            "SPACE_HEATMAPS__THREADS": str(args.heatmap_threads),
        }
        if args.real_model:
            command = [sys.executable, "-m", "worker", "serve"]
            extra.update(SPACE_MODELS__DEVICE=args.device, SPACE_MODELS__PRECISION=args.precision,
                         SPACE_MODELS__CUDA_GRAPHS=str(args.cuda_graphs).lower(),
                         SPACE_MODELS__WARMUP_BATCH_SIZES=f"1,{args.batch}",
                         SPACE_MODELS__THREADS=str(max(1, (os.cpu_count() or 1) // n)))  # fmt: skip
        else:
            command = [sys.executable, str(Path(__file__).resolve()), "--serve-standin", str(maps_path),
                       "--model-ips", str(speed), "--batch", str(args.batch),
                       "--store-latency-ms", str(args.store_latency_ms)]  # fmt: skip
        extra.update(kv.split("=", 1) for kv in args.worker_env)  # last: --worker-env wins
        fleet = Fleet.start(n, s, root, work / f"logs-{s.kafka.group_id}", command, preload=(line,), **extra)
        try:
            settled_at = fleet.wait_settled(PARTITIONS, timeout_s=180)
            cpu0 = fleet.cpu_seconds()
            results, cpu1 = read_results(s, len(recs), timeout_s=900, fleet=fleet)
        finally:
            codes = fleet.stop()
        stored = [p.stat().st_size for p in Path(s.heatmaps.store_uri.removeprefix("file://")).rglob("*.png")]
        stamps = [datetime.fromisoformat(r["produced_at"]).timestamp() for r in results]
        after = [t for t in stamps if t >= settled_at]
        if len(after) < len(stamps) // 4:
            raise RuntimeError(f"only {len(after)} of {len(stamps)} results after the group settled: raise --images")
        ips, _, _ = steady_rate(after)
        return {
            "images_per_s": ips, "cpu_ms_per_image": (cpu1 - cpu0) * 1000 / len(after),
            "mean_batch": statistics.mean(r["batch_size"] for r in results), "measured_results": len(after),
            "results_before_settled": len(stamps) - len(after),
            "heatmap_kib_mean": statistics.mean(stored) / 1024 if stored else 0.0,
            "worker_exit_code": max(codes),
        }  # fmt: skip

    cases = list(itertools.product(counts, speeds, policies))
    runs: dict[tuple[int, float, str], list[dict[str, float]]] = {c: [] for c in cases}
    report["cases"], report["errors"] = [], []

    def rows_so_far() -> list[dict[str, Any]]:
        """One row per case with at least one run (median over its runs), in case order."""
        rows: list[dict[str, Any]] = []
        for n, speed, policy in cases:
            figs = runs[(n, speed, policy)]
            if not figs:
                continue
            ips = statistics.median(f["images_per_s"] for f in figs)
            row = {"processes": n, "model_images_per_s": speed or None, "heatmaps": policy,
                   "images_per_s": round(ips, 1), "runs": [round(f["images_per_s"], 1) for f in figs],
                   "cpu_ms_per_image": round(statistics.median(f["cpu_ms_per_image"] for f in figs), 3),
                   "mean_batch": round(statistics.mean(f["mean_batch"] for f in figs), 1),
                   "heatmap_kib_mean": round(statistics.mean(f["heatmap_kib_mean"] for f in figs), 2),
                   "worker_exit_code": max(f["worker_exit_code"] for f in figs)}  # fmt: skip
            if speed or model_ips:
                row["over_model"] = round(ips / (speed or model_ips), 3)
            one = next((r for r in rows if r["processes"] == 1 and r["model_images_per_s"] == row["model_images_per_s"]
                        and r["heatmaps"] == policy), None)  # fmt: skip
            if one is not None and n > 1:
                row["over_one_process"] = round(ips / one["images_per_s"], 2)
            rows.append(row)
        return rows

    def write_report() -> None:
        """The report so far (``--out``): a run cut off by a time limit keeps the finished cases."""
        report["cases"] = rows_so_far()
        if args.out:
            Path(args.out).write_text(json.dumps(report) + "\n")

    try:
        write_report()
        for _ in range(args.repeats):
            for n, speed, policy in cases:
                device = "real model" if args.real_model else f"device {speed or 'instant'}"
                try:
                    fig = run_case(n, speed, policy)
                except Exception as exc:  # noqa: BLE001 - one failing case must not lose the others
                    report["errors"].append(f"{n} process(es), {device}, heatmaps={policy}: {exc!r}"[:500])
                    print(f"  {n} process(es), {device}, heatmaps={policy}: failed: {exc!r}"[:500], flush=True)
                    write_report()
                    continue
                runs[(n, speed, policy)].append(fig)
                print(f"  {n} process(es), {device}, heatmaps={policy}: "
                      f"{fig['images_per_s']:,.1f} images/s, {fig['cpu_ms_per_image']:.2f} CPU ms/image"
                      f" ({fig['results_before_settled']} results before the group settled)", flush=True)  # fmt: skip
                write_report()
    finally:
        stack.down()

    write_report()
    rows = report["cases"]
    print("\nspace-worker host ceiling (stand-in device, real workers and broker)")
    for k, v in report.items():
        if k != "cases":
            print(f"  {k:18} {v}")
    print(f"\n  {'processes':>9} {'device images/s':>16} {'heatmaps':>9} {'worker images/s':>16} {'/ device':>9}"
          f" {'x 1 process':>12} {'CPU ms/image':>13} {'mean batch':>11}")  # fmt: skip
    for r in rows:
        dev = (
            "real model"
            if args.real_model
            else (f"{r['model_images_per_s']:,.0f}" if r["model_images_per_s"] else "instant")
        )
        print(f"  {r['processes']:>9} {dev:>16} {r['heatmaps']:>9} {r['images_per_s']:>16,.1f}"
              f" {r.get('over_model', '-'):>9} {r.get('over_one_process', '-'):>12} {r['cpu_ms_per_image']:>13}"
              f" {r['mean_batch']:>11}")  # fmt: skip
    print("JSON " + json.dumps(report))


if __name__ == "__main__":
    main()
