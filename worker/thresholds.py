"""Per-product-line decision thresholds: the Redis store, the worker's cache and the invalidation watcher.

Owns three things:

* :class:`ThresholdStore`: one hash per line (``<prefix>:threshold:<line>``), a bounded history list
  (``<prefix>:threshold-history:<line>``, newest first) and a notice on ``<prefix>:thresholds`` after
  every write. A write is one Lua script, so the version increment, the optional compare-and-set
  (``if_version``), the history append and the notice are atomic: two writers holding the same version
  cannot both win. (The two keys of a line hash to different slots: on Redis Cluster, use one shard.)
* :class:`ThresholdCache`: pure logic with an injected loader and clock. A value read from Redis within
  ``ttl_s`` is reported with ``source="redis"``; when Redis fails the last known good value is served
  with ``source="cache"`` and Redis is not asked again for ``retry_interval_s`` (a dead Redis must not add
  a timeout to every batch); with no usable record the model card's default applies
  (``source="model-default"``). A record written for another model version is never applied: scores of
  different model versions are on different scales. When the line's record names another version
  (a rollout wrote the next version's threshold first, or a rollback went back to the previous
  model), the newest write in the line's history that does apply is used instead, so the serving
  version keeps its calibrated value rather than falling back to the card default.
* :class:`ThresholdWatcher`: a daemon thread subscribed to the notice channel that invalidates the cache,
  so a write is visible at once instead of after the TTL; it reconnects with capped exponential backoff.
"""

from __future__ import annotations

import builtins
import json
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import redis
import structlog
from pydantic import ValidationError

from schemas.threshold import ThresholdRecord
from worker.errors import SpaceError

if TYPE_CHECKING:
    from worker.settings import Settings

__all__ = [
    "CONNECTION_ERRORS",
    "ResolvedThreshold",
    "ThresholdCache",
    "ThresholdError",
    "ThresholdRecordError",
    "ThresholdSource",
    "ThresholdStore",
    "ThresholdValueError",
    "ThresholdWatcher",
    "VersionConflict",
]

log = structlog.get_logger(__name__)

ThresholdSource = Literal["redis", "cache", "model-default"]
Method = Literal["quantile", "f1", "manual"]

#: Errors that mean "Redis is unreachable or too slow" (redis-py wraps most socket errors, not all).
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    OSError,
)


class ThresholdError(SpaceError):
    """Base class of threshold failures meant for the operator."""


class VersionConflict(ThresholdError):
    """A compare-and-set write found another version than the writer expected."""

    def __init__(self, line: str, expected: int, actual: int) -> None:
        """Record the line and both versions.

        Args:
            line: the product line.
            expected: the version the writer read (``--if-version``).
            actual: the version Redis holds now (0 = no threshold).
        """
        self.line = line
        self.expected = expected
        self.actual = actual
        super().__init__(f"threshold for line {line} is at version {actual}, not {expected}: re-read and retry")


class ThresholdValueError(ThresholdError, ValueError):
    """A threshold value is not finite or lies outside the configured bounds."""


class ThresholdRecordError(ThresholdError, ValueError):
    """A hash or history entry in Redis is not a valid :class:`ThresholdRecord`."""


# KEYS: hash, history. ARGV: channel, if_version ('' = unconditional), history_max, line, field/value pairs.
# Returns {1, new_version} or {0, current_version} on a compare-and-set mismatch.
_SET_SCRIPT = """
local current = tonumber(redis.call('HGET', KEYS[1], 'version') or '0') or 0
if ARGV[2] ~= '' and tonumber(ARGV[2]) ~= current then
  return {0, current}
end
local version = current + 1
local entry = {}
for i = 5, #ARGV, 2 do
  entry[ARGV[i]] = ARGV[i + 1]
end
entry['version'] = tostring(version)
local flat = {}
for k, v in pairs(entry) do
  flat[#flat + 1] = k
  flat[#flat + 1] = v
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(flat))
redis.call('LPUSH', KEYS[2], cjson.encode(entry))
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[3]) - 1)
redis.call('PUBLISH', ARGV[1], cjson.encode({line = ARGV[4], version = version}))
return {1, version}
"""


