"""Model registry: ``<root>/<line>/<version>/`` artifacts with an active-version pointer per line.

The pointer is ``<root>/<line>/ACTIVE.json``: ``{"version": ..., "history": [...], "updated_at",
"updated_by"}``; ``promote`` writes it atomically and keeps the previous versions (bounded) for
``rollback``. Roots are directories or ``s3://bucket/prefix``; S3 artifacts are fetched into a
local cache directory (keyed by line and version, verified by the artifact's own checksums when
loaded). Line and version names are validated, so they never become path traversal.

I/O and client failures (permission denied, S3 unreachable, timed out or refusing access) surface as
:class:`RegistryError` naming the path or ``s3://`` key, never credentials. Files the registry writes
are mode 0644, so workers running as another user can read a pointer an operator wrote.

Versions are immutable: publish a new version folder instead of overwriting one (S3 copies are cached
by line and version). :meth:`ModelRegistry.verify` checks an artifact (card valid, weights' sha256
matches, card's line and version match the folder) without building the network; ``space models
promote`` calls it before moving the pointer, :meth:`ModelRegistry.promote` itself does not.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import structlog
from botocore.exceptions import BotoCoreError, ClientError

from worker.errors import SpaceError

log = structlog.get_logger(__name__)

POINTER = "ACTIVE.json"
HISTORY_MAX = 20
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_FILE_MODE = 0o644  # pointers are written by operators and read by workers running as another user
_DIR_MODE = 0o755


class RegistryError(SpaceError):
    """A line or version is unknown or the registry is inconsistent."""


class NoActiveModel(RegistryError):
    """The product line has no promoted version (an unknown line, as far as serving goes)."""


def check_name(kind: str, value: str) -> str:
    """Validate a product line or version name (it becomes part of paths and keys)."""
    if not _NAME.fullmatch(value) or value in {".", ".."}:
        raise RegistryError(f"invalid {kind} {value!r}: use 1-64 of [A-Za-z0-9._-], starting with a letter or digit")
    return value


@dataclass(frozen=True)
class ActivePointer:
    """Which version of a line serves, and what served before."""

    version: str
    history: tuple[str, ...]
    updated_at: str
    updated_by: str


class PointerConflict(RegistryError):
    """The active pointer changed between this command's read and its write (another operator, or CI)."""


class _Backend(Protocol):
    def read_text(self, key: str) -> str | None: ...
    def write_text(self, key: str, text: str) -> None: ...
    def read_versioned(self, key: str) -> tuple[str | None, str | None]: ...
    def write_text_if(self, key: str, text: str, token: str | None) -> bool: ...
    def list_dirs(self, prefix: str) -> list[str]: ...
    def exists(self, key: str) -> bool: ...
    def materialize(self, prefix: str, cache_dir: Path) -> Path: ...
    def discard(self, prefix: str, cache_dir: Path) -> None: ...


