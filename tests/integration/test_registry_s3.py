"""The model registry on an s3:// root (moto server): listing, pointer, download cache, verification,
hot-swap through ModelManager, and ``space models`` configured by environment variables."""

# ruff: noqa: F811 - the moto fixtures are imported from test_heatmaps_s3 and used as arguments
from __future__ import annotations

import json
import stat
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from models.artifact import ModelCard, load_artifact, save_artifact
from tests.integration.test_heatmaps_s3 import moto_endpoint, s3_client, s3_settings  # noqa: F401 - fixtures
from worker.cli import main
from worker.model_manager import ModelManager
from worker.registry import ModelRegistry, RegistryError

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelCard, dict[str, Any]]:
    from tests.test_models.model_fixtures import make_card, make_model

    model = make_model()
    folder = save_artifact(tmp_path_factory.mktemp("s3-artifact") / "v1", make_card(model), model.state_dict())
    return load_artifact(folder)


def _upload(client: Any, bucket: str, key_prefix: str, folder: Path) -> None:
    for name in ("model.safetensors", "model.json"):  # weights first, like a careful uploader
        client.upload_file(str(folder / name), bucket, f"{key_prefix}/{name}")


@pytest.fixture
def s3_root(s3_client: Any, artifact: tuple[ModelCard, dict[str, Any]], tmp_path: Path) -> str:
    """A bucket with brick/v1 and brick/v2 under ``models/``; returns the root URI."""
    bucket = f"models-{uuid.uuid4().hex[:8]}"
    s3_client.create_bucket(Bucket=bucket)
    card, state = artifact
    for version in ("v1", "v2"):
        folder = save_artifact(tmp_path / "src" / version, card.model_copy(update={"version": version}), state)
        _upload(s3_client, bucket, f"models/brick/{version}", folder)
    s3_client.put_object(Bucket=bucket, Key="models/brick/partial/model.safetensors", Body=b"no card yet")
    return f"s3://{bucket}/models"


