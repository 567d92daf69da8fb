"""``space demo`` pieces with fakes: signals, a leftover worker, a crashed worker, the exit code, redaction."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import worker.demo.run as demo_run
import worker.stack
from worker.cli import main
from worker.demo.live import LiveTable
from worker.demo.run import DemoConfig, DemoError, DemoResult, _collect, _sigterm_as_interrupt
from worker.errors import SpaceError


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_interrupt_the_demo_and_restore_the_handlers(sig: signal.Signals) -> None:
    before = signal.getsignal(sig)

    def interrupted() -> None:
        with _sigterm_as_interrupt():
            os.kill(os.getpid(), sig)
            time.sleep(1)  # the handler raises here
            pytest.fail("the signal did not interrupt")

    with pytest.raises(KeyboardInterrupt, match=sig.name):
        interrupted()
    assert signal.getsignal(sig) is before


def _sleeper(*extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", *extra], start_new_session=True)


def test_a_leftover_worker_is_stopped_and_a_reused_pid_is_left_alone(tmp_path: Path) -> None:
    pid_file = tmp_path / "worker.pid"
    ours = _sleeper("-m", "worker", "serve")
    stranger = _sleeper("something-else")
    try:
        pid_file.write_text(f"{ours.pid}\n")
        assert demo_run._stop_leftover_worker(pid_file, timeout_s=10) == ours.pid
        assert ours.wait(10) is not None and not pid_file.exists()

        pid_file.write_text(f"{stranger.pid}\n")  # the pid was reused by another program
        assert demo_run._stop_leftover_worker(pid_file, timeout_s=10) is None
        assert stranger.poll() is None and not pid_file.exists()

        pid_file.write_text("garbage")
        assert demo_run._stop_leftover_worker(pid_file) is None and not pid_file.exists()
        assert demo_run._stop_leftover_worker(pid_file) is None  # no pid file at all
    finally:
        for proc in (ours, stranger):
            proc.kill()
            proc.wait(10)


class _Consumer:
    def poll(self, timeout_ms: int = 0) -> dict[Any, Any]:
        time.sleep(timeout_ms / 1000)
        return {}


class _Sender:
    error = None

    def snapshot(self) -> dict[str, Any]:
        return {}

    def is_alive(self) -> bool:
        return True


def test_collect_fails_at_once_when_the_worker_exits(tmp_path: Path) -> None:
    log_file = tmp_path / "worker.log"
    log_file.write_text("boom: the model would not load\n")
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait(10)
    dead_worker = demo_run._WorkerProcess(proc, 0, log_file)
    t0 = time.monotonic()
    with pytest.raises(DemoError, match=r"exited with code 3(.|\n)*boom"):
        _collect(
            _Consumer(), _Sender(), {}, LiveTable(("a",), io.StringIO()),  # type: ignore[arg-type]
            total=5, dlq_topic="dlq", drain_timeout_s=120, worker=dead_worker,
        )  # fmt: skip
    assert time.monotonic() - t0 < 5


def _result(**metrics: Any) -> DemoResult:
    base = {"unanswered": 0, "dead_letters": [], "worker_exit_code": 0}
    return DemoResult(Path("report/index.html"), {**base, **metrics}, "", {})


@pytest.mark.parametrize(
    ("metrics", "code", "why"),
    [
        ({}, 0, ""),
        ({"unanswered": 2}, 1, "2 images got no result"),
        ({"dead_letters": [{"message_id": "m", "line": "brick", "reason": "decode-failed"}]}, 1, "dead-lettered"),
        ({"worker_exit_code": 1}, 1, "worker exited with code 1"),
        ({"worker_exit_code": -9}, 1, "worker exited with code -9"),
    ],
)
def test_demo_exit_code(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], metrics: dict[str, Any], code: int, why: str
) -> None:
    monkeypatch.setattr(demo_run, "run_demo", lambda cfg: _result(**metrics))
    assert main(["demo"]) == code
    err = capsys.readouterr().err
    assert (why in err) if why else err == ""


class _FakeStack:
    def __init__(self, state_dir: Path, redis_url: str) -> None:
        self.downs = 0

    def status(self) -> bool:
        return False

    def up(self) -> None:
        pass

    def env(self) -> dict[str, str]:
        return {"SPACE_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1", "SPACE_REDIS__URL": "redis://u:s3cretpw@h:6379/0"}

    def down(self) -> None:
        self.downs += 1


def test_the_redis_url_is_printed_redacted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker.stack, "Stack", _FakeStack)
    out = io.StringIO()
    with pytest.raises(SpaceError):  # the settings refuse a URL with credentials, after the first print
        demo_run.run_demo(DemoConfig(out=tmp_path, keep_stack=True, lines=("brick",)), out=out)
    text = out.getvalue()
    assert "redis://***@h:6379/0" in text and "export SPACE_REDIS__URL=redis://***@h:6379/0" in text
    assert "s3cretpw" not in text


def test_the_live_table_in_a_log_names_its_columns_once() -> None:
    # Redirected to a file or a pipe the rows came without their header.
    from worker.demo.live import LineStats

    stream = io.StringIO()
    clock = iter([0.0, 5.0, 10.0, 15.0])
    table = LiveTable(("brick",), stream, clock=lambda: next(clock))
    stats = {"brick": LineStats("brick")}
    table.update(stats)
    table.update(stats)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3 and lines[0].split() == LiveTable.HEADER.split()
    assert lines[1].startswith("[") and lines[2].startswith("[") and "brick" in lines[2]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"lines": ("nosuchline",)}, "--lines must name distinct lines from brick, coins, grass, gravel, retina, got nosuchline"),
        ({"target_fpr": 2.0}, "--target-fpr must be in [0, 1), got 2"),
    ],
)
def test_demo_options_are_refused_in_the_options_words(changes, message) -> None:
    from worker.demo.run import DemoConfig, DemoError

    with pytest.raises(DemoError) as info:
        DemoConfig(**changes).check()
    assert str(info.value) == message
