"""``space stack up | status | down``: the embedded broker and Redis for a laptop, the demo and tests."""

from __future__ import annotations

import argparse
import sys

NAME = "stack"
HELP = "Start, inspect or stop the embedded Kafka-protocol broker (Tansu) and Redis."


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the stack subcommands."""
    parser.add_argument("--state-dir", default=None, help="State directory (default: <SPACE_WORKER__STATE_DIR>/stack).")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    up = sub.add_parser("up", help="Start the broker and Redis (idempotent); print the settings as env lines.")
    up.add_argument("--kafka-port", type=int, default=None, help="Broker port (default: a free port).")
    up.add_argument("--redis-port", type=int, default=None, help="Start a Redis on this port instead of adopting one.")
    sub.add_parser("status", help="Show what runs and whether it answers.")
    sub.add_parser("down", help="Stop what `up` started.")
    sub.add_parser("env", help="Print the settings for the running stack as env lines.")


def run(args: argparse.Namespace) -> int:
    """Run one stack action."""
    from pathlib import Path

    from worker.logging import configure_logging
    from worker.settings import load_settings
    from worker.stack import SERVICES, Stack, StackError

    settings = load_settings()
    configure_logging(settings.log.level, settings.log.format)
    state_dir = Path(args.state_dir) if args.state_dir else settings.worker.state_dir / "stack"
    stack = Stack(state_dir, redis_url=settings.redis.url)
    if args.action == "up":
        stack.up(kafka_port=args.kafka_port, redis_port=args.redis_port)
        for key, value in stack.env().items():
            print(f"{key}={value}")
        return 0
    if args.action == "env":
        # Meant for `export $(space stack env)`: stdout holds env lines only, and only for a usable
        # stack; anything else is an error on stderr with a non-zero exit.
        if not stack.status():
            raise StackError(f"the stack in {state_dir} is not running: `space stack up` starts it")
        problems = stack.problems()
        if problems:
            raise StackError(f"the stack in {state_dir} is not healthy ({'; '.join(problems)}): `space stack up`")
        for key, value in stack.env().items():
            print(f"{key}={value}")
        return 0
    if args.action == "status":
        services = stack.status()
        if not services:
            print("stack: not running (space stack up starts it)")
            return 3
        all_ok = True
        for name, (svc, ok) in services.items():
            all_ok &= ok
            owner = f"pid {svc.pid}" if svc.started_by_stack else "external"
            print(
                f"{name:6} {svc.address:22} {'up' if ok else 'DOWN':5} {owner}"
                + (f"  log {svc.log_file}" if svc.log_file else "")
            )
        for name in SERVICES:
            if name not in services:
                all_ok = False
                print(f"{name:6} {'-':22} {'MISSING':5} (space stack up starts it)")
        return 0 if all_ok else 1
    stopped, skipped = stack.down_report()
    print("stopped: " + (", ".join(stopped) if stopped else "nothing (no service was started by this stack)"))
    for line in skipped:
        print(f"space: warning: {line}", file=sys.stderr)
    return 0