def _escape_glob(text: str) -> str:
    return "".join(f"\\{ch}" if ch in "*?[]\\" else ch for ch in text)


class ThresholdStore:
    """Threshold records in Redis: read, compare-and-set write, list, history.

    Args:
        client: a ``redis.Redis`` with ``decode_responses=True`` (:func:`worker.redis_client.make_redis`).
        key_prefix: prefix of every key and of the notice channel (``space``).
        history_max: entries kept in each line's history list.
        min_value: lowest value accepted without ``force``.
        max_value: highest value accepted without ``force``.
    """

    def __init__(
        self,
        client: redis.Redis,
        key_prefix: str,
        history_max: int,
        *,
        min_value: float | None = None,
        max_value: float | None = None,
    ) -> None:
        """Keep the client and register the write script (loaded lazily by redis-py)."""
        if history_max < 1:
            raise ValueError("history_max must be >= 1")
        self._client = client
        self._prefix = key_prefix
        self._history_max = history_max
        self._min_value = min_value
        self._max_value = max_value
        self._set_script = client.register_script(_SET_SCRIPT)

    @classmethod
    def from_settings(cls, client: redis.Redis, settings: Settings) -> ThresholdStore:
        """The store the settings describe: ``redis.key_prefix``, ``thresholds.history_max`` and the bounds."""
        return cls(
            client,
            settings.redis.key_prefix,
            settings.thresholds.history_max,
            min_value=settings.thresholds.min_value,
            max_value=settings.thresholds.max_value,
        )

    @property
    def channel(self) -> str:
        """The pub/sub channel that carries a JSON notice ``{"line", "version"}`` after every write."""
        return f"{self._prefix}:thresholds"

    def key(self, line: str) -> str:
        """The hash key of a line's current threshold."""
        return f"{self._prefix}:threshold:{line}"

    def history_key(self, line: str) -> str:
        """The list key of a line's history (newest first)."""
        return f"{self._prefix}:threshold-history:{line}"

    def get(self, line: str) -> ThresholdRecord | None:
        """Read a line's current threshold.

        Args:
            line: the product line.

        Returns:
            The record, or None when the line has none.

        Raises:
            ThresholdRecordError: the hash exists but is not a valid record.
            redis.exceptions.RedisError: Redis failed (connection errors included).
        """
        data = self._client.hgetall(self.key(line))
        return self._parse(self.key(line), data) if data else None

    def set(
        self,
        line: str,
        value: float,
        *,
        model_version: str | None,
        method: Method,
        updated_by: str,
        note: str = "",
        if_version: int | None = None,
        force: bool = False,
    ) -> ThresholdRecord:
        """Write a new version of a line's threshold, atomically.

        Args:
            line: the product line.
            value: the threshold, finite and (unless ``force``) within the configured bounds.
            model_version: the model version whose score scale the value belongs to; None = any.
            method: how it was chosen (quantile, f1 or manual).
            updated_by: who wrote it.
            note: free text for the history.
            if_version: write only if the current version is this one (0 = only if the line has none).
            force: accept a value outside the configured bounds.

        Returns:
            The record as written, with its new version.

        Raises:
            ThresholdValueError: the value is not finite or is out of bounds without ``force``.
            VersionConflict: ``if_version`` does not match the current version.
            redis.exceptions.RedisError: Redis failed.
        """
        self._check_value(line, value, force=force)
        if if_version is not None and if_version < 0:
            raise ThresholdValueError("if_version must be >= 0")
        try:
            draft = ThresholdRecord(
                product_line=line,
                value=float(value),
                version=1,  # placeholder: the script assigns the real version atomically
                model_version=model_version or None,
                method=method,
                updated_at=datetime.now(UTC),
                updated_by=updated_by,
                note=note,
            )
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ThresholdValueError(f"invalid threshold for line {line!r}: {problems}") from exc
        fields = {k: str(v) for k, v in draft.to_redis_hash().items() if k != "version"}
        argv: list[Any] = [
            self.channel,
            "" if if_version is None else str(if_version),
            self._history_max,
            line,
        ]
        for name, text in fields.items():
            argv += [name, text]
        applied, version = self._set_script(keys=[self.key(line), self.history_key(line)], args=argv)
        if not applied:
            raise VersionConflict(line, if_version if if_version is not None else -1, int(version))
        record = draft.model_copy(update={"version": int(version)})
        log.info("threshold_set", product_line=line, version=record.version, value=record.value)
        return record

    def list(self) -> builtins.list[ThresholdRecord]:
        """All lines' current thresholds, sorted by product line (SCAN, never KEYS).

        Raises:
            ThresholdRecordError: a hash is not a valid record.
            redis.exceptions.RedisError: Redis failed.
        """
        pattern = _escape_glob(f"{self._prefix}:threshold:") + "*"
        keys = sorted(set(self._client.scan_iter(match=pattern, count=500, _type="HASH")))
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(key)
        records = [self._parse(key, data) for key, data in zip(keys, pipe.execute(), strict=True) if data]
        return sorted(records, key=lambda r: r.product_line)

    def history(self, line: str, limit: int = 20) -> builtins.list[ThresholdRecord]:
        """A line's past writes, newest first.

        Args:
            line: the product line.
            limit: most entries returned (at most ``history_max`` are kept).

        Raises:
            ThresholdRecordError: an entry is not a valid record.
            redis.exceptions.RedisError: Redis failed.
        """
        if limit < 1:
            return []
        key = self.history_key(line)
        return [self._parse_entry(key, raw) for raw in self._client.lrange(key, 0, limit - 1)]

    def latest_for(self, line: str, model_version: str, chunk: int = 64) -> ThresholdRecord | None:
        """The newest write in a line's history that applies to ``model_version``.

        That is one written for this version or for any version (no ``model_version``). Read newest
        first in chunks of ``chunk`` entries, at most the ``history_max`` kept.

        Raises:
            ThresholdRecordError: an entry read before the match is not a valid record.
            redis.exceptions.RedisError: Redis failed.
        """
        key = self.history_key(line)
        for start in range(0, self._history_max, chunk):
            entries = self._client.lrange(key, start, min(start + chunk, self._history_max) - 1)
            for raw in entries:
                record = self._parse_entry(key, raw)
                if record.model_version in (None, model_version):
                    return record
            if len(entries) < chunk:
                break
        return None

    @classmethod
    def _parse_entry(cls, key: str, raw: Any) -> ThresholdRecord:
        """One JSON entry of a history list."""
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise ThresholdRecordError(f"{key} holds an entry that is not JSON: {exc}") from exc
        return cls._parse(key, data)

    def _check_value(self, line: str, value: float, *, force: bool) -> None:
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise ThresholdValueError(f"threshold for line {line} must be a finite number, got {value!r}")
        if force:
            return
        if self._min_value is not None and value < self._min_value:
            raise ThresholdValueError(
                f"threshold {value} for line {line} is below the minimum {self._min_value}"
                " (SPACE_THRESHOLDS__MIN_VALUE); use --force if you mean it"
            )
        if self._max_value is not None and value > self._max_value:
            raise ThresholdValueError(
                f"threshold {value} for line {line} is above the maximum {self._max_value}"
                " (SPACE_THRESHOLDS__MAX_VALUE); use --force if you mean it"
            )

    @staticmethod
    def _parse(key: str, data: Mapping[Any, Any]) -> ThresholdRecord:
        try:
            return ThresholdRecord.from_redis_hash({str(k): str(v) for k, v in data.items()})
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            raise ThresholdRecordError(f"{key} is not a valid threshold record: {exc}") from exc


