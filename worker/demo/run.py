"""``space demo``: the whole job end to end on the embedded stack, from training to a report.

Steps, each timed:

1. start the embedded stack (Tansu broker + Redis, :class:`worker.stack.Stack`) in ``<out>/stack`` and
   create the four topics;
2. build each product line from bundled CC0 images with drawn defects (MVTec layout) and train a small
   model per line into the registry ``<out>/registry``;
3. calibrate: score the validation normals (never trained on) and take the threshold at the target
   false-positive rate (:func:`models.metrics.quantile_threshold`, method ``quantile``; the drawn test
   defects give the expected recall), write it to Redis with the model version, promote the version;
4. start a real worker (``space serve`` in a subprocess, configured only through ``SPACE_*``
   variables, as in production) and wait for ``/readyz``;
5. stream a shuffled mix of fresh good and defective renders through Kafka at a steady rate, read the
   results (and dead letters) back live and draw a table per line;
6. stop the worker (SIGTERM: drain and commit), print the summary, write the report folder.

The stack and the worker are stopped at the end, on errors and on Ctrl-C, SIGTERM or SIGHUP (terminal
closed), unless ``keep_stack`` is set (the worker is stopped even then). The worker's pid is kept in
``<out>/worker.pid``: a worker an earlier run left behind (the demo was SIGKILLed) is stopped at the
start of the next run. A stack kept by an earlier run in the same folder is replaced, so every run
starts with empty topics.

The run fails (:attr:`DemoResult.ok` false, ``space demo`` exits 1) when an image got no result, when
one was dead-lettered (the demo only sends valid images, so a dead letter is a fault) or when the
worker did not exit cleanly.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import structlog

from worker.demo.live import LineStats, LiveTable, Received, SentImage, percentile_ms, summary_table
from worker.demo.report import write_report
from worker.errors import SpaceError

__all__ = ["DemoConfig", "DemoError", "DemoResult", "run_demo"]

log = structlog.get_logger(__name__)

DEFAULT_LINES = ("brick", "grass")
WORKER_READY_TIMEOUT_S = 240.0
WORKER_STOP_TIMEOUT_S = 40.0
REQUEST_PARTITIONS = 4


class DemoError(SpaceError):
    """The demo cannot run or did not finish; the message says why and where the logs are."""


@dataclass(frozen=True)
class DemoConfig:
    """Everything one demo run needs (the ``space demo`` flags).

    Attributes:
        lines: Product lines from :data:`models.synthetic.PRODUCT_LINES` (at least one).
        steps: Training steps per line.
        images: Images streamed per line (fresh renders, never the training images).
        rate_hz: Images per second sent to Kafka, all lines together.
        out: Demo folder (stack state, data, registry, heatmaps, logs, report).
        size: Image side and model input side in pixels (multiple of 32, >= 128).
        keep_stack: Leave the broker and Redis running at the end.
        seed: Base seed of every render and of training.
        defect_fraction: Share of defective images in the stream.
        target_fpr: False-positive rate the thresholds aim for on good parts.
        n_train: Good training images per line.
        n_validation: Good validation images per line (never trained on): the model's map
            normalisation and the threshold's false-positive rate are measured on them.
        n_test_defect: Defective images per line scored at calibration to report the recall.
        samples_per_line: Images per line shown in the report.
        drain_timeout_s: How long to wait for the last results after the last send.
        progress: Show training progress lines.
    """

    lines: tuple[str, ...] = DEFAULT_LINES
    steps: int = 200
    images: int = 60
    rate_hz: float = 5.0
    out: Path = Path(".space/demo")
    size: int = 128
    keep_stack: bool = False
    seed: int = 0
    defect_fraction: float = 0.4
    target_fpr: float = 0.02
    n_train: int = 30
    n_validation: int = 50
    n_test_defect: int = 20
    samples_per_line: int = 12
    drain_timeout_s: float = 120.0
    progress: bool = True

    def check(self) -> None:
        """Raise :class:`DemoError` for values that cannot work."""
        from models.synthetic import PRODUCT_LINES

        unknown = [line for line in self.lines if line not in PRODUCT_LINES]
        if not self.lines or unknown or len(set(self.lines)) != len(self.lines):
            raise DemoError(
                f"--lines must name distinct lines from {', '.join(sorted(PRODUCT_LINES))}, "
                f"got {','.join(self.lines) or 'none'}"
            )
        if self.steps < 1 or self.images < 2 or self.rate_hz <= 0:
            raise DemoError("--steps must be >= 1, --images >= 2 and --rate > 0")
        if self.size < 128 or self.size % 32:
            raise DemoError(f"--size must be a multiple of 32 and >= 128, got {self.size}")
        if not 0 <= self.target_fpr < 1:
            raise DemoError(f"--target-fpr must be in [0, 1), got {self.target_fpr:g}")
        if not 0 < self.defect_fraction < 1:
            raise DemoError(f"defect_fraction must be in (0, 1), got {self.defect_fraction:g}")


@dataclass
class DemoResult:
    """What a finished run produced."""

    report: Path
    metrics: dict[str, Any]
    summary: str
    stats: dict[str, LineStats] = field(repr=False)

    @property
    def problems(self) -> list[str]:
        """Why the run failed (empty when it succeeded): unanswered images, dead letters, a worker exit code."""
        return demo_problems(self.metrics)

    @property
    def ok(self) -> bool:
        """Every image got a result, none was dead-lettered and the worker exited with code 0."""
        return not self.problems


def demo_problems(metrics: dict[str, Any]) -> list[str]:
    """The reasons a run with these metrics failed; the demo sends only valid images, so any dead letter is one."""
    problems = []
    if metrics.get("unanswered"):
        problems.append(f"{metrics['unanswered']} images got no result")
    if metrics.get("dead_letters"):
        problems.append(f"{len(metrics['dead_letters'])} images were dead-lettered")
    code = metrics.get("worker_exit_code")
    if code != 0:
        problems.append(f"the worker exited with code {code}")
    return problems


@dataclass(frozen=True)
class _Trained:
    line: str
    version: str
    artifact: Path
    train_s: float
    threshold: dict[str, Any]


# ------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------
def _say(stream: TextIO, text: str) -> None:
    stream.write(text + "\n")
    stream.flush()


#: Signals that stop the demo like Ctrl-C: ``kill`` and a closed terminal or dropped ssh session.
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into KeyboardInterrupt (like Ctrl-C) so ``finally`` blocks stop what we started."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handle) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _line_rng(seed: int, purpose: int, index: int) -> np.random.Generator:
    # Purposes differ from models.synthetic's own streams, so nothing here repeats a training image.
    return np.random.default_rng(np.random.SeedSequence([seed, 0x5EED, purpose, index]))


def _write_png(path: Path, rgb: np.ndarray) -> None:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 image
        raise DemoError(f"cannot encode {path}")
    path.write_bytes(buf.tobytes())


# ------------------------------------------------------------------------------------------------
# training and calibration
# ------------------------------------------------------------------------------------------------
class _PrefixedLines:
    """A text stream that prefixes every line (training progress of parallel lines stays readable)."""

    def __init__(self, prefix: str, target: TextIO) -> None:
        self._prefix = prefix
        self._target = target
        self._buffer = ""

    def write(self, text: str) -> int:
        self._buffer += text.replace("\r", "\n")
        while "\n" in self._buffer:
            line, self._buffer = self._buffer.split("\n", 1)
            if line:
                self._target.write(f"{self._prefix}{line}\n")
        self._target.flush()
        return len(text)

    def flush(self) -> None:
        self._target.flush()

    def isatty(self) -> bool:
        return False


def _train_line(cfg: DemoConfig, line: str, dirs: dict[str, Path], version: str, threads: int) -> _Trained:
    """Build the line's dataset, train its model, calibrate the threshold on the validation normals.

    Runs in a training process of its own (see :func:`_train_all`); progress goes to stderr.
    """
    import torch

    from models.data import load_image, scan_dataset
    from models.detector import Detector
    from models.synthetic import build_product_line
    from models.train import TrainConfig, train
    from worker.logging import configure_logging
    from worker.malloc import configure_malloc

    configure_malloc("retain")  # this process only trains: keep freed activations (1.1-1.2x per step on CPU)
    configure_logging("WARNING", "json")
    torch.set_num_threads(threads)
    sys.stderr = _PrefixedLines(f"  [{line}] ", sys.__stderr__ or sys.stderr)  # type: ignore[assignment]
    data = build_product_line(
        line, dirs["data"], n_train=cfg.n_train, n_val=cfg.n_validation, n_test_good=0,
        n_test_defect=cfg.n_test_defect, size=cfg.size, seed=cfg.seed,
    )  # fmt: skip
    t0 = time.monotonic()
    artifact = train(
        TrainConfig.model_validate(
            {
                "data": data, "product_line": line, "out": dirs["registry"], "steps": cfg.steps,
                "input_size": cfg.size, "seed": cfg.seed, "model_version": version, "name": f"{line}-demo",
                "progress": cfg.progress, "device": "cpu",
            }
        )
    )  # fmt: skip
    train_s = time.monotonic() - t0
    detector = Detector.load(artifact, device="cpu")
    index = scan_dataset(data)
    normal = _scores(detector, [load_image(p) for p in index.validation_good])
    defect = _scores(detector, [load_image(s.path) for s in index.test if s.is_anomalous])
    return _Trained(line, version, artifact, train_s, calibrate_quantile(normal, defect, cfg.target_fpr, version))


def _scores(detector: Any, images: list[np.ndarray], batch_size: int = 16) -> np.ndarray:
    chunks = [detector.predict(images[i : i + batch_size]).scores for i in range(0, len(images), batch_size)]
    return np.concatenate(chunks).astype(np.float64) if chunks else np.zeros(0, np.float64)


def calibrate_quantile(normal: np.ndarray, defect: np.ndarray, target_fpr: float, model_version: str) -> dict[str, Any]:
    """The threshold that flags at most ``target_fpr`` of the validation normals, with its rates.

    Method ``quantile`` of the threshold store (:func:`models.metrics.quantile_threshold`); the recall
    on the drawn test defects is reported, not optimised.

    Returns:
        ``value``, ``method``, ``target_fpr``, ``n_normal``, ``n_defect``, ``calibration_fpr``,
        ``calibration_recall``, ``model_version``, ``summary`` and ``note`` (for the Redis history).
    """
    from models.metrics import quantile_threshold

    value = quantile_threshold(normal, target_fpr)
    fpr = float(np.mean(normal >= value))
    recall = float(np.mean(defect >= value)) if defect.size else None
    summary = f"threshold {value:.4g} at target FPR {target_fpr:g}: FPR {fpr:.1%} on {normal.size} validation normals"
    if recall is not None:
        summary += f", recall {recall:.1%} on {defect.size} drawn defects"
    return {
        "value": value, "method": "quantile", "target_fpr": target_fpr, "n_normal": int(normal.size),
        "n_defect": int(defect.size), "calibration_fpr": fpr, "calibration_recall": recall,
        "model_version": model_version, "summary": summary, "note": f"space demo: {summary}"[:1000],
    }  # fmt: skip


def _train_all(cfg: DemoConfig, dirs: dict[str, Path], version: str, out: TextIO) -> dict[str, _Trained]:
    """Train every line, in parallel processes of one torch thread each where cores allow.

    One thread per process wastes no time in thread synchronisation, which dominates small 128 px
    steps on a busy machine; the lines are independent, so they share the cores instead.
    """
    cores = os.cpu_count() or 1
    n_proc = max(1, min(len(cfg.lines), cores))
    threads = max(1, cores // n_proc)
    _say(
        out,
        f"training {len(cfg.lines)} lines ({', '.join(cfg.lines)}): {cfg.n_train} good images each, "
        f"{cfg.steps} steps, {cfg.size} px, {n_proc} process(es) x {threads} thread(s)",
    )
    pool = multiprocessing.get_context("spawn").Pool(processes=n_proc)
    try:
        pending = {line: pool.apply_async(_train_line, (cfg, line, dirs, version, threads)) for line in cfg.lines}
        trained: dict[str, _Trained] = {}
        while pending:
            for line, job in list(pending.items()):
                if job.ready():
                    tr = trained[line] = job.get()
                    del pending[line]
                    _say(out, f"  {line}: trained in {tr.train_s:.0f} s; {tr.threshold['summary']}")
            time.sleep(0.2)
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
    return {line: trained[line] for line in cfg.lines}


# ------------------------------------------------------------------------------------------------
# worker subprocess
# ------------------------------------------------------------------------------------------------
@dataclass
class _WorkerProcess:
    proc: subprocess.Popen[bytes]
    port: int
    log_file: Path

    def tail(self, chars: int = 1500) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        url = f"http://127.0.0.1:{self.port}/readyz"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DemoError(
                    f"the worker exited with code {self.proc.returncode} (log {self.log_file}):\n{self.tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=1.0) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        raise DemoError(f"the worker was not ready within {timeout_s:.0f} s (log {self.log_file}):\n{self.tail()}")

    def stop(self, timeout_s: float = WORKER_STOP_TIMEOUT_S) -> int | None:
        """SIGTERM (graceful drain), then SIGKILL after ``timeout_s``; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def _is_demo_worker(pid: int) -> bool:
    """Whether ``pid`` runs ``python -m worker serve`` (a pid file may name a reused pid)."""
    from worker.stack import proc_args

    args = proc_args(pid)
    return "worker" in args and "serve" in args


