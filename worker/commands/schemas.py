"""``space schemas export DIR | reasons``: publish the wire contracts for integrators.

``export`` writes one JSON Schema per contract (the files checked into ``docs/schemas/``; a test
keeps them equal to what this writes). ``reasons`` prints the dead-letter reason table that
``docs/integration.md`` embeds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "schemas"
HELP = "Export the JSON Schemas of the wire contracts, or print the dead-letter reason table."


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``export`` and ``reasons`` subcommands."""
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    export = sub.add_parser("export", help="Write one JSON Schema file per contract into DIR.")
    export.add_argument("directory", metavar="DIR", help="Target folder (created if missing).")
    export.add_argument(
        "--check",
        action="store_true",
        help="Write nothing; exit 1 if any file in DIR is missing or differs (for CI).",
    )
    sub.add_parser("reasons", help="Print the dead-letter reasons as a Markdown table.")


def render_reason_table() -> str:
    """The dead-letter reasons as a Markdown table (one row per :class:`DeadLetterReason`)."""
    from schemas.deadletter import DEAD_LETTER_REASONS, DeadLetterReason
    from schemas.request import RequestErrorReason

    request_codes = {reason.value for reason in RequestErrorReason}
    lines = ["| error-reason | raised by | meaning |", "|---|---|---|"]
    for reason in DeadLetterReason:
        stage = "request validation" if reason.value in request_codes else "worker"
        lines.append(f"| `{reason.value}` | {stage} | {DEAD_LETTER_REASONS[reason]} |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    """Run one schemas action."""
    from schemas.export import render_json_schemas
    from worker.errors import SpaceError

    if args.action == "reasons":
        print(render_reason_table(), end="")
        return 0
    directory = Path(args.directory)
    files = render_json_schemas()
    if args.check:
        stale = [name for name, text in files.items() if _read(directory / name) != text]
        for name in stale:
            print(f"stale or missing: {directory / name}")
        return 1 if stale else 0
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (directory / name).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise SpaceError(f"cannot write schemas to {directory}: {exc}") from exc
    print(f"wrote {len(files)} schemas to {directory}")
    return 0


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return None
