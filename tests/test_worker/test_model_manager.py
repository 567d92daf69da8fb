"""ModelManager logic with fake detectors on a file registry: lazy load, LRU, hot-swap, failures."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from structlog.testing import capture_logs

from worker.model_manager import DeviceLost, ModelManager, ModelUnavailable
from worker.registry import ModelRegistry


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeDetector:
    """Stands in for models.detector.Detector: a card, and a warmup that can be observed."""

    def __init__(self, path: Path, on_warmup: Any = None) -> None:
        self.path = path
        self.version = path.name
        self.card = SimpleNamespace(name=f"{path.parent.name}-model", default_threshold=0.5, version=path.name)
        self.warmed: list[tuple[int, ...]] = []
        self._on_warmup = on_warmup

    def warmup(self, batch_sizes: tuple[int, ...]) -> None:
        if self._on_warmup is not None:
            self._on_warmup(self)
        self.warmed.append(tuple(batch_sizes))


class FakeLoader:
    """Counts loads per version; versions in ``broken`` raise; ``gate`` (if set) blocks loads."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.broken: set[str] = set()
        self.gate: threading.Event | None = None
        self.started = threading.Event()
        self.on_warmup: Any = None
        self.card_version: str | None = None  # overrides the version the card names
        self._lock = threading.Lock()

    def __call__(self, path: Path) -> FakeDetector:
        with self._lock:
            self.calls.append(f"{path.parent.name}/{path.name}")
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(10), "test gate never opened"
        if path.name in self.broken:
            raise ValueError(f"{path}: sha256 mismatch")
        detector = FakeDetector(path, self.on_warmup)
        if self.card_version is not None:
            detector.card.version = self.card_version
        return detector


def _add(root: Path, line: str, version: str) -> None:
    folder = root / line / version
    folder.mkdir(parents=True)
    (folder / "model.json").write_text("{}")


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    registry = ModelRegistry(str(tmp_path))
    for line in ("brick", "tile", "wood"):
        _add(tmp_path, line, "v1")
        registry.promote(line, "v1")
    _add(tmp_path, "brick", "v2")
    return registry


@pytest.fixture
def loader() -> FakeLoader:
    return FakeLoader()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def loads() -> list[tuple[str, str]]:
    return []


@pytest.fixture
def manager(
    registry: ModelRegistry, loader: FakeLoader, clock: FakeClock, loads: list[tuple[str, str]]
) -> ModelManager:
    return ModelManager(
        registry, loader, max_loaded=2, warmup_batch_sizes=(1, 4), clock=clock,
        on_load=lambda line, outcome: loads.append((line, outcome)), negative_ttl_s=5.0, swap_retry_s=30.0,
    )  # fmt: skip


@pytest.fixture
def threads() -> Iterator[list[threading.Thread]]:
    started: list[threading.Thread] = []
    yield started
    for t in started:
        t.join(10)
        assert not t.is_alive()


def _start(threads: list[threading.Thread], target: Any) -> threading.Thread:
    t = threading.Thread(target=target, daemon=True)
    threads.append(t)
    t.start()
    return t


def test_first_use_loads_and_warms_once_even_under_concurrency(
    manager: ModelManager, loader: FakeLoader, loads: list[tuple[str, str]], threads: list[threading.Thread]
) -> None:
    assert manager.loaded() == {}  # lazy: nothing before first use
    loader.gate = threading.Event()
    got: list[Any] = []
    for _ in range(8):
        _start(threads, lambda: got.append(manager.get("brick")))
    assert loader.started.wait(5)
    time.sleep(0.05)  # let the other seven callers queue up behind the loader
    loader.gate.set()
    for t in threads:
        t.join(5)
    assert loader.calls == ["brick/v1"]
    assert len(got) == 8 and all(m is got[0] for m in got)
    model = got[0]
    assert (model.line, model.version, model.name, model.default_threshold) == ("brick", "v1", "brick-model", 0.5)
    assert model.detector.warmed == [(1, 4)]
    assert loads == [("brick", "ok")]


def test_least_recently_used_line_is_evicted_beyond_max_loaded(manager: ModelManager, loader: FakeLoader) -> None:
    manager.get("brick")
    manager.get("tile")
    manager.get("brick")  # tile is now the least recently used
    with capture_logs() as logs:
        manager.get("wood")
    assert list(manager.loaded()) == ["brick", "wood"]
    assert {"event": "model_evicted", "product_line": "tile", "log_level": "info"} in logs
    manager.get("tile")  # loads again
    assert loader.calls == ["brick/v1", "tile/v1", "wood/v1", "tile/v1"]
    assert list(manager.loaded()) == ["wood", "tile"]


