"""Health endpoints, heartbeats and the sender's pacing (pure logic plus a loopback HTTP server)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter

from worker.http import HealthServer, Heartbeats
from worker.sender import paced


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_heartbeats_report_stale_loops() -> None:
    clock = FakeClock()
    beats = Heartbeats(clock)
    beats.beat("poll")
    beats.beat("infer")
    clock.now = 10
    beats.beat("poll")
    assert beats.stale(5) == {"infer": 10}
    assert beats.ages() == {"poll": 0, "infer": 10}


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_health_server_endpoints() -> None:
    clock = FakeClock()
    beats = Heartbeats(clock)
    registry = CollectorRegistry()
    Counter("space_test_total", "A test counter.", registry=registry).inc(3)
    ready = {"value": False}
    server = HealthServer("127.0.0.1", 0, registry, beats, 30.0, lambda: (ready["value"], {"joined": ready["value"]}))
    server.start()
    try:
        beats.beat("poll")
        assert _get(server.port, "/healthz")[0] == 200
        clock.now = 31
        code, body = _get(server.port, "/healthz")
        assert code == 503
        assert json.loads(body)["stale_loops"] == {"poll": 31}
        assert _get(server.port, "/readyz")[0] == 503
        ready["value"] = True
        code, body = _get(server.port, "/readyz")
        assert code == 200
        assert json.loads(body) == {"ready": True, "joined": True}
        code, body = _get(server.port, "/metrics")
        assert code == 200
        assert b"space_test_total 3.0" in body
        assert _get(server.port, "/nope")[0] == 404
    finally:
        server.stop()


def test_clients_that_never_finish_a_request_are_dropped_and_bounded(monkeypatch) -> None:
    # ThreadingHTTPServer without a socket timeout kept a thread per idle connection for good: a port
    # scanner could grow threads until the pod could start no more (decode pools, probes).
    import socket
    import threading

    from worker import http

    monkeypatch.setattr(http, "REQUEST_TIMEOUT_S", 0.5)
    monkeypatch.setattr(http, "MAX_CONNECTIONS", 8)
    server = HealthServer("127.0.0.1", 0, CollectorRegistry(), Heartbeats(), 30.0, lambda: (True, {}))
    server.start()
    before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(20)]
    try:
        idle[0].sendall(b"GET /healthz HTTP/1.1\r\n")  # a request that never ends
        time.sleep(0.2)
        assert threading.active_count() - before <= 8  # the rest were closed at once
        time.sleep(0.8)
        assert threading.active_count() <= before + 1  # the held ones timed out
        assert _get(server.port, "/healthz")[0] == 200
    finally:
        for conn in idle:
            conn.close()
        server.stop()


def test_an_ipv6_host_serves_ipv6_and_ipv4() -> None:
    # Binding "::" failed at start ("Address family for hostname not supported"): no probe server on IPv6 clusters.
    import socket

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"no IPv6 here ({exc})")
    server = HealthServer("::", 0, CollectorRegistry(), Heartbeats(), 30.0, lambda: (True, {}))
    server.start()
    try:
        assert _get(server.port, "/readyz")[0] == 200  # IPv4, through the dual-stack socket
        with urllib.request.urlopen(f"http://[::1]:{server.port}/readyz", timeout=5) as resp:
            assert resp.status == 200
    finally:
        server.stop()


def test_paced_sender_keeps_a_fixed_schedule_without_drift() -> None:
    clock = FakeClock()
    sent_at = []
    for _ in paced(range(5), 10.0, clock=clock, sleep=clock.sleep):
        sent_at.append(round(clock.now, 6))
        clock.now += 0.03  # work per item shorter than the 0.1 s period
    assert sent_at == [0.0, 0.1, 0.2, 0.3, 0.4]


def test_send_takes_one_image_file_as_well_as_a_folder(tmp_path) -> None:
    # A newcomer's first try is one image: `space send --dir part.png` said "is not a directory".
    from worker.errors import SpaceError
    from worker.sender import image_files

    (tmp_path / "a").mkdir()
    one, other = tmp_path / "a" / "part.png", tmp_path / "a" / "b.jpg"
    one.write_bytes(b"png")
    other.write_bytes(b"jpg")
    (tmp_path / "notes.txt").write_text("x")
    assert image_files(one) == [one]
    assert image_files(tmp_path) == [other, one]
    with pytest.raises(SpaceError, match="is not an image"):
        image_files(tmp_path / "notes.txt")
    with pytest.raises(SpaceError, match="neither a folder nor an image file"):
        image_files(tmp_path / "missing")