def _stop_leftover_worker(pid_file: Path, timeout_s: float = WORKER_STOP_TIMEOUT_S) -> int | None:
    """Stop the worker an earlier run recorded in ``pid_file`` if it still runs; returns its pid if it did.

    The pid is only signalled when it still runs ``worker serve``, so a reused pid is left alone.
    """
    from worker.stack import terminate_process

    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        pid_file.unlink(missing_ok=True)
        return None
    stopped = None
    if pid > 0 and _is_demo_worker(pid):
        stopped = pid
        log.warning("demo_stopping_leftover_worker", pid=pid, pid_file=str(pid_file))
        terminate_process(pid, timeout_s, still=_is_demo_worker)
    pid_file.unlink(missing_ok=True)
    return stopped


def _start_worker(env_overrides: dict[str, str], log_file: Path) -> _WorkerProcess:
    from worker.stack import free_port

    port = free_port()
    env = {**os.environ, **env_overrides, "SPACE_HTTP__PORT": str(port), "SPACE_HTTP__HOST": "127.0.0.1"}
    with open(log_file, "ab") as fh:
        # A new session keeps Ctrl-C away from the worker: the demo stops it with SIGTERM (a drain).
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "serve"], env=env, stdout=fh, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    return _WorkerProcess(proc, port, log_file)