def test_refresh_swaps_only_after_the_new_version_loaded_and_warmed(
    manager: ModelManager, registry: ModelRegistry, loader: FakeLoader, threads: list[threading.Thread]
) -> None:
    old = manager.get("brick")
    assert manager.refresh() == []  # nothing promoted: nothing loaded
    registry.promote("brick", "v2")
    serving_during_warmup: list[str] = []
    loader.on_warmup = lambda det: serving_during_warmup.append(manager.get("brick").version)
    loader.gate = threading.Event()
    loader.started.clear()
    swapped: list[list[str]] = []
    _start(threads, lambda: swapped.append(manager.refresh()))
    assert loader.started.wait(5)
    assert manager.get("brick") is old  # v2 is loading: v1 keeps serving
    loader.gate.set()
    threads[0].join(5)
    assert swapped == [["brick"]]
    assert serving_during_warmup == ["v1"]
    new = manager.get("brick")
    assert new.version == "v2" and new.detector.warmed == [(1, 4)]
    assert old.detector.path.name == "v1"  # a batch holding the old object still has a usable model

    registry.rollback("brick")
    assert manager.refresh() == ["brick"]
    assert manager.get("brick").version == "v1"


def test_a_line_evicted_while_its_new_version_loads_is_not_reported_swapped(
    manager: ModelManager, registry: ModelRegistry, loader: FakeLoader, threads: list[threading.Thread]
) -> None:
    manager.get("brick")
    registry.promote("brick", "v2")
    evicted = threading.Event()
    loader.on_warmup = lambda det: det.path.parent.name == "brick" and det.version == "v2" and evicted.wait(5)
    loader.started.clear()
    swapped: list[list[str]] = []
    with capture_logs() as logs:
        _start(threads, lambda: swapped.append(manager.refresh()))
        assert loader.started.wait(5)  # brick v2 is loading (held in its warm-up)
        manager.get("tile")
        manager.get("wood")  # max_loaded=2: brick (least recently used) is evicted meanwhile
        evicted.set()
        threads[0].join(5)
    assert swapped == [[]]
    assert "brick" not in manager.loaded()
    events = [e["event"] for e in logs if e.get("product_line") == "brick"]
    assert "model_swapped" not in events and "model_swap_dropped" in events


def test_failed_swap_keeps_the_old_version_and_retries_with_backoff(
    manager: ModelManager, registry: ModelRegistry, loader: FakeLoader, clock: FakeClock, loads: list[tuple[str, str]]
) -> None:
    old = manager.get("brick")
    registry.promote("brick", "v2")
    loader.broken.add("v2")
    with capture_logs() as logs:
        assert manager.refresh() == []
    assert manager.get("brick") is old
    assert loads == [("brick", "ok"), ("brick", "failed")]
    failed = next(e for e in logs if e["event"] == "model_swap_failed")
    assert failed["serving_version"] == "v1" and failed["wanted_version"] == "v2" and "sha256" in failed["error"]

    clock.now += 29  # within swap_retry_s: the broken version is not loaded again
    assert manager.refresh() == []
    assert loader.calls.count("brick/v2") == 1
    clock.now += 2
    assert manager.refresh() == []
    assert loader.calls.count("brick/v2") == 2
    clock.now += 31  # the delay doubled to 60 s
    manager.refresh()
    assert loader.calls.count("brick/v2") == 2

    loader.broken.clear()  # fixed, e.g. re-uploaded
    clock.now += 30
    assert manager.refresh() == ["brick"]
    assert manager.get("brick").version == "v2"


def test_failed_warmup_counts_as_a_failed_load(
    manager: ModelManager, registry: ModelRegistry, loader: FakeLoader
) -> None:
    old = manager.get("brick")
    registry.promote("brick", "v2")

    def explode(det: FakeDetector) -> None:
        raise RuntimeError("CUDA out of memory")

    loader.on_warmup = explode
    assert manager.refresh() == []
    assert manager.get("brick") is old


