"""Log lines stay whole when threads log at once (a log shipper drops a line holding two JSON objects)."""

from __future__ import annotations

import io
import json
import logging
import sys
import threading
import time

import structlog

from worker.logging import configure_logging


class _SlowStream(io.StringIO):
    """A stream that yields the GIL on every write, as a pipe under load does: interleavings show up."""

    def write(self, text: str) -> int:
        time.sleep(0)
        return super().write(text)


def test_concurrent_structlog_and_stdlib_lines_are_never_glued(monkeypatch) -> None:
    stream = _SlowStream()
    monkeypatch.setattr(sys, "stderr", stream)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers.clear()
    try:
        configure_logging("INFO", "json", force=True)
        log = structlog.get_logger("test")
        stdlib = logging.getLogger("kafka.test")
        start = threading.Barrier(4)

        def emit(n: int) -> None:
            start.wait()
            for i in range(200):
                if n == 3:
                    stdlib.warning("reconnect %d", i)
                else:
                    log.info("batch_done", thread=n, i=i, pad="x" * 200)

        threads = [threading.Thread(target=emit, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    lines = stream.getvalue().splitlines()
    assert len(lines) == 800
    events = [json.loads(line) for line in lines]  # library records are JSON lines too
    ours = [e for e in events if e["event"] == "batch_done"]
    library = [e for e in events if e.get("logger") == "kafka.test"]
    assert len(ours) == 600 and len(library) == 200
    assert all(e["level"] == "warning" and e["event"].startswith("reconnect ") and "timestamp" in e for e in library)


def test_a_signal_handler_may_log_while_the_main_thread_is_writing_a_line() -> None:
    """The worker's SIGTERM handler logs on the main thread, which may be inside a log write: no deadlock.

    Run in a child process, so that a deadlock fails the test by timeout instead of hanging it.
    """
    import subprocess
    from pathlib import Path

    script = (
        "import os, signal, structlog, worker.logging as wl\n"
        "wl.configure_logging('INFO', 'json', force=True)\n"
        "signal.signal(signal.SIGUSR1, lambda *a: structlog.get_logger().info('signal_received'))\n"
        "with wl._write_lock:  # the main thread is mid-write when the signal arrives\n"
        "    os.kill(os.getpid(), signal.SIGUSR1)\n"
        "    for _ in range(1000): pass  # the handler runs here, between bytecodes\n"
        "structlog.get_logger().info('after')\n"
    )
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", script], cwd=repo, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["event"] for line in done.stderr.splitlines()] == ["signal_received", "after"]
