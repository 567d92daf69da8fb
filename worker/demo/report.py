"""The demo's report folder: ``index.html``, the sample images, ``overview.png`` and ``metrics.json``.

For a sample of each line's images (misses first: false negatives, then false positives, then the
correct verdicts with the highest scores of each class) the report shows the original, the worker's
heatmap blended over it, the score, the threshold and the verdict. Overlays are drawn from the
heatmap PNG the worker stored (8-bit, threshold at 128), so the picture is what production stores.
The HTML has no scripts and no external resources; images sit next to it in ``images/``.
"""

from __future__ import annotations

import html
import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from worker.demo.live import Received
from worker.heatmaps import encode_overlay_jpeg

__all__ = ["METRICS_FILE", "OVERVIEW_FILE", "pick_samples", "write_report"]

METRICS_FILE = "metrics.json"
OVERVIEW_FILE = "overview.png"
INDEX_FILE = "index.html"
IMAGES_DIR = "images"
_OUTCOME_ORDER = {"FN": 0, "FP": 1, "TP": 2, "TN": 3}
_OUTCOME_BGR = {"TP": (60, 160, 40), "TN": (150, 120, 40), "FP": (0, 140, 255), "FN": (40, 40, 220)}
_TILE = 160


def pick_samples(results: Sequence[Received], count: int, *, max_misses: int | None = None) -> list[Received]:
    """Up to ``count`` results of one line: misses first, then correct ones of both classes.

    Misses are sorted FN then FP, each by how far they were from being right; the correct verdicts
    alternate between detected defects (highest score first) and passed good parts (highest score
    first, the ones closest to a false alarm).

    Args:
        results: The line's results.
        count: Most results returned.
        max_misses: Most misses among them (default: up to ``count``).
    """
    misses = sorted(
        (r for r in results if r.outcome in ("FN", "FP")),
        key=lambda r: (_OUTCOME_ORDER[r.outcome], -abs(r.score - r.threshold)),
    )
    tps = sorted((r for r in results if r.outcome == "TP"), key=lambda r: -r.score)
    tns = sorted((r for r in results if r.outcome == "TN"), key=lambda r: -r.score)
    chosen = misses[: min(count, count if max_misses is None else max_misses)]
    for i in range(max(len(tps), len(tns))):
        for group in (tps, tns):
            if len(chosen) < count and i < len(group):
                chosen.append(group[i])
    return chosen


def _read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise OSError(f"cannot read {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _heatmap_map(uri: str | None, threshold: float) -> np.ndarray | None:
    """The stored heatmap PNG back in score units (values above 2 x threshold saturate)."""
    if not uri or not uri.startswith("file://"):
        return None
    gray = cv2.imread(uri.removeprefix("file://"), cv2.IMREAD_GRAYSCALE)
    if gray is None:
        return None
    return gray.astype(np.float32) / 255.0 * (2.0 * threshold)


def _overlay_bgr(r: Received) -> np.ndarray:
    rgb = _read_rgb(r.sent.path)
    amap = _heatmap_map(r.heatmap_uri, r.threshold)
    if amap is None:
        return cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    jpeg = encode_overlay_jpeg(rgb, amap, r.threshold)
    return np.asarray(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR))


def _caption(r: Received) -> str:
    truth = r.sent.defect or "good"
    return f"{r.outcome} {truth}  s={r.score:.3f} t={r.threshold:.3f}"