# ------------------------------------------------------------------------------------------------
# the stream
# ------------------------------------------------------------------------------------------------
def _render_stream(cfg: DemoConfig, stream_dir: Path) -> list[tuple[str, str | None, Path]]:
    """Fresh renders for every line, shuffled: (line, defect kind or None, png path)."""
    from models.synthetic import PRODUCT_LINES, render_defect_image, render_good_image

    items: list[tuple[str, str | None, Path]] = []
    for index, line in enumerate(cfg.lines):
        kinds = PRODUCT_LINES[line].defects
        n_defect = max(1, round(cfg.images * cfg.defect_fraction))
        for i in range(cfg.images):
            rng = _line_rng(cfg.seed, 2, index * 100_000 + i)
            kind = kinds[i % len(kinds)] if i < n_defect else None
            if kind is not None:
                image, _mask = render_defect_image(line, kind, rng, size=cfg.size)
            else:
                image = render_good_image(line, rng, size=cfg.size)
            path = stream_dir / line / f"{i:04d}-{kind or 'good'}.png"
            _write_png(path, image)
            items.append((line, kind, path))
    order = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0x5EED, 3])).permutation(len(items))
    return [items[i] for i in order]


class _Sender(threading.Thread):
    """Publishes the stream at a steady rate from its own thread (the main thread reads results)."""

    def __init__(self, producer: Any, topic: str, items: list[tuple[str, str | None, Path]], rate_hz: float) -> None:
        super().__init__(name="demo-sender", daemon=True)
        self.producer = producer
        self.topic = topic
        self.items = items
        self.rate_hz = rate_hz
        self.sent: dict[str, SentImage] = {}
        self.lock = threading.Lock()
        self.error: BaseException | None = None
        self.stop_event = threading.Event()

    def run(self) -> None:
        from schemas.request import build_request_headers
        from worker.sender import build_request, paced

        try:
            for line, kind, path in paced(self.items, self.rate_hz):
                if self.stop_event.is_set():
                    return
                camera = f"{line}-cam-1"
                request, value = build_request(data=path.read_bytes(), path=path, product_line=line, camera_id=camera)
                sent = SentImage(request.message_id, line, kind, path, time.monotonic())
                with self.lock:
                    self.sent[request.message_id] = sent
                self.producer.send(self.topic, key=camera.encode(), value=value, headers=build_request_headers(request))
            self.producer.flush(timeout=30)
        except BaseException as exc:  # noqa: BLE001 - reported to the main thread, which raises it
            self.error = exc

    def snapshot(self) -> dict[str, SentImage]:
        with self.lock:
            return dict(self.sent)