def _registry(root: str, client: Any, tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(root, s3_client_factory=lambda: client, cache_dir=tmp_path / "cache")


def test_s3_registry_lists_promotes_rolls_back_and_downloads(s3_root: str, s3_client: Any, tmp_path: Path) -> None:
    registry = _registry(s3_root, s3_client, tmp_path)
    assert registry.lines() == ["brick"]
    assert registry.versions("brick") == ["v1", "v2"]  # 'partial' has no card
    assert registry.pointer("brick") is None
    registry.promote("brick", "v1", by="alice")
    registry.promote("brick", "v2", by="bob")
    bucket = s3_root.removeprefix("s3://").split("/")[0]
    stored = json.loads(s3_client.get_object(Bucket=bucket, Key="models/brick/ACTIVE.json")["Body"].read())
    assert stored["version"] == "v2" and stored["history"] == ["v1"] and stored["updated_by"] == "bob"
    assert registry.rollback("brick").version == "v1"

    assert json.loads(registry.card_text("brick", "v2"))["version"] == "v2"
    assert not list((tmp_path / "cache").glob("*/brick/v2"))  # reading a card fetches no weights
    path = registry.local_path("brick", "v2")
    root_dir, *rest = path.relative_to(tmp_path / "cache").parts
    assert rest == ["brick", "v2"] and root_dir.startswith(bucket + "-")  # one cache folder per root
    card, _ = load_artifact(path)  # the downloaded copy passes the checksum
    assert card.version == "v2"
    assert registry.verify("brick", "v2").version == "v2"
    with pytest.raises(RegistryError, match="no version"):
        registry.promote("brick", "partial")


def test_s3_corrupt_upload_is_refused_and_its_cached_copy_dropped(
    s3_root: str, s3_client: Any, tmp_path: Path, artifact: tuple[ModelCard, dict[str, Any]]
) -> None:
    registry = _registry(s3_root, s3_client, tmp_path)
    bucket, prefix = s3_root.removeprefix("s3://").split("/", 1)
    card, state = artifact
    good = save_artifact(tmp_path / "src" / "v3", card.model_copy(update={"version": "v3"}), state)
    weights = bytearray((good / "model.safetensors").read_bytes())
    weights[-1] ^= 0xFF
    s3_client.put_object(Bucket=bucket, Key=f"{prefix}/brick/v3/model.safetensors", Body=bytes(weights))
    s3_client.upload_file(str(good / "model.json"), bucket, f"{prefix}/brick/v3/model.json")
    with pytest.raises(RegistryError, match=r"not a valid artifact.*sha256"):
        registry.verify("brick", "v3")
    assert list((tmp_path / "cache").glob("*/brick/v3")) == []
    _upload(s3_client, bucket, f"{prefix}/brick/v3", good)  # fixed upload of the same version
    assert registry.verify("brick", "v3").version == "v3"


def test_a_version_cached_from_one_root_is_not_served_for_another(
    s3_root: str, s3_client: Any, tmp_path: Path, artifact: tuple[ModelCard, dict[str, Any]]
) -> None:
    # staging and prod both hold brick/v3; prod's upload is corrupt. Verifying staging first (same state
    # folder, as after a change of SPACE_MODELS__ROOT) must not make prod's copy pass.
    bucket, prefix = s3_root.removeprefix("s3://").split("/", 1)
    card, state = artifact
    good = save_artifact(tmp_path / "src" / "v3", card.model_copy(update={"version": "v3"}), state)
    _upload(s3_client, bucket, "staging/brick/v3", good)
    weights = bytearray((good / "model.safetensors").read_bytes())
    weights[-1] ^= 0xFF
    s3_client.put_object(Bucket=bucket, Key=f"{prefix}/brick/v3/model.safetensors", Body=bytes(weights))
    s3_client.upload_file(str(good / "model.json"), bucket, f"{prefix}/brick/v3/model.json")

    staging = _registry(f"s3://{bucket}/staging", s3_client, tmp_path)
    assert staging.verify("brick", "v3").version == "v3"
    prod = _registry(s3_root, s3_client, tmp_path)
    with pytest.raises(RegistryError, match=r"not a valid artifact.*sha256"):
        prod.verify("brick", "v3")


def test_model_manager_hot_swaps_from_s3_and_recovers_after_a_fixed_upload(
    s3_root: str, s3_client: Any, tmp_path: Path, artifact: tuple[ModelCard, dict[str, Any]]
) -> None:
    registry = _registry(s3_root, s3_client, tmp_path)
    registry.promote("brick", "v1")
    now = [0.0]
    outcomes: list[str] = []

    def load(path: Path) -> Any:
        loaded_card, _ = load_artifact(path)  # checksum-verified, like Detector.load
        return SimpleNamespace(card=loaded_card)

    manager = ModelManager(
        registry, load, warmup_batch_sizes=(), clock=lambda: now[0], swap_retry_s=10,
        on_load=lambda line, outcome: outcomes.append(outcome),
    )  # fmt: skip
    assert manager.get("brick").detector.card.version == "v1"

    bucket, prefix = s3_root.removeprefix("s3://").split("/", 1)
    card, state = artifact
    good = save_artifact(tmp_path / "src" / "v3", card.model_copy(update={"version": "v3"}), state)
    s3_client.upload_file(str(good / "model.json"), bucket, f"{prefix}/brick/v3/model.json")
    s3_client.put_object(Bucket=bucket, Key=f"{prefix}/brick/v3/model.safetensors", Body=b"truncated")
    registry.promote("brick", "v3")  # bypasses the CLI's check
    assert manager.refresh() == []
    assert manager.get("brick").version == "v1"
    assert outcomes == ["ok", "failed"]

    _upload(s3_client, bucket, f"{prefix}/brick/v3", good)
    now[0] = 11.0
    assert manager.refresh() == ["brick"]  # downloaded again: the broken copy was not kept
    assert manager.get("brick").detector.card.version == "v3"


def test_models_cli_on_an_s3_root(
    s3_root: str, moto_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.setattr("worker.logging.configure_logging", lambda *args, **kwargs: None)
    for name, value in {
        "SPACE_MODELS__ROOT": s3_root,
        "SPACE_S3__ENDPOINT_URL": moto_endpoint,
        "SPACE_S3__ACCESS_KEY_ID": "test",
        "SPACE_S3__SECRET_ACCESS_KEY": "test",
        "SPACE_WORKER__STATE_DIR": str(tmp_path / "state"),
    }.items():
        monkeypatch.setenv(name, value)
    assert main(["models", "promote", "brick", "v2", "--by", "ci"]) == 0
    assert main(["models", "list", "--json"]) == 0
    out = capsys.readouterr().out
    listing = json.loads(out[out.index("{") :])
    assert listing["root"] == s3_root
    assert [(v["version"], v["active"]) for v in listing["lines"][0]["versions"]] == [("v1", False), ("v2", True)]


def test_s3_client_errors_are_registry_errors(s3_client: Any, tmp_path: Path) -> None:
    registry = _registry(f"s3://missing-{uuid.uuid4().hex[:8]}/models", s3_client, tmp_path)
    with pytest.raises(RegistryError, match=r"cannot read s3://missing-\w+/models/brick/ACTIVE.json: NoSuchBucket"):
        registry.active_version("brick")
    with pytest.raises(RegistryError, match=r"cannot list s3://missing-\w+/models/: NoSuchBucket"):
        registry.lines()


def test_downloaded_versions_are_readable_by_other_users(s3_root: str, s3_client: Any, tmp_path: Path) -> None:
    path = _registry(s3_root, s3_client, tmp_path).local_path("brick", "v1")
    assert stat.S_IMODE(path.stat().st_mode) == 0o755  # not mkdtemp's 0700


def test_refresh_blocked_on_a_hung_s3_keeps_liveness(
    s3_root: str, s3_client: Any, s3_settings: Any, moto_endpoint: str, tmp_path: Path
) -> None:
    from prometheus_client import CollectorRegistry

    from tests.reliability.proxy import DelayProxy
    from tests.test_worker.test_http_and_sender import _get
    from tests.test_worker.test_refresh_liveness import refresh_app
    from worker.http import HealthServer, Heartbeats
    from worker.s3 import make_s3_client

    bucket = s3_root.removeprefix("s3://").split("/")[0]
    for name in ("model.json", "model.safetensors"):  # a second line, so one pass reads two pointers
        s3_client.copy_object(
            Bucket=bucket, Key=f"models/tile/v1/{name}", CopySource={"Bucket": bucket, "Key": f"models/brick/v1/{name}"}
        )
    port = int(moto_endpoint.rsplit(":", 1)[1])
    with DelayProxy(port) as proxy:
        slow = s3_settings.model_copy(update={"endpoint_url": f"http://127.0.0.1:{proxy.port}"})
        registry = _registry(s3_root, make_s3_client(slow, timeout_s=0.5, max_attempts=1), tmp_path)
        for line in ("brick", "tile"):
            registry.promote(line, "v1")
        manager = ModelManager(
            registry, lambda path: SimpleNamespace(card=load_artifact(path)[0]), warmup_batch_sizes=()
        )
        manager.get("brick")
        manager.get("tile")
        beats = Heartbeats()
        server = HealthServer("127.0.0.1", 0, CollectorRegistry(), beats, 0.4, lambda: (True, {}))
        app = refresh_app(manager, beats, healthy_after_s=0.4)
        proxy.delay_s = 60  # the store accepts connections and never answers in time: every read times out
        beats.beat("model-refresh")
        loop = threading.Thread(target=app._refresh_loop, daemon=True)
        server.start()
        loop.start()
        codes, waits = [], []
        try:
            deadline = time.monotonic() + 2.5  # over two passes of ~1 s (two lines x 0.5 s timeout)
            while time.monotonic() < deadline:
                code, body = _get(server.port, "/healthz")
                codes.append(code)
                waits += [w["on"] for w in json.loads(body).get("waiting", {}).values()]
                time.sleep(0.05)
        finally:
            app._stop.set()
            loop.join(10)
            server.stop()
    assert set(codes) == {200}, f"/healthz failed {codes.count(503)} of {len(codes)} times"
    assert {"model registry, line brick", "model registry, line tile"} <= set(waits)
    assert {line: m.version for line, m in manager.loaded().items()} == {"brick": "v1", "tile": "v1"}


def test_s3_pointer_writes_are_compare_and_set(s3_root: str, s3_client: Any, tmp_path: Path) -> None:
    # A conditional PUT (If-Match the ETag read; If-None-Match for a first promote): another operator's
    # promote between this command's read and write makes it fail instead of overwriting that promote.
    from worker.registry import PointerConflict

    registry, other = _registry(s3_root, s3_client, tmp_path), _registry(s3_root, s3_client, tmp_path / "b")
    read = registry._backend.read_versioned

    def read_then_someone_writes(key: str) -> tuple[str | None, str | None]:
        found = read(key)
        other.promote("brick", "v1", by="bob")
        return found

    registry._backend.read_versioned = read_then_someone_writes  # type: ignore[method-assign]
    with pytest.raises(PointerConflict, match="now version 'v1' by bob"):
        registry.promote("brick", "v2", by="alice")  # the first promote of the line: If-None-Match
    with pytest.raises(PointerConflict):
        registry.promote("brick", "v2", by="alice")  # If-Match the ETag it read
    registry._backend.read_versioned = read  # type: ignore[method-assign]
    pointer = registry.pointer("brick")
    assert pointer is not None and (pointer.version, pointer.updated_by) == ("v1", "bob")
    assert registry.promote("brick", "v2", by="alice").history == ("v1",)
