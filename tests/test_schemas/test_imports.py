"""The schemas package imports only pydantic and the standard library (DESIGN: dependencies point one way)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import schemas

ALLOWED_THIRD_PARTY = {"pydantic"}
PACKAGE_DIR = Path(schemas.__file__).parent


def foreign_imports(source: str) -> set[str]:
    """Top-level modules imported by ``source`` that are neither stdlib, pydantic nor schemas."""
    roots: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return {
        r for r in roots if r not in sys.stdlib_module_names and r not in ALLOWED_THIRD_PARTY | {"schemas"}
    }


def test_checker_flags_foreign_imports() -> None:
    source = "import json\nfrom pydantic import BaseModel\nimport numpy as np\nfrom worker.x import y\n"
    assert foreign_imports(source) == {"numpy", "worker"}


def test_every_schemas_module_imports_only_pydantic_and_stdlib() -> None:
    modules = sorted(PACKAGE_DIR.glob("*.py"))
    assert {m.name for m in modules} >= {
        "__init__.py",
        "request.py",
        "result.py",
        "deadletter.py",
        "threshold.py",
    }
    offenders = {m.name: found for m in modules if (found := foreign_imports(m.read_text()))}
    assert offenders == {}


def test_importing_schemas_loads_no_runtime_dependency() -> None:
    code = "import sys, schemas; print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    loaded = set(
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.split()
    )
    assert loaded.isdisjoint(
        {"torch", "numpy", "cv2", "kafka", "redis", "boto3", "cloudevents", "worker", "models"}
    )
