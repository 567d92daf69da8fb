"""ModelManager when the registry fails or a promotion is broken: failures are remembered for the
negative TTL (never one registry read per image), and a line evicted while its promoted version
fails to load comes back at the version that served."""

# ruff: noqa: F811 - fixtures imported from test_model_manager are used as arguments
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.test_worker.test_model_manager import (  # noqa: F401 - fixtures
    FakeClock,
    FakeLoader,
    _add,
    clock,
    loader,
    loads,
    manager,
    registry,
)
from tests.test_worker.test_registry_faults import SECRET, hung_endpoint, s3_registry  # noqa: F401 - fixture
from worker.model_manager import ModelManager, ModelUnavailable
from worker.registry import POINTER, ModelRegistry


def _count_pointer_reads(registry: ModelRegistry, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    asked: list[str] = []
    real = registry.active_version
    monkeypatch.setattr(registry, "active_version", lambda line: asked.append(line) or real(line))
    return asked


def test_unreadable_pointer_file_is_remembered_and_not_unknown(
    manager: ModelManager,
    registry: ModelRegistry,
    clock: FakeClock,
    loader: FakeLoader,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked = _count_pointer_reads(registry, monkeypatch)
    real = Path.read_text

    def denied(self: Path, *args: Any, **kwargs: Any) -> str:
        if self.name == POINTER:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied)
    for _ in range(5):
        with pytest.raises(ModelUnavailable, match="Permission denied") as info:
            manager.get("brick")
        assert not info.value.unknown_line
    assert asked == ["brick"]  # one registry read within negative_ttl_s, not one per image
    monkeypatch.setattr(Path, "read_text", real)
    clock.now += 5.1
    assert manager.get("brick").version == "v1"
    assert loader.calls == ["brick/v1"]


def test_hung_s3_pointer_read_costs_one_timeout_per_negative_ttl(
    tmp_path: Path, hung_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = s3_registry(hung_endpoint, tmp_path, timeout_s=0.3)
    asked = _count_pointer_reads(registry, monkeypatch)
    manager = ModelManager(registry, FakeLoader(), warmup_batch_sizes=(), negative_ttl_s=60)
    with pytest.raises(ModelUnavailable, match="ReadTimeoutError") as info:
        manager.get("brick")
    assert not info.value.unknown_line and SECRET not in str(info.value)
    start = time.monotonic()
    for _ in range(20):  # the next images of the line are answered from memory
        with pytest.raises(ModelUnavailable, match="ReadTimeoutError"):
            manager.get("brick")
    assert time.monotonic() - start < 0.2
    assert asked == ["brick"]


def test_a_registry_bug_is_remembered_too(
    manager: ModelManager, registry: ModelRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[str] = []

    def broken(line: str) -> str:
        asked.append(line)
        raise KeyError("unexpected")

    monkeypatch.setattr(registry, "active_version", broken)
    with capture_logs() as logs:
        for _ in range(3):
            with pytest.raises(ModelUnavailable, match="KeyError"):
                manager.get("brick")
    assert asked == ["brick"]
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["model_pointer_read_failed"]


def test_line_evicted_after_a_failed_promotion_comes_back_at_the_serving_version(
    manager: ModelManager, registry: ModelRegistry, loader: FakeLoader, clock: FakeClock
) -> None:
    assert manager.get("brick").version == "v1"
    loader.broken.add("v2")
    registry.promote("brick", "v2")
    assert manager.refresh() == []  # swap failed: v1 keeps serving
    manager.get("tile")
    manager.get("wood")  # max_loaded=2: brick is evicted
    assert "brick" not in manager.loaded()
    with capture_logs() as logs:
        assert manager.get("brick").version == "v1"
    held = next(e for e in logs if e["event"] == "model_promotion_held_back")
    assert (held["log_level"], held["wanted_version"], held["serving_version"]) == ("error", "v2", "v1")
    assert loader.calls.count("brick/v2") == 1  # the known-broken version was not loaded again per image

    clock.now += 31  # past swap_retry_s: refresh (not get) tries v2 again, on its schedule
    manager.refresh()
    assert loader.calls.count("brick/v2") == 2
    assert manager.get("brick").version == "v1"
    loader.broken.clear()
    clock.now += 61
    assert manager.refresh() == ["brick"]
    assert manager.get("brick").version == "v2"


def test_held_back_line_follows_a_rollback_and_a_new_promotion(
    manager: ModelManager, registry: ModelRegistry, loader: FakeLoader, tmp_path: Path
) -> None:
    manager.get("brick")
    loader.broken.add("v2")
    registry.promote("brick", "v2")
    manager.refresh()
    _add(tmp_path, "brick", "v3")
    registry.promote("brick", "v3")  # a fixed version, promoted while brick is evicted
    manager.get("tile")
    manager.get("wood")
    assert manager.get("brick").version == "v3"


def test_held_back_line_whose_old_version_fails_too_tries_the_pointer_next(
    manager: ModelManager, registry: ModelRegistry, loader: FakeLoader, clock: FakeClock
) -> None:
    manager.get("brick")
    loader.broken.add("v2")
    registry.promote("brick", "v2")
    manager.refresh()
    manager.get("tile")
    manager.get("wood")
    loader.broken.add("v1")  # e.g. v1 deleted from the store meanwhile
    with pytest.raises(ModelUnavailable, match="'v1' failed to load"):
        manager.get("brick")
    loader.broken.discard("v2")
    clock.now += 5.1
    assert manager.get("brick").version == "v2"
