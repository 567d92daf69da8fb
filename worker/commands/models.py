"""``space models list | show | promote | rollback``: the model registry of ``SPACE_MODELS__ROOT``.

The registry (:class:`worker.registry.ModelRegistry`, a directory or ``s3://bucket/prefix``) holds
``<line>/<version>/`` artifacts and one ``ACTIVE.json`` pointer per line. Running workers poll the
pointer every ``SPACE_MODELS__REFRESH_INTERVAL_S`` and hot-swap to the version it names once that
version has loaded and warmed up. ``promote`` first checks the artifact (valid card naming this line
and version, weights matching the card's sha256) so a corrupt upload is refused here rather than
failing in every worker; ``--force`` skips that check.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.registry import ModelRegistry

NAME = "models"
HELP = "List, show, promote and roll back model versions per product line (SPACE_MODELS__ROOT)."

_COLUMNS = ("line", "version", "active", "variant", "input", "default_threshold", "precision", "created_at", "metrics")


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the list/show/promote/rollback subcommands."""
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    listing = sub.add_parser("list", help="Every line's versions, which is active, and card summaries.")
    listing.add_argument("--json", action="store_true", help="Print JSON instead of a table.")

    show = sub.add_parser("show", help="A version's model card and the line's pointer (default: active).")
    show.add_argument("line", metavar="LINE", help="Product line.")
    show.add_argument("version", metavar="VERSION", nargs="?", default=None, help="Version (default: active).")

    promote = sub.add_parser("promote", help="Make VERSION the serving version of LINE (workers hot-swap).")
    promote.add_argument("line", metavar="LINE", help="Product line.")
    promote.add_argument("version", metavar="VERSION", help="Version folder to serve.")
    promote.add_argument("--by", default=None, help="Who (default: the current user).")
    promote.add_argument("--force", action="store_true", help="Skip the artifact check.")

    rollback = sub.add_parser("rollback", help="Serve LINE's previous version again.")
    rollback.add_argument("line", metavar="LINE", help="Product line.")
    rollback.add_argument("--by", default=None, help="Who (default: the current user).")


def run(args: argparse.Namespace) -> int:
    """Run one models action against the configured registry root."""
    from worker.logging import configure_logging
    from worker.registry import ModelRegistry
    from worker.s3 import make_s3_client
    from worker.settings import load_settings

    settings = load_settings()
    configure_logging("WARNING" if settings.log.level in ("DEBUG", "INFO") else settings.log.level, settings.log.format)
    registry = ModelRegistry(
        settings.models.root,
        s3_client_factory=lambda: make_s3_client(settings.s3),
        cache_dir=settings.worker.state_dir / "model-cache",
    )
    return _dispatch(args, registry)


def _dispatch(args: argparse.Namespace, registry: ModelRegistry) -> int:
    from worker.commands.thresholds import _default_user

    if args.action == "list":
        _print_list(registry, as_json=args.json)
    elif args.action == "show":
        _print_show(registry, args.line, args.version)
    elif args.action == "promote":
        if not args.force:
            registry.verify(args.line, args.version)
        pointer = registry.promote(args.line, args.version, by=args.by or _default_user())
        print(f"line {args.line}: {pointer.version} is active (previous: {_previous(pointer)})")
    else:
        pointer = registry.rollback(args.line, by=args.by or _default_user())
        print(f"line {args.line}: rolled back to {pointer.version} (previous: {_previous(pointer)})")
    return 0


def _previous(pointer: Any) -> str:
    return pointer.history[0] if pointer.history else "none"


def _card_summary(registry: ModelRegistry, line: str, version: str) -> dict[str, Any]:
    """The card fields an operator compares versions by; ``error`` when the card is unreadable."""
    from models.artifact import ModelCard
    from models.detector import precision_name

    try:
        card = ModelCard.model_validate_json(registry.card_text(line, version))
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        return {"error": f"invalid model card: {str(exc).splitlines()[0]}"}
    return {
        "name": card.name,
        "variant": f"{card.variant}-{card.size}",
        "input_size": list(card.input_size),
        "default_threshold": card.default_threshold,
        # The training precision: the default threshold was chosen on its scores, and
        # SPACE_MODELS__PRECISION=auto serves it where the node has the kernels.
        "precision": precision_name(card.training.precision),
        "created_at": card.created_at.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "metrics": card.metrics,
        "card_version": card.version,
    }


def _inventory(registry: ModelRegistry) -> list[dict[str, Any]]:
    from worker.registry import RegistryError

    lines = []
    for line in registry.lines():
        try:
            pointer = registry.pointer(line)
            active, pointer_error = (pointer.version if pointer else None), None
        except RegistryError as exc:
            active, pointer_error = None, str(exc)
        versions = [
            {"version": v, "active": v == active, **_card_summary(registry, line, v)} for v in registry.versions(line)
        ]
        lines.append({"line": line, "active": active, "pointer_error": pointer_error, "versions": versions})
    return lines


def _fmt_metrics(metrics: dict[str, float] | None) -> str:
    if not metrics:
        return "-"
    return " ".join(f"{k}={v:.3g}" for k, v in sorted(metrics.items()))


def _print_list(registry: ModelRegistry, *, as_json: bool) -> None:
    inventory = _inventory(registry)
    if as_json:
        print(json.dumps({"root": registry.root, "lines": inventory}, indent=2))
        return
    if not inventory:
        print(f"(no model in {registry.root})")
        return
    rows = []
    for entry in inventory:
        if entry["pointer_error"]:
            print(f"warning: {entry['pointer_error']}")
        for v in entry["versions"]:
            row = {"line": entry["line"], "version": v["version"], "active": "*" if v["active"] else ""}
            if "error" in v:
                row.update({c: "-" for c in _COLUMNS[3:]}, metrics=v["error"])
            else:
                row.update(
                    variant=v["variant"],
                    input="x".join(map(str, v["input_size"])),
                    default_threshold=f"{v['default_threshold']:.6g}",
                    precision=v["precision"],
                    created_at=v["created_at"],
                    metrics=_fmt_metrics(v["metrics"]),
                )
            rows.append(row)
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in _COLUMNS}
    print("  ".join(c.upper().ljust(widths[c]) for c in _COLUMNS).rstrip())
    for r in rows:
        print("  ".join(r[c].ljust(widths[c]) for c in _COLUMNS).rstrip())


def _print_show(registry: ModelRegistry, line: str, version: str | None) -> None:
    from worker.registry import RegistryError

    pointer = registry.pointer(line)
    if version is None:
        if pointer is None:
            raise RegistryError(f"product line {line!r} has no active model; name a VERSION to show")
        version = pointer.version
    try:
        card = json.loads(registry.card_text(line, version))
    except json.JSONDecodeError as exc:  # one line, as `models list` reports it
        raise RegistryError(f"line {line!r} version {version!r}: invalid model card: {exc}") from exc
    doc = {
        "line": line,
        "version": version,
        "active": pointer is not None and pointer.version == version,
        "pointer": None
        if pointer is None
        else {
            "version": pointer.version,
            "history": list(pointer.history),
            "updated_at": pointer.updated_at,
            "updated_by": pointer.updated_by,
        },
        "card": card,
    }
    print(json.dumps(doc, indent=2))
