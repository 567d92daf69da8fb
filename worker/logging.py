"""structlog configuration, done once per process.

JSON lines when stderr is not a TTY (pods, CI), a readable console renderer in a terminal. Event
names are stable snake_case keys (``batch_done``, ``partition_paused``); context such as message id,
product line, topic, partition and offset travels as key-value pairs, never inside the message.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import MutableMapping
from typing import Any

import structlog

_configured = False
_write_lock = threading.RLock()  # re-entrant: a signal handler on the main thread may log mid-write


def write_line(text: str) -> None:
    """Write one log line to the *current* ``sys.stderr`` (never a stream captured earlier), whole.

    One ``write`` of text and newline under a process-wide lock: ``print`` writes the newline
    separately, so two threads logging at once could glue two JSON objects into one line (and a log
    shipper would drop both). The lock is re-entrant: the SIGTERM handler logs on the main thread, which
    may be inside this function when the signal arrives (a plain Lock deadlocked the worker there).
    """
    stream = sys.stderr
    with _write_lock:
        stream.write(text + "\n")
        stream.flush()


class _StderrLogger:
    """structlog's output: each rendered event through :func:`write_line`."""

    def msg(self, message: str) -> None:
        write_line(message)

    log = debug = info = warning = warn = error = critical = exception = fatal = msg


class _LineHandler(logging.Handler):
    """The stdlib root handler (kafka-python, botocore): the same whole-line writes as structlog's."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            write_line(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)


def _stderr_logger_factory(*_args: Any) -> _StderrLogger:
    return _StderrLogger()


def _redact_secrets(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    # Defence in depth: SecretStr values render as '**********', but a raw secret passed under an
    # obvious key must never reach a log line either.
    for key in list(event):
        lowered = key.lower()
        if any(word in lowered for word in ("password", "secret", "token", "sasl_plain")):
            event[key] = "**********"
    return event


def configure_logging(level: str = "INFO", fmt: str = "auto", *, force: bool = False) -> None:
    """Configure structlog and the stdlib root logger.

    Args:
        level: Minimum level name (DEBUG, INFO, WARNING, ERROR, CRITICAL).
        fmt: ``json``, ``console`` or ``auto`` (console on a TTY, JSON otherwise).
        force: Reconfigure even if already configured (tests).
    """
    global _configured
    if _configured and not force:
        return
    numeric = logging.getLevelNamesMapping()[level.upper()]
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: Any = structlog.dev.ConsoleRenderer(colors=True) if use_console else structlog.processors.JSONRenderer()
    stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            stamp,
            _redact_secrets,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=_stderr_logger_factory,
        # No caching: loggers stay reconfigurable (tests' capture_logs, a later configure_logging).
        cache_logger_on_first_use=False,
    )
    # Library records (kafka-python, botocore, redis) in the same format as the worker's own: a log
    # collector reading JSON lines would otherwise choke on plain-text ones in between.
    handler = _LineHandler()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                stamp,
                _redact_secrets,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    logging.basicConfig(level=max(numeric, logging.WARNING), handlers=[handler])
    # kafka-python logs every reconnect at WARNING/ERROR; keep them, but not its INFO chatter, nor its
    # event loop's "task ran for 0.108s" warnings (a busy host, not something an operator can act on).
    logging.getLogger("kafka").setLevel(max(numeric, logging.WARNING))
    logging.getLogger("kafka.net.selector").setLevel(max(numeric, logging.ERROR))
    _configured = True
