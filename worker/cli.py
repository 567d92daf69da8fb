"""The ``space`` command line: discovers subcommands in :mod:`worker.commands`.

Each module in ``worker/commands`` defines ``NAME``, ``HELP``, ``configure(parser)`` and
``run(args) -> int``. Modules import heavy dependencies (torch, kafka) inside ``run`` so that
``space --help`` stays fast. Settings errors and other expected failures end as one line on stderr
with a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence
from types import ModuleType

from worker import __version__
from worker.errors import SpaceError


def _command_modules() -> list[ModuleType]:
    import worker.commands as pkg

    modules = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"worker.commands.{info.name}")
        if hasattr(module, "NAME") and hasattr(module, "run"):
            modules.append(module)
    return modules


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with one subparser per command module."""
    parser = argparse.ArgumentParser(
        prog="space",
        description="space-worker: streaming visual anomaly detection (Kafka -> SPACE -> verdicts).",
    )
    parser.add_argument("--version", action="version", version=f"space-worker {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in sorted(_command_modules(), key=lambda m: m.NAME):
        child = sub.add_parser(
            module.NAME, help=module.HELP, description=module.HELP, epilog=getattr(module, "EPILOG", None)
        )
        module.configure(child)
        child.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``space`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except SpaceError as exc:
        print(f"space: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("space: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
