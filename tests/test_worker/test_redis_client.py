"""Redis client construction: a URL redis-py cannot parse stops with one line that never shows a secret."""

from __future__ import annotations

import pytest

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
