"""Helpers for the fault-injection tests: worker subprocesses, a results tail, local servers, /proc.

Everything here is bounded: every wait has a deadline, every process started here is stopped by
its own pid, and nothing touches the shared Redis except under the test's own key prefix.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kafka import KafkaConsumer, TopicPartition

from worker.settings import Settings

if TYPE_CHECKING:
    from worker.app import App
from worker.stack import free_port, port_open

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------
# `space serve` as a subprocess
# ------------------------------------------------------------------------------------------------
def serve_env(settings: Settings, model_root: Path | str, *, preload: tuple[str, ...] = ("brick",), **extra: str) -> dict[str, str]:
    """The environment for ``space serve`` equivalent to ``settings`` (the parts the tests vary)."""
    k, r = settings.kafka, settings.redis
    env = {key: value for key, value in os.environ.items() if not key.startswith("SPACE_")}
    env.update(
        {
            "SPACE_KAFKA__BOOTSTRAP_SERVERS": k.bootstrap_servers,
            "SPACE_KAFKA__GROUP_ID": k.group_id,
            "SPACE_KAFKA__REQUESTS_TOPIC": k.requests_topic,
            "SPACE_KAFKA__RESULTS_TOPIC": k.results_topic,
            "SPACE_KAFKA__ALERTS_TOPIC": k.alerts_topic,
            "SPACE_KAFKA__DLQ_TOPIC": k.dlq_topic,
            "SPACE_KAFKA__SESSION_TIMEOUT_MS": str(k.session_timeout_ms),
            "SPACE_KAFKA__HEARTBEAT_INTERVAL_MS": str(k.heartbeat_interval_ms),
            "SPACE_KAFKA__COMMIT_INTERVAL_MS": str(k.commit_interval_ms),
            "SPACE_REDIS__URL": r.url,
            "SPACE_REDIS__KEY_PREFIX": r.key_prefix,
            "SPACE_HEATMAPS__STORE_URI": settings.heatmaps.store_uri,
            "SPACE_HEATMAPS__POLICY": settings.heatmaps.policy,
            "SPACE_BATCHING__MAX_BATCH_SIZE": str(settings.batching.max_batch_size),
            "SPACE_BATCHING__MAX_WAIT_MS": str(settings.batching.max_wait_ms),
            "SPACE_HTTP__PORT": "0",
            "SPACE_HTTP__HOST": "127.0.0.1",
            "SPACE_WORKER__STATE_DIR": str(settings.worker.state_dir),
            "SPACE_MODELS__ROOT": str(model_root),
            "SPACE_MODELS__PRELOAD": ",".join(preload),
            "SPACE_MODELS__DEVICE": "cpu",
            "SPACE_MODELS__THREADS": "1",
            "SPACE_LOG__FORMAT": "json",
            "SPACE_SECRETS_DIR": str(settings.worker.state_dir / "no-secrets"),
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


def spawn_worker(env: dict[str, str], log_file: Path) -> subprocess.Popen[bytes]:
    """Start ``space serve`` (``python -m worker serve``) with its output in ``log_file``."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "worker", "serve"], env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip


