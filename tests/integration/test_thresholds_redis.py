"""Thresholds against a real Redis: the store's atomic writes, the watcher, outages and the CLI.

The shared Redis (``SPACE_REDIS__URL``, default 127.0.0.1:6379) is used with a unique key prefix per
test, and its keys are deleted afterwards. Outage and authentication tests start their own
``redis-server`` on a free port and kill it, never the shared one.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from worker import cli
from worker.errors import ConfigError
from worker.redis_client import make_redis
from worker.settings import RedisSettings
from worker.thresholds import ThresholdCache, ThresholdStore, ThresholdWatcher, VersionConflict

pytestmark = pytest.mark.redis

SHARED_URL = os.environ.get("SPACE_REDIS__URL", "redis://127.0.0.1:6379/0")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout_s: float, step_s: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step_s)
    return predicate()


class OwnRedis:
    """A private redis-server subprocess on a fixed port that a test may kill and restart."""

    def __init__(self, *extra: str) -> None:
        self.port = free_port()
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not on PATH"
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def answers() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.1):
                    return True
            except OSError:
                return False

        assert wait_until(answers, 5.0), "own redis-server did not start"

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)
            self.proc = None


@pytest.fixture
def own_redis() -> Iterator[Callable[..., OwnRedis]]:
    servers: list[OwnRedis] = []

    def start(*extra: str) -> OwnRedis:
        server = OwnRedis(*extra)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.kill()


@pytest.fixture
def prefix() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def client(prefix: str) -> Iterator[redis.Redis]:
    conn = make_redis(RedisSettings(url=SHARED_URL, key_prefix=prefix, socket_timeout_ms=2000))
    conn.ping()
    yield conn
    for key in conn.scan_iter(match=f"{prefix}:*"):
        conn.delete(key)
    conn.close()


@pytest.fixture
def store(client: redis.Redis, prefix: str) -> ThresholdStore:
    return ThresholdStore(client, prefix, history_max=3)


def write(store: ThresholdStore, line: str, value: float, **kwargs):
    kwargs.setdefault("model_version", "v1")
    kwargs.setdefault("method", "manual")
    kwargs.setdefault("updated_by", "qe")
    return store.set(line, value, **kwargs)


def test_set_get_versions_history_and_list(store, client, prefix):
    assert store.get("L1") is None
    for i in range(5):
        written = write(store, "L1", 0.1 * (i + 1), note=f"n{i}")
        assert written.version == i + 1
    write(store, "L2", 2.0, model_version=None, method="f1")
    current = store.get("L1")
    assert (current.value, current.version, current.note, current.model_version) == (0.5, 5, "n4", "v1")
    assert client.hget(f"{prefix}:threshold:L1", "version") == "5"
    history = store.history("L1", limit=10)
    assert [r.version for r in history] == [5, 4, 3]  # newest first, trimmed to history_max=3
    assert [r.note for r in history] == ["n4", "n3", "n2"]
    assert client.llen(f"{prefix}:threshold-history:L1") == 3
    assert [r.version for r in store.history("L1", limit=2)] == [5, 4]
    assert [(r.product_line, r.version) for r in store.list()] == [("L1", 5), ("L2", 1)]


def test_unicode_and_quotes_survive_the_history(store):
    note = 'größer "tighter" \\ / ✓'
    write(store, "L1", 0.5, note=note, updated_by="Zoë")
    assert store.get("L1").note == note
    (entry,) = store.history("L1")
    assert (entry.note, entry.updated_by) == (note, "Zoë")


def test_a_write_replaces_every_field(store):
    write(store, "L1", 0.5, model_version="v1", note="calibrated")
    write(store, "L1", 0.6, model_version=None)
    current = store.get("L1")
    assert (current.model_version, current.note) == (None, "")


def test_write_publishes_a_notice(store, client):
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(store.channel)
    try:
        assert wait_until(lambda: pubsub.get_message(timeout=0.05) is None and pubsub.subscribed, 2.0)
        write(store, "L1", 0.5)
        message = None
        deadline = time.monotonic() + 2.0
        while message is None and time.monotonic() < deadline:
            message = pubsub.get_message(timeout=0.1)
        assert message is not None
        assert json.loads(message["data"]) == {"line": "L1", "version": 1}
    finally:
        pubsub.close()


def test_compare_and_set(store):
    write(store, "L1", 0.5, if_version=0)  # create only if absent
    with pytest.raises(VersionConflict) as info:
        write(store, "L1", 0.6, if_version=0)
    assert (info.value.expected, info.value.actual) == (0, 1)
    assert write(store, "L1", 0.6, if_version=1).version == 2
    with pytest.raises(VersionConflict, match="at version 2, not 1: re-read and retry"):
        write(store, "L1", 0.7, if_version=1)
    assert store.get("L1").value == 0.6
    assert len(store.history("L1")) == 2  # a refused write leaves no history entry


def test_concurrent_writers_with_the_same_version_one_wins(store):
    write(store, "L1", 0.5)
    barrier = threading.Barrier(8)
    outcomes: list[object] = []
    lock = threading.Lock()

    def writer(i: int) -> None:
        barrier.wait()
        try:
            result: object = write(store, "L1", 1.0 + i, if_version=1).version
        except VersionConflict as exc:
            result = exc
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    wins = [o for o in outcomes if o == 2]
    conflicts = [o for o in outcomes if isinstance(o, VersionConflict)]
    assert len(wins) == 1
    assert len(conflicts) == 7
    assert all(c.actual == 2 for c in conflicts)
    assert store.get("L1").version == 2


def test_latest_for_finds_the_newest_write_that_applies_to_a_version(client, prefix):
    store = ThresholdStore(client, prefix, history_max=200)
    write(store, "L1", 0.12, model_version="v1")
    write(store, "L1", 0.3, model_version=None)  # for any version
    write(store, "L1", 0.11, model_version="v1")
    for i in range(150):  # more than one chunk of v2 writes on top
        write(store, "L1", 0.2 + i / 1000, model_version="v2")
    earlier = store.latest_for("L1", "v1", chunk=64)
    assert earlier is not None and (earlier.value, earlier.version) == (0.11, 3)
    assert store.latest_for("L1", "v9").value == 0.3  # only the any-version write applies
    assert store.latest_for("L2", "v1") is None
    cache = ThresholdCache(store.get, ttl_s=60.0, load_earlier=store.latest_for)
    assert (cache.resolve("L1", "v1", 0.9).value, cache.resolve("L1", "v2", 0.9).value) == (0.11, 0.349)


def test_watcher_makes_a_write_visible_within_a_second_despite_a_long_ttl(store, prefix):
    cache = ThresholdCache(store.get, ttl_s=60.0)
    watcher = ThresholdWatcher(lambda: make_redis(RedisSettings(url=SHARED_URL)), store.channel, cache)
    watcher.start()
    try:
        assert watcher.wait_subscribed(5.0)
        assert watcher.healthy
        # No record yet: the model default is cached for the 60 s TTL; only a notice can end that.
        assert cache.resolve("L1", "v1", 9.0).source == "model-default"
        write(store, "L1", 0.5)
        assert wait_until(lambda: cache.resolve("L1", "v1", 9.0).value == 0.5, 1.0)
        write(store, "L1", 0.75)
        started = time.monotonic()
        assert wait_until(lambda: cache.resolve("L1", "v1", 9.0).value == 0.75, 1.0)
        assert time.monotonic() - started < 1.0
        resolved = cache.resolve("L1", "v1", 9.0)
        assert (resolved.version, resolved.source) == (2, "redis")
    finally:
        watcher.stop()
    assert not watcher.healthy


def test_outage_serves_last_known_good_then_recovers(own_redis):
    server = own_redis()
    settings = RedisSettings(url=server.url, socket_timeout_ms=200, retries=0)
    client = make_redis(settings)
    store = ThresholdStore(client, "outage", history_max=5)
    write(store, "L1", 0.5)
    cache = ThresholdCache(store.get, ttl_s=0.2, retry_interval_s=0.2)
    watcher = ThresholdWatcher(
        lambda: make_redis(settings), store.channel, cache, backoff_initial_s=0.05, backoff_max_s=0.2
    )
    watcher.start()
    try:
        assert watcher.wait_subscribed(5.0)
        assert cache.resolve("L1", "v1", 9.0).source == "redis"

        server.kill()
        time.sleep(0.25)  # past the TTL
        resolved = cache.resolve("L1", "v1", 9.0)
        assert (resolved.value, resolved.version, resolved.source) == (0.5, 1, "cache")
        assert wait_until(lambda: not watcher.healthy, 3.0)

        server.start()  # same port, empty data: write again, as an operator would after a loss
        write_deadline = time.monotonic() + 5.0
        while True:
            try:
                write(store, "L1", 0.8)
                break
            except redis.exceptions.ConnectionError:
                assert time.monotonic() < write_deadline
                time.sleep(0.05)
        assert wait_until(lambda: watcher.healthy, 5.0)
        assert wait_until(lambda: cache.resolve("L1", "v1", 9.0).source == "redis", 3.0)
        assert cache.resolve("L1", "v1", 9.0).value == 0.8
    finally:
        watcher.stop()
        client.close()


def test_make_redis_uses_the_secret_password_and_never_shows_it(own_redis):
    server = own_redis("--requirepass", "s3cr3t-pw")
    good = make_redis(RedisSettings(url=server.url, password="s3cr3t-pw"))
    assert good.ping() is True
    assert "s3cr3t-pw" not in repr(good)
    assert "s3cr3t-pw" not in repr(RedisSettings(url=server.url, password="s3cr3t-pw"))
    bad = make_redis(RedisSettings(url=server.url, password="wrong"))
    with pytest.raises(redis.exceptions.AuthenticationError):
        bad.ping()
    good.close()
    bad.close()


def test_make_redis_refuses_tls_files_without_rediss(tmp_path: Path):
    with pytest.raises(ConfigError, match="rediss://"):
        make_redis(RedisSettings(ssl_ca_certs=tmp_path / "ca.pem"))
    client = make_redis(RedisSettings(url="rediss://127.0.0.1:6390/0", ssl_ca_certs=tmp_path / "ca.pem"))
    assert client.connection_pool.connection_kwargs["ssl_ca_certs"] == str(tmp_path / "ca.pem")
    assert client.connection_pool.connection_kwargs["socket_timeout"] == 0.25


# --- CLI ---------------------------------------------------------------------------------------


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, prefix: str, client: redis.Redis, tmp_path: Path) -> Iterator[str]:
    import structlog

    import worker.logging

    # The command configures logging process-wide: give the other tests their configuration back.
    saved = structlog.get_config()
    monkeypatch.setattr(worker.logging, "_configured", False)
    monkeypatch.setenv("SPACE_REDIS__URL", SHARED_URL)
    monkeypatch.setenv("SPACE_REDIS__KEY_PREFIX", prefix)
    monkeypatch.setenv("SPACE_SECRETS_DIR", str(tmp_path / "no-secrets"))
    monkeypatch.delenv("SPACE_CONFIG_FILE", raising=False)
    yield prefix
    structlog.configure(**saved)


def test_cli_two_writers_with_the_same_version_one_gets_a_clear_conflict(cli_env, capsys):
    assert cli.main(["thresholds", "set", "L1", "0.5", "--by", "alice", "--note", "initial"]) == 0
    capsys.readouterr()
    assert cli.main(["thresholds", "set", "L1", "0.6", "--if-version", "1", "--by", "alice", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert (first["version"], first["value"], first["updated_by"]) == (2, 0.6, "alice")
    assert cli.main(["thresholds", "set", "L1", "0.7", "--if-version", "1", "--by", "bob"]) == 1
    err = capsys.readouterr().err
    assert "threshold for line L1 is at version 2, not 1: re-read and retry" in err
    assert cli.main(["thresholds", "get", "L1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["value"] == 0.6


def test_cli_get_list_history_tables(cli_env, capsys):
    assert cli.main(["thresholds", "get", "L9"]) == 3
    assert "no threshold" in capsys.readouterr().out
    cli.main(["thresholds", "set", "L1", "0.5", "--model-version", "v3", "--method", "f1", "--by", "qe"])
    cli.main(["thresholds", "set", "L1", "0.55", "--by", "qe", "--note", "tighter"])
    cli.main(["thresholds", "set", "L2", "1.5", "--by", "qe"])
    capsys.readouterr()
    assert cli.main(["thresholds", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "LINE",
        "VALUE",
        "VERSION",
        "MODEL_VERSION",
        "METHOD",
        "UPDATED_AT",
        "UPDATED_BY",
        "NOTE",
    ]
    assert [row.split()[:3] for row in lines[1:]] == [["L1", "0.55", "2"], ["L2", "1.5", "1"]]
    assert cli.main(["thresholds", "history", "L1", "--limit", "5", "--json"]) == 0
    history = json.loads(capsys.readouterr().out)
    assert [(h["version"], h["model_version"], h["method"]) for h in history] == [
        (2, None, "manual"),
        (1, "v3", "f1"),
    ]


def test_cli_refuses_bad_values(cli_env, capsys, monkeypatch):
    assert cli.main(["thresholds", "set", "L1", "nan"]) == 1
    assert "finite" in capsys.readouterr().err
    monkeypatch.setenv("SPACE_THRESHOLDS__MAX_VALUE", "1.0")
    assert cli.main(["thresholds", "set", "L1", "3"]) == 1
    assert "above the maximum 1.0" in capsys.readouterr().err
    assert cli.main(["thresholds", "set", "L1", "3", "--force", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["value"] == 3.0


def test_cli_reports_an_unreachable_redis_in_one_line(cli_env, capsys, monkeypatch):
    monkeypatch.setenv("SPACE_REDIS__URL", f"redis://127.0.0.1:{free_port()}/0")
    assert cli.main(["thresholds", "list"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("space: error: Redis at redis://127.0.0.1:")
    assert "Traceback" not in err
