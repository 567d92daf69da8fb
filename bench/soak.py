"""Soak: run `space serve` at a fraction of its measured capacity for a long time and watch its footprint.

1. Start (or reuse) the embedded broker and Redis, create unique topics, start one worker subprocess.
2. Capacity: a backlog of ``--capacity-images`` requests, answered as fast as the worker can; images/s.
3. Soak: a paced producer at ``--load`` x capacity for ``--duration-s``; every ``--sample-s`` the worker's
   RSS, open file descriptors and threads are sampled from /proc, with results answered so far.
4. The run passes when every request was answered and the footprint is flat: between the first and last
   quarter of the samples (after warm-up), RSS grows by less than 10 % + 32 MiB, open files by at most 8
   and threads by at most 4 (a leak of one per request or per batch would be far larger).

Prints a table and a one-line verdict; exits 0 (flat, nothing lost) or 1. ``python bench/soak.py --help``.
Environment: SPACE_KAFKA__BOOTSTRAP_SERVERS / SPACE_REDIS__URL to reuse a running stack; otherwise an
embedded one is started in a temporary directory. ``--model-root`` takes a registry with the ``brick``
line; without it a tiny model is trained first (about 30 s).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
LINE = "brick"


@dataclass
class Sample:
    t_s: float
    rss_mib: float
    open_files: int
    threads: int
    answered: int
    sent: int


@dataclass
class SoakReport:
    capacity_ips: float
    rate_ips: float
    duration_s: float
    sent: int
    answered: int
    duplicates: int
    samples: list[Sample] = field(default_factory=list)
    flat: bool = False
    verdict: str = ""


def _proc_figures(pid: int) -> tuple[float, int, int]:
    rss = 0.0
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task"))


def _train_tiny(out: Path) -> Path:
    import torch

    from models.synthetic import build_product_line
    from models.train import TrainConfig, train
    from worker.registry import ModelRegistry

    torch.manual_seed(0)
    data = build_product_line(LINE, out / "data", n_train=12, n_val=6, n_test_good=6, n_test_defect=6, size=128, seed=0)
    root = out / "registry"
    train(
        TrainConfig(
            data=data, product_line=LINE, out=root, steps=5, input_size=128, seed=0, model_version="v1", device="cpu"
        )
    )
    ModelRegistry(str(root)).promote(LINE, "v1", by="soak")
    return root


class _Results:
    """Counts distinct answered message ids on the results topic (no group)."""

    def __init__(self, kafka: Any, topic: str) -> None:
        from kafka import KafkaConsumer

        self.consumer = KafkaConsumer(**kafka.client_kwargs(), group_id=None, enable_auto_commit=False,
                                      auto_offset_reset="earliest")  # fmt: skip
        self.topic = topic
        self.ids: set[str] = set()
        self.total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        from kafka import TopicPartition

        parts = None
        while not parts and not self._stop.is_set():
            parts = self.consumer.partitions_for_topic(self.topic)
            time.sleep(0.1)
        self.consumer.assign([TopicPartition(self.topic, p) for p in sorted(parts or [])])
        self.consumer.seek_to_beginning()
        while not self._stop.is_set():
            for recs in self.consumer.poll(timeout_ms=200).values():
                for r in recs:
                    self.total += 1
                    self.ids.add(json.loads(r.value)["message_id"])

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.consumer.close()

    def wait(self, n: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if len(self.ids) >= n:
                return True
            time.sleep(0.1)
        return False


def run_soak(
    *, duration_s: float, load: float = 0.8, sample_s: float = 10.0, capacity_images: int = 120,
    model_root: Path | None = None, workdir: Path | None = None, log: Any = print,
) -> SoakReport:  # fmt: skip
    """Measure capacity, soak at ``load`` x capacity, return the figures (see the module docstring)."""
    import cv2
    import numpy as np
    from kafka import KafkaProducer

    from schemas.request import InspectionRequest, build_request_headers
    from worker.kafka_clients import ensure_topics
    from worker.settings import load_settings
    from worker.stack import Stack

    workdir = Path(workdir or tempfile.mkdtemp(prefix="space-soak-"))
    stack = None
    if "SPACE_KAFKA__BOOTSTRAP_SERVERS" not in os.environ:
        stack = Stack(workdir / "stack", redis_url=os.environ.get("SPACE_REDIS__URL", "redis://127.0.0.1:6379/0"))
        stack.up()
        env_stack = stack.env()
    else:
        env_stack = {
            k: os.environ[k] for k in ("SPACE_KAFKA__BOOTSTRAP_SERVERS", "SPACE_REDIS__URL") if k in os.environ
        }
    proc = None
    try:
        root = model_root or _train_tiny(workdir / "model")
        suffix = uuid.uuid4().hex[:8]
        topics = {"requests_topic": f"soak-req-{suffix}", "results_topic": f"soak-res-{suffix}",
                  "alerts_topic": f"soak-al-{suffix}", "dlq_topic": f"soak-dlq-{suffix}"}  # fmt: skip
        settings = load_settings(kafka={"bootstrap_servers": env_stack["SPACE_KAFKA__BOOTSTRAP_SERVERS"], **topics})
        ensure_topics(settings.kafka, {topics["requests_topic"]: 4, topics["results_topic"]: 4,
                                       topics["alerts_topic"]: 1, topics["dlq_topic"]: 1})  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPACE_")}
        env.update(env_stack)
        env.update({f"SPACE_KAFKA__{k.upper()}": v for k, v in topics.items()})
        env.update({
            "SPACE_KAFKA__GROUP_ID": f"soak-{suffix}", "SPACE_KAFKA__SESSION_TIMEOUT_MS": "6000",
            "SPACE_KAFKA__HEARTBEAT_INTERVAL_MS": "1000", "SPACE_REDIS__KEY_PREFIX": f"soak-{suffix}",
            "SPACE_MODELS__ROOT": str(root), "SPACE_MODELS__PRELOAD": LINE, "SPACE_HTTP__PORT": "0",
            "SPACE_HTTP__HOST": "127.0.0.1", "SPACE_WORKER__STATE_DIR": str(workdir / "state"),
            "SPACE_HEATMAPS__STORE_URI": f"file://{workdir / 'heatmaps'}", "SPACE_HEATMAPS__POLICY": "anomalous",
            "SPACE_LOG__FORMAT": "json", "SPACE_LOG__LEVEL": "WARNING", "PYTHONUNBUFFERED": "1",
        })  # fmt: skip
        with open(workdir / "worker.log", "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "worker", "serve"], env=env, cwd=REPO, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)  # fmt: skip
        rng = np.random.default_rng(0)
        images = [
            cv2.imencode(".png", rng.integers(90, 160, (128, 128, 3), dtype=np.uint8))[1].tobytes() for _ in range(8)
        ]
        producer = KafkaProducer(**settings.kafka.client_kwargs(), acks="all", linger_ms=2)
        sent = 0

        def send(prefix: str) -> None:
            nonlocal sent
            request = InspectionRequest(message_id=f"{prefix}-{sent}", source="soak", time=datetime.now(UTC),
                                        product_line=LINE, camera_id=f"cam-{sent % 8}", content_type="image/png")  # fmt: skip
            producer.send(topics["requests_topic"], key=request.camera_id.encode(), value=images[sent % 8],
                          headers=build_request_headers(request))  # fmt: skip
            sent += 1

        results = _Results(settings.kafka, topics["results_topic"])
        results.start()
        for _ in range(8):
            send("warm")
        producer.flush()
        if not results.wait(8, 180):
            raise RuntimeError(f"the worker answered no warm-up image (log: {workdir / 'worker.log'})")
        t0 = time.monotonic()
        for _ in range(capacity_images):
            send("cap")
        producer.flush()
        if not results.wait(8 + capacity_images, 600):
            raise RuntimeError("capacity backlog not answered")
        capacity = capacity_images / (time.monotonic() - t0)
        rate = capacity * load
        log(f"capacity {capacity:.1f} images/s; soaking at {rate:.1f} images/s ({load:.0%}) for {duration_s:.0f} s")
        report = SoakReport(capacity, rate, duration_s, 0, 0, 0)
        start = time.monotonic()
        next_sample = start
        n = 0
        while (now := time.monotonic()) < start + duration_s:
            due = int((now - start) * rate)
            while n < due:
                send("soak")
                n += 1
            if now >= next_sample:
                rss, fds, threads = _proc_figures(proc.pid)
                s = Sample(round(now - start, 1), round(rss, 1), fds, threads, len(results.ids), sent)
                report.samples.append(s)
                log(f"  t={s.t_s:6.1f}s rss={s.rss_mib:7.1f} MiB files={s.open_files:4d} threads={s.threads:3d} "
                    f"answered={s.answered}/{s.sent}")  # fmt: skip
                next_sample += sample_s
            if proc.poll() is not None:
                raise RuntimeError(f"the worker exited with {proc.returncode} during the soak")
            time.sleep(0.01)
        producer.flush()
        report.sent = sent
        drained = results.wait(sent, 300)
        report.answered = len(results.ids)
        report.duplicates = results.total - len(results.ids)
        producer.close(timeout=5)
        results.stop()
        report.flat, report.verdict = _judge(report.samples)
        lost = sent - report.answered
        ok = report.flat and drained and lost == 0
        report.verdict = f"{'PASS' if ok else 'FAIL'}: {report.verdict}; sent {sent}, answered {report.answered}, " \
                         f"duplicates {report.duplicates}"  # fmt: skip
        report.flat = ok
        log(report.verdict)
        return report
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        if stack is not None:
            stack.down()


def _judge(samples: list[Sample]) -> tuple[bool, str]:
    usable = samples[max(1, len(samples) // 5) :]  # skip warm-up (allocator and caches settle)
    if len(usable) < 4:
        return False, f"too few samples ({len(samples)}) to judge"
    q = max(1, len(usable) // 4)
    first, last = usable[:q], usable[-q:]

    def mean(xs: list[Sample], attr: str) -> float:
        return statistics.fmean(getattr(s, attr) for s in xs)

    rss0, rss1 = mean(first, "rss_mib"), mean(last, "rss_mib")
    fd0, fd1 = mean(first, "open_files"), mean(last, "open_files")
    th0, th1 = mean(first, "threads"), mean(last, "threads")
    flat = rss1 <= rss0 * 1.10 + 32 and fd1 - fd0 <= 8 and th1 - th0 <= 4
    text = (f"RSS {rss0:.0f} -> {rss1:.0f} MiB, open files {fd0:.0f} -> {fd1:.0f}, threads {th0:.0f} -> {th1:.0f} "
            f"({'flat' if flat else 'GROWING'})")  # fmt: skip
    return flat, text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=600.0)
    parser.add_argument("--load", type=float, default=0.8, help="Fraction of the measured capacity.")
    parser.add_argument("--sample-s", type=float, default=10.0)
    parser.add_argument("--capacity-images", type=int, default=120)
    parser.add_argument("--model-root", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    report = run_soak(duration_s=args.duration_s, load=args.load, sample_s=args.sample_s,
                      capacity_images=args.capacity_images, model_root=args.model_root, workdir=args.workdir)  # fmt: skip
    return 0 if report.flat else 1


if __name__ == "__main__":
    raise SystemExit(main())
