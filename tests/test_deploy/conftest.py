"""Fixtures for the deployment checks (helpers live in ``_support``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from worker.settings import ENV_PREFIX

from ._support import K8S, OVERLAYS, render


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    """Name of each overlay under deploy/k8s/overlays."""
    return str(request.param)


@pytest.fixture
def docs(overlay: str) -> list[dict[str, Any]]:
    """Rendered documents of the overlay."""
    return render(K8S / "overlays" / overlay)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No SPACE_* variables from the developer's shell; an empty secrets dir, returned."""
    for key in list(os.environ):
        if key.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(key)
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    monkeypatch.setenv(f"{ENV_PREFIX}SECRETS_DIR", str(secrets))
    return secrets
