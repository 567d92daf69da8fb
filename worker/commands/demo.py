"""``space demo``: the main job end to end on the embedded stack, with a report of pictures."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

NAME = "demo"
HELP = (
    "Train small models on synthetic product lines, start a worker on the embedded stack, stream "
    "fresh images through Kafka, show live results and write an HTML report."
)


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options (defaults: about the size that runs in minutes on 2 CPU cores)."""
    from worker.demo.run import DemoConfig

    d = DemoConfig()
    parser.add_argument(
        "--lines", default=",".join(d.lines), help=f"Comma-separated product lines (default {','.join(d.lines)})."
    )
    parser.add_argument("--steps", type=int, default=d.steps, help=f"Training steps per line (default {d.steps}).")
    parser.add_argument("--images", type=int, default=d.images, help=f"Images streamed per line (default {d.images}).")
    parser.add_argument(
        "--rate", type=float, default=d.rate_hz, help=f"Images per second, all lines together (default {d.rate_hz:g})."
    )
    parser.add_argument(
        "--out", type=Path, default=d.out, help=f"Demo folder: data, models, logs, report (default {d.out})."
    )
    parser.add_argument(
        "--size", type=int, default=d.size, help=f"Image and model input side in px (default {d.size})."
    )
    parser.add_argument("--seed", type=int, default=d.seed, help=f"Seed of renders and training (default {d.seed}).")
    parser.add_argument(
        "--target-fpr",
        type=float,
        default=d.target_fpr,
        help=f"False-positive rate the thresholds aim for (default {d.target_fpr}).",
    )
    parser.add_argument(
        "--keep-stack", action="store_true", help="Leave the broker and Redis running and print their settings."
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="No training progress lines.")


def run(args: argparse.Namespace) -> int:
    """Run the demo; exit 0 when every image got a result, none was dead-lettered and the worker exited 0."""
    from worker.demo.run import DemoConfig, run_demo
    from worker.logging import configure_logging
    from worker.settings import load_settings

    settings = load_settings()
    # The live table owns the terminal: only warnings from the demo's own logging.
    configure_logging("WARNING", settings.log.format)
    cfg = DemoConfig(
        lines=tuple(x.strip() for x in args.lines.split(",") if x.strip()),
        steps=args.steps,
        images=args.images,
        rate_hz=args.rate,
        out=args.out,
        size=args.size,
        seed=args.seed,
        target_fpr=args.target_fpr,
        keep_stack=args.keep_stack,
        progress=args.progress,
    )
    result = run_demo(cfg)
    if result.ok:
        return 0
    print(f"space: demo failed: {'; '.join(result.problems)}", file=sys.stderr)
    return 1
