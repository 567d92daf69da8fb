"""What the Kafka client factories pass to kafka-python, and what they refuse before connecting."""

from __future__ import annotations

from typing import Any

import pytest

from worker import kafka_clients
from worker.errors import ConfigError
from worker.settings import load_settings


def test_a_compression_codec_without_its_library_is_refused_naming_the_variable(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # kafka-python accepted it and failed at the first send (RuntimeError: "Libraries for snappy ... not found").
    monkeypatch.setattr(kafka_clients.kafka_codec, "has_snappy", lambda: False)
    settings = load_settings(kafka={"compression_type": "snappy"})
    with pytest.raises(ConfigError, match="SPACE_KAFKA__COMPRESSION_TYPE: snappy needs its library"):
        kafka_clients.make_producer(settings.kafka)


@pytest.mark.parametrize("codec", ["gzip", "snappy", "lz4", "zstd"])
def test_every_codec_the_settings_accept_is_installed(codec: str) -> None:
    # Requests compressed with any of them must be readable too, or their partition stops every worker.
    assert getattr(kafka_clients.kafka_codec, f"has_{codec}")()


def test_the_consumer_gets_the_request_timeout_and_isolation_level(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    seen: dict[str, Any] = {}

    class Opened:
        def assignment(self) -> set[Any]:
            return set()

    def fake_open(cls: type, kwargs: dict[str, Any]) -> Any:
        seen.update(kwargs)
        return Opened()

    monkeypatch.setattr(kafka_clients, "_open", fake_open)
    settings = load_settings(kafka={"request_timeout_ms": 45_000})
    kafka_clients.make_consumer(settings.kafka)
    assert seen["request_timeout_ms"] == 45_000 and seen["isolation_level"] == "read_committed"
    kafka_clients.make_admin(settings.kafka)
    assert seen["request_timeout_ms"] == 45_000


def test_security_options_the_protocol_ignores_are_logged(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # A client that believes it encrypts or authenticates and does not. Logged, not refused: the deployment
    # mounts its Kafka secret files in every overlay, PLAINTEXT ones included.
    from structlog.testing import capture_logs

    class Opened:
        def assignment(self) -> set[Any]:
            return set()

    monkeypatch.setattr(kafka_clients, "_open", lambda cls, kwargs: Opened())
    settings = load_settings(kafka={"ssl_cafile": "/etc/ca.pem", "sasl_username": "worker"})
    with capture_logs() as logs:
        kafka_clients.make_consumer(settings.kafka)
    (event,) = [e for e in logs if e["event"] == "kafka_security_options_unused"]
    assert event["options"] == ["ssl_cafile", "sasl_username"] and event["log_level"] == "warning"
    with capture_logs() as logs:
        kafka_clients.make_consumer(load_settings().kafka)
    assert not [e for e in logs if e["event"] == "kafka_security_options_unused"]