def test_unknown_line_is_remembered_until_the_ttl_or_a_refresh(
    manager: ModelManager, registry: ModelRegistry, clock: FakeClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[str] = []
    real = registry.active_version
    monkeypatch.setattr(registry, "active_version", lambda line: asked.append(line) or real(line))
    for _ in range(3):
        with pytest.raises(ModelUnavailable) as info:
            manager.get("glass")
        assert info.value.unknown_line
        assert "no active model" in str(info.value)
    assert asked == ["glass"]
    clock.now += 5.1
    with pytest.raises(ModelUnavailable):
        manager.get("glass")
    assert asked == ["glass", "glass"]

    _add(tmp_path, "glass", "v1")
    registry.promote("glass", "v1")
    with pytest.raises(ModelUnavailable):
        manager.get("glass")  # still remembered as unknown
    manager.refresh()  # a refresh forgets unknown lines: new ones may have been published
    assert manager.get("glass").version == "v1"


def test_failed_first_load_is_remembered_and_not_unknown(
    manager: ModelManager, loader: FakeLoader, clock: FakeClock
) -> None:
    loader.broken.add("v1")
    for _ in range(3):
        with pytest.raises(ModelUnavailable) as info:
            manager.get("tile")
        assert not info.value.unknown_line
        assert "'v1' failed to load" in str(info.value)
    assert loader.calls == ["tile/v1"]
    manager.refresh()  # does not clear load failures
    with pytest.raises(ModelUnavailable):
        manager.get("tile")
    loader.broken.clear()
    clock.now += 5.1
    assert manager.get("tile").version == "v1"
    assert loader.calls == ["tile/v1", "tile/v1"]


def test_unreadable_pointer_keeps_the_model_serving(manager: ModelManager, tmp_path: Path) -> None:
    model = manager.get("brick")
    (tmp_path / "brick" / "ACTIVE.json").write_text("{broken")
    with capture_logs() as logs:
        assert manager.refresh() == []
    assert manager.get("brick") is model
    assert any(e["event"] == "model_pointer_unreadable" for e in logs)


def test_remembered_failures_are_bounded(manager: ModelManager) -> None:
    from worker import model_manager

    for i in range(model_manager._MAX_REMEMBERED + 10):
        with pytest.raises(ModelUnavailable):
            manager.get(f"ghost-{i}")
    assert len(manager._unavailable) == model_manager._MAX_REMEMBERED
    assert len(manager._line_locks) == 0


def test_a_card_naming_another_version_is_served_but_logged(manager: ModelManager, loader: FakeLoader) -> None:
    loader.card_version = "v9"  # e.g. a version folder copied without re-saving its card
    with capture_logs() as logs:
        assert manager.get("brick").version == "v1"
    mismatch = next(e for e in logs if e["event"] == "model_card_version_mismatch")
    assert (mismatch["model_version"], mismatch["card_version"]) == ("v1", "v9")
    loader.card_version = None
    with capture_logs() as logs:
        manager.get("tile")
    assert not any(e["event"] == "model_card_version_mismatch" for e in logs)


def test_a_line_that_fails_to_preload_is_skipped_and_reported_not_raised(
    manager: ModelManager, registry: ModelRegistry, loader: FakeLoader, clock: FakeClock
) -> None:
    # A raise here ended App.run before the worker started: one bad line crash-looped every new pod.
    registry.promote("brick", "v2")
    loader.broken.add("v2")
    with capture_logs() as logs:
        failed = manager.preload(["brick", "tile", "glass"])
    assert set(failed) == {"brick", "glass"} and "sha256" in failed["brick"]
    assert list(manager.loaded()) == ["tile"]
    assert {e["product_line"] for e in logs if e["event"] == "model_preload_failed"} == {"brick", "glass"}
    assert set(manager.preload_failures()) == {"brick", "glass"}
    loader.broken.clear()  # fixed; the line loads on first use after the negative TTL
    clock.now += 6
    manager.get("brick")
    assert set(manager.preload_failures()) == {"glass"}


def test_preload_stops_between_lines_when_asked(manager: ModelManager, loader: FakeLoader) -> None:
    asked: list[int] = []
    assert manager.preload(["brick", "tile", "wood"], stop=lambda: asked.append(1) or len(asked) > 1) == {}
    assert loader.calls == ["brick/v1"]


def test_a_load_that_lost_the_device_raises_device_lost_not_model_unavailable(
    manager: ModelManager, loader: FakeLoader, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ModelUnavailable dead-letters the line's images (committed) although no load in this process can
    # work again; DeviceLost stops the worker uncommitted instead. Nothing is remembered for the line.
    import torch  # noqa: F401 - the check runs only where torch is loaded

    monkeypatch.setattr("models.hardware.cuda_context_lost", lambda: True)
    loader.broken.add("v1")
    with pytest.raises(DeviceLost, match="model load"):
        manager.get("brick")
    monkeypatch.setattr("models.hardware.cuda_context_lost", lambda: False)
    with pytest.raises(ModelUnavailable):  # the context works: an ordinary failed load
        manager.get("brick")
