"""Static checks as tests, so `make test` (and CI) fail on what `make lint` finds.

The type checker catches what the wire contracts and settings rely on (a settings field without a
default, a partition key of the wrong type reaching a commit); the formatter keeps diffs about
behaviour. Each check runs the tool the Makefile uses, on the same paths.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PACKAGES = ["worker", "models", "schemas"]


def _run(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    exe = BIN / tool
    if not exe.exists():
        pytest.fail(f"{tool} is not installed next to {sys.executable}: run `make install`")
    return subprocess.run([str(exe), *args], cwd=REPO, capture_output=True, text=True, timeout=600)


def test_ruff_finds_nothing() -> None:
    result = _run("ruff", "check", *PACKAGES, "tests", "bench")
    assert result.returncode == 0, result.stdout + result.stderr


def test_packages_are_formatted() -> None:
    result = _run("ruff", "format", "--check", *PACKAGES)
    assert result.returncode == 0, f"run `make format`:\n{result.stdout}{result.stderr}"


def test_mypy_finds_nothing() -> None:
    result = _run("mypy", "--cache-dir", str(REPO / ".mypy_cache"), *PACKAGES)
    assert result.returncode == 0, result.stdout + result.stderr
