"""Helpers shared by the deployment checks: rendered kustomize overlays, the Dockerfiles, the
compose file, and the set of environment variable names that ``worker.settings`` accepts.

Nothing here needs a cluster, a Docker engine or the network. Rendering needs ``kubectl`` (with its
built-in kustomize); tests that need a render skip, with the reason, where it is absent.
"""

from __future__ import annotations

import functools
import json
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from worker.settings import DEFAULT_SECRETS_DIR, ENV_NESTED_DELIMITER, ENV_PREFIX, Settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
DOCKER = DEPLOY / "docker"
COMPOSE = DEPLOY / "compose.yaml"
SCHEMAS = Path(__file__).resolve().parent / "schemas"

OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
DOCKERFILES = sorted(p.name for p in DOCKER.glob("Dockerfile.*") if not p.name.endswith(".dockerignore"))

# Partitions of inspection.requests, as documented in docs/scaling.md and created by compose.
REQUESTS_PARTITIONS = 12
# Process-level variables read by worker/settings.py outside the section tree.
PROCESS_ENV = {f"{ENV_PREFIX}SECRETS_DIR", f"{ENV_PREFIX}CONFIG_FILE"}
# Kubernetes version the manifests must validate against (oldest supported).
KUBERNETES_VERSION = "1.31.0"


def settings_fields() -> dict[str, dict[str, Any]]:
    """``{section: {field: FieldInfo}}`` walked from :class:`worker.settings.Settings`."""
    sections: dict[str, dict[str, Any]] = {}
    for section, info in Settings.model_fields.items():
        model = info.annotation
        assert isinstance(model, type), section
        assert issubclass(model, BaseModel), section
        sections[section] = dict(model.model_fields)
    return sections


def setting_env_names() -> set[str]:
    """Every ``SPACE_<SECTION>__<FIELD>`` the settings accept, plus the process-level ones."""
    names = set(PROCESS_ENV)
    for section, fields in settings_fields().items():
        names |= {f"{ENV_PREFIX}{section}{ENV_NESTED_DELIMITER}{field}".upper() for field in fields}
    return names


@functools.cache
def _render(path: str) -> tuple[str, ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: cannot render the kustomize overlays")
    proc = subprocess.run([kubectl, "kustomize", path], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    return tuple(json.dumps(d) for d in yaml.safe_load_all(proc.stdout) if d)


def render(path: Path) -> list[dict[str, Any]]:
    """Documents of ``kubectl kustomize path`` (fresh copies; cached per path)."""
    return [json.loads(d) for d in _render(str(path))]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The single document of ``kind`` (and ``name``) in ``docs``."""
    hits = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


def worker_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``worker`` container of the Deployment."""
    containers = find(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "worker")


def worker_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    """The environment the worker container sees: ConfigMap ``envFrom`` plus literal ``env``."""
    container = worker_container(docs)
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(find(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def secret_file_names(docs: list[dict[str, Any]]) -> list[str]:
    """File names projected into SPACE_SECRETS_DIR by the Deployment."""
    container = worker_container(docs)
    pod = find(docs, "Deployment")["spec"]["template"]["spec"]
    secrets_dir = worker_env(docs).get(f"{ENV_PREFIX}SECRETS_DIR", DEFAULT_SECRETS_DIR)
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == secrets_dir)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    names: list[str] = []
    for source in volume["projected"]["sources"]:
        names += [item["path"] for item in source["secret"]["items"]]
    return names


def dockerfile_final_stage(name: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` of the last build stage, continuation lines joined."""
    text = (DOCKER / name).read_text(encoding="utf-8")
    logical: list[str] = []
    buffer = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        buffer = f"{buffer} {line[:-1].strip()}" if line.endswith("\\") else f"{buffer} {line}"
        if not line.endswith("\\"):
            logical.append(buffer.strip())
            buffer = ""
    stages: list[list[tuple[str, str]]] = []
    for line in logical:
        instruction, _, args = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction.upper(), args.strip()))
    return stages[-1]


def dockerfile_env(name: str) -> dict[str, str]:
    """ENV of the final stage (``KEY=value`` form)."""
    env: dict[str, str] = {}
    for instruction, args in dockerfile_final_stage(name):
        if instruction == "ENV":
            for token in shlex.split(args):
                key, _, value = token.partition("=")
                env[key] = value
    return env


def load_compose() -> dict[str, Any]:
    """deploy/compose.yaml as data."""
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