@dataclass(frozen=True, slots=True)
class ResolvedThreshold:
    """The threshold a verdict uses, with where it came from.

    Attributes:
        value: the threshold.
        version: the record's version; None for the model default.
        source: ``redis`` (read from Redis within the TTL), ``cache`` (Redis failed or lost the record: last known good)
            or ``model-default`` (no applicable record).
        model_version: the record's model version (None = written for any version); for
            ``model-default``, the active model version whose card supplied the value.
    """

    value: float
    version: int | None
    source: ThresholdSource
    model_version: str | None


@dataclass(slots=True)
class _Entry:
    record: ThresholdRecord | None
    loaded_at: float
    stale: bool = False
    # Model version -> the newest history write that applies to it (None: none), for versions the
    # current record does not apply to; read once per load of the line.
    earlier: dict[str, ThresholdRecord | None] = field(default_factory=dict)
    # Set while Redis answers that the line has no record although it had one: the record kept from
    # then (served as ``cache``), and when it was last read.
    kept_since: float | None = None


def _applies(record: ThresholdRecord | None, model_version: str) -> bool:
    return record is not None and record.model_version in (None, model_version)


def _source(entry: _Entry) -> ThresholdSource:
    return "redis" if entry.kept_since is None else "cache"


class ThresholdCache:
    """TTL cache of threshold records with last-known-good fallback (thread-safe, no I/O of its own).

    Args:
        load: reads one line's record (``ThresholdStore.get``); None when the line has none.
        ttl_s: a record read from Redis is reused this long, then read again.
        load_earlier: reads the newest write of a line that applies to a model version
            (``ThresholdStore.latest_for``), asked only when the current record names another
            version; None: such versions get the model default.
        clock: monotonic seconds (injected in tests).
        retry_interval_s: after a failed load, Redis is not asked again for this long (counted from
            the failure); meanwhile the last known good record is served with ``source="cache"``.
            A record that disappears (Redis restarted without persistence, evicted, deleted by hand:
            no command of this project deletes one) is kept and served the same way, with a
            ``threshold_record_missing`` warning at every reload, until the line is written again.
        max_entries: lines kept (least recently used evicted), so odd product-line headers cannot
            grow memory without bound.
    """

    def __init__(
        self,
        load: Callable[[str], ThresholdRecord | None],
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        load_earlier: Callable[[str, str], ThresholdRecord | None] | None = None,
        retry_interval_s: float = 1.0,
        max_entries: int = 4096,
    ) -> None:
        """Start empty."""
        if ttl_s <= 0 or retry_interval_s < 0 or max_entries < 1:
            raise ValueError("ttl_s must be > 0, retry_interval_s >= 0 and max_entries >= 1")
        self._load = load
        self._load_earlier = load_earlier
        self._ttl_s = ttl_s
        self._clock = clock
        self._retry_interval_s = retry_interval_s
        self._max_entries = max_entries
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        # Key None: Redis unreachable (all lines); key = line: that line's record is unreadable.
        self._retry_at: dict[str | None, float] = {}
        self._generation = 0

    def resolve(self, line: str, model_version: str, default: float) -> ResolvedThreshold:
        """The threshold to apply to a line's scores from ``model_version``.

        Args:
            line: the product line.
            model_version: the version of the model that produced the scores.
            default: the model card's default threshold.

        Returns:
            The value with its version and source.
        """
        now = self._clock()
        fresh: _Entry | None = None  # a fresh entry that only lacks this version's earlier record
        with self._lock:
            entry = self._entries.get(line)
            if entry is not None:
                self._entries.move_to_end(line)
                if not entry.stale and now - entry.loaded_at < self._ttl_s:
                    known, found = self._lookup(entry, model_version)
                    if known:
                        return self._apply(found, _source(entry), model_version, default)
                    fresh = entry
            if self._retry_at.get(None, -math.inf) > now or self._retry_at.get(line, -math.inf) > now:
                return self._fallback(entry, model_version, default)
            generation = self._generation
        try:
            record = fresh.record if fresh is not None else self._load(line)
            earlier: ThresholdRecord | None = None
            asked = not _applies(record, model_version) and record is not None and self._load_earlier is not None
            if asked:
                assert self._load_earlier is not None
                earlier = self._load_earlier(line, model_version)
        except CONNECTION_ERRORS as exc:
            return self._load_failed(None, line, exc, model_version, default)
        except (
            redis.exceptions.RedisError,
            ValueError,
        ) as exc:  # e.g. WRONGTYPE, a corrupt record: this line only
            return self._load_failed(line, line, exc, model_version, default)
        if record is not None and not _applies(record, model_version):
            log.warning(
                "threshold_model_version_mismatch",
                product_line=line,
                record_model_version=record.model_version,
                model_version=model_version,
                version=record.version,
                earlier_version=earlier.version if earlier is not None else None,
            )
        with self._lock:
            if fresh is not None and self._entries.get(line) is fresh:
                fresh.earlier[model_version] = earlier
            elif fresh is None:
                # An invalidation that raced with this load leaves the entry stale: the next call reloads.
                new = _Entry(record, now, stale=generation != self._generation)
                previous = self._entries.get(line)
                if record is None and previous is not None and previous.record is not None:
                    new = self._keep_lost(line, previous, new)
                elif asked:
                    new.earlier[model_version] = earlier
                self._entries[line] = new
                self._entries.move_to_end(line)
                while len(self._entries) > self._max_entries:
                    self._entries.popitem(last=False)
                if new.kept_since is not None:
                    found = self._lookup(new, model_version)[1]
                    return self._apply(found, "cache", model_version, default)
        source = _source(fresh) if fresh is not None else "redis"
        return self._apply(record if _applies(record, model_version) else earlier, source, model_version, default)

    @staticmethod
    def _keep_lost(line: str, previous: _Entry, new: _Entry) -> _Entry:
        """``new`` (Redis: no record) carrying the record ``previous`` had, served as ``cache``."""
        assert previous.record is not None
        log.warning(
            "threshold_record_missing",
            product_line=line,
            kept_value=previous.record.value,
            kept_version=previous.record.version,
            kept_model_version=previous.record.model_version,
            hint="Redis lost the line's record (restart without persistence, eviction, a manual delete); "
            "serving the last value read until the line is written again",
        )
        new.record = previous.record
        new.earlier = previous.earlier
        new.kept_since = previous.kept_since if previous.kept_since is not None else previous.loaded_at
        return new

    def invalidate(self, line: str | None = None) -> None:
        """Force a reload of one line (or of all lines with None) on its next use.

        Last known good values are kept for outages. A notice proves Redis answers, so the retry
        back-off is lifted too.
        """
        with self._lock:
            self._generation += 1
            targets = self._entries.values() if line is None else [e for e in [self._entries.get(line)] if e]
            for entry in targets:
                entry.stale = True
            if line is None:
                self._retry_at.clear()
            else:
                self._retry_at.pop(line, None)
                self._retry_at.pop(None, None)

    def age_s(self, line: str) -> float | None:
        """Seconds since the line's record was last read from Redis; None if it never was."""
        with self._lock:
            entry = self._entries.get(line)
            if entry is None:
                return None
            read_at = entry.loaded_at if entry.kept_since is None else entry.kept_since
            return max(0.0, self._clock() - read_at)

    def _load_failed(
        self,
        scope: str | None,
        line: str,
        exc: BaseException,
        model_version: str,
        default: float,
    ) -> ResolvedThreshold:
        log.warning(
            "threshold_load_failed",
            product_line=line,
            error=f"{type(exc).__name__}: {exc}",
            retry_in_s=self._retry_interval_s,
        )
        with self._lock:
            # From the failure, not from the start of the read: a read that times out after its
            # retries can take longer than the pause, which would then never hold.
            self._retry_at[scope] = self._clock() + self._retry_interval_s
            return self._fallback(self._entries.get(line), model_version, default)

    def _lookup(self, entry: _Entry, model_version: str) -> tuple[bool, ThresholdRecord | None]:
        """(known, record): the record of a loaded entry that applies to ``model_version``.

        Not known when the current record names another version and that version's earlier
        record was not looked up yet.
        """
        if entry.record is None or _applies(entry.record, model_version) or self._load_earlier is None:
            return True, entry.record
        if model_version in entry.earlier:
            return True, entry.earlier[model_version]
        return False, None

    def _fallback(self, entry: _Entry | None, model_version: str, default: float) -> ResolvedThreshold:
        found = self._lookup(entry, model_version)[1] if entry is not None else None
        return self._apply(found, "cache", model_version, default)

    @staticmethod
    def _apply(
        record: ThresholdRecord | None, source: ThresholdSource, model_version: str, default: float
    ) -> ResolvedThreshold:
        if record is None or (record.model_version is not None and record.model_version != model_version):
            return ResolvedThreshold(float(default), None, "model-default", model_version)
        return ResolvedThreshold(record.value, record.version, source, record.model_version)


