"""deploy/compose.yaml: the services exist, wait for each other, and agree with the worker's
settings (broker listener, topics, partitions, buckets, ports, grace period)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from worker.settings import Settings

from ._support import COMPOSE, REPO, REQUESTS_PARTITIONS, load_compose

SERVICES = load_compose()["services"]
WORKER = SERVICES["worker"]
DEFAULTS = Settings.model_construct()


def _env(service: str) -> dict[str, str]:
    return {k: str(v) for k, v in SERVICES[service].get("environment", {}).items()}


def _script(service: str) -> str:
    command = SERVICES[service]["command"]
    return command if isinstance(command, str) else "\n".join(command)


def _duration_s(value: str) -> float:
    match = re.fullmatch(r"(\d+)(ms|s|m)", value)
    assert match, value
    return int(match[1]) * {"ms": 0.001, "s": 1, "m": 60}[match[2]]


def test_services() -> None:
    assert set(SERVICES) == {"kafka", "kafka-init", "redis", "minio", "minio-init", "worker"}


@pytest.mark.parametrize("service", ["kafka", "kafka-init", "redis", "minio", "minio-init"])
def test_third_party_images_are_pinned(service: str) -> None:
    image = SERVICES[service]["image"]
    _, _, tag = image.rpartition(":")
    assert tag not in ("", "latest"), image
    assert "/" not in tag, f"{image} has no tag"


def test_kafka_is_a_single_kraft_node() -> None:
    env = _env("kafka")
    assert SERVICES["kafka"]["image"].startswith("apache/kafka:")
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{env['KAFKA_NODE_ID']}@kafka:")
    assert "CLUSTER_ID" in env
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false", "topics come from kafka-init, with partitions"
    assert int(env["KAFKA_MESSAGE_MAX_BYTES"]) >= DEFAULTS.kafka.max_request_size


def test_listeners_serve_the_host_and_the_compose_network() -> None:
    env = _env("kafka")
    advertised = dict(item.split("://", 1) for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    listeners = dict(item.split("://", 1) for item in env["KAFKA_LISTENERS"].split(","))
    protocols = dict(item.split(":", 1) for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(advertised) <= set(listeners) <= set(protocols)
    assert _env("worker")["SPACE_KAFKA__BOOTSTRAP_SERVERS"] in advertised.values(), (
        "worker uses an advertised one"
    )
    host = [name for name, address in advertised.items() if address.startswith("localhost:")]
    assert host, "a listener advertised to the host"
    host_port = advertised[host[0]].rsplit(":", 1)[1]
    assert f"127.0.0.1:{host_port}:{host_port}" in SERVICES["kafka"]["ports"]


def test_topic_init_creates_the_worker_topics() -> None:
    script = _script("kafka-init")
    created = dict(re.findall(r"^\s*create (\S+) (\d+)\s*$", script, flags=re.MULTILINE))
    env = _env("worker")
    topics = {
        env.get(f"SPACE_KAFKA__{name.upper()}", getattr(DEFAULTS.kafka, name))
        for name in ("requests_topic", "results_topic", "alerts_topic", "dlq_topic")
    }
    assert set(created) == topics
    assert int(created[env["SPACE_KAFKA__REQUESTS_TOPIC"]]) == REQUESTS_PARTITIONS
    assert "--if-not-exists" in script, "re-running the stack must not fail"
    assert "kafka:19092" in script


def test_buckets_and_endpoints_match_the_worker() -> None:
    env = _env("worker")
    heatmap_bucket = env["SPACE_HEATMAPS__STORE_URI"].removeprefix("s3://").split("/", 1)[0]
    assert re.search(rf"\b{re.escape(heatmap_bucket)}\b", _script("minio-init"))
    assert env["SPACE_S3__ENDPOINT_URL"] == "http://minio:9000"
    assert env["SPACE_REDIS__URL"].startswith("redis://redis:6379/")
    assert env["SPACE_S3__ACCESS_KEY_ID"] == _env("minio")["MINIO_ROOT_USER"]
    assert env["SPACE_S3__SECRET_ACCESS_KEY"] == _env("minio")["MINIO_ROOT_PASSWORD"]


def test_startup_order_and_healthchecks() -> None:
    for service in ("kafka", "redis", "minio", "worker"):
        assert SERVICES[service]["healthcheck"]["test"], service
    assert SERVICES["kafka-init"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert SERVICES["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert WORKER["depends_on"] == {
        "kafka-init": {"condition": "service_completed_successfully"},
        "minio-init": {"condition": "service_completed_successfully"},
        "redis": {"condition": "service_healthy"},
    }


def test_worker_container_matches_the_image_contract() -> None:
    env = _env("worker")
    build = WORKER["build"]
    assert (COMPOSE.parent / build["context"]).resolve() == REPO
    assert (REPO / build["dockerfile"]).name == "Dockerfile.cpu"
    assert (REPO / build["dockerfile"]).is_file()
    assert WORKER["read_only"] is True
    assert {"/tmp", "/home/space"} <= set(WORKER["tmpfs"])
    # SOURCE:TARGET[:MODE]; SOURCE may hold ${VAR:-default}, so match the target from the right.
    mounts = {re.fullmatch(r"(.+):(/[^:]*)(:ro|:rw)?", volume)[2] for volume in WORKER["volumes"]}
    assert env["SPACE_WORKER__STATE_DIR"] in mounts
    assert env["SPACE_MODELS__ROOT"] in mounts
    port = env.get("SPACE_HTTP__PORT", str(DEFAULTS.http.port))
    assert f"127.0.0.1:{port}:{port}" in WORKER["ports"]
    grace_s = float(env.get("SPACE_WORKER__SHUTDOWN_GRACE_S", DEFAULTS.worker.shutdown_grace_s))
    assert _duration_s(WORKER["stop_grace_period"]) >= grace_s + 10


def _ports(service: dict[str, Any]) -> list[str]:
    return [str(p) for p in service.get("ports", [])]


def test_published_ports_bind_loopback_only() -> None:
    for name, service in SERVICES.items():
        for port in _ports(service):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"
