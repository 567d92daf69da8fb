"""``space serve``: run a worker against the configured Kafka, Redis, model registry and stores."""

from __future__ import annotations

import argparse

NAME = "serve"
HELP = "Run a worker: consume inspection requests, batch them for the model, publish verdicts."
EPILOG = (
    "Everything else is set with SPACE_* environment variables (sections joined by __, e.g. "
    "SPACE_KAFKA__BOOTSTRAP_SERVERS, SPACE_REDIS__URL, SPACE_MODELS__ROOT), secret files or a config file; "
    "the full list with defaults and limits is docs/configuration.md. A bad value stops the worker at start "
    "with one line naming the variable."
)


def configure(parser: argparse.ArgumentParser) -> None:
    """Options override the matching settings for quick local runs."""
    parser.add_argument("--model-root", default=None, help="Override SPACE_MODELS__ROOT.")
    parser.add_argument(
        "--preload", nargs="*", default=None, help="Lines to load before serving (SPACE_MODELS__PRELOAD)."
    )
    parser.add_argument("--max-batch-size", type=int, default=None, help="Override SPACE_BATCHING__MAX_BATCH_SIZE.")
    parser.add_argument("--max-wait-ms", type=float, default=None, help="Override SPACE_BATCHING__MAX_WAIT_MS.")


def run(args: argparse.Namespace) -> int:
    """Build the app from settings and run it until SIGTERM/SIGINT."""
    from worker.settings import load_settings

    overrides: dict[str, dict[str, object]] = {}
    if args.model_root:
        overrides.setdefault("models", {})["root"] = args.model_root
    if args.preload is not None:
        overrides.setdefault("models", {})["preload"] = tuple(args.preload)
    if args.max_batch_size is not None:
        overrides.setdefault("batching", {})["max_batch_size"] = args.max_batch_size
    if args.max_wait_ms is not None:
        overrides.setdefault("batching", {})["max_wait_ms"] = args.max_wait_ms
    settings = load_settings()
    if overrides:
        merged = settings.model_dump()
        for section, values in overrides.items():
            merged[section].update(values)
        settings = load_settings(**merged)

    import structlog

    from worker.app import build_app
    from worker.logging import configure_logging
    from worker.malloc import configure_malloc

    configure_logging(settings.log.level, settings.log.format)
    malloc = configure_malloc(settings.models.malloc)  # before models load and threads start
    structlog.get_logger("worker.malloc").info(
        "malloc_configured", malloc=malloc.mode, applied=malloc.applied, reason=malloc.reason or None
    )
    from kafka.errors import KafkaError

    from worker.errors import SpaceError
    from worker.kafka_clients import describe_kafka_error

    try:
        app = build_app(settings)
    except KafkaError as exc:  # unreachable brokers, refused credentials: one line, as space send says it
        raise SpaceError(describe_kafka_error(exc, settings.kafka, "starting the worker")) from None
    app.install_signal_handlers()
    return app.run()