def stop_process(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
    """Signal a process we started and wait for it (SIGKILL after ``timeout_s``); returns its code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return int(proc.returncode)


def log_events(log_file: Path) -> list[dict[str, Any]]:
    """The JSON log lines of a worker log file (other lines skipped)."""
    events = []
    for line in log_file.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
    return events


# ------------------------------------------------------------------------------------------------
# Reading a topic while the test runs
# ------------------------------------------------------------------------------------------------
class TopicTail:
    """A background reader of a whole topic (no group, from the beginning) into ``records``."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.settings = settings
        self.topic = topic
        self.records: list[Any] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"tail-{topic}", daemon=True)
        self.error: BaseException | None = None

    def __enter__(self) -> TopicTail:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        consumer = KafkaConsumer(
            **self.settings.kafka.client_kwargs(), group_id=None, enable_auto_commit=False,
            auto_offset_reset="earliest", client_id=f"tail-{uuid.uuid4().hex[:6]}",
        )  # fmt: skip
        try:
            parts = None
            while not parts and not self._stop.is_set():
                parts = consumer.partitions_for_topic(self.topic)
                if not parts:
                    time.sleep(0.1)
            if not parts:
                return
            consumer.assign([TopicPartition(self.topic, p) for p in sorted(parts)])
            consumer.seek_to_beginning()
            while not self._stop.is_set():
                batch = consumer.poll(timeout_ms=100)
                with self._lock:
                    for recs in batch.values():
                        self.records.extend(recs)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            consumer.close()

    def snapshot(self) -> list[Any]:
        with self._lock:
            return list(self.records)

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(r.value) for r in self.snapshot()]

    def wait(self, predicate: Callable[[list[Any]], bool], timeout_s: float, what: str = "condition") -> list[Any]:
        """Wait until ``predicate(records)``; raises TimeoutError with ``what``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            records = self.snapshot()
            if predicate(records):
                return records
            if self.error is not None:
                raise RuntimeError(f"tail of {self.topic} failed: {self.error!r}")
            time.sleep(0.05)
        raise TimeoutError(f"{what} not reached within {timeout_s} s ({len(self.snapshot())} records on {self.topic})")


class InProcessWorker:
    """A built App run on a thread of the test process (``start`` waits for /readyz's condition)."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.rc: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.rc = self.app.run()

    def start(self, timeout_s: float = 60) -> InProcessWorker:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.app.worker.readiness()[0]:
            assert self.thread.is_alive(), f"worker exited early with {self.rc}"
            assert time.monotonic() < deadline, f"not ready: {self.app.worker.readiness()[1]}"
            time.sleep(0.05)
        return self

    def stop(self) -> int | None:
        self.app.stop()
        self.thread.join(60)
        assert not self.thread.is_alive(), "worker did not stop"
        return self.rc



def distinct_ids(records: list[Any]) -> set[str]:
    return {json.loads(r.value)["message_id"] for r in records}


def committed_offsets(settings: Settings, topic: str) -> dict[int, int | None]:
    """The group's committed offset of each partition of ``topic``."""
    consumer = KafkaConsumer(**settings.kafka.client_kwargs(), group_id=settings.kafka.group_id, enable_auto_commit=False)
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        return {p: consumer.committed(TopicPartition(topic, p)) for p in sorted(parts)}
    finally:
        consumer.close()


# ------------------------------------------------------------------------------------------------
# Local servers started by a test (never the shared Redis)
# ------------------------------------------------------------------------------------------------
@dataclass
class LocalServer:
    """A server process this test started, by pid."""

    proc: subprocess.Popen[bytes]
    port: int
    log_file: Path
    extra: dict[str, Any] = field(default_factory=dict)

    def stop(self, sig: int = signal.SIGKILL) -> None:
        stop_process(self.proc, sig, timeout_s=5)


def wait_port(port: int, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if port_open("127.0.0.1", port):
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


def start_redis_server(tmp: Path, *args: str, port: int | None = None, tls: bool = False) -> LocalServer:
    """A private ``redis-server`` on a free loopback port (no persistence)."""
    import shutil

    binary = shutil.which("redis-server")
    if binary is None:
        from worker.stack import redis_server_binary

        binary = str(redis_server_binary())
    port = port or free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    log_file = tmp / f"redis-{port}.log"
    port_args = ["--port", "0", "--tls-port", str(port)] if tls else ["--port", str(port)]
    argv = [binary, *port_args, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp), *args]
    with open(log_file, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    wait_port(port, 10, proc)
    return LocalServer(proc, port, log_file)


def start_moto_server(tmp: Path) -> LocalServer:
    """A moto S3 server on a free loopback port."""
    port = free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    log_file = tmp / f"moto-{port}.log"
    binary = Path(sys.executable).parent / "moto_server"
    argv = [str(binary), "-H", "127.0.0.1", "-p", str(port)]
    with open(log_file, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    wait_port(port, 20, proc)
    return LocalServer(proc, port, log_file)


# ------------------------------------------------------------------------------------------------
# /proc figures of a process
# ------------------------------------------------------------------------------------------------
def rss_bytes(pid: int | None = None) -> int:
    with open(f"/proc/{pid or os.getpid()}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def open_files(pid: int | None = None) -> int:
    return len(os.listdir(f"/proc/{pid or os.getpid()}/fd"))


def thread_count(pid: int | None = None) -> int:
    return len(os.listdir(f"/proc/{pid or os.getpid()}/task"))


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[Callable[[], float]]:
    """Yields a function returning the seconds left (never negative)."""
    end = time.monotonic() + seconds
    yield lambda: max(0.0, end - time.monotonic())