def _collect(
    consumer: Any,
    sender: _Sender,
    stats: dict[str, LineStats],
    table: LiveTable,
    *,
    total: int,
    dlq_topic: str,
    drain_timeout_s: float,
    worker: _WorkerProcess | None = None,
) -> tuple[list[Received], list[dict[str, Any]]]:
    """Read results and dead letters until every sent image is answered (or the drain times out).

    Raises:
        DemoError: Sending failed, or the worker exited (nothing more can come back).
    """
    from schemas import header_text
    from schemas.result import InspectionResult

    received: list[Received] = []
    dead: list[dict[str, Any]] = []
    answered: set[str] = set()
    counted_sent = 0
    done_at: float | None = None
    while True:
        if sender.error is not None:
            raise DemoError(f"sending failed: {sender.error!r}")
        if worker is not None and worker.proc.poll() is not None:
            raise DemoError(
                f"the worker exited with code {worker.proc.returncode} while images were streaming "
                f"({len(answered)} of {total} answered; log {worker.log_file}):\n{worker.tail()}"
            )
        batches = consumer.poll(timeout_ms=100)
        now = time.monotonic()
        sent = sender.snapshot()
        if len(sent) > counted_sent:
            for new in list(sent.values())[counted_sent:]:
                stats[new.line].record_sent(new.sent_at)
            counted_sent = len(sent)
        for tp, records in batches.items():
            for rec in records:
                if tp.topic == dlq_topic:
                    lost = sent.get(header_text(rec.headers, "ce_id") or "")
                    if lost is not None and lost.message_id not in answered:
                        answered.add(lost.message_id)
                        stats[lost.line].dead_letters += 1
                        reason = header_text(rec.headers, "error-reason")
                        dead.append({"message_id": lost.message_id, "line": lost.line, "reason": reason})
                    continue
                result = InspectionResult.model_validate_json(rec.value)
                item = sent.get(result.message_id)
                if item is None or result.message_id in answered:
                    continue  # a redelivered duplicate (at-least-once) or a stranger's record
                answered.add(result.message_id)
                r = Received(
                    sent=item, score=result.score, verdict=result.verdict, threshold=result.threshold.value,
                    threshold_version=result.threshold.version, threshold_source=result.threshold.source,
                    model_version=result.model.version, heatmap_uri=result.heatmap.uri if result.heatmap else None,
                    latency_ms=(now - item.sent_at) * 1000, worker_ms=result.timings.total_ms,
                    batch_size=result.batch_size, received_at=now,
                )  # fmt: skip
                received.append(r)
                stats[item.line].results.append(r)
        table.update(stats)
        if len(answered) >= total:
            break
        if not sender.is_alive():
            done_at = done_at or now
            if now - done_at > drain_timeout_s:
                log.warning("demo_drain_timeout", answered=len(answered), total=total)
                break
    table.update(stats, force=True)
    return received, dead


