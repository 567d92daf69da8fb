"""A small HTTP server: ``/metrics`` (Prometheus), ``/healthz`` (loops progress), ``/readyz``.

``/healthz`` fails when a loop has not reported progress for ``healthy_after_s`` (a stalled poll
loop or a wedged inference thread), so Kubernetes restarts the pod. A loop that is waiting on
something a restart would not fix (a slow model registry, a long model load) says so with
:meth:`Heartbeats.waiting`: it is listed under ``waiting`` and never stale meanwhile. ``/readyz`` is
true once the preloaded models are warm and the worker has joined its consumer group (with or without
partitions), until it begins to stop.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


class Heartbeats:
    """Last progress time of each named loop (monotonic seconds), and what a waiting loop waits on."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._beats: dict[str, float] = {}
        self._waiting: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def beat(self, loop: str) -> None:
        """Record progress of ``loop``."""
        with self._lock:
            self._beats[loop] = self._clock()

    @contextlib.contextmanager
    def waiting(self, loop: str, on: str) -> Iterator[None]:
        """Mark ``loop`` as blocked on ``on``, an outside dependency; it beats when the wait ends.

        Only for waits a restart would not shorten (the object store, a model load): the loop is
        reported by :meth:`waiting_on` instead of going stale, so a slow store cannot crash-loop pods.
        """
        with self._lock:
            self._waiting[loop] = (on, self._clock())
        try:
            yield
        finally:
            with self._lock:
                del self._waiting[loop]
                self._beats[loop] = self._clock()

    def stale(self, max_age_s: float) -> dict[str, float]:
        """Loops whose last beat is older than ``max_age_s`` and that are not waiting (name -> age)."""
        now = self._clock()
        with self._lock:
            return {k: now - v for k, v in self._beats.items() if now - v > max_age_s and k not in self._waiting}

    def waiting_on(self) -> dict[str, dict[str, str | float]]:
        """What each waiting loop waits on and for how long (``{"on": ..., "for_s": ...}``)."""
        now = self._clock()
        with self._lock:
            return {k: {"on": on, "for_s": round(now - since, 3)} for k, (on, since) in self._waiting.items()}

    def ages(self) -> dict[str, float]:
        """Age of every loop's last beat."""
        now = self._clock()
        with self._lock:
            return {k: round(now - v, 3) for k, v in self._beats.items()}


class HealthServer:
    """Serves the three endpoints on a daemon thread."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        heartbeats: Heartbeats,
        healthy_after_s: float,
        readiness: Callable[[], tuple[bool, dict[str, Any]]],
    ) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/metrics":
                    body = generate_latest(registry)
                    self._send(200, body, CONTENT_TYPE_LATEST)
                elif self.path == "/healthz":
                    stale = heartbeats.stale(healthy_after_s)
                    doc = {
                        "ok": not stale,
                        "stale_loops": stale,
                        "loops": heartbeats.ages(),
                        "waiting": heartbeats.waiting_on(),
                    }
                    self._send(200 if not stale else 503, json.dumps(doc).encode(), "application/json")
                elif self.path == "/readyz":
                    ready, detail = readiness()
                    self._send(
                        200 if ready else 503, json.dumps({"ready": ready, **detail}).encode(), "application/json"
                    )
                else:
                    self._send(404, b"not found\n", "text/plain")

            def _send(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return  # probes every few seconds would flood the logs

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)
        outer.port = int(self._server.server_address[1])

    port: int

    def start(self) -> None:
        """Start serving."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()
