"""Redis client construction: a URL redis-py cannot parse stops with one line that never shows a secret;
a dead or silent Redis costs at most ``socket_timeout_ms`` x (1 + ``retries``) per command."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid

import pytest
import redis

from worker.errors import ConfigError
from worker.redis_client import make_redis
from worker.settings import RedisSettings


def test_a_valid_url_builds_a_lazy_client() -> None:
    client = make_redis(RedisSettings(url="redis://127.0.0.1:1/3", socket_timeout_ms=50))
    assert client.connection_pool.connection_kwargs["db"] == 3  # nothing connected


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://host:notaport/0", "redis://host:notaport/0"),
        ("redis://host:6379/0?db=x", "redis://host:6379/0?db=x"),
        # Settings refuse user info in the URL; make_redis must not leak it either when handed one anyway.
        ("redis://app:S3cr/etPass@host:6379/0", "redis://***@host:6379/0"),
    ],
)
def test_an_unparsable_url_is_a_config_error_with_the_redacted_url(url: str, shown: str) -> None:
    settings = RedisSettings.model_construct(url=url)  # bypasses the URL validator, as a caller's bug would
    with pytest.raises(ConfigError) as info:
        make_redis(settings)
    message = str(info.value)
    assert message.startswith(f"SPACE_REDIS__URL: {shown} is not a valid Redis URL")
    assert "S3cr" not in message and "etPass" not in message
    assert "\n" not in message
    assert info.value.__suppress_context__  # a traceback does not show redis-py's message either


class _SilentServer:
    """Accepts TCP connections and never answers: a hung Redis (or a proxy in front of a dead one)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                self.accepted.append(self.sock.accept()[0])

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


@pytest.mark.parametrize("retries", [0, 1, 2])
def test_a_silent_redis_costs_one_timeout_per_attempt(retries: int) -> None:
    # redis-py 8 on its own retries the handshake of every command attempt's connection as well:
    # (1 + retries)^2 timeouts and connections (4 and 1.07 s at the defaults), each on the infer thread.
    server = _SilentServer()
    try:
        client = make_redis(
            RedisSettings(url=f"redis://127.0.0.1:{server.port}/0", socket_timeout_ms=100, retries=retries)
        )
        start = time.monotonic()
        with pytest.raises(redis.exceptions.TimeoutError):
            client.get("k")
        elapsed_s = time.monotonic() - start
        time.sleep(0.05)  # the accept thread has seen every connection
        assert len(server.accepted) == 1 + retries
        assert elapsed_s < 0.1 * (1 + retries) + 0.4
        client.close()
    finally:
        server.close()


@pytest.mark.redis
def test_a_connection_the_server_dropped_is_replaced(stack) -> None:  # type: ignore[no-untyped-def]
    # A pooled connection that died while idle (Redis restarted, a proxy's idle cut) reconnects.
    client = make_redis(RedisSettings(url=stack.redis_url, retries=1))
    admin = redis.Redis.from_url(stack.redis_url)
    try:
        assert client.ping()
        name = f"space-test-{uuid.uuid4().hex}"
        client.client_setname(name)
        killed = admin.client_kill_filter(_id=next(c["id"] for c in admin.client_list() if c["name"] == name))
        assert killed == 1
        assert client.ping()  # the pool notices the dead socket and connects again, through _ConnectOnce
    finally:
        client.close()
        admin.close()
