"""``space thresholds set --model-version`` against the model registry: a version the line does not have
would be ignored by every worker forever, so it is refused unless the operator says it is on purpose."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from worker.cli import main
from worker.registry import ModelRegistry

pytestmark = pytest.mark.redis

SHARED_URL = os.environ.get("SPACE_REDIS__URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """Environment of the ``space`` command: shared Redis under a unique prefix, a file model root."""
    import structlog

    import worker.logging

    prefix = f"test-{uuid.uuid4().hex[:8]}"
    root = tmp_path / "models"
    for version in ("v1", "v2"):
        (root / "brick" / version).mkdir(parents=True)
        (root / "brick" / version / "model.json").write_text("{}")
    ModelRegistry(str(root)).promote("brick", "v1")
    saved = structlog.get_config()
    monkeypatch.setattr(worker.logging, "_configured", False)
    for name, value in {
        "SPACE_REDIS__URL": SHARED_URL,
        "SPACE_REDIS__KEY_PREFIX": prefix,
        "SPACE_MODELS__ROOT": str(root),
        "SPACE_SECRETS_DIR": str(tmp_path / "no-secrets"),
        "SPACE_WORKER__STATE_DIR": str(tmp_path / "state"),
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("SPACE_CONFIG_FILE", raising=False)
    yield root
    structlog.configure(**saved)
    client = redis.Redis.from_url(SHARED_URL)
    for key in client.scan_iter(match=f"{prefix}:*"):
        client.delete(key)
    client.close()


def test_set_refuses_a_model_version_the_registry_lacks(cli_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["thresholds", "set", "brick", "0.5", "--model-version", "v3"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("space: error: line brick has no model version v3") and err.count("\n") == 1
    assert "(have: v1, v2)" in err and "--allow-unknown-version" in err
    assert main(["thresholds", "get", "brick"]) == 3  # nothing was written
    capsys.readouterr()

    assert main(["thresholds", "set", "brick", "0.5", "--model-version", "v2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model_version"] == "v2"
    assert main(["thresholds", "set", "glass", "0.5", "--model-version", "v1"]) == 1  # a line without models
    assert "line glass has no model version v1" in capsys.readouterr().err
    assert main(["thresholds", "set", "brick", "0.5", "--model-version", "../v1"]) == 1
    assert "invalid version '../v1'" in capsys.readouterr().err


def test_allow_unknown_version_writes_it_anyway(cli_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["thresholds", "set", "brick", "0.5", "--model-version", "v3", "--allow-unknown-version", "--json"]) == 0
    )
    assert json.loads(capsys.readouterr().out)["model_version"] == "v3"
    assert main(["thresholds", "set", "brick", "0.6", "--json"]) == 0  # no model version: nothing to check
    assert json.loads(capsys.readouterr().out)["model_version"] is None


def test_an_unreadable_registry_refuses_with_the_reason(
    cli_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SPACE_MODELS__ROOT", "s3://models/root")
    monkeypatch.setenv("SPACE_S3__ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("SPACE_S3__ACCESS_KEY_ID", "test")
    monkeypatch.setenv("SPACE_S3__SECRET_ACCESS_KEY", "not-shown-anywhere")
    assert main(["thresholds", "set", "brick", "0.5", "--model-version", "v2"]) == 1
    err = capsys.readouterr().err
    assert "cannot check --model-version v2 against the model registry: cannot list s3://models/root/brick/" in err
    assert "not-shown-anywhere" not in err


def test_without_a_configured_registry_nothing_is_checked(
    cli_env: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("SPACE_MODELS__ROOT")
    monkeypatch.chdir(tmp_path)  # no ./.space/models either
    assert main(["thresholds", "set", "brick", "0.5", "--model-version", "v9", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model_version"] == "v9"


def test_set_refuses_a_line_the_registry_has_no_model_for(cli_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A typo in the line name wrote a threshold no worker would ever use, silently.
    assert main(["thresholds", "set", "brik", "0.5"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("space: error: line brik has no model in ") and "(lines there: brick)" in err
    assert main(["thresholds", "set", "brik", "0.5", "--allow-unknown-version", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["product_line"] == "brik"
    assert main(["thresholds", "set", "brick", "0.5", "--json"]) == 0


def test_set_without_a_registry_says_nothing_was_checked(
    cli_env: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("SPACE_MODELS__ROOT")
    monkeypatch.chdir(tmp_path)  # no .space/models here either
    assert main(["thresholds", "set", "glass", "0.5", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["product_line"] == "glass"
    assert "space: warning: line glass and its model version were not checked" in captured.err
