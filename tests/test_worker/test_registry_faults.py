"""The registry when its storage misbehaves: file modes others can read, and I/O or S3 client failures
(permission denied, unreachable, hung, access denied) as one-line :class:`RegistryError`s without secrets."""

from __future__ import annotations

import os
import socket
import stat
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from worker.registry import POINTER, ModelRegistry, RegistryError
from worker.s3 import make_s3_client
from worker.settings import S3Settings

SECRET = "wJalrXUtnFEMI-not-a-real-secret"


def _version(root: Path, line: str, version: str) -> None:
    folder = root / line / version
    folder.mkdir(parents=True)
    (folder / "model.json").write_text("{}")


@pytest.fixture
def umask() -> Iterator[Any]:
    """Sets the process umask for one test and restores it."""
    saved = os.umask(0o022)
    yield os.umask
    os.umask(saved)


def s3_registry(endpoint: str, tmp_path: Path, *, timeout_s: float = 0.3) -> ModelRegistry:
    settings = S3Settings(
        endpoint_url=endpoint, access_key_id=SecretStr("AKIDEXAMPLE"), secret_access_key=SecretStr(SECRET)
    )
    return ModelRegistry(
        "s3://models/root",
        s3_client_factory=lambda: make_s3_client(settings, timeout_s=timeout_s, max_attempts=1),
        cache_dir=tmp_path / "cache",
    )


@pytest.fixture
def hung_endpoint() -> Iterator[str]:
    """An endpoint that completes the TCP handshake and never answers (a wedged object store)."""
    with socket.create_server(("127.0.0.1", 0), backlog=64) as server:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


class _Denying(BaseHTTPRequestHandler):
    """Answers every S3 request 403 AccessDenied, like a bucket policy without this role."""

    def _deny(self) -> None:
        body = b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message><RequestId>1</RequestId></Error>"
        self.send_response(403)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:
        self._deny()

    def do_HEAD(self) -> None:
        self._deny()

    def do_PUT(self) -> None:
        self._deny()

    def log_message(self, format: str, *args: Any) -> None:
        return


@pytest.fixture
def denying_endpoint() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Denying)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_pointer_written_by_an_operator_is_readable_by_workers_of_another_user(
    tmp_path: Path, umask: Any, mask: int
) -> None:
    _version(tmp_path, "brick", "v1")
    _version(tmp_path, "brick", "v2")
    registry = ModelRegistry(str(tmp_path))
    umask(mask)  # e.g. root with a strict umask, workers as uid 10001 on a read-only mount
    registry.promote("brick", "v1")
    assert stat.S_IMODE((tmp_path / "brick" / POINTER).stat().st_mode) == 0o644
    registry.promote("brick", "v2")
    registry.rollback("brick")
    assert stat.S_IMODE((tmp_path / "brick" / POINTER).stat().st_mode) == 0o644
    assert [p.name for p in (tmp_path / "brick").iterdir() if p.name.startswith(".tmp-")] == []


def test_unreadable_pointer_file_is_a_registry_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _version(tmp_path, "brick", "v1")
    registry = ModelRegistry(str(tmp_path))
    registry.promote("brick", "v1")
    real = Path.read_text

    def denied(self: Path, *args: Any, **kwargs: Any) -> str:
        if self.name == POINTER:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(RegistryError, match=rf"cannot read .*brick/{POINTER}: Permission denied$"):
        registry.active_version("brick")


def test_unreachable_s3_is_a_registry_error(tmp_path: Path) -> None:
    registry = s3_registry("http://127.0.0.1:1", tmp_path)
    with pytest.raises(RegistryError, match=r"cannot read s3://models/root/brick/ACTIVE.json: EndpointConnectionError"):
        registry.active_version("brick")
    with pytest.raises(RegistryError, match=r"cannot list s3://models/root/"):
        registry.lines()


def test_hung_s3_is_a_registry_error_after_the_client_timeout(tmp_path: Path, hung_endpoint: str) -> None:
    registry = s3_registry(hung_endpoint, tmp_path)
    with pytest.raises(RegistryError, match=r"cannot read s3://models/root/brick/ACTIVE.json: ReadTimeoutError"):
        registry.active_version("brick")
    with pytest.raises(RegistryError, match=r"cannot fetch s3://models/root/brick/v1: ReadTimeoutError"):
        registry.local_path("brick", "v1")


def test_s3_access_denied_is_a_registry_error_without_credentials(tmp_path: Path, denying_endpoint: str) -> None:
    registry = s3_registry(denying_endpoint, tmp_path)
    with pytest.raises(RegistryError) as info:
        registry.active_version("brick")
    assert str(info.value) == "cannot read s3://models/root/brick/ACTIVE.json: AccessDenied: Access Denied"
    with pytest.raises(RegistryError, match=r"cannot write s3://models/root/brick/ACTIVE\.json: AccessDenied") as info:
        registry._write_pointer("brick", "v1", [], "ops", None)
    with pytest.raises(RegistryError, match="cannot list s3://models/root/brick/: AccessDenied") as listing:
        registry.versions("brick")
    for exc in (info.value, listing.value):
        assert SECRET not in str(exc) and "AKIDEXAMPLE" not in str(exc)
