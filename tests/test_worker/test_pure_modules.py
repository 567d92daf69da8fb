"""The worker's pure-logic modules load no client library: they are unit-tested, and reused, without a broker."""

from __future__ import annotations

import subprocess
import sys

import pytest

CLIENT_LIBRARIES = {"kafka", "redis", "boto3", "botocore", "torch", "cv2"}


def loaded_roots(module: str) -> set[str]:
    """Top-level packages in ``sys.modules`` after importing ``module`` in a fresh interpreter."""
    code = f"import sys, {module}; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(done.stdout.split())


@pytest.mark.parametrize(
    "module",
    [
        "worker.batcher",
        "worker.offsets",
        "worker.sequencer",
        "worker.dlq",
        "worker.settings",
        "worker.errors",
    ],
)
def test_pure_module_loads_no_client_library(module: str) -> None:
    assert loaded_roots(module) & CLIENT_LIBRARIES == set()


def test_the_check_sees_a_client_library() -> None:
    assert "kafka" in loaded_roots("worker.kafka_clients")
