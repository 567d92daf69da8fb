"""Every SPACE_* variable the deployment sets must be a real setting, with a value it accepts.

The names are checked against the settings tree (``SPACE_<SECTION>__<FIELD>``, walked from
:class:`worker.settings.Settings`), and the values are loaded through
:func:`worker.settings.load_settings`. A typo, a bad value or an inconsistent combination then
fails here, with the variable named, instead of in a crash-looping pod after a rollout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from worker.settings import ENV_NESTED_DELIMITER, Settings, load_settings

from ._support import (
    DOCKERFILES,
    dockerfile_env,
    load_compose,
    secret_file_names,
    setting_env_names,
    settings_fields,
    worker_env,
)

VALID_NAMES = setting_env_names()


def _space_vars(env: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in env.items() if k.upper().startswith("SPACE_")}


def _load(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> Settings:
    for key, value in env.items():
        if key != "SPACE_SECRETS_DIR":  # the test's own secrets dir stands in for the mount
            monkeypatch.setenv(key, value)
    return load_settings()


def test_settings_tree_is_walkable() -> None:
    # Guards the walk itself: if sections stop being models, the name checks would pass vacuously.
    assert "SPACE_KAFKA__BOOTSTRAP_SERVERS" in VALID_NAMES
    assert "SPACE_WORKER__SHUTDOWN_GRACE_S" in VALID_NAMES
    assert "SPACE_KAFKA__BOOTSTRAP_SERVER" not in VALID_NAMES


def test_configmap_names_are_settings(docs: list[dict[str, Any]]) -> None:
    unknown = sorted(set(_space_vars(worker_env(docs))) - VALID_NAMES)
    assert not unknown, f"not settings (typo?): {unknown}"


def test_secret_files_are_settings(docs: list[dict[str, Any]]) -> None:
    fields = settings_fields()
    for name in secret_file_names(docs):
        section, _, field = name.partition(ENV_NESTED_DELIMITER)
        assert field in fields.get(section, {}), f"secret file {name} matches no setting"


def test_secret_fields_come_from_files_not_configmaps(docs: list[dict[str, Any]]) -> None:
    fields = settings_fields()
    for key in _space_vars(worker_env(docs)):
        section, _, field = key.removeprefix("SPACE_").lower().partition(ENV_NESTED_DELIMITER)
        if field in fields.get(section, {}):  # unknown names: test_configmap_names_are_settings
            annotation = str(fields[section][field].annotation)
            assert SecretStr.__name__ not in annotation, f"{key} is a secret: mount it as a file"


def test_overlay_environment_loads(
    docs: list[dict[str, Any]], clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in secret_file_names(docs):  # what the projected Secrets would provide
        (clean_env / name).write_text("from-secret\n", encoding="utf-8")
    env = _space_vars(worker_env(docs))
    settings = _load(monkeypatch, env)
    assert settings.kafka.group_id == "space-workers"
    assert str(settings.worker.state_dir) == env["SPACE_WORKER__STATE_DIR"]
    assert max(settings.models.warmup_batch_sizes) == settings.batching.max_batch_size, (
        "warm up the largest batch the batcher emits, or the first full batch pays for it"
    )
    if settings.kafka.security_protocol.startswith("SASL"):
        assert settings.kafka.sasl_username == "from-secret", "secret file name does not reach the setting"


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_env_is_settings(
    dockerfile: str, clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = _space_vars(dockerfile_env(dockerfile))
    assert env, "the images set their SPACE_* defaults"
    unknown = sorted(set(env) - VALID_NAMES)
    assert not unknown, f"{dockerfile}: not settings (typo?): {unknown}"
    settings = _load(monkeypatch, env)
    assert str(settings.worker.state_dir) == dockerfile_env(dockerfile)["SPACE_WORKER__STATE_DIR"]


def test_compose_worker_env_is_settings(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = load_compose()["services"]["worker"]["environment"]
    # Resolve ${VAR:-default} the way compose does when VAR is unset.
    env = {
        k: (v.split(":-", 1)[1].rstrip("}") if isinstance(v, str) and v.startswith("${") else str(v))
        for k, v in raw.items()
    }
    unknown = sorted(set(_space_vars(env)) - VALID_NAMES)
    assert not unknown, f"compose worker: not settings (typo?): {unknown}"
    settings = _load(monkeypatch, _space_vars(env))
    assert settings.s3.secret_access_key is not None
