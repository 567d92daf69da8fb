"""Redis client construction from :class:`worker.settings.RedisSettings`.

Owns the one place where a ``redis.Redis`` is built: credentials come from ``SecretStr`` fields (never
from the URL, never logged), TLS options are passed only for ``rediss://``, and every command is bounded
by ``socket_timeout_ms`` so a slow or dead Redis adds bounded latency to a batch. Retries are few and
short for the same reason; callers (the threshold cache) degrade to last-known-good instead.

A command costs at most ``socket_timeout_ms`` x (1 + ``retries``): redis-py 8 also retries a new
connection's handshake inside each command attempt, (1 + retries)² timeouts against a Redis that
accepts connections and never answers (1.07 s instead of 0.5 s at the defaults), so the clients built
here connect once per attempt (:class:`_ConnectOnce`).
"""

from __future__ import annotations

from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from worker.errors import ConfigError
from worker.settings import RedisSettings, redact_url

__all__ = ["make_redis", "redis_kwargs"]


class _ConnectOnce:
    """Mixed into the pool's connection class: ``connect`` tries once; the command's retry retries.

    redis-py's ``Connection.connect`` wraps the socket connect and handshake in the connection's
    ``retry``, and a command attempt that finds its connection broken connects again under the same
    policy, so the attempts multiply. Here ``connect`` makes one attempt and disconnects on failure
    (what redis-py's retry does between attempts); retries happen only at the command level.
    """

    def connect(self) -> None:
        try:
            self.connect_check_health(check_health=True, retry_socket_connect=False)  # type: ignore[attr-defined]
        except BaseException as exc:
            self.disconnect(exc)  # type: ignore[attr-defined]
            raise


def _connect_once(pool: Any) -> None:
    """Make ``pool`` build :class:`_ConnectOnce` connections of its URL's kind (TCP, TLS, Unix socket)."""
    base = pool.connection_class
    if not issubclass(base, _ConnectOnce):
        pool.connection_class = type(f"ConnectOnce{base.__name__}", (_ConnectOnce, base), {})


def redis_kwargs(settings: RedisSettings) -> dict[str, Any]:
    """Keyword arguments for ``redis.Redis.from_url`` (secrets included: never log the result).

    Args:
        settings: the ``redis`` settings section.

    Returns:
        The keyword arguments, without the URL.

    Raises:
        ConfigError: TLS files are configured for a URL that is not ``rediss://``.
    """
    timeout_s = settings.socket_timeout_ms / 1000.0
    kwargs: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "health_check_interval": settings.health_check_interval_s,
        "decode_responses": True,
        "retry": Retry(ExponentialBackoff(cap=timeout_s, base=0.01), settings.retries),
    }
    if settings.username:
        kwargs["username"] = settings.username
    if settings.password is not None:
        kwargs["password"] = settings.password.get_secret_value()
    tls_files = {
        "ssl_ca_certs": settings.ssl_ca_certs,
        "ssl_certfile": settings.ssl_certfile,
        "ssl_keyfile": settings.ssl_keyfile,
    }
    if settings.url.startswith("rediss://"):
        kwargs.update({name: str(path) for name, path in tls_files.items() if path is not None})
    elif any(path is not None for path in tls_files.values()):
        raise ConfigError("SPACE_REDIS__SSL_*: TLS files are set but SPACE_REDIS__URL is not rediss://")
    return kwargs


def make_redis(settings: RedisSettings) -> redis.Redis:
    """Build a client (lazy: nothing connects until the first command).

    Args:
        settings: the ``redis`` settings section.

    Returns:
        A ``redis.Redis`` with ``decode_responses=True`` (all replies are ``str``).

    Raises:
        ConfigError: inconsistent TLS settings, or a URL redis-py cannot parse (shown redacted: redis-py's
            own message may quote part of it, a password included).
    """
    kwargs = redis_kwargs(settings)
    try:
        client = redis.Redis.from_url(settings.url, **kwargs)
    except (ValueError, TypeError) as exc:  # `from None`: no traceback shows redis-py's message
        raise ConfigError(
            f"SPACE_REDIS__URL: {redact_url(settings.url)} is not a valid Redis URL ({type(exc).__name__})"
        ) from None
    _connect_once(client.connection_pool)
    return client