def _tile(r: Received) -> np.ndarray:
    """Original and overlay side by side with a caption bar coloured by the outcome."""
    original_bgr = cv2.cvtColor(_read_rgb(r.sent.path), cv2.COLOR_RGB2BGR)
    original = cv2.resize(original_bgr, (_TILE, _TILE), interpolation=cv2.INTER_AREA)
    overlay = cv2.resize(_overlay_bgr(r), (_TILE, _TILE), interpolation=cv2.INTER_AREA)
    pair = np.concatenate([original, np.full((_TILE, 4, 3), 255, np.uint8), overlay], axis=1)
    bar = np.full((26, pair.shape[1], 3), _OUTCOME_BGR[r.outcome], np.uint8)
    cv2.putText(bar, _caption(r), (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
    return np.concatenate([pair, bar], axis=0)


def _overview(results_by_line: Mapping[str, Sequence[Received]], per_row: int) -> np.ndarray:
    """A grid: one row per line of ``per_row`` tiles (at most half of them misses), line name left."""
    rows = []
    label_w = 110
    for line, results in results_by_line.items():
        tiles = [_tile(r) for r in pick_samples(results, per_row, max_misses=per_row // 2)]
        if not tiles:
            continue
        blank = np.full_like(tiles[0], 255)
        tiles += [blank] * (per_row - len(tiles))
        gap = np.full((tiles[0].shape[0], 8, 3), 255, np.uint8)
        body = np.concatenate([x for t in tiles for x in (t, gap)][:-1], axis=1)
        label = np.full((body.shape[0], label_w, 3), 255, np.uint8)
        cv2.putText(label, line, (8, body.shape[0] // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (30, 30, 30), 2, cv2.LINE_AA)
        rows.append(np.concatenate([label, body], axis=1))
        rows.append(np.full((10, label_w + body.shape[1], 3), 255, np.uint8))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    legend = np.full((30, width, 3), 255, np.uint8)
    cv2.putText(
        legend,
        "each tile: part image | worker heatmap overlay (red = above threshold); s = score, t = threshold",
        (8, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (30, 30, 30), 1, cv2.LINE_AA,
    )  # fmt: skip
    return np.concatenate([legend, *rows], axis=0)


_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.grid{display:flex;flex-wrap:wrap;gap:12px}.card{border:1px solid #ccc;border-radius:6px;padding:6px;width:276px}
.card img{width:134px;height:134px;image-rendering:pixelated}.card p{margin:4px 0;font-size:13px}
.badge{display:inline-block;padding:1px 6px;border-radius:4px;color:#fff;font-weight:600}
.TP{background:#28a03c}.TN{background:#287896}.FP{background:#ff8c00}.FN{background:#dc2828}
code{background:#f3f3f3;padding:1px 4px}
"""


def _line_table(metrics: Mapping[str, Any]) -> str:
    head = "<tr><th>line</th><th>images</th><th>TP</th><th>FP</th><th>TN</th><th>FN</th><th>AUROC</th>"
    head += "<th>threshold</th><th>version</th><th>method</th><th>model version</th><th>img/s</th>"
    head += "<th>p50 ms</th><th>p99 ms</th></tr>"
    body = []
    for line, m in metrics["lines"].items():
        thr = m["threshold"]
        auroc = "-" if m["auroc"] is None else f"{m['auroc']:.3f}"
        lat = m["latency_ms"]
        cells = [
            line, m["images"], m["tp"], m["fp"], m["tn"], m["fn"], auroc, f"{thr['value']:.4f}", thr["version"],
            thr["method"], m["model_version"], f"{m['throughput_ips']:.1f}",
            "-" if lat["p50"] is None else f"{lat['p50']:.0f}", "-" if lat["p99"] is None else f"{lat['p99']:.0f}",
        ]  # fmt: skip
        body.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    return f"<table>{head}{''.join(body)}</table>"


def _card(r: Received, original: str, overlay: str) -> str:
    truth = r.sent.defect or "good"
    return (
        f'<div class="card"><img src="{html.escape(original)}" alt="part"> '
        f'<img src="{html.escape(overlay)}" alt="heatmap overlay">'
        f'<p><span class="badge {r.outcome}">{r.outcome}</span> truth: <b>{html.escape(truth)}</b>, '
        f"verdict: <b>{html.escape(r.verdict)}</b></p>"
        f"<p>score {r.score:.4f} vs threshold {r.threshold:.4f} (v{r.threshold_version}, "
        f"{html.escape(r.threshold_source)})</p>"
        f"<p>latency {r.latency_ms:.0f} ms, batch of {r.batch_size}</p></div>"
    )


def write_report(
    report_dir: Path,
    results_by_line: Mapping[str, Sequence[Received]],
    metrics: Mapping[str, Any],
    *,
    samples_per_line: int = 12,
    overview_per_row: int = 4,
) -> Path:
    """Write the report folder (replacing an earlier one) and return the path of ``index.html``.

    Args:
        report_dir: The folder; created, or emptied first when it exists.
        results_by_line: Every received result, per product line.
        metrics: The run's metrics (written as ``metrics.json`` and summarised in the page).
        samples_per_line: Images shown per line in the page.
        overview_per_row: Tiles per line in ``overview.png`` (at most half of them misses).
    """
    if report_dir.exists():
        shutil.rmtree(report_dir)
    images = report_dir / IMAGES_DIR
    images.mkdir(parents=True)
    samples = {line: pick_samples(results, samples_per_line) for line, results in results_by_line.items()}
    sections = []
    for line, items in samples.items():
        cards = []
        for i, r in enumerate(items):
            stem = f"{line}-{i:02d}-{r.outcome.lower()}"
            original = f"{IMAGES_DIR}/{stem}-original.png"
            overlay = f"{IMAGES_DIR}/{stem}-overlay.jpg"
            shutil.copyfile(r.sent.path, report_dir / original)
            cv2.imwrite(str(report_dir / overlay), _overlay_bgr(r), [cv2.IMWRITE_JPEG_QUALITY, 90])
            cards.append(_card(r, original, overlay))
        sections.append(
            f"<h2>{html.escape(line)}</h2><p>{len(items)} of {len(results_by_line[line])} images, "
            f'misses first.</p><div class="grid">{"".join(cards)}</div>'
        )
    cv2.imwrite(str(report_dir / OVERVIEW_FILE), _overview(results_by_line, overview_per_row))
    (report_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    cfg = metrics["config"]
    page = (
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>space-worker demo report</title>"
        f"<style>{_CSS}</style></head><body><h1>space-worker demo</h1>"
        f"<p>{metrics['images_streamed']} fresh images streamed through Kafka at {cfg['rate_hz']} images/s to a "
        f"<code>space serve</code> worker; models trained for {cfg['steps']} steps at {cfg['size']} px; "
        f"thresholds calibrated at a target false-positive rate of {cfg['target_fpr']} and read from Redis. "
        f"Run took {metrics['duration_s']:.0f} s. Left: the part as sent; right: the worker's heatmap "
        f"(red = above the threshold).</p>{_line_table(metrics)}"
        f'<p><img src="{OVERVIEW_FILE}" alt="overview" style="max-width:100%"></p>'
        f'{"".join(sections)}<p>Raw numbers: <a href="{METRICS_FILE}">{METRICS_FILE}</a></p></body></html>\n'
    )
    index = report_dir / INDEX_FILE
    index.write_text(page, encoding="utf-8")
    return index