class ThresholdWatcher:
    """A daemon thread that invalidates a :class:`ThresholdCache` on every threshold notice.

    On every (re)subscription the whole cache is invalidated, because notices sent while the watcher
    was disconnected are lost.

    Args:
        client_factory: builds a fresh ``redis.Redis`` (called again after each connection loss).
        channel: the notice channel (``ThresholdStore.channel``).
        cache: the cache to invalidate.
        backoff_initial_s: first wait before reconnecting, doubled after each failure.
        backoff_max_s: cap of that wait.
        poll_timeout_s: how long one wait for a message blocks (bounds the latency of :meth:`stop`).
    """

    def __init__(
        self,
        client_factory: Callable[[], redis.Redis],
        channel: str,
        cache: ThresholdCache,
        *,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 5.0,
        poll_timeout_s: float = 0.2,
    ) -> None:
        """Prepare the thread; nothing connects before :meth:`start`."""
        self._client_factory = client_factory
        self._channel = channel
        self._cache = cache
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._poll_timeout_s = poll_timeout_s
        self._backoff_s = backoff_initial_s
        self._stop = threading.Event()
        self._subscribed = threading.Event()
        self._thread: threading.Thread | None = None
        self.notices = 0

    @property
    def healthy(self) -> bool:
        """True while the thread runs and holds a live subscription."""
        return self._thread is not None and self._thread.is_alive() and self._subscribed.is_set()

    def wait_subscribed(self, timeout_s: float) -> bool:
        """Block until subscribed (or ``timeout_s`` passed); True when subscribed."""
        return self._subscribed.wait(timeout_s)

    def start(self) -> None:
        """Start the thread (once)."""
        if self._thread is not None:
            raise RuntimeError("ThresholdWatcher already started")
        self._thread = threading.Thread(target=self._run, name="threshold-watcher", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ask the thread to end and wait for it up to ``timeout_s``."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._listen()
            except (redis.exceptions.RedisError, OSError) as exc:
                self._subscribed.clear()
                log.warning(
                    "threshold_watch_lost",
                    channel=self._channel,
                    error=f"{type(exc).__name__}: {exc}",
                    retry_in_s=self._backoff_s,
                )
                self._stop.wait(self._backoff_s)
                self._backoff_s = min(self._backoff_s * 2, self._backoff_max_s)
        self._subscribed.clear()

    def _listen(self) -> None:
        client = self._client_factory()
        pubsub = client.pubsub()
        try:
            pubsub.subscribe(self._channel)
            while not self._stop.is_set():
                message = pubsub.get_message(timeout=self._poll_timeout_s)
                if message is not None:
                    self._handle(message)
        finally:
            pubsub.close()
            client.close()

    def _handle(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "subscribe":
            self._cache.invalidate(None)
            self._backoff_s = self._backoff_initial_s
            self._subscribed.set()
            log.info("threshold_watch_subscribed", channel=self._channel)
        elif kind == "message":
            self.notices += 1
            line = None
            try:
                notice = json.loads(message.get("data") or "")
                line = notice.get("line") if isinstance(notice, dict) else None
            except ValueError:
                pass
            # An unreadable notice still means "something changed": invalidate everything.
            self._cache.invalidate(line if isinstance(line, str) else None)
