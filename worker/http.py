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
import socket
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


#: Seconds a connection may take to send its request (a client that never finishes holds a thread).
REQUEST_TIMEOUT_S = 5.0
#: Connections served at once; more are closed at once (probes and scrapes need a handful).
MAX_CONNECTIONS = 128


class _ProbeServer(ThreadingHTTPServer):
    """A thread per connection, at most :data:`MAX_CONNECTIONS` of them; IPv6 hosts serve IPv4 too."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        # "::" (IPv6 or dual-stack clusters, where the kubelet probes the pod's IPv6 address) needs an
        # AF_INET6 socket; AF_INET refused it ("Address family for hostname not supported").
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, handler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            with contextlib.suppress(OSError):  # a kernel without IPv4 mapping serves IPv6 only
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # refuse instead of growing threads without bound
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


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
            timeout = REQUEST_TIMEOUT_S  # socket timeout: a client that stops sending is dropped

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

        self._server = _ProbeServer((host, port), Handler)
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
