"""Shared fixtures: the embedded stack (real broker + real Redis), per-test topics and settings.

The stack is started once per test session through the same :class:`worker.stack.Stack` code that
``space stack up`` uses. Tests never skip when the broker or Redis is down: they fail.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# Keep torch and OpenCV from fighting over the two cores of CI machines.
os.environ.setdefault("OMP_NUM_THREADS", "2")

import structlog

import worker.logging
from worker.settings import Settings, load_settings
from worker.stack import Stack


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    """Undo a test's logging set-up, so tests do not depend on their order.

    A CLI command run in-process configures logging once per process (``space calibrate`` at WARNING):
    every later test's ``capture_logs`` would then miss info events.
    """
    config = structlog.get_config()
    configured = worker.logging._configured
    yield
    structlog.configure(**config)
    worker.logging._configured = configured


@dataclass(frozen=True)
class StackInfo:
    """Addresses of the running embedded stack."""

    bootstrap_servers: str
    redis_url: str
    state_dir: Path


@dataclass(frozen=True)
class Topics:
    """Unique topic names for one test."""

    requests: str
    results: str
    alerts: str
    dlq: str

    def as_settings(self) -> dict[str, str]:
        return {
            "requests_topic": self.requests,
            "results_topic": self.results,
            "alerts_topic": self.alerts,
            "dlq_topic": self.dlq,
        }


def _kafka_network_threads() -> dict[int | None, str]:
    return {t.ident: t.name for t in threading.enumerate() if t.name.startswith("kafka-io-")}


@pytest.fixture(autouse=True)
def _no_kafka_client_left_open() -> Iterator[None]:
    """Fail a test that leaves a kafka-python client open.

    Its network thread would go on reconnecting (to a broker a test may have stopped) for the rest of
    the session and draw from the global ``random`` module meanwhile, which Hypothesis reports as a
    strategy using ``random`` (a failure of an unrelated fuzz test, seen once in CI).
    """
    before = _kafka_network_threads()
    yield
    deadline = time.monotonic() + 5
    while leaked := sorted(name for ident, name in _kafka_network_threads().items() if ident not in before):
        if time.monotonic() > deadline:
            pytest.fail(f"kafka clients left open (network threads still running): {leaked}")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackInfo]:
    """A real Tansu broker and a real Redis for the whole session."""
    state_dir = tmp_path_factory.mktemp("stack")
    stack = Stack(state_dir, redis_url=os.environ.get("SPACE_REDIS__URL", "redis://127.0.0.1:6379/0"))
    stack.up()
    env = stack.env()
    try:
        yield StackInfo(env["SPACE_KAFKA__BOOTSTRAP_SERVERS"], env["SPACE_REDIS__URL"], state_dir)
    finally:
        stack.down()


@pytest.fixture
def key_prefix() -> str:
    """A Redis key prefix unique to this test (the Redis at 6379 is shared)."""
    return f"test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def redis_client(stack: StackInfo, key_prefix: str) -> Iterator[Any]:
    """A redis-py client on the stack's Redis; deletes the test's keys afterwards."""
    import redis

    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    client.ping()
    yield client
    for key in client.scan_iter(match=f"{key_prefix}*"):
        client.delete(key)
    client.close()


@pytest.fixture
def topics(stack: StackInfo, request: pytest.FixtureRequest) -> Iterator[Topics]:
    """Four unique topics (requests with 4 partitions) created for this test and deleted after it."""
    from worker.kafka_clients import ensure_topics, make_admin

    suffix = uuid.uuid4().hex[:8]
    names = Topics(f"req-{suffix}", f"res-{suffix}", f"alert-{suffix}", f"dlq-{suffix}")
    partitions = getattr(request, "param", 4)
    settings = load_settings(kafka={"bootstrap_servers": stack.bootstrap_servers})
    ensure_topics(
        settings.kafka, {names.requests: partitions, names.results: partitions, names.alerts: 1, names.dlq: 1}
    )
    yield names
    admin = make_admin(settings.kafka)
    try:
        admin.delete_topics([names.requests, names.results, names.alerts, names.dlq])
    except Exception:  # noqa: BLE001 - cleanup must not mask the test's own result
        pass
    finally:
        admin.close()


@pytest.fixture
def make_settings(stack: StackInfo, tmp_path: Path, key_prefix: str) -> Callable[..., Settings]:
    """Build settings for the embedded stack with the timeouts Tansu needs; sections can be overridden."""

    def build(topics: Topics | None = None, **sections: dict[str, Any]) -> Settings:
        kafka = {
            "bootstrap_servers": stack.bootstrap_servers,
            "group_id": f"group-{uuid.uuid4().hex[:8]}",
            "session_timeout_ms": 6000,
            "heartbeat_interval_ms": 1000,
            "commit_interval_ms": 200,
            **(topics.as_settings() if topics else {}),
            **sections.pop("kafka", {}),
        }
        base: dict[str, Any] = {
            "kafka": kafka,
            "redis": {"url": stack.redis_url, "key_prefix": key_prefix, **sections.pop("redis", {})},
            "heatmaps": {"store_uri": f"file://{tmp_path / 'heatmaps'}", **sections.pop("heatmaps", {})},
            "http": {"port": 0, "host": "127.0.0.1", **sections.pop("http", {})},
            "worker": {"state_dir": str(tmp_path / "state"), **sections.pop("worker", {})},
        }
        base.update(sections)
        return load_settings(**base)

    return build


# ------------------------------------------------------------------------------------------------
# A small trained model, built once per session and shared by the worker, e2e and demo tests.
# ------------------------------------------------------------------------------------------------
TRAINED_LINE = "brick"
TRAINED_INPUT_PX = 128
TRAINED_STEPS = int(os.environ.get("SPACE_TEST_TRAIN_STEPS", "20"))


@dataclass(frozen=True)
class TrainedModel:
    """A registry root holding one trained, promoted line, and the dataset it came from."""

    root: Path
    line: str
    version: str
    data: Path


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory: pytest.TempPathFactory) -> TrainedModel:
    """Train the test model (CC0 brick texture with drawn defects, 128 px) into a fresh registry."""
    import torch

    from models.synthetic import build_product_line
    from models.train import TrainConfig, train
    from worker.registry import ModelRegistry

    torch.manual_seed(0)
    base = tmp_path_factory.mktemp("trained")
    data = build_product_line(
        TRAINED_LINE, base / "data", n_train=20, n_val=8, n_test_good=8, n_test_defect=12, size=TRAINED_INPUT_PX, seed=0
    )
    root = base / "registry"
    train(
        TrainConfig(
            data=data, product_line=TRAINED_LINE, out=root, steps=TRAINED_STEPS, input_size=TRAINED_INPUT_PX,
            seed=0, model_version="v1", device="cpu",
        )
    )  # fmt: skip
    ModelRegistry(str(root)).promote(TRAINED_LINE, "v1", by="tests")
    return TrainedModel(root, TRAINED_LINE, "v1", data)
