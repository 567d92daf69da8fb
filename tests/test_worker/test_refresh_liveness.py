"""Liveness of the model-refresh loop: waiting on the registry or a long model load is reported, not stale.

A restart does not make a slow object store or a minute-long ``torch.compile`` warm-up any faster, so
/healthz must not fail for them; the poll, infer and publish loops stay strict.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from tests.test_worker.test_http_and_sender import _get
from tests.test_worker.test_model_manager import FakeClock, FakeLoader, _add
from worker.app import App
from worker.http import HealthServer, Heartbeats
from worker.metrics import WorkerMetrics
from worker.model_manager import ModelManager
from worker.registry import ModelRegistry
from worker.settings import load_settings


def refresh_app(manager: ModelManager, beats: Heartbeats, *, healthy_after_s: float = 30.0) -> App:
    """An App holding only what its refresh loop uses (settings, heartbeats, metrics, models)."""
    settings = load_settings(models={"refresh_interval_s": 0.01}, http={"healthy_after_s": healthy_after_s})
    worker: Any = SimpleNamespace(heartbeats=beats, metrics=WorkerMetrics())
    return App(settings, worker, None, None, None, manager.registry, manager)  # type: ignore[arg-type]


@pytest.fixture
def refresh_loop() -> Iterator[Any]:
    """Starts ``app``'s model-refresh loop in a thread; stops and joins it after the test."""
    started: list[tuple[App, threading.Thread]] = []

    def start(app: App) -> threading.Thread:
        thread = threading.Thread(target=app._refresh_loop, name="model-refresh", daemon=True)
        started.append((app, thread))
        thread.start()
        return thread

    yield start
    for app, thread in started:
        app._stop.set()
        thread.join(10)
        assert not thread.is_alive()


def test_a_waiting_loop_is_reported_but_never_stale() -> None:
    clock = FakeClock()
    beats = Heartbeats(clock)
    beats.beat("poll")
    with beats.waiting("model-refresh", "model registry, line brick"):
        clock.now += 90
        assert beats.stale(30) == {"poll": 90}  # other loops stay strict
        assert beats.waiting_on() == {"model-refresh": {"on": "model registry, line brick", "for_s": 90}}
    assert beats.waiting_on() == {}
    assert beats.ages()["model-refresh"] == 0  # the end of a wait is progress
    clock.now += 31
    assert set(beats.stale(30)) == {"poll", "model-refresh"}


def test_healthz_stays_ok_and_names_what_a_waiting_loop_waits_on() -> None:
    clock = FakeClock()
    beats = Heartbeats(clock)
    server = HealthServer("127.0.0.1", 0, CollectorRegistry(), beats, 30.0, lambda: (True, {}))
    server.start()
    try:
        with beats.waiting("model-refresh", "model load, line brick version v2"):
            clock.now += 120
            code, body = _get(server.port, "/healthz")
        doc = json.loads(body)
        assert code == 200 and doc["ok"] and doc["stale_loops"] == {}
        assert doc["waiting"] == {"model-refresh": {"on": "model load, line brick version v2", "for_s": 120}}
    finally:
        server.stop()


def test_refresh_loop_loading_a_promotion_for_minutes_keeps_liveness(tmp_path: Any, refresh_loop: Any) -> None:
    registry = ModelRegistry(str(tmp_path))
    for version in ("v1", "v2"):
        _add(tmp_path, "brick", version)
    registry.promote("brick", "v1")
    loader = FakeLoader()
    manager = ModelManager(registry, loader, warmup_batch_sizes=())
    manager.get("brick")
    registry.promote("brick", "v2")
    loader.gate = threading.Event()
    loader.started.clear()
    clock = FakeClock()
    beats = Heartbeats(clock)
    beats.beat("model-refresh")  # the previous pass
    beats.beat("poll")
    refresh_loop(refresh_app(manager, beats))
    assert loader.started.wait(5)
    clock.now += 120  # e.g. torch.compile of the new version on a CPU node
    assert beats.stale(30) == {"poll": 120}  # only the strict loop that really stalled
    assert beats.waiting_on() == {"model-refresh": {"on": "model load, line brick version v2", "for_s": 120}}
    loader.gate.set()
    deadline = time.monotonic() + 5
    while manager.loaded()["brick"].version != "v2":
        assert time.monotonic() < deadline, "v2 never swapped in"
        time.sleep(0.01)
    assert "model-refresh" not in beats.stale(30)


def test_refresh_reports_each_registry_read_as_waiting(tmp_path: Any) -> None:
    registry = ModelRegistry(str(tmp_path))
    for line in ("brick", "tile"):
        _add(tmp_path, line, "v1")
        registry.promote(line, "v1")
    manager = ModelManager(registry, FakeLoader(), warmup_batch_sizes=())
    manager.get("brick")
    manager.get("tile")
    waits: list[str] = []

    class Recorder:
        def __init__(self, on: str) -> None:
            self.on = on

        def __enter__(self) -> None:
            waits.append(self.on)

        def __exit__(self, *exc: object) -> None:
            return None

    assert manager.refresh(waiting=Recorder) == []
    assert [w for w in waits if w.startswith("model registry")] == [
        "model registry, line brick",
        "model registry, line tile",
    ]


def test_a_refresh_interval_longer_than_the_liveness_window_keeps_the_loop_fresh(
    tmp_path: Any, refresh_loop: Any
) -> None:
    # The loop beat once per pass: with SPACE_MODELS__REFRESH_INTERVAL_S=60 its last beat was older than
    # /healthz's 30 s for half of every minute, and liveness restarted every pod about once a minute.
    registry = ModelRegistry(str(tmp_path))
    manager = ModelManager(registry, FakeLoader(), warmup_batch_sizes=())
    beats = Heartbeats()
    app = refresh_app(manager, beats)
    app.settings = load_settings(models={"refresh_interval_s": 60.0}, http={"healthy_after_s": 1.0})
    beats.beat("model-refresh")
    refresh_loop(app)
    time.sleep(2.5)
    assert beats.stale(1.5) == {}
    assert beats.ages()["model-refresh"] < 1.5
