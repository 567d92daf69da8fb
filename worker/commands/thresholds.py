"""``space thresholds get | set | list | history``: read and move per-line thresholds in Redis.

Writes go through :class:`worker.thresholds.ThresholdStore`, so they are versioned, kept in the
line's history and announced to every worker at once. ``--if-version`` makes a write conditional on
the version the operator read (optimistic concurrency): of two engineers editing the same line, the
second gets a clear conflict instead of silently overwriting the first. ``set`` is checked against
the model registry (``SPACE_MODELS__ROOT``, when set or present): a line without models (a typo) or a
``--model-version`` the line does not have would never be applied by any worker, so it is refused
unless ``--allow-unknown-version``; without a registry to ask, stderr says nothing was checked.
"""

from __future__ import annotations

import argparse
import getpass
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from schemas.threshold import ThresholdRecord
    from worker.settings import Settings
    from worker.thresholds import ThresholdStore

NAME = "thresholds"
HELP = "Show, set, list and audit per-product-line decision thresholds (Redis)."

EXIT_NOT_FOUND = 3
_COLUMNS = ("line", "value", "version", "model_version", "method", "updated_at", "updated_by", "note")


def _default_user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no USER variable and no passwd entry (some containers)
        return "unknown"


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the get/set/list/history subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="Print JSON instead of a table.")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    get = sub.add_parser("get", parents=[common], help="Show a line's current threshold.")
    get.add_argument("line", metavar="LINE", help="Product line.")

    put = sub.add_parser("set", parents=[common], help="Write a new version of a line's threshold.")
    put.add_argument("line", metavar="LINE", help="Product line.")
    put.add_argument("value", metavar="VALUE", type=float, help="Threshold on the model's score (finite).")
    put.add_argument("--model-version", default=None, help="Model version the value is calibrated for.")
    put.add_argument("--method", choices=("manual", "quantile", "f1"), default="manual", help="How it was chosen.")
    put.add_argument("--note", default="", help="Why (kept in the history).")
    put.add_argument("--by", default=None, help="Who (default: the current user).")
    put.add_argument(
        "--if-version",
        type=int,
        default=None,
        metavar="N",
        help="Write only if the current version is N (0 = new).",
    )
    put.add_argument("--force", action="store_true", help="Accept a value outside the configured bounds.")
    put.add_argument(
        "--allow-unknown-version",
        action="store_true",
        help="Write for a line, or a --model-version, the model registry does not have (yet).",
    )

    sub.add_parser("list", parents=[common], help="Show every line's current threshold.")

    history = sub.add_parser("history", parents=[common], help="Show a line's past writes, newest first.")
    history.add_argument("line", metavar="LINE", help="Product line.")
    history.add_argument("--limit", type=int, default=20, help="Most entries shown (default 20).")


def run(args: argparse.Namespace) -> int:
    """Run one thresholds action against the configured Redis."""
    import redis

    from worker.errors import SpaceError
    from worker.logging import configure_logging
    from worker.redis_client import make_redis
    from worker.settings import load_settings, redact_url
    from worker.thresholds import ThresholdStore

    settings = load_settings()
    # The table (or JSON) on stdout is the output; only warnings and errors go to stderr.
    configure_logging("WARNING" if settings.log.level in ("DEBUG", "INFO") else settings.log.level, settings.log.format)
    if args.action == "set":
        _check_against_registry(args, settings)
    client = make_redis(settings.redis)
    store = ThresholdStore.from_settings(client, settings)
    try:
        return _dispatch(args, store)
    except redis.exceptions.RedisError as exc:
        raise SpaceError(f"Redis at {redact_url(settings.redis.url)} failed: {exc}") from exc
    finally:
        client.close()