# ------------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------------
def _metrics(
    cfg: DemoConfig, stats: dict[str, LineStats], trained: dict[str, _Trained], thresholds: dict[str, dict[str, Any]],
    timings: dict[str, float], dead: list[dict[str, Any]], started_at: datetime, duration_s: float, sent: int,
) -> dict[str, Any]:  # fmt: skip
    lines: dict[str, Any] = {}
    for line, s in stats.items():
        c = s.counts()
        worker_ms = [r.worker_ms for r in s.results]
        lines[line] = {
            "images": len(s.results),
            "sent": s.sent,
            "dead_letters": s.dead_letters,
            "tp": c["TP"], "fp": c["FP"], "tn": c["TN"], "fn": c["FN"],
            "auroc": s.auroc(),
            "flagged": s.flagged,
            "threshold": thresholds[line],
            "threshold_sources": sorted({r.threshold_source for r in s.results}),
            "model_version": trained[line].version,
            "train_s": round(trained[line].train_s, 2),
            "throughput_ips": round(s.mean_throughput(), 3),
            "latency_ms": {"p50": percentile_ms(s.latencies(), 50), "p99": percentile_ms(s.latencies(), 99)},
            "worker_total_ms": {"p50": percentile_ms(worker_ms, 50), "p99": percentile_ms(worker_ms, 99)},
            "mean_batch_size": float(np.mean([r.batch_size for r in s.results])) if s.results else None,
        }  # fmt: skip
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    config["lines"] = list(cfg.lines)
    return {
        "schema_version": 1,
        "started_at": started_at.isoformat(),
        "duration_s": round(duration_s, 2),
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "config": config,
        "images_streamed": sent,
        "dead_letters": dead,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "lines": lines,
    }


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------
def run_demo(cfg: DemoConfig, *, out: TextIO | None = None, clock: Callable[[], float] = time.monotonic) -> DemoResult:
    """Run the demo end to end; see the module docstring for the steps.

    Args:
        cfg: The run's options.
        out: Where progress, the live table and the summary go (default stdout).
        clock: Monotonic seconds for the phase timings.

    Returns:
        The report path, the metrics (also in ``metrics.json``) and the summary table.

    Raises:
        DemoError: A step failed; the message names the log to read.
        KeyboardInterrupt: Ctrl-C or SIGTERM (after everything started was stopped).
    """
    cfg.check()
    stream = out or sys.stdout
    started_at = datetime.now(UTC)
    t_start = clock()
    timings: dict[str, float] = {}
    root = Path(cfg.out).resolve()
    dirs = {name: root / name for name in ("stack", "data", "registry", "heatmaps", "stream", "report", "worker-state")}
    for name in ("registry", "heatmaps", "stream", "worker-state"):
        if dirs[name].exists():
            shutil.rmtree(dirs[name])
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    pid_file = root / "worker.pid"
    leftover = _stop_leftover_worker(pid_file)
    if leftover is not None:
        _say(stream, f"stopped worker {leftover} left running by an earlier run ({pid_file})")

    from worker.settings import load_settings, redact_url
    from worker.stack import Stack

    base = load_settings()
    stack = Stack(dirs["stack"], redis_url=base.redis.url)
    worker: _WorkerProcess | None = None
    run_id = uuid.uuid4().hex[:8]
    key_prefix = f"space-demo-{run_id}"
    env: dict[str, str] = {}
    with _sigterm_as_interrupt():
        try:
            if stack.status():  # a stack kept by an earlier run: start with empty topics
                _say(stream, f"stopping the stack an earlier --keep-stack run left running ({dirs['stack']})")
                stack.down()
            stack.up()
            env = stack.env()
            _say(
                stream,
                f"stack up: kafka {env['SPACE_KAFKA__BOOTSTRAP_SERVERS']}, redis {redact_url(env['SPACE_REDIS__URL'])} "
                f"(state {dirs['stack']})",
            )
            settings = load_settings(
                kafka={"bootstrap_servers": env["SPACE_KAFKA__BOOTSTRAP_SERVERS"]},
                redis={"url": env["SPACE_REDIS__URL"], "key_prefix": key_prefix},
            )
            from worker.kafka_clients import ensure_topics, worker_topics

            ensure_topics(settings.kafka, worker_topics(settings.kafka, REQUEST_PARTITIONS))
            timings["stack"] = clock() - t_start

            # -- train, calibrate, publish thresholds, promote ------------------------------------
            t = clock()
            version = f"demo-{started_at:%Y%m%d-%H%M%S}"
            trained = _train_all(cfg, dirs, version, stream)
            timings["train_and_calibrate"] = clock() - t
            from worker.redis_client import make_redis
            from worker.registry import ModelRegistry
            from worker.thresholds import ThresholdStore

            redis_client = make_redis(settings.redis)
            thresholds: dict[str, dict[str, Any]] = {}
            try:
                store = ThresholdStore(redis_client, key_prefix, settings.thresholds.history_max)
                registry = ModelRegistry(str(dirs["registry"]))
                for line, tr in trained.items():
                    record = store.set(
                        line, tr.threshold["value"], model_version=tr.version, method="quantile",
                        updated_by="space-demo", note=tr.threshold["note"],
                    )  # fmt: skip
                    thresholds[line] = {**tr.threshold, "version": record.version, "redis_key": store.key(line)}
                    registry.promote(line, tr.version, by="space-demo")
            finally:
                redis_client.close()

            # -- worker ------------------------------------------------------------------------------
            t = clock()
            worker_env = {
                **env,
                "SPACE_REDIS__KEY_PREFIX": key_prefix,
                "SPACE_KAFKA__GROUP_ID": f"space-demo-{run_id}",
                "SPACE_KAFKA__SESSION_TIMEOUT_MS": "6000",
                "SPACE_KAFKA__HEARTBEAT_INTERVAL_MS": "1000",
                "SPACE_MODELS__ROOT": str(dirs["registry"]),
                "SPACE_MODELS__PRELOAD": ",".join(cfg.lines),
                "SPACE_HEATMAPS__STORE_URI": f"file://{dirs['heatmaps']}",
                "SPACE_WORKER__STATE_DIR": str(dirs["worker-state"]),
                "SPACE_WORKER__ID": f"demo-worker-{run_id}",
                "SPACE_LOG__FORMAT": "json",
            }
            _say(stream, "starting the worker: space serve (log: " + str(root / "worker.log") + ")")
            worker = _start_worker(worker_env, root / "worker.log")
            pid_file.write_text(f"{worker.proc.pid}\n")
            worker.wait_ready(WORKER_READY_TIMEOUT_S)
            timings["worker_ready"] = clock() - t
            _say(stream, f"worker ready in {timings['worker_ready']:.1f} s (http://127.0.0.1:{worker.port}/metrics)")

            # -- stream ------------------------------------------------------------------------------
            items = _render_stream(cfg, dirs["stream"])
            n_total = len(items)
            _say(
                stream,
                f"streaming {n_total} fresh images ({cfg.images} per line, "
                f"{cfg.defect_fraction:.0%} defective) at {cfg.rate_hz:g}/s",
            )
            from kafka import TopicPartition

            from worker.kafka_clients import make_consumer, make_producer

            producer = make_producer(settings.kafka, client_id="space-demo-camera")
            consumer = make_consumer(settings.kafka, client_id="space-demo-monitor", group_id=None)
            t = clock()
            sender = _Sender(producer, settings.kafka.requests_topic, items, cfg.rate_hz)
            try:
                k = settings.kafka
                consumer.assign(
                    [TopicPartition(k.results_topic, p) for p in range(REQUEST_PARTITIONS)]
                    + [TopicPartition(k.dlq_topic, 0)]
                )
                stats = {line: LineStats(line) for line in cfg.lines}
                table = LiveTable(cfg.lines, stream)
                sender.start()
                received, dead = _collect(
                    consumer,
                    sender,
                    stats,
                    table,
                    total=n_total,
                    dlq_topic=k.dlq_topic,
                    drain_timeout_s=cfg.drain_timeout_s,
                    worker=worker,
                )
            finally:
                sender.stop_event.set()
                sender.join(10)
                producer.close(timeout=10)
                consumer.close()
            timings["stream"] = clock() - t
            code = worker.stop()
            worker = None
            pid_file.unlink(missing_ok=True)
            if code != 0:
                _say(stream, f"warning: the worker exited with code {code} (log {root / 'worker.log'})")

            # -- summary and report ------------------------------------------------------------------
            missing = n_total - len(received) - len(dead)
            duration_s = clock() - t_start
            metrics = _metrics(cfg, stats, trained, thresholds, timings, dead, started_at, duration_s, n_total)
            metrics["unanswered"] = missing
            metrics["worker_exit_code"] = code
            summary = summary_table(stats, thresholds)
            _say(stream, "\n" + summary)
            if missing:
                _say(stream, f"warning: {missing} images got no result within {cfg.drain_timeout_s:.0f} s")
            if dead:
                reasons = sorted({str(d["reason"]) for d in dead})
                _say(
                    stream,
                    f"warning: {len(dead)} images were dead-lettered ({', '.join(reasons)}; log {root / 'worker.log'})",
                )
            results_by_line = {line: stats[line].results for line in cfg.lines}
            index = write_report(dirs["report"], results_by_line, metrics, samples_per_line=cfg.samples_per_line)
            _say(stream, f"\ndemo finished in {clock() - t_start:.0f} s; report: {index}")
            return DemoResult(index, metrics, summary, stats)
        finally:
            if worker is not None:
                worker.stop(timeout_s=15)
                pid_file.unlink(missing_ok=True)
            if cfg.keep_stack and env:
                _say(stream, "stack kept running; to use it, with the demo's models, thresholds and consumer group:")
                kept = {
                    **env,
                    "SPACE_REDIS__KEY_PREFIX": key_prefix,
                    "SPACE_KAFKA__GROUP_ID": f"space-demo-{run_id}",
                    "SPACE_MODELS__ROOT": str(dirs["registry"]),
                    "SPACE_HEATMAPS__STORE_URI": f"file://{dirs['heatmaps']}",
                }
                for key, value in kept.items():
                    shown = redact_url(value) if key == "SPACE_REDIS__URL" else value
                    _say(stream, f"  export {key}={shown}")
                line = cfg.lines[0]
                _say(stream, "then: space serve (a worker; it starts after the demo's images),")
                _say(stream, f"  space thresholds set {line} VALUE,")
                _say(stream, f"  space send --dir {dirs['stream'] / line} --product-line {line} --limit 5;")
                _say(stream, "each result's verdict and threshold: the worker's batch_done lines, inspection.results")
                _say(stream, f"stop it with: space stack --state-dir {dirs['stack']} down")
            else:
                _cleanup_redis(env, key_prefix)
                stack.down()


def _cleanup_redis(env: dict[str, str], key_prefix: str) -> None:
    """Delete the run's keys from a Redis the stack adopted (one it started goes away with it)."""
    url = env.get("SPACE_REDIS__URL")
    if not url:
        return
    import redis

    with contextlib.suppress(redis.exceptions.RedisError, OSError):
        client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        try:
            keys = list(client.scan_iter(match=f"{key_prefix}:*", count=500))
            if keys:
                client.delete(*keys)
        finally:
            client.close()
