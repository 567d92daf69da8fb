"""`space stack` never signals a process it did not start, serialises up/down, cleans up after a
failed or interrupted start, and reports a missing, unhealthy or broken stack as an error."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import worker.stack as stack_mod
from worker.stack import ServiceState, Stack, StackError, free_port, proc_start_time


def _space(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args], capture_output=True, text=True, timeout=60, env=dict(os.environ)
    )


def _write_state(state_dir: Path, entries: dict[str, dict]) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "state.json").write_text(json.dumps(entries), encoding="utf-8")


def _entry(name: str, port: int, pid: int | None, started: bool, **extra: object) -> dict:
    return {
        "name": name, "host": "127.0.0.1", "port": port, "pid": pid,
        "log_file": None, "started_by_stack": started, **extra,
    }  # fmt: skip


def _listener_argv(port: int) -> list[str]:
    code = (
        "import socket, time\n"
        "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        f"s.bind(('127.0.0.1', {port})); s.listen(); time.sleep(120)\n"
    )
    return [sys.executable, "-c", code]


@pytest.fixture
def sleeper():
    proc = subprocess.Popen(["sleep", "120"])
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


# -- 1: a reused pid is never signalled --------------------------------------------------------------
@pytest.mark.parametrize("recorded", ["other_start_time", "legacy_entry"])
def test_down_does_not_signal_a_reused_pid(tmp_path: Path, sleeper: subprocess.Popen, recorded: str) -> None:
    start = proc_start_time(sleeper.pid)
    assert start is not None
    extra = {"start_time": start - 1} if recorded == "other_start_time" else {}
    state = tmp_path / "stack"
    _write_state(state, {"kafka": _entry("kafka", free_port(), sleeper.pid, True, **extra)})
    down = _space("stack", "--state-dir", str(state), "down")
    time.sleep(0.2)
    assert sleeper.poll() is None, "down signalled a process it did not start"
    assert down.returncode == 0, down.stderr
    assert "stopped: nothing" in down.stdout
    assert "not signalled" in down.stderr
    assert not (state / "state.json").exists()


def test_down_stops_the_process_it_started(tmp_path: Path) -> None:
    stack = Stack(tmp_path / "s")
    port = free_port()
    svc = stack._spawn("kafka", _listener_argv(port), port)
    try:
        assert svc.start_time == proc_start_time(svc.pid or 0)  # identity recorded at spawn
        stack._write_state({"kafka": svc})
        stopped, skipped = stack.down_report(timeout_s=2.0)
        assert (stopped, skipped) == (["kafka"], [])
        assert not stack_mod.pid_alive(svc.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(svc.pid, signal.SIGKILL)


def test_status_of_a_reused_pid_is_down(tmp_path: Path, sleeper: subprocess.Popen) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        start = proc_start_time(sleeper.pid)
        svc = ServiceState("kafka", "127.0.0.1", port, sleeper.pid, None, True, (start or 0) + 1, None)
        assert not Stack(tmp_path)._healthy(svc)


# -- 2: one up at a time ------------------------------------------------------------------------------
def test_concurrent_ups_start_one_service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spawned: list[int] = []

    def fake_broker(self: Stack, port: int | None) -> ServiceState:
        port = free_port()
        time.sleep(0.3)  # widen the race window
        svc = self._spawn("kafka", _listener_argv(port), port)
        spawned.append(svc.pid or 0)
        return svc

    def fake_redis(self: Stack, port: int | None) -> ServiceState:
        return ServiceState("redis", "127.0.0.1", 1, None, None, False)

    monkeypatch.setattr(Stack, "_start_broker", fake_broker)
    monkeypatch.setattr(Stack, "_start_or_adopt_redis", fake_redis)
    monkeypatch.setattr(Stack, "_healthy", lambda self, svc: svc.pid is not None and stack_mod.pid_alive(svc.pid))
    state = tmp_path / "s"
    results: list[str] = []
    errors: list[BaseException] = []

    def up() -> None:
        try:
            results.append(Stack(state).up()["kafka"].address)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=up) for _ in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors
        assert len(spawned) == 1, f"two concurrent ups started {len(spawned)} brokers"
        assert results[0] == results[1]
    finally:
        for pid in spawned:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_lock_is_exclusive(tmp_path: Path) -> None:
    stack = Stack(tmp_path / "s")
    with stack._locked(), pytest.raises(StackError, match="holds"), Stack(tmp_path / "s")._locked(timeout_s=0.2):
        pass


# -- 3: an interrupted or failed start leaves nothing running -----------------------------------------
def test_interrupt_while_waiting_for_the_port_stops_the_child(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    children: list[subprocess.Popen] = []
    real_popen = subprocess.Popen

    def popen(*args, **kwargs):  # type: ignore[no-untyped-def]
        proc = real_popen(*args, **kwargs)
        children.append(proc)
        return proc

    def interrupted(*_a: object, **_k: object) -> bool:
        raise KeyboardInterrupt

    monkeypatch.setattr(stack_mod.subprocess, "Popen", popen)
    monkeypatch.setattr(stack_mod, "port_open", interrupted)
    try:
        with pytest.raises(KeyboardInterrupt):
            Stack(tmp_path / "s")._spawn("kafka", ["sleep", "120"], free_port())
        assert len(children) == 1
        time.sleep(0.1)
        assert children[0].poll() is not None, "the interrupted start left its child running"
    finally:
        for proc in children:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def test_failed_up_stops_the_broker_it_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[ServiceState] = []

    def fake_broker(self: Stack, port: int | None) -> ServiceState:
        port = free_port()
        svc = self._spawn("kafka", _listener_argv(port), port)
        started.append(svc)
        return svc

    def busy_redis(self: Stack, port: int | None) -> ServiceState:
        raise StackError("port 1 on 127.0.0.1 is in use")

    monkeypatch.setattr(Stack, "_start_broker", fake_broker)
    monkeypatch.setattr(Stack, "_start_or_adopt_redis", busy_redis)
    stack = Stack(tmp_path / "s")
    try:
        with pytest.raises(StackError, match="in use"):
            stack.up()
        assert len(started) == 1
        assert not stack_mod.pid_alive(started[0].pid), "the broker of a failed up was left running"
        assert "kafka" not in stack._read_state()
    finally:
        for svc in started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(svc.pid or 0, signal.SIGKILL)


# -- 4: status, env and a broken state dir ------------------------------------------------------------
def test_status_counts_a_missing_service_as_not_ok(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        state = tmp_path / "s"
        _write_state(state, {"redis": _entry("redis", sock.getsockname()[1], None, False)})
        status = _space("stack", "--state-dir", str(state), "status")
    assert status.returncode == 1, status.stdout
    assert "kafka" in status.stdout and "MISSING" in status.stdout


def test_env_without_a_stack_is_an_error(tmp_path: Path) -> None:
    env = _space("stack", "--state-dir", str(tmp_path / "none"), "env")
    assert env.returncode != 0
    assert env.stdout == ""
    assert env.stderr.strip().splitlines()[-1].startswith("space: error: the stack in")


def test_env_of_an_unhealthy_stack_is_an_error(tmp_path: Path) -> None:
    state = tmp_path / "s"
    _write_state(
        state,
        {"kafka": _entry("kafka", free_port(), None, False), "redis": _entry("redis", free_port(), None, False)},
    )
    env = _space("stack", "--state-dir", str(state), "env")
    assert env.returncode != 0
    assert env.stdout == ""
    assert "not healthy" in env.stderr and "kafka does not answer" in env.stderr


@pytest.mark.parametrize("action", ["up", "status", "down", "env"])
@pytest.mark.parametrize("broken", ["state_dir_is_a_file", "state_is_a_list", "entry_is_a_string"])
def test_broken_state_is_a_one_line_error(tmp_path: Path, action: str, broken: str) -> None:
    state = tmp_path / "s"
    if broken == "state_dir_is_a_file":
        state.write_text("x")
    else:
        state.mkdir()
        content = [] if broken == "state_is_a_list" else {"kafka": "x"}
        (state / "state.json").write_text(json.dumps(content))
    proc = _space("stack", "--state-dir", str(state), action)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("space: error: the stack state"), proc.stderr