def _check_against_registry(args: argparse.Namespace, settings: Settings) -> None:
    """Refuse a line, or a ``--model-version``, the registry lacks: no worker would ever apply it.

    Without a registry to ask (``SPACE_MODELS__ROOT`` unset and the default folder absent) it writes,
    and says on stderr that nothing was checked.
    """
    import sys
    from pathlib import Path

    from worker.errors import SpaceError
    from worker.registry import ModelRegistry, RegistryError, check_name
    from worker.s3 import make_s3_client

    if args.model_version is not None:
        check_name("version", args.model_version)
    root = settings.models.root
    configured = "root" in settings.models.model_fields_set or Path(root).is_dir()
    if args.allow_unknown_version:
        return
    if not configured:
        print(
            f"space: warning: line {args.line} and its model version were not checked against a model registry "
            "(SPACE_MODELS__ROOT is not set)",
            file=sys.stderr,
        )
        return
    check_name("product line", args.line)
    checked = f"--model-version {args.model_version}" if args.model_version is not None else f"line {args.line}"
    try:
        registry = ModelRegistry(
            root,
            s3_client_factory=lambda: make_s3_client(settings.s3),
            cache_dir=settings.worker.state_dir / "model-cache",
        )
        versions = registry.versions(args.line)
        lines = registry.lines() if not versions else []
    except RegistryError as exc:
        raise SpaceError(
            f"cannot check {checked} against the model registry: {exc}; "
            "--allow-unknown-version writes without the check"
        ) from exc
    if args.model_version is None:
        if not versions:
            raise SpaceError(
                f"line {args.line} has no model in {root} (lines there: {', '.join(lines) or 'none'}): no worker "
                "would apply this threshold; fix the line name, or --allow-unknown-version to write it anyway "
                "(e.g. before the line's first model)"
            )
        return
    if args.model_version not in versions:
        raise SpaceError(
            f"line {args.line} has no model version {args.model_version} in {root} "
            f"(have: {', '.join(versions) or 'none'}): no worker would apply this threshold; "
            "fix the version, or --allow-unknown-version to write it anyway (e.g. before the upload)"
        )


def _dispatch(args: argparse.Namespace, store: ThresholdStore) -> int:
    if args.action == "get":
        record = store.get(args.line)
        if record is None:
            _print_missing(args)
            return EXIT_NOT_FOUND
        _print_records([record], as_json=args.json, single=True)
    elif args.action == "set":
        record = store.set(
            args.line,
            args.value,
            model_version=args.model_version,
            method=args.method,
            updated_by=args.by or _default_user(),
            note=args.note,
            if_version=args.if_version,
            force=args.force,
        )
        _print_records([record], as_json=args.json, single=True)
    elif args.action == "list":
        _print_records(store.list(), as_json=args.json)
    else:
        _print_records(store.history(args.line, args.limit), as_json=args.json)
    return 0


def _print_missing(args: argparse.Namespace) -> None:
    if args.json:
        print("null")
    else:
        print(f"line {args.line} has no threshold: workers apply the model's default")


def _row(record: ThresholdRecord) -> dict[str, Any]:
    return {
        "line": record.product_line,
        "value": record.value,
        "version": record.version,
        "model_version": record.model_version or "(any)",
        "method": record.method,
        "updated_at": record.updated_at.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "updated_by": record.updated_by,
        "note": record.note.replace("\n", " "),
    }


def _print_records(records: Sequence[ThresholdRecord], *, as_json: bool, single: bool = False) -> None:
    if as_json:
        data = [r.model_dump(mode="json") for r in records]
        print(json.dumps(data[0] if single else data, indent=2, sort_keys=True))
        return
    if not records:
        print("(none)")
        return
    rows = [{k: str(v) for k, v in _row(r).items()} for r in records]
    widths = {c: max(len(c), *(len(row[c]) for row in rows)) for c in _COLUMNS}
    print("  ".join(c.upper().ljust(widths[c]) for c in _COLUMNS).rstrip())
    for row in rows:
        print("  ".join(row[c].ljust(widths[c]) for c in _COLUMNS).rstrip())
