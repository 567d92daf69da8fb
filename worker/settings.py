"""One frozen settings tree for the whole worker (pydantic-settings).

Environment variables are prefixed ``SPACE_`` and nest with ``__``:
``SPACE_KAFKA__BOOTSTRAP_SERVERS``, ``SPACE_BATCHING__MAX_WAIT_MS``. Secrets are ``SecretStr`` and
can come from files (``SPACE_SECRETS_DIR`` or ``/run/secrets/space``), an optional TOML/JSON config
file is read from ``SPACE_CONFIG_FILE``. Every knob has a default that works against the embedded
stack (``space stack up``). :func:`load_settings` turns a validation error into one line naming the
variable, so a bad value stops the program before anything connects.
"""

from __future__ import annotations

import json
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, unquote, urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from schemas.request import CLAIM_CHECK_SCHEMES
from worker import DEFAULT_MAX_PIXELS
from worker.errors import ConfigError


def _split_list(value: Any) -> Any:
    """Lists in env vars: JSON (``[1, 8]``) or comma-separated (``1,8``)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


#: Largest batch a model is called with (``SPACE_BATCHING__MAX_BATCH_SIZE``, warm-up batch sizes).
MAX_BATCH_SIZE = 1024

StrList = Annotated[tuple[str, ...], NoDecode, BeforeValidator(_split_list)]
IntList = Annotated[tuple[int, ...], NoDecode, BeforeValidator(_split_list)]

ENV_PREFIX = "SPACE_"
ENV_NESTED_DELIMITER = "__"
DEFAULT_SECRETS_DIR = "/run/secrets/space"
#: Words that mark a setting (or a URL query parameter) as secret: its value is never echoed.
_SENSITIVE_WORDS = ("password", "secret", "key", "token")
#: URL query parameters that carry credentials (redis-py passes any query parameter to the connection).
_CREDENTIAL_QUERY_PARAMETERS = frozenset({"password", "username"})


def redact_url(url: str) -> str:
    """``url`` fit for logs and error messages: user info and credential query values shown as ``***``.

    ``redis://user:pw@host:6379/0?password=pw&db=1`` becomes ``redis://***@host:6379/0?password=***&db=1``.
    Everything up to the last ``@`` counts as user info, so a password holding ``/`` or ``?`` is hidden too.
    """
    prefix, userinfo, rest = _split_userinfo(url)
    if userinfo is not None:
        rest = "***@" + rest
    location, sep, query = rest.partition("?")
    if sep:
        query = "&".join(_redact_query_pair(pair) for pair in query.split("&"))
    return prefix + location + sep + query


def _split_userinfo(url: str) -> tuple[str, str | None, str]:
    """``url`` as (``scheme://``, user info or None, the rest), the user info being everything up to the last ``@``.

    Deliberately wider than RFC 3986 (user info ends at the first ``/``, ``?`` or ``#``): an unencoded
    ``/``, ``?`` or ``#`` in a password would otherwise leave the rest of it in the path or query.
    :func:`redact_url` hides exactly this part and the Redis URL check refuses it, so the two agree.
    """
    scheme, slashes, rest = url.partition("://")
    if not slashes:
        scheme, rest = "", url
    if "@" not in rest:
        return scheme + slashes, None, rest
    userinfo, _, rest = rest.rpartition("@")
    return scheme + slashes, userinfo, rest


def _redact_query_pair(pair: str) -> str:
    name, sep, _value = pair.partition("=")
    words = (*_CREDENTIAL_QUERY_PARAMETERS, *_SENSITIVE_WORDS)
    return f"{name}=***" if sep and any(word in unquote(name).lower() for word in words) else pair


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class KafkaSettings(_Section):
    """Broker connection, topics, consumer-group behavior and client security."""

    bootstrap_servers: str = Field("127.0.0.1:9092", description="Comma-separated host:port list.")
    client_id: str = Field("space-worker", description="Kafka client id prefix.")
    group_id: str = Field("space-workers", description="Consumer group shared by all worker pods.")
    requests_topic: str = Field("inspection.requests", description="Input topic (key = camera id).")
    results_topic: str = Field("inspection.results", description="One result per request.")
    alerts_topic: str = Field("inspection.alerts", description="Copy of anomalous results.")
    dlq_topic: str = Field("inspection.dlq", description="Dead letters with error-* headers.")
    auto_offset_reset: Literal["earliest", "latest"] = Field(
        "earliest", description="Where a new group starts; earliest never skips images."
    )
    isolation_level: Literal["read_committed", "read_uncommitted"] = Field(
        "read_committed",
        description="Requests of aborted producer transactions are skipped (no cost for producers without them).",
    )
    session_timeout_ms: int = Field(
        10_000, ge=6_000, le=300_000,
        description="Group session timeout (brokers refuse less than group.min.session.timeout.ms, 6 s by default).",
    )  # fmt: skip
    heartbeat_interval_ms: int = Field(
        1_000, ge=100, le=60_000, description="Group heartbeat interval; at most a third of the session timeout."
    )
    max_poll_interval_ms: int = Field(
        60_000, ge=5_000, description="Eviction deadline between polls (also bounds a rebalance wait)."
    )
    max_poll_records: int = Field(256, ge=1, le=10_000, description="Records per poll() call.")
    poll_timeout_ms: int = Field(100, ge=1, le=5_000, description="How long one poll() blocks.")
    max_partition_fetch_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="Per-partition fetch cap.")
    fetch_max_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Per-fetch cap.")
    max_request_size: int = Field(16 * 1024 * 1024, ge=1024, description="Producer request cap (inline images).")
    dlq_max_value_bytes: int = Field(
        8 * 1024 * 1024, ge=0, description="Dead letters keep at most this much of the original value."
    )
    compression_type: Literal["none", "gzip", "snappy", "lz4", "zstd"] = Field(
        "none", description="Producer compression for results and dead letters."
    )
    linger_ms: int = Field(5, ge=0, le=1_000, description="Producer linger to batch results.")
    request_timeout_ms: int = Field(
        30_000, ge=1_000, le=539_000,
        description="Request timeout of every client (kafka-python requires it below connections_max_idle_ms, 540 s).",
    )  # fmt: skip
    bootstrap_timeout_ms: int = Field(
        30_000, ge=1_000, le=600_000,
        description="How long a client (worker, space send, space dlq) tries to reach the brokers before it fails.",
    )  # fmt: skip
    max_block_ms: int = Field(
        10_000, ge=100, description="Longest a producer send may block (metadata or a full buffer)."
    )
    delivery_timeout_ms: int = Field(120_000, ge=1_000, description="Producer delivery timeout (> linger + request).")
    commit_interval_ms: int = Field(1_000, ge=10, le=60_000, description="How often acked offsets commit.")
    commit_timeout_ms: int = Field(
        5_000, ge=100, le=60_000, description="Longest a commit may block the poll loop (broker or coordinator down)."
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_password: SecretStr | None = None

    @field_validator("bootstrap_servers")
    @classmethod
    def _check_bootstrap(cls, value: str) -> str:
        servers = [s.strip() for s in value.split(",") if s.strip()]
        if not servers:
            raise ValueError("must list at least one host:port")
        for server in servers:
            host, sep, port = server.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{server!r} is not host:port")
        return ",".join(servers)

    @model_validator(mode="after")
    def _check_security(self) -> KafkaSettings:
        if self.dlq_max_value_bytes + 64 * 1024 > self.max_request_size:
            raise ValueError("dlq_max_value_bytes must leave 64 KiB of max_request_size for headers")
        if self.delivery_timeout_ms <= self.linger_ms + self.request_timeout_ms:
            raise ValueError("delivery_timeout_ms must exceed linger_ms + request_timeout_ms")
        if self.heartbeat_interval_ms * 3 > self.session_timeout_ms:
            raise ValueError(
                f"heartbeat_interval_ms ({self.heartbeat_interval_ms}) must be at most a third of session_timeout_ms "
                f"({self.session_timeout_ms}): the broker evicts a member that sends no heartbeat for that long"
            )
        if self.security_protocol.startswith("SASL"):
            if self.sasl_mechanism is None:
                raise ValueError("sasl_mechanism is required when security_protocol is SASL_*")
            if not self.sasl_username or self.sasl_password is None:
                raise ValueError("sasl_username and sasl_password are required for SASL")
        key_alone = (self.ssl_keyfile is not None or self.ssl_password is not None) and self.ssl_certfile is None
        if self.security_protocol.endswith("SSL") and key_alone:
            raise ValueError("ssl_keyfile and ssl_password need ssl_certfile (the client certificate)")
        return self

    def unused_security_options(self) -> list[str]:
        """Options set that ``security_protocol`` ignores (the client neither encrypts nor authenticates with them).

        Not refused: the deployment mounts its Kafka secret files in every overlay, and a PLAINTEXT overlay
        may find them present; the clients log ``kafka_security_options_unused`` instead.
        """
        ssl = [n for n in ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_password") if getattr(self, n) is not None]
        sasl = [n for n in ("sasl_mechanism", "sasl_username", "sasl_password") if getattr(self, n) is not None]
        return (ssl if not self.security_protocol.endswith("SSL") else []) + (
            sasl if not self.security_protocol.startswith("SASL") else []
        )

    def client_kwargs(self) -> dict[str, Any]:
        """Connection, request timeout and security arguments shared by kafka-python consumers, producers and admins."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers.split(","),
            "bootstrap_timeout_ms": self.bootstrap_timeout_ms,
            "request_timeout_ms": self.request_timeout_ms,
            "security_protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            kwargs["sasl_plain_username"] = self.sasl_username
            kwargs["sasl_plain_password"] = self.sasl_password.get_secret_value() if self.sasl_password else None
        if self.security_protocol.endswith("SSL"):
            if self.ssl_cafile:
                kwargs["ssl_cafile"] = str(self.ssl_cafile)
            if self.ssl_certfile:
                kwargs["ssl_certfile"] = str(self.ssl_certfile)
            if self.ssl_keyfile:
                kwargs["ssl_keyfile"] = str(self.ssl_keyfile)
            if self.ssl_password:
                kwargs["ssl_password"] = self.ssl_password.get_secret_value()
        return kwargs


class RedisSettings(_Section):
    """Where thresholds (and the model registry's pointers) live."""

    url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="redis://, rediss:// or unix:// URL without credentials (no user:password@, no ?password=).",
    )
    username: str | None = Field(None, description="ACL user (Redis 6+).")
    password: SecretStr | None = Field(None, description="AUTH password; prefer a secret file.")
    ssl_ca_certs: Path | None = Field(None, description="CA bundle for rediss://.")
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    socket_timeout_ms: int = Field(250, ge=10, le=30_000, description="Per-command timeout; bounds added latency.")
    health_check_interval_s: int = Field(
        10, ge=0, le=3_600, description="PING a connection idle this long before reuse (0 = never)."
    )
    retries: int = Field(1, ge=0, le=10, description="Retries after a connection error or timeout (each adds latency).")
    key_prefix: str = Field("space", min_length=1, description="Prefix of every key and channel.")

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        if _split_userinfo(value)[1] is not None:  # any @: a password may hold / ? or # (redis://u:p/w@host)
            raise ValueError("put credentials in SPACE_REDIS__USERNAME/PASSWORD, not in the URL")
        query = value.partition("?")[2].partition("#")[0]
        names = {name.lower() for name, _ in parse_qsl(query, keep_blank_values=True)}
        if names & _CREDENTIAL_QUERY_PARAMETERS:
            raise ValueError(
                "put credentials in SPACE_REDIS__USERNAME/PASSWORD, not in the URL's query "
                f"({', '.join(sorted(names & _CREDENTIAL_QUERY_PARAMETERS))})"
            )
        if not value.startswith("unix://"):
            path = value.split("://", 1)[1].partition("?")[0].partition("#")[0].partition("/")[2]
            if path and not path.isdigit():  # redis-py would quietly use database 0
                raise ValueError(f"the path must be a database number (redis://host:6379/0), not /{path}")
        return value


class BatchingSettings(_Section):
    """Dynamic batcher: a batch leaves when full or when its oldest image waited ``max_wait_ms``."""

    max_batch_size: int = Field(16, ge=1, le=MAX_BATCH_SIZE, description="Images per model call.")
    max_wait_ms: float = Field(20.0, ge=0, le=10_000, description="Longest wait of the oldest queued image.")
    max_queue_images: int = Field(1024, ge=1, description="Bound of each (line, model version) queue.")
    max_inflight_images: int = Field(512, ge=1, description="Polled but not yet acknowledged images (pause above).")
    max_inflight_bytes: int = Field(512 * 1024 * 1024, ge=1024, description="Bytes held for in-flight images.")
    resume_fraction: float = Field(0.5, gt=0, lt=1, description="Resume partitions below this share of the caps.")
    deadline_ms: float | None = Field(None, gt=0, description="Default per-image deadline after capture.")
    late_policy: Literal["process", "dead_letter"] = Field(
        "process", description="Late images: infer anyway (flagged late) or dead-letter them."
    )

    @model_validator(mode="after")
    def _check_bounds(self) -> BatchingSettings:
        if self.max_queue_images < self.max_inflight_images:
            raise ValueError("max_queue_images must be >= max_inflight_images (a queue can never overflow)")
        return self


class DecodeSettings(_Section):
    """Image decoding and input guards (decompression bombs, claim-check sources)."""

    workers: int = Field(2, ge=1, le=64, description="Decode threads (OpenCV releases the GIL).")
    device: Literal["cpu", "auto", "cuda"] = Field(
        "cpu",
        description="Where JPEGs are decoded and resized: cuda = nvJPEG via torchvision (refuses to start "
        "without it), auto = nvJPEG when present, cpu = OpenCV. Other formats always decode on the CPU.",
    )
    max_pixels: int = Field(
        DEFAULT_MAX_PIXELS,
        ge=1,
        description="Refuse images larger than this before decoding (as an environment variable it also sets "
        "OpenCV's own limit, OPENCV_IO_MAX_IMAGE_PIXELS, unless that is set).",
    )
    max_value_bytes: int = Field(32 * 1024 * 1024, ge=1, description="Refuse record values larger than this.")
    claim_check_schemes: StrList = Field(
        ("s3",),
        description=f"Allowed claim-check URI schemes, among {', '.join(CLAIM_CHECK_SCHEMES)} (http is never fetched).",
    )
    claim_check_buckets: StrList = Field((), description="Allowed S3 buckets; empty allows any.")
    claim_check_file_root: Path | None = Field(
        None, description="If set, file:// claim checks are allowed only under this directory."
    )
    fetch_timeout_ms: int = Field(
        5_000, ge=10, description="Claim-check timeout of each connect and read; a whole download gets twice this."
    )

    @field_validator("claim_check_schemes")
    @classmethod
    def _check_schemes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        schemes = tuple(scheme.lower() for scheme in value)
        unsupported = [scheme for scheme in schemes if scheme not in CLAIM_CHECK_SCHEMES]
        if unsupported:
            raise ValueError(
                f"{', '.join(unsupported)} cannot be fetched (supported: {', '.join(CLAIM_CHECK_SCHEMES)})"
            )
        return schemes


class ModelSettings(_Section):
    """Model registry and runtime options."""

    root: str = Field(".space/models", description="Registry root: a directory or s3://bucket/prefix.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto picks CUDA when present.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="Inference precision (autocast). auto: each model's training precision (the one its default "
        "threshold was chosen at) where the device runs it natively (bf16 on GPUs and on CPUs with AVX-512 bf16 "
        "or AMX), else fp32. Calibrate thresholds at the precision the workers use.",
    )
    channels_last: bool = Field(True, description="NHWC memory format for the convolutions.")
    cuda_graphs: bool = Field(False, description="Capture a CUDA graph per batch bucket (CUDA only).")
    compile: Literal["off", "default", "max-autotune"] = Field(
        "off",
        description="torch.compile the model, one graph per batch bucket (on CPU too); the first batch of "
        "each bucket compiles, so warm-up takes longer (minutes on a small CPU). Needs a C++ compiler "
        "(CPU; the shipped CPU image has none, so serve refuses it at start there) or triton (CUDA); a failed "
        "compile is an error, never a silent fallback to eager.",
    )
    concurrent_branches: bool = Field(
        False,
        description="Run the networks that do not wait for each other (the autoencoder; for efficientad the "
        "teacher too) on side CUDA streams beside the student, captured into the same CUDA graphs: meant to "
        "shorten small batches, where no single network fills the card (bench/branches.py measures it). "
        "CUDA only (no effect on CPU); needs SPACE_MODELS__COMPILE=off.",
    )
    max_loaded: int = Field(4, ge=1, le=64, description="Models kept in memory (LRU).")
    refresh_interval_s: float = Field(5.0, gt=0, le=3_600, description="How often active versions are checked.")
    warmup: bool = Field(True, description="Run a warm-up batch before serving a model.")
    threads: int | None = Field(None, ge=1, le=256, description="torch intra-op threads (default: torch's).")
    malloc: Literal["retain", "system"] = Field(
        "retain",
        description="glibc malloc of the serving process: retain keeps freed memory for the next batch (no mmap "
        "for large blocks, no heap trim, one arena), 1.2-1.5x CPU model throughput for a higher resident "
        "floor (docs/performance.md); system keeps glibc's defaults. No effect on other C libraries.",
    )
    preload: StrList = Field((), description="Lines loaded and warmed at start-up; /readyz waits for them.")
    negative_ttl_s: float = Field(
        5.0,
        ge=0,
        le=3_600,
        description="Remember a failing line this long; an unknown line at most this long (each refresh, "
        "every REFRESH_INTERVAL_S, forgets unknown lines so newly published ones are found).",
    )
    swap_retry_s: float = Field(30.0, ge=0, le=86_400, description="Retry a failed promoted version after this.")
    warmup_batch_sizes: IntList = Field(
        (1,), description=f"Batch sizes run once before a model serves (each 1 to {MAX_BATCH_SIZE})."
    )

    @field_validator("warmup_batch_sizes")
    @classmethod
    def _check_warmup_batch_sizes(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        # A size below 1 made every model load fail (each image dead-lettered model-unavailable).
        if any(not 1 <= size <= MAX_BATCH_SIZE for size in value):
            raise ValueError(f"each batch size must be 1 to {MAX_BATCH_SIZE} (SPACE_BATCHING__MAX_BATCH_SIZE's range)")
        return value

    @model_validator(mode="after")
    def _check_branches(self) -> ModelSettings:
        if self.concurrent_branches and self.compile != "off":
            raise ValueError(
                "SPACE_MODELS__CONCURRENT_BRANCHES=true needs SPACE_MODELS__COMPILE=off "
                "(torch.compile does not capture the side streams)"
            )
        return self


class HeatmapSettings(_Section):
    """Where anomaly maps go and which results get one."""

    store_uri: str = Field("file://.space/heatmaps", description="file://DIR or s3://bucket/prefix.")
    policy: Literal["all", "anomalous", "none"] = Field("all", description="Which results store a heatmap.")
    threads: int = Field(
        4,
        ge=1,
        le=64,
        description="Threads that encode and store heatmaps (PNG encoding and uploads release the GIL); "
        "raise it on GPU pods, where policy=all stores more than a thousand maps a second.",
    )
    retries: int = Field(3, ge=0, le=10, description="Attempts after the first failure.")
    backoff_ms: float = Field(50.0, ge=0, le=10_000, description="First retry delay, doubled each time.")
    breaker_failures: int = Field(
        5,
        ge=0,
        le=10_000,
        description="Heatmap puts failing in a row (after their retries) that stop the store being asked for "
        "breaker_cooldown_s; results then go out at once with heatmap_error. 0 = always ask.",
    )
    breaker_cooldown_s: float = Field(
        30.0, ge=0, le=3_600, description="How long the heatmap store is not asked once puts keep failing."
    )
    wait_s: float = Field(
        60.0,
        gt=0,
        le=3_600,
        description="Longest a batch's results wait for their heatmaps; then they go out with heatmap_error (a "
        "store answering a byte at a time is slow within every per-request timeout).",
    )
    max_side_px: int | None = Field(
        None,
        ge=8,
        le=8192,
        description="Store heatmaps with their longer side at most this many pixels (each block keeps its "
        "maximum, so the threshold crossing and the score survive); unset = the model input size. The model "
        "computes its map at about a quarter of the input size, so a quarter loses little.",
    )

    @field_validator("store_uri")
    @classmethod
    def _check_uri(cls, value: str) -> str:
        if value.startswith("file://"):
            if not value.removeprefix("file://").strip():
                raise ValueError("file:// names no directory (file://DIR or file:///ABSOLUTE/DIR)")
        elif value.startswith("s3://"):
            if not urlsplit(value).netloc:  # what worker.s3.parse_s3_uri requires
                raise ValueError("s3:// names no bucket (s3://bucket or s3://bucket/prefix)")
            # Results carry s3://bucket/prefix/key as it is; the result schema (StorageUri) refuses
            # whitespace and control characters there. (file:// results are percent-encoded.)
            bad = next((c for c in value if ord(c) <= 0x20 or 0x7F <= ord(c) <= 0x9F), None)
            if bad is not None:
                raise ValueError(
                    f"s3:// prefix contains {bad!r}; results cannot carry whitespace or control characters"
                )
        else:
            raise ValueError("must start with file:// or s3://")
        return value


class S3Settings(_Section):
    """S3 or S3-compatible object storage (MinIO) for claim checks, heatmaps and models."""

    endpoint_url: str | None = Field(None, description="Custom endpoint (MinIO, moto); None = AWS.")
    region: str = "us-east-1"
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None

    @field_validator("endpoint_url")
    @classmethod
    def _check_endpoint(cls, value: str | None) -> str | None:
        # botocore quotes the endpoint in its errors, which reach logs and dead-letter details.
        if value is not None and _split_userinfo(value)[1] is not None:
            raise ValueError("put credentials in SPACE_S3__ACCESS_KEY_ID/SECRET_ACCESS_KEY, not in the URL")
        return value


class ThresholdSettings(_Section):
    """Per-line threshold cache."""

    cache_ttl_s: float = Field(30.0, gt=0, le=86_400, description="Re-read a cached threshold after this.")
    history_max: int = Field(1_000, ge=1, le=1_000_000, description="Entries kept per line's history.")
    retry_interval_s: float = Field(
        1.0, gt=0, le=600, description="After a failed Redis read, serve last-known-good this long, then retry."
    )
    watch_backoff_max_s: float = Field(
        5.0, gt=0, le=600, description="Longest wait between reconnects of the pub/sub invalidation watcher."
    )
    min_value: float | None = Field(
        None,
        allow_inf_nan=False,
        description="Lowest value `space thresholds set` takes without --force (finite, at most max_value).",
    )
    max_value: float | None = Field(
        None, allow_inf_nan=False, description="Highest value `space thresholds set` takes without --force (finite)."
    )

    @model_validator(mode="after")
    def _check_value_bounds(self) -> ThresholdSettings:
        if self.min_value is not None and self.max_value is not None and self.min_value > self.max_value:
            raise ValueError(
                f"SPACE_THRESHOLDS__MIN_VALUE ({self.min_value}) must be at most SPACE_THRESHOLDS__MAX_VALUE "
                f"({self.max_value}): no threshold could be set without --force"
            )
        return self


class HttpSettings(_Section):
    """/metrics, /healthz, /readyz."""

    host: str = Field(
        "0.0.0.0",  # noqa: S104 - pods expose probes on all interfaces
        description="Listen address; `::` on IPv6 or dual-stack clusters (serves IPv4 as well).",
    )
    port: int = Field(8080, ge=0, le=65_535, description="0 picks a free port.")
    enabled: bool = True
    healthy_after_s: float = Field(30.0, gt=0, description="/healthz fails when a loop stalls this long.")


class LogSettings(_Section):
    """structlog output."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    format: Literal["auto", "json", "console"] = Field("auto", description="auto = console on a TTY, else JSON.")

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class WorkerSettings(_Section):
    """Identity and lifecycle of one worker process."""

    id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}", description="Worker id.")
    shutdown_grace_s: float = Field(25.0, gt=0, le=3_600, description="SIGTERM drain budget.")
    state_dir: Path = Field(Path(".space"), description="Local state (stack, heatmaps, heartbeat).")


class Settings(BaseSettings):
    """The whole configuration. Build it with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        frozen=True,
        extra="forbid",
        case_sensitive=False,
    )

    kafka: KafkaSettings = KafkaSettings()
    redis: RedisSettings = RedisSettings()
    batching: BatchingSettings = BatchingSettings()
    decode: DecodeSettings = DecodeSettings()
    models: ModelSettings = ModelSettings()
    heatmaps: HeatmapSettings = HeatmapSettings()
    s3: S3Settings = S3Settings()
    thresholds: ThresholdSettings = ThresholdSettings()
    http: HttpSettings = HttpSettings()
    log: LogSettings = LogSettings()
    worker: WorkerSettings = WorkerSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Precedence: explicit arguments > environment > secret files > config file.
        return (init_settings, env_settings, _SecretFilesSource(settings_cls), _ConfigFileSource(settings_cls))

    def redacted(self) -> dict[str, Any]:
        """The settings as plain data with every secret shown as ``**********``."""
        return json.loads(self.model_dump_json())


class _ConfigFileSource(PydanticBaseSettingsSource):
    """Reads ``SPACE_CONFIG_FILE`` (TOML or JSON) when set."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = os.environ.get(f"{ENV_PREFIX}CONFIG_FILE")
        if not path:
            return {}
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"{ENV_PREFIX}CONFIG_FILE: {path} does not exist")
        text = file.read_text(encoding="utf-8")
        try:
            data = json.loads(text) if file.suffix == ".json" else tomllib.loads(text)
        except (ValueError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{ENV_PREFIX}CONFIG_FILE: {path} is not valid: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{ENV_PREFIX}CONFIG_FILE: {path} must hold a table of sections")
        return data


class _SecretFilesSource(PydanticBaseSettingsSource):
    """Secret files named like the variables: ``<dir>/kafka__sasl_password`` (Kubernetes secret mounts).

    The directory is ``SPACE_SECRETS_DIR`` (default ``/run/secrets/space``). File names are matched
    case-insensitively, with or without the ``SPACE_`` prefix; trailing newlines are stripped.
    """

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        directory = Path(os.environ.get(f"{ENV_PREFIX}SECRETS_DIR", DEFAULT_SECRETS_DIR))
        if not directory.is_dir():
            return {}
        data: dict[str, Any] = {}
        for file in sorted(directory.iterdir()):
            if not file.is_file():
                continue
            name = file.name.lower().removeprefix(ENV_PREFIX.lower())
            parts = name.split(ENV_NESTED_DELIMITER)
            if len(parts) != 2:
                continue
            section, key = parts
            data.setdefault(section, {})[key] = file.read_text(encoding="utf-8").rstrip("\r\n")
        return data


def _may_hold_secret(value: str) -> bool:
    """A URL with user info, or a value naming a credential (``redis://host/0?pass%77ord=...`` too)."""
    text = unquote(value).lower()
    return "@" in text or any(word in text for word in ("password", "secret", "token"))


def _settings_error_line(exc: SettingsError) -> str:
    """A source's parse error (``SPACE_KAFKA='{bad'``) as one line naming the variable, never its value."""
    field = re.search(r'error parsing value for field "([^"]+)"', str(exc))
    if field is None:
        return f"{ENV_PREFIX}*: {exc}"
    cause = exc.__cause__
    if isinstance(cause, json.JSONDecodeError):  # its message says where, without the value
        return f"{env_name((field.group(1),))}: is not valid JSON ({cause})"
    return f"{env_name((field.group(1),))}: cannot be parsed ({type(cause).__name__})"


def env_name(loc: tuple[int | str, ...]) -> str:
    """The environment variable for a validation error location, e.g. ``SPACE_KAFKA__BOOTSTRAP_SERVERS``."""
    parts = [str(p) for p in loc if not isinstance(p, int)]
    return ENV_PREFIX + ENV_NESTED_DELIMITER.join(parts).upper()


def _check_sections(environ: Mapping[str, str]) -> None:
    """Refuse ``SPACE_<SECTION>__<FIELD>`` variables whose section does not exist.

    pydantic-settings refuses an unknown field of a known section but silently ignores a variable of an
    unknown section (``SPACE_MODEL__PRELOAD`` for ``SPACE_MODELS__PRELOAD``): the setting would just
    not apply. Only names with the nested delimiter are checked, so other ``SPACE_*`` variables
    (``SPACE_CONFIG_FILE``, test knobs) pass.
    """
    sections = set(Settings.model_fields)
    for name in environ:
        if not name.upper().startswith(ENV_PREFIX) or ENV_NESTED_DELIMITER not in name:
            continue
        section = name[len(ENV_PREFIX) :].split(ENV_NESTED_DELIMITER, 1)[0].lower()
        if section not in sections:
            raise ConfigError(f"{name}: no settings section {section!r} (sections: {', '.join(sorted(sections))})")


def load_settings(**overrides: Any) -> Settings:
    """Build the settings or raise :class:`ConfigError` with one line naming the variable and reason."""
    _check_sections(os.environ)
    try:
        return Settings(**overrides)
    except SettingsError as exc:
        raise ConfigError(_settings_error_line(exc)) from None
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = tuple(first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        value = first.get("input")
        shown = f" (got {value!r})"
        sensitive = any(word in str(loc).lower() for word in _SENSITIVE_WORDS)
        if isinstance(value, dict | list) or sensitive or (isinstance(value, str) and _may_hold_secret(value)):
            shown = ""  # never echo a secret, nor a URL that may carry credentials
        more = f"; and {len(exc.errors()) - 1} more" if len(exc.errors()) > 1 else ""
        if first["type"] == "extra_forbidden":  # a misspelled variable: say which ones exist
            message = "no such setting" + _close_setting(loc)
            shown = ""
        raise ConfigError(f"{env_name(loc)}: {message}{shown}{more}") from None


def _close_setting(loc: tuple[int | str, ...]) -> str:
    """``"; did you mean SPACE_X__Y?"`` for the settings names closest to an unknown one, or ``""``."""
    import difflib

    parts = [str(p) for p in loc if not isinstance(p, int)]
    section = Settings.model_fields.get(parts[0]) if len(parts) == 2 else None
    model = getattr(section, "annotation", None) if section is not None else None
    names = list(getattr(model, "model_fields", {})) if model is not None else list(Settings.model_fields)
    close = difflib.get_close_matches(parts[-1], names, n=1, cutoff=0.6)
    return f"; did you mean {env_name((*parts[:-1], close[0]))}?" if close else ""
