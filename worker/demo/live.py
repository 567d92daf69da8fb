"""Per-line bookkeeping of the demo stream and the tables it prints (live and final).

:class:`LineStats` collects what was sent and what came back for one product line; :class:`LiveTable`
draws them while the stream runs: redrawn in place on a terminal, one line per product line every few
seconds otherwise (logs, CI). :func:`summary_table` formats the final per-line confusion counts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np

from models.metrics import image_auroc

__all__ = ["LineStats", "LiveTable", "Received", "SentImage", "percentile_ms", "summary_table"]

THROUGHPUT_WINDOW_S = 5.0
_ERASE_LINE = "\x1b[2K"


@dataclass(frozen=True)
class SentImage:
    """One streamed image and its ground truth.

    Attributes:
        message_id: ``ce_id`` of the request.
        line: Product line.
        defect: Defect kind drawn on the image, or None for a good part.
        path: The PNG file that was sent.
        sent_at: Monotonic time just before the record was handed to the producer.
    """

    message_id: str
    line: str
    defect: str | None
    path: Path
    sent_at: float

    @property
    def anomalous(self) -> bool:
        """Ground truth: True for a defective part."""
        return self.defect is not None


@dataclass(frozen=True)
class Received:
    """A result read back from ``inspection.results`` for one sent image.

    Attributes:
        sent: What was sent.
        score: Raw image score.
        verdict: ``ok`` or ``anomalous`` as decided by the worker.
        threshold: Threshold value the worker applied.
        threshold_version: Redis version of that threshold (None = model default).
        threshold_source: ``redis``, ``cache`` or ``model-default``.
        model_version: Version of the model that scored the image.
        heatmap_uri: Where the worker stored the heatmap PNG, if it did.
        latency_ms: Send to receipt of the result, measured by the demo (camera's view).
        worker_ms: The worker's own ``timings.total_ms`` (poll to result produced).
        batch_size: Images in the model call that scored this one.
        received_at: Monotonic receipt time.
    """

    sent: SentImage
    score: float
    verdict: str
    threshold: float
    threshold_version: int | None
    threshold_source: str
    model_version: str
    heatmap_uri: str | None
    latency_ms: float
    worker_ms: float
    batch_size: int
    received_at: float

    @property
    def outcome(self) -> str:
        """``TP``, ``FP``, ``TN`` or ``FN`` (anomalous is the positive class)."""
        flagged = self.verdict == "anomalous"
        if self.sent.anomalous:
            return "TP" if flagged else "FN"
        return "FP" if flagged else "TN"


def percentile_ms(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) of ``values``, None when there are none."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else None


@dataclass
class LineStats:
    """What one product line has sent and received so far."""

    line: str
    sent: int = 0
    dead_letters: int = 0
    results: list[Received] = field(default_factory=list)
    first_sent_at: float | None = None

    def record_sent(self, at: float) -> None:
        """Count one sent image."""
        self.sent += 1
        if self.first_sent_at is None:
            self.first_sent_at = at

    @property
    def flagged(self) -> int:
        """Results with an anomalous verdict."""
        return sum(r.verdict == "anomalous" for r in self.results)

    def counts(self) -> dict[str, int]:
        """Confusion counts ``{"TP", "FP", "TN", "FN"}``."""
        counts = dict.fromkeys(("TP", "FP", "TN", "FN"), 0)
        for r in self.results:
            counts[r.outcome] += 1
        return counts

    def auroc(self) -> float | None:
        """Image AUROC of the received scores, None until both classes were scored."""
        labels = [r.sent.anomalous for r in self.results]
        if all(labels) or not any(labels):
            return None
        return image_auroc(labels, [r.score for r in self.results])

    def throughput(self, now: float, window_s: float = THROUGHPUT_WINDOW_S) -> float:
        """Results per second over the last ``window_s`` seconds (shorter at the start)."""
        if self.first_sent_at is None:
            return 0.0
        span = min(window_s, max(now - self.first_sent_at, 1e-3))
        recent = sum(1 for r in reversed(self.results) if now - r.received_at <= span)
        return recent / span

    def mean_throughput(self) -> float:
        """Results per second from the first send to the last result."""
        if not self.results or self.first_sent_at is None:
            return 0.0
        span = max(r.received_at for r in self.results) - self.first_sent_at
        return len(self.results) / max(span, 1e-3)

    def latencies(self) -> list[float]:
        """End-to-end latencies (ms) of the received results."""
        return [r.latency_ms for r in self.results]


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


class LiveTable:
    """Prints per-line progress while the stream runs.

    Args:
        lines: Product lines, in display order.
        stream: Where to print (a terminal gets in-place redraws).
        refresh_s: Redraw interval on a terminal.
        log_interval_s: Interval between printed blocks when the stream is not a terminal.
        clock: Monotonic seconds (injected in tests).
    """

    HEADER = (
        f"{'line':<10} {'sent':>5} {'scored':>6} {'flagged':>7} {'img/s':>6} {'p50 ms':>7} {'p99 ms':>7} {'dlq':>4}"
    )

    def __init__(
        self,
        lines: Sequence[str],
        stream: TextIO,
        *,
        refresh_s: float = 0.25,
        log_interval_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Nothing is printed before the first :meth:`update`."""
        self.lines = list(lines)
        self.stream = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.interval_s = refresh_s if self.tty else log_interval_s
        self._clock = clock
        self._t0 = clock()
        self._last = -float("inf")
        self._drawn = 0
        self._header_written = False

    def rows(self, stats: Mapping[str, LineStats], now: float) -> list[str]:
        """The table as text rows (header first)."""
        rows = [self.HEADER]
        for line in self.lines:
            s = stats[line]
            lat = s.latencies()
            rows.append(
                f"{line:<10} {s.sent:>5} {len(s.results):>6} {s.flagged:>7} {s.throughput(now):>6.1f} "
                f"{_fmt(percentile_ms(lat, 50), '7.0f'):>7} {_fmt(percentile_ms(lat, 99), '7.0f'):>7} "
                f"{s.dead_letters:>4}"
            )
        return rows

    def update(self, stats: Mapping[str, LineStats], *, force: bool = False) -> None:
        """Draw the table if the interval passed (or ``force``)."""
        now = self._clock()
        if not force and now - self._last < self.interval_s:
            return
        self._last = now
        rows = self.rows(stats, now)
        if self.tty:
            if self._drawn:
                self.stream.write(f"\x1b[{self._drawn}F")
            self.stream.write("".join(f"{_ERASE_LINE}{row}\n" for row in rows))
            self._drawn = len(rows)
        else:  # a log (a file, a pipe, CI): the header once, then time-stamped rows
            elapsed = now - self._t0
            header = "" if self._header_written else f"{'':9}{rows[0]}\n"
            self._header_written = True
            self.stream.write(header + "".join(f"[{elapsed:6.1f}s] {row}\n" for row in rows[1:]))
        self.stream.flush()


def summary_table(stats: Mapping[str, LineStats], thresholds: Mapping[str, Mapping[str, object]]) -> str:
    """The final per-line table: images, confusion counts, AUROC, threshold and its version.

    Args:
        stats: Per-line statistics.
        thresholds: Per line, ``value``, ``version`` and ``model_version`` of the threshold written.
    """
    header = (
        f"{'line':<10} {'images':>6} {'TP':>4} {'FP':>4} {'TN':>4} {'FN':>4} {'AUROC':>6} "
        f"{'threshold':>9} {'thr.v':>5}  model version"
    )
    rows = [header, "-" * len(header)]
    for line, s in stats.items():
        c = s.counts()
        thr = thresholds.get(line, {})
        value = thr.get("value")
        rows.append(
            f"{line:<10} {len(s.results):>6} {c['TP']:>4} {c['FP']:>4} {c['TN']:>4} {c['FN']:>4} "
            f"{_fmt(s.auroc(), '6.3f'):>6} {_fmt(value if isinstance(value, float) else None, '9.4f'):>9} "
            f"{thr.get('version', '-')!s:>5}  {thr.get('model_version', '-')}"
        )
    return "\n".join(rows)