def _reason(exc: BaseException) -> str:
    """A one-line cause without paths or endpoints repeated (the caller names the object)."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return f"{error.get('Code', 'error')}: {error.get('Message', '')}".rstrip(": ")
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8 text"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}: {exc}"


@contextlib.contextmanager
def _io(action: str, where: str) -> Iterator[None]:
    """Turn an I/O or S3 client failure into a :class:`RegistryError` naming ``where``."""
    try:
        yield
    except (OSError, UnicodeDecodeError, BotoCoreError, ClientError) as exc:
        raise RegistryError(f"cannot {action} {where}: {_reason(exc)}") from exc


def _content_token(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode("utf-8")).hexdigest()


class _FileBackend:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        return self.root / key

    def read_text(self, key: str) -> str | None:
        path = self._path(key)
        with _io("read", str(path)):
            return path.read_text(encoding="utf-8") if path.is_file() else None

    def write_text(self, key: str, text: str) -> None:
        path = self._path(key)
        with _io("write", str(path)):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            try:
                os.fchmod(fd, _FILE_MODE)  # mkstemp creates 0600
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    fh.write(text)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise

    def read_versioned(self, key: str) -> tuple[str | None, str | None]:
        """The text and a token of its content (None, None when absent)."""
        text = self.read_text(key)
        return text, _content_token(text)

    def write_text_if(self, key: str, text: str, token: str | None) -> bool:
        """Write unless the content changed since ``token`` (None: unless it exists), under a lock file."""
        path = self._path(key)
        with _io("write", str(path)):
            path.parent.mkdir(parents=True, exist_ok=True)
            # Read-only is enough for flock, so operators running as other users share the lock file.
            lock = os.open(path.parent / f".{path.name}.lock", os.O_RDONLY | os.O_CREAT, _FILE_MODE)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when the descriptor closes
                if _content_token(self.read_text(key)) != token:
                    return False
                self.write_text(key, text)
                return True
            finally:
                os.close(lock)

    def list_dirs(self, prefix: str) -> list[str]:
        base = self._path(prefix) if prefix else self.root
        with _io("list", str(base)):
            if not base.is_dir():
                return []
            return sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))

    def exists(self, key: str) -> bool:
        with _io("read", str(self._path(key))):
            return self._path(key).exists()

    def materialize(self, prefix: str, cache_dir: Path) -> Path:
        return self._path(prefix)

    def discard(self, prefix: str, cache_dir: Path) -> None:
        """Nothing to drop: files are read in place."""


class _S3Backend:
    def __init__(self, bucket: str, prefix: str, client: Any) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = client

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def read_text(self, key: str) -> str | None:
        return self.read_versioned(key)[0]

    def write_text(self, key: str, text: str) -> None:
        with _io("write", self._uri(key)):
            self.client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=text.encode(), ContentType="application/json"
            )

    def read_versioned(self, key: str) -> tuple[str | None, str | None]:
        """The text and its ETag (None, None when absent)."""
        with _io("read", self._uri(key)):
            try:
                obj = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            except self.client.exceptions.NoSuchKey:
                return None, None
            return str(obj["Body"].read().decode("utf-8")), str(obj["ETag"])

    def write_text_if(self, key: str, text: str, token: str | None) -> bool:
        """A conditional PUT: If-Match the ETag read, or If-None-Match when there was nothing."""
        condition = {"IfMatch": token} if token is not None else {"IfNoneMatch": "*"}
        with _io("write", self._uri(key)):
            try:
                self.client.put_object(
                    Bucket=self.bucket, Key=self._key(key), Body=text.encode(), ContentType="application/json",
                    **condition,
                )  # fmt: skip
            except ClientError as exc:
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if status in (409, 412):  # PreconditionFailed, ConditionalRequestConflict
                    return False
                raise
        return True

    def list_dirs(self, prefix: str) -> list[str]:
        full = self._key(prefix).rstrip("/") + "/" if prefix or self.prefix else ""
        names: set[str] = set()
        with _io("list", f"s3://{self.bucket}/{full}"):
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full, Delimiter="/"):
                for common in page.get("CommonPrefixes", []):
                    names.add(common["Prefix"][len(full) :].strip("/"))
        return sorted(n for n in names if n)

    def exists(self, key: str) -> bool:
        with _io("list", self._uri(key)):
            resp = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self._key(key), MaxKeys=1)
        return bool(resp.get("KeyCount", 0))

    def _cache_root(self, cache_dir: Path) -> Path:
        # One folder per bucket and prefix: a version name means nothing outside its root, and a state
        # folder that outlives a change of SPACE_MODELS__ROOT must not serve the other root's weights.
        digest = hashlib.sha256(f"{self.bucket}/{self.prefix}".encode()).hexdigest()[:12]
        return cache_dir / f"{self.bucket}-{digest}"

    def materialize(self, prefix: str, cache_dir: Path) -> Path:
        cache_dir = self._cache_root(cache_dir)
        target = cache_dir / prefix
        if (target / "model.json").is_file() and (target / "model.safetensors").is_file():
            return target
        with _io("fetch into", str(cache_dir)):
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".dl-"))
        try:
            tmp.chmod(_DIR_MODE)  # mkdtemp creates 0700; the cache may be shared with other users' commands
            for name in ("model.json", "model.safetensors"):
                self.client.download_file(self.bucket, self._key(f"{prefix}/{name}"), str(tmp / name))
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        except Exception as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if (target / "model.json").is_file() and (target / "model.safetensors").is_file():
                return target  # another thread finished the same download first
            raise RegistryError(f"cannot fetch {self._uri(prefix)}: {_reason(exc)}") from exc
        return target

    def discard(self, prefix: str, cache_dir: Path) -> None:
        """Drop a cached copy (after it failed to load, so the next try downloads it again)."""
        shutil.rmtree(self._cache_root(cache_dir) / prefix, ignore_errors=True)


class ModelRegistry:
    """Versions and active pointers of every product line.

    Args:
        root: Directory or ``s3://bucket/prefix``.
        s3_client_factory: Builds a boto3 S3 client (only for s3:// roots).
        cache_dir: Where S3 artifacts are downloaded.
        clock: Wall clock for pointer timestamps.
    """

    def __init__(
        self,
        root: str,
        *,
        s3_client_factory: Callable[[], Any] | None = None,
        cache_dir: Path | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.root = root
        self._clock = clock
        self.cache_dir = cache_dir or Path(tempfile.gettempdir()) / "space-models"
        self._backend: _Backend
        if root.startswith("s3://"):
            if s3_client_factory is None:
                raise RegistryError("an s3:// model root needs S3 settings")
            bucket, _, prefix = root.removeprefix("s3://").partition("/")
            self._backend = _S3Backend(bucket, prefix, s3_client_factory())
        else:
            self._backend = _FileBackend(Path(root.removeprefix("file://")))

    @property
    def local_root(self) -> Path | None:
        """The registry's folder for a file root; None for s3://."""
        return self._backend.root if isinstance(self._backend, _FileBackend) else None

    def lines(self) -> list[str]:
        """Product lines that have at least one version."""
        return [d for d in self._backend.list_dirs("") if _NAME.fullmatch(d) and self.versions(d)]

    def versions(self, line: str) -> list[str]:
        """Versions of ``line`` that hold a model card."""
        check_name("product line", line)
        return [
            v
            for v in self._backend.list_dirs(line)
            if _NAME.fullmatch(v) and self._backend.exists(f"{line}/{v}/model.json")
        ]

    def pointer(self, line: str) -> ActivePointer | None:
        """The active pointer of ``line``, or None when never promoted.

        Raises:
            RegistryError: the pointer exists but is not valid JSON of the expected shape.
        """
        check_name("product line", line)
        return self._parse_pointer(line, self._backend.read_text(f"{line}/{POINTER}"))

    @staticmethod
    def _parse_pointer(line: str, text: str | None) -> ActivePointer | None:
        if text is None:
            return None
        try:
            data = json.loads(text)
            if not isinstance(data.get("history", []), list):
                raise TypeError("history is not a list")
            return ActivePointer(
                version=check_name("version", data["version"]),
                history=tuple(check_name("version", v) for v in data.get("history", [])),
                updated_at=str(data.get("updated_at", "")),
                updated_by=str(data.get("updated_by", "")),
            )
        except (RegistryError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise RegistryError(f"the active pointer of line {line!r} is corrupt: {exc}") from exc

    def active_version(self, line: str) -> str:
        """The serving version of ``line``; raises :class:`RegistryError` when there is none."""
        pointer = self.pointer(line)
        if pointer is not None:
            return pointer.version
        raise NoActiveModel(f"product line {line!r} has no active model: `space models promote {line} VERSION`")

    def promote(self, line: str, version: str, *, by: str = "unknown") -> ActivePointer:
        """Make ``version`` the active one (it must exist; its artifact is not checked here).

        A corrupt pointer is replaced (its history is lost, and a warning says so), so that
        promoting is always the way out of a broken pointer.
        """
        self._require_version(line, version)
        text, token = self._backend.read_versioned(f"{line}/{POINTER}")
        try:
            current = self._parse_pointer(line, text)
        except RegistryError as exc:
            log.warning("model_pointer_replaced", product_line=line, error=str(exc))
            current = None
        history: list[str] = []
        if current is not None and current.version != version:
            history = [current.version, *current.history][:HISTORY_MAX]
        elif current is not None:
            history = list(current.history)
        return self._write_pointer(line, version, history, by, token)

    def rollback(self, line: str, *, by: str = "unknown") -> ActivePointer:
        """Go back to the previous active version (which must still exist)."""
        check_name("product line", line)
        text, token = self._backend.read_versioned(f"{line}/{POINTER}")
        current = self._parse_pointer(line, text)
        if current is None or not current.history:
            raise RegistryError(f"line {line!r} has no previous version to roll back to")
        previous, *rest = current.history
        if previous not in self.versions(line):
            raise RegistryError(
                f"line {line!r}: previous version {previous!r} no longer exists; promote a version instead"
            )
        return self._write_pointer(line, previous, rest, by, token)

    def card_text(self, line: str, version: str) -> str:
        """The raw ``model.json`` of a version, read without fetching the weights."""
        check_name("product line", line)
        check_name("version", version)
        text = self._backend.read_text(f"{line}/{version}/model.json")
        if text is None:
            raise RegistryError(f"line {line!r} has no version {version!r}")
        return text

    def verify(self, line: str, version: str) -> Any:
        """Check an artifact without building its network: card valid, weights' sha256, names.

        Fetches the artifact first for S3 roots. The card's ``product_line`` and ``version`` must
        match the folder: results and thresholds key on the folder's version, calibration writes
        the card's, and a mismatch would silently keep every threshold from applying.

        Returns:
            The :class:`models.artifact.ModelCard`.

        Raises:
            RegistryError: the artifact is missing, corrupt, or names another line or version.
        """
        from models.artifact import ArtifactError, verify_artifact

        self._require_version(line, version)
        path = self.local_path(line, version)
        try:
            card = verify_artifact(path)
        except (ArtifactError, OSError) as exc:
            self.discard_local(line, version)
            raise RegistryError(f"line {line!r} version {version!r} is not a valid artifact: {exc}") from exc
        if card.product_line != line or card.version != version:
            raise RegistryError(
                f"{line}/{version}/model.json says product line {card.product_line!r} version "
                f"{card.version!r}; the folder must match the card"
            )
        return card

    def discard_local(self, line: str, version: str) -> None:
        """Forget a downloaded copy (S3 roots), so the next :meth:`local_path` fetches it again."""
        check_name("product line", line)
        check_name("version", version)
        self._backend.discard(f"{line}/{version}", self.cache_dir)

    def _require_version(self, line: str, version: str) -> None:
        check_name("product line", line)
        check_name("version", version)
        versions = self.versions(line)
        if version not in versions:
            raise RegistryError(f"line {line!r} has no version {version!r} (have: {', '.join(versions) or 'none'})")

    def _write_pointer(self, line: str, version: str, history: list[str], by: str, token: str | None) -> ActivePointer:
        """Write the pointer unless it changed since it was read as ``token`` (compare-and-set).

        Raises:
            PointerConflict: another promote or rollback wrote in between; nothing was written (two
                operators rolling back at once would otherwise both step back, or one lose history).
        """
        pointer = ActivePointer(version, tuple(history), self._clock().isoformat(), by)
        doc = {"version": version, "history": history, "updated_at": pointer.updated_at, "updated_by": by}
        if not self._backend.write_text_if(f"{line}/{POINTER}", json.dumps(doc, indent=2), token):
            try:
                now = self.pointer(line)
                where = f"now version {now.version!r} by {now.updated_by}" if now else "now removed"
            except RegistryError:
                where = "now unreadable"
            raise PointerConflict(
                f"the active pointer of line {line!r} changed while this command ran ({where}); "
                "nothing was written: check `space models show` and run it again if still wanted"
            )
        return pointer

    def local_path(self, line: str, version: str) -> Path:
        """A local directory holding the artifact (downloaded first for S3 roots)."""
        check_name("product line", line)
        check_name("version", version)
        return self._backend.materialize(f"{line}/{version}", self.cache_dir)
