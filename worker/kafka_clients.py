"""kafka-python consumer, producer and admin factories built from :class:`KafkaSettings`.

The consumer commits manually (at-least-once), uses the cooperative-sticky assignor so that adding a
pod moves only the partitions it takes (with the ownership fix of :class:`CooperativeStickyAssignor`),
and keeps ``max_poll_interval_ms`` independent of model time (the poll loop never waits for inference).
The producer is idempotent with ``acks=all``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import structlog
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka import codec as kafka_codec
from kafka.admin import NewTopic
from kafka.coordinator.assignors.cooperative_sticky import (
    CooperativeStickyAssignor as _KafkaPythonCooperativeSticky,
)
from kafka.errors import TopicAlreadyExistsError
from kafka.structs import TopicPartition

import worker.kafka_patches  # noqa: F401 - kafka-python fixes, installed before any consumer exists
from worker.errors import ConfigError
from worker.settings import KafkaSettings

log = structlog.get_logger(__name__)


class CooperativeStickyAssignor(_KafkaPythonCooperativeSticky):
    """kafka-python's cooperative-sticky assignor, advertising the partitions the consumer owns *now*.

    kafka-python (3.0.12) fills a member's JoinGroup ``owned_partitions`` from the last assignment the
    member received and does not clear it when the member loses its partitions (fenced: session expired,
    ``IllegalGeneration`` on a heartbeat or commit). Such a member rejoins claiming partitions it no
    longer holds. When the leader moves one of them to another member, it withholds the partition in
    the first round (KIP-429: the owner must revoke it first); the claimant finds nothing to revoke,
    so nobody asks for the second round, and the partition is consumed by no one until some unrelated
    rebalance. Seen with three workers on Tansu: a partition unowned for 40 s and counting. The Java
    client builds the field from the consumer's current assignment; so does this one, once bound to
    its consumer with :meth:`track`. The protocol name is unchanged, so members with and without the
    fix form one group.
    """

    def __init__(self) -> None:
        super().__init__()
        self._current: Callable[[], Iterable[TopicPartition] | None] | None = None

    def track(self, current: Callable[[], Iterable[TopicPartition] | None]) -> None:
        """Take owned partitions from ``current`` (``consumer.assignment``) from now on."""
        self._current = current

    def metadata(self, topics: Iterable[str]) -> Any:
        if self._current is not None:
            self.member_assignment = sorted(self._current() or ())
        return super().metadata(topics)


def _warn_unused_security_options(settings: KafkaSettings) -> None:
    unused = settings.unused_security_options()
    if unused:
        log.warning(
            "kafka_security_options_unused", security_protocol=settings.security_protocol, options=unused,
            detail="set, but the protocol ignores them: the client neither encrypts nor authenticates with them",
        )  # fmt: skip


def _open(client_class: Any, kwargs: dict[str, Any]) -> Any:
    """Construct a kafka-python client; if the constructor fails, stop the network thread it started.

    kafka-python 3 starts a client's network thread before bootstrapping, and a bootstrap that fails
    (brokers unreachable within ``bootstrap_timeout_ms``) raises out of the constructor with that
    thread left running, reconnecting for the rest of the process.
    """
    default_factory = getattr(client_class, "DEFAULT_CONFIG", {}).get("kafka_client")
    if default_factory is None:
        return client_class(**kwargs)
    factory = kwargs.get("kafka_client", default_factory)
    created: list[Any] = []

    def recording_factory(**config: Any) -> Any:
        created.append(factory(**config))
        return created[-1]

    try:
        return client_class(**{**kwargs, "kafka_client": recording_factory})
    except BaseException:
        for net_client in created:
            with contextlib.suppress(Exception):
                net_client.close()
        raise


def make_consumer(settings: KafkaSettings, *, client_id: str | None = None, **overrides: Any) -> KafkaConsumer:
    """A group consumer of raw bytes with manual commits and the cooperative-sticky assignor."""
    assignor = CooperativeStickyAssignor()
    kwargs: dict[str, Any] = {
        **settings.client_kwargs(),
        "client_id": client_id or settings.client_id,
        "group_id": settings.group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": settings.auto_offset_reset,
        "session_timeout_ms": settings.session_timeout_ms,
        "heartbeat_interval_ms": settings.heartbeat_interval_ms,
        "max_poll_interval_ms": settings.max_poll_interval_ms,
        "max_poll_records": settings.max_poll_records,
        "max_partition_fetch_bytes": settings.max_partition_fetch_bytes,
        "fetch_max_bytes": settings.fetch_max_bytes,
        "isolation_level": settings.isolation_level,
        "partition_assignment_strategy": [assignor],
    }
    kwargs.update(overrides)
    _warn_unused_security_options(settings)
    consumer = _open(KafkaConsumer, kwargs)
    assignor.track(consumer.assignment)
    return consumer


def network_sleep(consumer: Any) -> Callable[[float], Awaitable[Any]] | None:
    """The awaitable sleep of kafka-python 3's network loop, for rebalance callbacks that must wait.

    kafka-python 3 runs rebalance callbacks on its network thread, which also sends the heartbeats: a
    callback that blocks stops them, while one that awaits this sleep lets them go on. None when the
    consumer has no such loop (a test fake, or kafka-python internals that moved).
    """
    sleep = getattr(getattr(consumer, "_net", None), "sleep", None)
    return sleep if callable(sleep) else None


def make_producer(settings: KafkaSettings, *, client_id: str | None = None, **overrides: Any) -> KafkaProducer:
    """An idempotent producer (acks=all) sized for inline images.

    Raises:
        ConfigError: the compression codec's library is not installed (kafka-python fails at the first send).
    """
    codec = settings.compression_type
    if codec != "none" and not getattr(kafka_codec, f"has_{codec}", lambda: True)():
        raise ConfigError(f"SPACE_KAFKA__COMPRESSION_TYPE: {codec} needs its library, which is not installed")
    kwargs: dict[str, Any] = {
        **settings.client_kwargs(),
        "client_id": client_id or settings.client_id,
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": settings.linger_ms,
        "max_request_size": settings.max_request_size,
        "delivery_timeout_ms": settings.delivery_timeout_ms,
        "max_block_ms": settings.max_block_ms,
        "compression_type": None if settings.compression_type == "none" else settings.compression_type,
    }
    kwargs.update(overrides)
    return _open(KafkaProducer, kwargs)


def make_admin(settings: KafkaSettings, **overrides: Any) -> KafkaAdminClient:
    """An admin client (topic creation for the embedded stack, tests and the demo)."""
    kwargs = {**settings.client_kwargs(), "client_id": f"{settings.client_id}-admin", **overrides}
    return _open(KafkaAdminClient, kwargs)


def ensure_topics(settings: KafkaSettings, topics: dict[str, int], replication_factor: int = 1) -> list[str]:
    """Create the topics that do not exist yet (name -> partitions). Returns the ones created."""
    admin = make_admin(settings)
    try:
        existing = set(admin.list_topics())
        missing = [NewTopic(name, n, replication_factor) for name, n in topics.items() if name not in existing]
        created = []
        for topic in missing:
            try:
                admin.create_topics([topic])
                created.append(topic.name)
            except TopicAlreadyExistsError:
                pass
        return created
    finally:
        admin.close()


def worker_topics(settings: KafkaSettings, request_partitions: int = 4) -> dict[str, int]:
    """The four topics of the product with default partition counts for a local stack."""
    return {
        settings.requests_topic: request_partitions,
        settings.results_topic: request_partitions,
        settings.alerts_topic: 1,
        settings.dlq_topic: 1,
    }


def describe_kafka_error(exc: BaseException, settings: KafkaSettings, action: str) -> str:
    """One line for a CLI: ``<action> at <servers, credentials redacted> failed: <Error>: <first line>``."""
    from worker.settings import redact_url

    name = type(exc).__name__
    detail = str(exc).splitlines()[0] if str(exc) else ""
    while detail.startswith(f"{name}: "):  # kafka-python repeats the class name in the message
        detail = detail.removeprefix(f"{name}: ")
    servers = ",".join(redact_url(s) for s in settings.bootstrap_servers.split(","))
    text = f"{action} at {servers} failed: {name}" + (f": {detail}" if detail else "")
    if detail.startswith("Unable to bootstrap"):
        text += f" (tried for SPACE_KAFKA__BOOTSTRAP_TIMEOUT_MS={settings.bootstrap_timeout_ms} ms)"
    return text
