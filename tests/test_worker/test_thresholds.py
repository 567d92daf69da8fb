"""Unit tests of the threshold cache (fake loader, fake clock) and of the store's input checks."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import redis

from schemas.threshold import ThresholdRecord
from worker.thresholds import ThresholdCache, ThresholdStore, ThresholdValueError, VersionConflict


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeLoader:
    """Returns records from a dict; raises ``error`` instead when set; counts calls."""

    def __init__(self) -> None:
        self.records: dict[str, ThresholdRecord] = {}
        self.error: Exception | None = None
        self.calls: list[str] = []

    def __call__(self, line: str) -> ThresholdRecord | None:
        self.calls.append(line)
        if self.error is not None:
            raise self.error
        return self.records.get(line)


def record(value: float, version: int = 1, model_version: str | None = "v1", line: str = "L1") -> ThresholdRecord:
    return ThresholdRecord(
        product_line=line,
        value=value,
        version=version,
        model_version=model_version,
        method="manual",
        updated_at=datetime(2026, 1, 1, tzinfo=UTC),
        updated_by="qe",
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def loader() -> FakeLoader:
    return FakeLoader()


@pytest.fixture
def cache(loader: FakeLoader, clock: FakeClock) -> ThresholdCache:
    return ThresholdCache(loader, ttl_s=10.0, clock=clock, retry_interval_s=1.0)


def test_fresh_value_comes_from_redis_and_is_reused_within_ttl(cache, loader, clock):
    loader.records["L1"] = record(0.7, version=3)
    first = cache.resolve("L1", "v1", default=0.5)
    clock.advance(9.9)
    second = cache.resolve("L1", "v1", default=0.5)
    assert first == second
    assert (first.value, first.version, first.source, first.model_version) == (0.7, 3, "redis", "v1")
    assert loader.calls == ["L1"]


def test_expired_entry_is_reloaded(cache, loader, clock):
    loader.records["L1"] = record(0.7, version=3)
    cache.resolve("L1", "v1", 0.5)
    loader.records["L1"] = record(0.8, version=4)
    clock.advance(10.0)
    resolved = cache.resolve("L1", "v1", 0.5)
    assert (resolved.value, resolved.version, resolved.source) == (0.8, 4, "redis")
    assert loader.calls == ["L1", "L1"]


def test_no_record_gives_model_default_and_is_cached(cache, loader, clock):
    resolved = cache.resolve("L1", "v7", 0.42)
    assert (resolved.value, resolved.version, resolved.source, resolved.model_version) == (
        0.42,
        None,
        "model-default",
        "v7",
    )
    clock.advance(5)
    cache.resolve("L1", "v7", 0.42)
    assert loader.calls == ["L1"]


@pytest.mark.parametrize(
    "error",
    [redis.exceptions.ConnectionError("down"), redis.exceptions.TimeoutError("slow"), OSError("unreachable")],
)
def test_redis_failure_serves_last_known_good_from_cache(cache, loader, clock, error):
    loader.records["L1"] = record(0.7, version=3)
    cache.resolve("L1", "v1", 0.5)
    clock.advance(11)
    loader.error = error
    resolved = cache.resolve("L1", "v1", 0.5)
    assert (resolved.value, resolved.version, resolved.source) == (0.7, 3, "cache")


def test_failure_backs_off_instead_of_hitting_a_dead_redis_every_batch(cache, loader, clock):
    loader.records["L1"] = record(0.7)
    cache.resolve("L1", "v1", 0.5)
    clock.advance(11)
    loader.error = redis.exceptions.ConnectionError("down")
    for _ in range(50):
        assert cache.resolve("L1", "v1", 0.5).source == "cache"
        clock.advance(0.01)
    assert loader.calls == ["L1", "L1"]  # one initial load, one failed reload, then back-off
    # A dead Redis is dead for every line: another line does not hit it either during the back-off.
    assert cache.resolve("L2", "v1", 0.5).source == "model-default"
    assert loader.calls == ["L1", "L1"]
    clock.advance(1.0)
    cache.resolve("L1", "v1", 0.5)
    assert loader.calls == ["L1", "L1", "L1"]  # retried once the interval passed


def test_recovers_to_redis_after_outage(cache, loader, clock):
    loader.records["L1"] = record(0.7, version=1)
    cache.resolve("L1", "v1", 0.5)
    clock.advance(11)
    loader.error = redis.exceptions.ConnectionError("down")
    assert cache.resolve("L1", "v1", 0.5).source == "cache"
    loader.error = None
    loader.records["L1"] = record(0.9, version=2)
    clock.advance(1.0)
    resolved = cache.resolve("L1", "v1", 0.5)
    assert (resolved.value, resolved.version, resolved.source) == (0.9, 2, "redis")


def test_the_back_off_counts_from_the_failure_not_from_the_start_of_the_read(cache, loader, clock):
    # A read against a hung Redis can outlast the pause (timeouts x retries); counted from its start,
    # the pause would be over when the read fails and every batch would wait for Redis again.
    loader.records["L1"] = record(0.7)
    cache.resolve("L1", "v1", 0.5)
    clock.advance(11)

    def slow_failure(line: str) -> ThresholdRecord | None:
        loader.calls.append(line)
        clock.advance(1.5)  # longer than retry_interval_s = 1.0
        raise redis.exceptions.TimeoutError("no answer")

    cache._load = slow_failure  # type: ignore[method-assign]
    for _ in range(5):
        assert cache.resolve("L1", "v1", 0.5).source == "cache"
        clock.advance(0.2)  # batches keep coming, within the second after the failure
    assert loader.calls == ["L1", "L1"]


def test_a_record_redis_lost_is_kept_until_the_line_is_written_again(cache, loader, clock, capsys):
    loader.records["L1"] = record(0.7, version=3)
    assert cache.resolve("L1", "v1", 0.5).source == "redis"
    clock.advance(5)
    assert cache.age_s("L1") == 5
    del loader.records["L1"]  # Redis restarted without persistence, or evicted the key
    clock.advance(6)
    resolved = cache.resolve("L1", "v1", 0.5)
    assert (resolved.value, resolved.version, resolved.source) == (0.7, 3, "cache")
    assert "threshold_record_missing" in capsys.readouterr().out
    assert cache.age_s("L1") == 11  # since the record was last read, not since Redis said "none"
    clock.advance(5)
    assert cache.resolve("L1", "v1", 0.5).source == "cache"  # within the TTL: not asked again
    assert loader.calls == ["L1", "L1"]
    clock.advance(10)
    assert cache.resolve("L1", "v1", 0.5).value == 0.7  # still missing at the next reload: still kept
    assert cache.age_s("L1") == 26
    loader.records["L1"] = record(0.8, version=1)  # written again (the version counter restarted)
    cache.invalidate("L1")  # the write's notice
    resolved = cache.resolve("L1", "v1", 0.5)
    assert (resolved.value, resolved.version, resolved.source) == (0.8, 1, "redis")
    assert cache.age_s("L1") == 0


def test_a_line_that_never_had_a_record_is_not_warned_about(cache, loader, clock, capsys):
    assert cache.resolve("L1", "v1", 0.5).source == "model-default"
    clock.advance(11)
    assert cache.resolve("L1", "v1", 0.5).source == "model-default"
    assert "threshold_record_missing" not in capsys.readouterr().out


class FakeHistory:
    """Newest-first writes per line; ``latest_for`` like ``ThresholdStore.latest_for``; counts calls."""

    def __init__(self) -> None:
        self.writes: dict[str, list[ThresholdRecord]] = {}
        self.calls: list[tuple[str, str]] = []

    def __call__(self, line: str, model_version: str) -> ThresholdRecord | None:
        self.calls.append((line, model_version))
        return next((r for r in self.writes.get(line, []) if r.model_version in (None, model_version)), None)


def test_a_version_the_current_record_does_not_name_keeps_its_own_earlier_value(loader, clock):
    # Rollout: the quality engineer wrote v2's threshold before promoting v2; v1 still serves (and,
    # after a rollback, serves again): it keeps its calibrated 0.12, not the card default.
    history = FakeHistory()
    v1, v2 = record(0.12, version=1, model_version="v1"), record(0.25, version=2, model_version="v2")
    history.writes["L1"] = [v2, v1]
    loader.records["L1"] = v2
    cache = ThresholdCache(loader, ttl_s=10.0, clock=clock, load_earlier=history)
    resolved = cache.resolve("L1", "v1", 0.5)
    assert (resolved.value, resolved.version, resolved.source, resolved.model_version) == (0.12, 1, "redis", "v1")
    assert cache.resolve("L1", "v2", 0.5).value == 0.25
    for _ in range(3):  # both versions served side by side during the swap: no reload per call
        assert cache.resolve("L1", "v1", 0.5).value == 0.12
        assert cache.resolve("L1", "v2", 0.5).value == 0.25
    assert loader.calls == ["L1"] and history.calls == [("L1", "v1")]
    assert cache.resolve("L1", "v3", 0.5).source == "model-default"  # no write applies to v3
    clock.advance(11)  # the TTL expires: the earlier values are read again with the record
    assert cache.resolve("L1", "v1", 0.5).value == 0.12
    assert history.calls == [("L1", "v1"), ("L1", "v3"), ("L1", "v1")]


def test_an_earlier_value_is_served_from_cache_while_redis_is_down(loader, clock):
    history = FakeHistory()
    history.writes["L1"] = [record(0.25, version=2, model_version="v2"), record(0.12, version=1)]
    loader.records["L1"] = history.writes["L1"][0]
    cache = ThresholdCache(loader, ttl_s=10.0, clock=clock, load_earlier=history, retry_interval_s=1.0)
    assert cache.resolve("L1", "v1", 0.5).value == 0.12
    clock.advance(11)
    loader.error = redis.exceptions.ConnectionError("down")
    resolved = cache.resolve("L1", "v1", 0.5)
    assert (resolved.value, resolved.source) == (0.12, "cache")


def test_failure_without_any_known_value_gives_model_default(cache, loader):
    loader.error = redis.exceptions.ConnectionError("down")
    resolved = cache.resolve("L1", "v1", 0.33)
    assert (resolved.value, resolved.source) == (0.33, "model-default")


def test_corrupt_record_backs_off_only_its_own_line(cache, loader, clock):
    loader.records["L2"] = record(0.6, line="L2")
    loader.error = ValueError("not a record")
    assert cache.resolve("L1", "v1", 0.5).source == "model-default"
    loader.error = None
    assert cache.resolve("L2", "v1", 0.5).source == "redis"  # not blocked by L1's back-off
    assert cache.resolve("L1", "v1", 0.5).source == "model-default"
    assert loader.calls == ["L1", "L2"]


def test_a_redis_error_on_one_key_does_not_escape_and_backs_off_only_that_line(cache, loader, clock):
    loader.records["L1"] = record(0.7)
    cache.resolve("L1", "v1", 0.5)
    clock.advance(11)
    loader.error = redis.exceptions.ResponseError("WRONGTYPE Operation against a key holding the wrong kind")
    assert cache.resolve("L1", "v1", 0.5).source == "cache"
    loader.error = None
    assert cache.resolve("L2", "v1", 0.5).source == "model-default"
    assert loader.calls == ["L1", "L1", "L2"]


@pytest.mark.parametrize("source_state", ["fresh", "cached-after-failure"])
def test_record_for_another_model_version_is_never_applied(cache, loader, clock, source_state):
    loader.records["L1"] = record(0.7, version=5, model_version="v1")
    assert cache.resolve("L1", "v1", 0.5).value == 0.7
    if source_state == "cached-after-failure":
        clock.advance(11)
        loader.error = redis.exceptions.ConnectionError("down")
    resolved = cache.resolve("L1", "v2", 0.25)
    assert (resolved.value, resolved.version, resolved.source, resolved.model_version) == (
        0.25,
        None,
        "model-default",
        "v2",
    )


def test_record_without_model_version_applies_to_any_model(cache, loader):
    loader.records["L1"] = record(0.7, model_version=None)
    resolved = cache.resolve("L1", "v9", 0.5)
    assert (resolved.value, resolved.source, resolved.model_version) == (0.7, "redis", None)


def test_invalidate_forces_reload_but_keeps_last_known_good(cache, loader, clock):
    loader.records["L1"] = record(0.7, version=1)
    cache.resolve("L1", "v1", 0.5)
    loader.records["L1"] = record(0.8, version=2)
    cache.invalidate("L1")
    assert cache.resolve("L1", "v1", 0.5).version == 2
    loader.error = redis.exceptions.ConnectionError("down")
    cache.invalidate(None)
    resolved = cache.resolve("L1", "v1", 0.5)
    assert (resolved.version, resolved.source) == (2, "cache")


def test_invalidate_lifts_the_back_off(cache, loader, clock):
    loader.error = redis.exceptions.ConnectionError("down")
    cache.resolve("L1", "v1", 0.5)
    loader.error = None
    loader.records["L1"] = record(0.7)
    cache.invalidate("L1")  # a notice arrived: Redis answers again
    assert cache.resolve("L1", "v1", 0.5).source == "redis"


def test_invalidation_racing_with_a_load_is_not_lost(clock):
    cache: ThresholdCache
    calls: list[str] = []

    def loader(line: str) -> ThresholdRecord:
        calls.append(line)
        if len(calls) == 1:
            cache.invalidate(line)  # a notice arrives while the (old) value is in flight
        return record(0.7, version=len(calls))

    cache = ThresholdCache(loader, ttl_s=60, clock=clock)
    assert cache.resolve("L1", "v1", 0.5).version == 1
    assert cache.resolve("L1", "v1", 0.5).version == 2  # the racing load was not trusted
    assert cache.resolve("L1", "v1", 0.5).version == 2
    assert len(calls) == 2


def test_age_s(cache, loader, clock):
    assert cache.age_s("L1") is None
    loader.records["L1"] = record(0.7)
    cache.resolve("L1", "v1", 0.5)
    clock.advance(12.5)
    loader.error = redis.exceptions.ConnectionError("down")
    cache.resolve("L1", "v1", 0.5)
    assert cache.age_s("L1") == pytest.approx(12.5)


def test_entries_are_bounded(loader, clock):
    cache = ThresholdCache(loader, ttl_s=60, clock=clock, max_entries=3)
    for i in range(5):
        cache.resolve(f"L{i}", "v1", 0.5)
    assert [cache.age_s(f"L{i}") is None for i in range(5)] == [True, True, False, False, False]


@pytest.mark.parametrize("kwargs", [{"ttl_s": 0}, {"ttl_s": 1, "retry_interval_s": -1}, {"ttl_s": 1, "max_entries": 0}])
def test_cache_rejects_bad_parameters(loader, kwargs):
    with pytest.raises(ValueError):
        ThresholdCache(loader, **kwargs)


# --- store input checks (they run before anything is sent to Redis) ---------------------------


@pytest.fixture
def offline_store() -> ThresholdStore:
    client = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.05, decode_responses=True)
    return ThresholdStore(client, "unit", 10, min_value=0.0, max_value=5.0)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_set_rejects_non_finite_values(offline_store, value):
    with pytest.raises(ThresholdValueError, match="finite"):
        offline_store.set("L1", value, model_version=None, method="manual", updated_by="qe")


@pytest.mark.parametrize(("value", "word"), [(-0.1, "below the minimum 0.0"), (5.5, "above the maximum 5.0")])
def test_set_rejects_out_of_bounds_values_with_a_clear_message(offline_store, value, word):
    with pytest.raises(ThresholdValueError, match=f"{word}.*--force"):
        offline_store.set("L1", value, model_version=None, method="manual", updated_by="qe")


def test_set_rejects_invalid_line_names(offline_store):
    with pytest.raises(ThresholdValueError, match="product_line"):
        offline_store.set("../etc", 0.5, model_version=None, method="manual", updated_by="qe")


def test_version_conflict_message_tells_the_operator_what_to_do():
    exc = VersionConflict("L1", expected=4, actual=5)
    assert str(exc) == "threshold for line L1 is at version 5, not 4: re-read and retry"
    assert (exc.line, exc.expected, exc.actual) == ("L1", 4, 5)
