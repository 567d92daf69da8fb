"""The container images: entrypoint and command exist in the package, non-root user, port, build
context allow-list, and the torch build each image installs.

No Docker engine is needed: the Dockerfiles are parsed as text (final stage only).
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from worker.settings import Settings

from ._support import DOCKER, DOCKERFILES, REPO, dockerfile_env, dockerfile_final_stage

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
SERVE_MODULE = REPO / "worker" / "commands" / "serve.py"


def _instruction(dockerfile: str, name: str) -> list[str]:
    return [args for instruction, args in dockerfile_final_stage(dockerfile) if instruction == name]


def test_both_images_exist() -> None:
    assert DOCKERFILES == ["Dockerfile.cpu", "Dockerfile.cuda"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_entrypoint_is_tini_then_space_serve(dockerfile: str) -> None:
    (entrypoint,) = _instruction(dockerfile, "ENTRYPOINT")
    (cmd,) = _instruction(dockerfile, "CMD")
    assert json.loads(entrypoint) == ["tini", "--", "space"], "exec form: tini is PID 1 and forwards SIGTERM"
    assert json.loads(cmd) == ["serve"]
    assert any("tini" in args for args in _instruction(dockerfile, "RUN")), "tini is installed"


def test_space_console_script_exists() -> None:
    assert PYPROJECT["project"]["scripts"]["space"] == "worker.cli:main"
    from worker.cli import main

    assert callable(main)


def test_serve_command_is_discovered() -> None:
    assert SERVE_MODULE.is_file()
    from worker.cli import build_parser

    parser = build_parser()
    (subparsers,) = [a for a in parser._actions if a.dest == "command"]
    assert "serve" in subparsers.choices


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_runs_as_uid_10001_with_writable_paths_outside_root(dockerfile: str) -> None:
    assert _instruction(dockerfile, "USER") == ["10001:10001"]
    assert _instruction(dockerfile, "EXPOSE") == [str(Settings.model_construct().http.port)]
    env = dockerfile_env(dockerfile)
    # The Deployment mounts emptyDirs exactly here (see test_kustomize.test_writable_paths_are_volumes).
    assert env["HOME"] == "/home/space"
    assert env["TMPDIR"] == "/tmp"
    assert env["SPACE_WORKER__STATE_DIR"] == "/var/lib/space"
    assert env["SPACE_MODELS__ROOT"] == "/models"
    assert env["SPACE_HEATMAPS__STORE_URI"].startswith("file:///var/lib/space/"), "not on the read-only root"
    assert "/opt/venv/bin" in env["PATH"]


def test_cpu_image_installs_the_pinned_cpu_torch() -> None:
    constraint = (REPO / "constraints" / "cpu.txt").read_text(encoding="utf-8").split()
    (pin,) = [c for c in constraint if c.startswith("torch==")]
    args = " ".join(_args_of_build_stage("Dockerfile.cpu"))
    assert f"TORCH_VERSION={pin.removeprefix('torch==')}" in args
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in args
    assert "--constraint constraints/cpu.txt" in args


def test_cuda_image_uses_an_official_cuda_base_with_the_same_torch() -> None:
    text = (DOCKER / "Dockerfile.cuda").read_text(encoding="utf-8")
    (base,) = [line.split("=", 1)[1] for line in text.splitlines() if line.startswith("ARG PYTORCH_IMAGE=")]
    assert base.startswith(("pytorch/pytorch:", "nvidia/cuda:")), base
    assert "cuda" in base
    assert "runtime" in base, "runtime, not the much larger devel image"
    cpu_version = _arg_default("Dockerfile.cpu", "TORCH_VERSION")
    assert _arg_default("Dockerfile.cuda", "TORCH_VERSION") == cpu_version
    assert base.split(":", 1)[1].startswith(cpu_version)


def test_dockerignore_copies_agree_and_allow_the_packages() -> None:
    reference = (DOCKER / ".dockerignore").read_text(encoding="utf-8")
    for dockerfile in DOCKERFILES:  # BuildKit uses <Dockerfile>.dockerignore next to the Dockerfile
        specific = DOCKER / f"{dockerfile}.dockerignore"
        assert specific.read_text(encoding="utf-8") == reference, f"{specific.name} drifted"
    lines = [line.strip() for line in reference.splitlines() if line.strip() and not line.startswith("#")]
    assert lines[0] == "*", "allow-list: exclude everything, then re-include"
    packages = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    for package in {p.rstrip("*") for p in packages}:
        assert f"!{package}/" in lines, f"the image needs {package}/"
    for needed in ("pyproject.toml", "constraints/"):
        assert f"!{needed}" in lines
        assert (REPO / needed).exists()


def _arg_default(dockerfile: str, name: str) -> str:
    for line in (DOCKER / dockerfile).read_text(encoding="utf-8").splitlines():
        if line.startswith(f"ARG {name}="):
            return line.split("=", 1)[1]
    raise AssertionError(f"{dockerfile} has no ARG {name}")


def _args_of_build_stage(dockerfile: str) -> list[str]:
    text = Path(DOCKER / dockerfile).read_text(encoding="utf-8")
    build = text.split(" AS runtime", 1)[0]
    return [line.strip() for line in build.splitlines() if not line.lstrip().startswith("#")]


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_images_install_every_dependency_at_the_locked_version(dockerfile: str) -> None:
    # Only torch was pinned: a rebuild could pick up a kafka-python whose internals worker/kafka_patches.py
    # no longer fixes, silently.
    text = (DOCKER / dockerfile).read_text(encoding="utf-8")
    assert "--constraint constraints/runtime.txt ." in text


def test_the_lock_matches_the_tested_environment() -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, str(REPO / "constraints" / "lock.py"), "--check"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    pins = (REPO / "constraints" / "runtime.txt").read_text(encoding="utf-8")
    assert "kafka-python==" in pins and "torch" not in pins  # torch: chosen per host
