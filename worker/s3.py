"""S3 (or S3-compatible: MinIO, moto) client construction and ``s3://`` URI parsing.

Owns the boto3 client built from :class:`worker.settings.S3Settings`: custom endpoint, region,
credentials from ``SecretStr`` (when unset, boto3's own chain applies: IRSA, instance profile, env),
and bounded timeouts and retries so that a slow object store cannot stall a decode or publish thread.
"""

from __future__ import annotations

from typing import Any

import boto3
from botocore.config import Config

from worker.settings import S3Settings

__all__ = ["make_s3_client", "parse_s3_uri"]


def make_s3_client(
    settings: S3Settings, *, timeout_s: float = 10.0, max_attempts: int = 2, max_pool_connections: int = 10
) -> Any:
    """Build a boto3 S3 client.

    Args:
        settings: the ``s3`` settings section.
        timeout_s: connect and read timeout of each request.
        max_attempts: total attempts per request made by botocore (its own retries, standard mode).
        max_pool_connections: kept-alive connections; at least the threads sharing the client, or
            connections are dropped and opened again ("Connection pool is full").

    Returns:
        A ``botocore`` S3 client (thread-safe; share one per process).
    """
    kwargs: dict[str, Any] = {
        "region_name": settings.region,
        "config": Config(
            connect_timeout=timeout_s,
            read_timeout=timeout_s,
            retries={"max_attempts": max_attempts, "mode": "standard"},
            max_pool_connections=max(10, max_pool_connections),
            # Path-style addressing works with MinIO and moto endpoints and with AWS.
            s3={"addressing_style": "path"} if settings.endpoint_url else None,
        ),
    }
    if settings.endpoint_url:
        kwargs["endpoint_url"] = settings.endpoint_url
    if settings.access_key_id is not None and settings.secret_access_key is not None:
        kwargs["aws_access_key_id"] = settings.access_key_id.get_secret_value()
        kwargs["aws_secret_access_key"] = settings.secret_access_key.get_secret_value()
    return boto3.session.Session().client("s3", **kwargs)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/key/parts`` into ``(bucket, "key/parts")``.

    Args:
        uri: an ``s3://`` URI; the key may be empty (``s3://bucket`` or ``s3://bucket/``).

    Returns:
        The bucket and the key without its leading slash.

    Raises:
        ValueError: not an ``s3://`` URI or no bucket.

    The key is taken as written: ``?`` and ``#`` are characters of S3 keys, not a query or a fragment
    (read as one, ``s3://allowed/a.png?x=../b.png`` fetched ``allowed/a.png``).
    """
    if uri[:5].lower() != "s3://":
        raise ValueError(f"{uri!r} is not an s3://bucket/key URI")
    bucket, _, key = uri[5:].partition("/")
    if not bucket:
        raise ValueError(f"{uri!r} is not an s3://bucket/key URI")
    return bucket, key.lstrip("/")
