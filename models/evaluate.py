"""``space evaluate``: score a test set with a detector, write ``metrics.json`` and a heatmap gallery.

Owns the evaluation protocol of SPACE_SPEC §4 at the original image resolution: image AUROC
(image score = the detector's score), pixel AUROC and AU-PRO over all test images whose ground truth
is known (good images count as all-negative), overall and per defect type (good vs that type), plus
the confusion counts at the model card's default threshold. ``scores.csv`` lists every test image;
the gallery puts misses first: false negatives, then false positives, then the rest by score.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import cv2
import numpy as np
import structlog

from models import metrics
from models.data import DatasetError, DatasetIndex, TestSample, load_image, load_mask

__all__ = ["METRICS_FILE", "SCORES_FILE", "EvaluationError", "Scorer", "evaluate", "gallery_order"]

log = structlog.get_logger(__name__)

METRICS_FILE = "metrics.json"
SCORES_FILE = "scores.csv"
GALLERY_DIR = "gallery"
METRICS_SCHEMA_VERSION = 1
_GALLERY_MAX_SIDE = 512
_GOOD_PIXEL_SAMPLE = 200_000


class EvaluationError(ValueError):
    """The test set cannot be evaluated (no readable test image, no defect, ...)."""


class _Prediction(Protocol):
    @property
    def scores(self) -> np.ndarray: ...

    @property
    def maps(self) -> np.ndarray | list[np.ndarray]: ...


class Scorer(Protocol):
    """What evaluation needs from :class:`models.detector.Detector` (tests pass a fake)."""

    card: Any  # a ModelCard: default_threshold, and name/version/product_line when present

    def predict(self, batch: Sequence[np.ndarray], map_size: Literal["input", "original"] = ...) -> _Prediction:
        """Score a list of RGB images; maps at each image's own size with ``map_size="original"``."""
        ...


@dataclass
class _Scored:
    sample: TestSample
    score: float
    amap: np.ndarray  # (H, W) float32 at the original resolution
    mask: np.ndarray | None  # (H, W) bool; None when an anomalous image has no annotation


# ---------------------------------------------------------------------------------------------- scoring


def _load_batch(samples: Sequence[TestSample], skipped: list[tuple[Path, str]]) -> list[tuple[TestSample, np.ndarray]]:
    loaded = []
    for sample in samples:
        try:
            loaded.append((sample, load_image(sample.path)))
        except DatasetError as exc:
            skipped.append((sample.path, str(exc)))
            log.warning("evaluate_image_skipped", path=str(sample.path), reason=str(exc))
    return loaded


def _ground_truth(sample: TestSample, size_hw: tuple[int, int], skipped: list[tuple[Path, str]]) -> np.ndarray | None:
    if not sample.is_anomalous:
        return np.zeros(size_hw, bool)
    if sample.mask_path is None:
        return None
    try:
        return load_mask(sample.mask_path, size_hw)
    except DatasetError as exc:
        skipped.append((sample.mask_path, str(exc)))
        log.warning("evaluate_mask_skipped", path=str(sample.mask_path), reason=str(exc))
        return None


def _score(
    detector: Scorer, samples: Sequence[TestSample], batch_size: int, skipped: list[tuple[Path, str]]
) -> tuple[list[_Scored], float]:
    """Predict every test image; returns the scored items and the seconds spent in ``predict``."""
    scored: list[_Scored] = []
    predict_s = 0.0
    for start in range(0, len(samples), batch_size):
        loaded = _load_batch(samples[start : start + batch_size], skipped)
        if not loaded:
            continue
        images = [image for _, image in loaded]
        began = time.perf_counter()
        prediction = detector.predict(images, map_size="original")
        predict_s += time.perf_counter() - began
        for (sample, image), score, amap in zip(loaded, prediction.scores, prediction.maps, strict=True):
            h, w = image.shape[:2]
            amap = np.asarray(amap, dtype=np.float32).squeeze()
            if amap.shape != (h, w):
                amap = cv2.resize(amap, (w, h), interpolation=cv2.INTER_LINEAR)
            scored.append(_Scored(sample, float(score), amap, _ground_truth(sample, (h, w), skipped)))
    return scored, predict_s


# ---------------------------------------------------------------------------------------------- metrics


def _at_threshold(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float | int | None]:
    flagged = scores >= threshold
    tp = int(np.sum(flagged & labels))
    fp = int(np.sum(flagged & ~labels))
    fn = int(np.sum(~flagged & labels))
    tn = int(np.sum(~flagged & ~labels))
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
    return {
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "accuracy": (tp + tn) / labels.size if labels.size else None,
    }


def _pixel_metrics(items: Sequence[_Scored], fpr_limit: float) -> dict[str, float | int | None]:
    masks = [it.mask for it in items if it.mask is not None]
    maps = [it.amap for it in items if it.mask is not None]
    out: dict[str, float | int | None] = {"n_pixel_images": len(masks), "pixel_auroc": None, "au_pro": None}
    if not (any(m.any() for m in masks) and any(not m.all() for m in masks)):
        return out
    out["pixel_auroc"] = metrics.pixel_auroc(masks, maps)
    out["au_pro"] = metrics.au_pro(masks, maps, fpr_limit=fpr_limit)
    return out


def _block(items: Sequence[_Scored], threshold: float, fpr_limit: float) -> dict[str, Any]:
    labels = np.array([it.sample.is_anomalous for it in items], bool)
    scores = np.array([it.score for it in items], np.float64)
    n_anomalous = int(labels.sum())
    both = 0 < n_anomalous < labels.size
    block: dict[str, Any] = {
        "n_images": int(labels.size),
        "n_good": int(labels.size - n_anomalous),
        "n_anomalous": n_anomalous,
        "image_auroc": metrics.image_auroc(labels, scores) if both else None,
    }
    block.update(_pixel_metrics(items, fpr_limit))
    block["at_threshold"] = _at_threshold(labels, scores, threshold)
    return block


def _summarise(items: Sequence[_Scored], threshold: float, fpr_limit: float) -> dict[str, Any]:
    overall = _block(items, threshold, fpr_limit)
    labels = np.array([it.sample.is_anomalous for it in items], bool)
    if labels.any():
        thr, f1, precision, recall = metrics.f1_optimal_threshold(labels, [it.score for it in items])
        overall["best_f1_on_test"] = {"threshold": thr, "f1": f1, "precision": precision, "recall": recall}
    good = [it for it in items if not it.sample.is_anomalous]
    types = sorted({it.sample.defect_type for it in items if it.sample.is_anomalous})
    per_type = {
        kind: _block(good + [it for it in items if it.sample.defect_type == kind], threshold, fpr_limit)
        for kind in types
    }
    return {"overall": overall, "per_defect_type": per_type}


# ---------------------------------------------------------------------------------------------- gallery


def _outcome(item: _Scored, threshold: float) -> str:
    flagged = item.score >= threshold
    if item.sample.is_anomalous:
        return "tp" if flagged else "fn"
    return "fp" if flagged else "tn"


def gallery_order(items: Sequence[_Scored], threshold: float) -> list[_Scored]:
    """Misses first: false negatives (lowest score first), false positives (highest first), then the rest."""
    fn = sorted((it for it in items if _outcome(it, threshold) == "fn"), key=lambda it: it.score)
    fp = sorted((it for it in items if _outcome(it, threshold) == "fp"), key=lambda it: -it.score)
    rest = sorted((it for it in items if _outcome(it, threshold) in ("tp", "tn")), key=lambda it: -it.score)
    return fn + fp + rest


def _heat_range(items: Sequence[_Scored], threshold: float) -> tuple[float, float]:
    """One colour scale for the whole gallery: typical good pixel = cold, threshold-level = hot."""
    good = [it.amap.ravel() for it in items if not it.sample.is_anomalous] or [it.amap.ravel() for it in items]
    pixels = np.concatenate(good)
    if pixels.size > _GOOD_PIXEL_SAMPLE:
        pixels = pixels[:: pixels.size // _GOOD_PIXEL_SAMPLE]
    lo = float(np.median(pixels))
    top = float(np.percentile([it.score for it in items], 95))
    hi = max(top, threshold) if math.isfinite(threshold) else top
    return lo, hi if hi > lo else lo + 1e-6


_LABELS = {"fn": "MISSED (FN)", "fp": "FALSE ALARM (FP)", "tp": "caught (TP)", "tn": "pass (TN)"}


def _render_card(item: _Scored, threshold: float, heat: tuple[float, float]) -> np.ndarray:
    """Original | overlay side by side under a two-line caption; returns BGR for encoding."""
    image = load_image(item.sample.path)
    h, w = image.shape[:2]
    scale = min(1.0, _GALLERY_MAX_SIDE / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    amap = cv2.resize(item.amap, size, interpolation=cv2.INTER_LINEAR)
    lo, hi = heat
    level = np.clip((amap - lo) / (hi - lo), 0.0, 1.0)
    colour = cv2.applyColorMap(np.rint(level * 255).astype(np.uint8), cv2.COLORMAP_JET)
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    overlay = cv2.addWeighted(bgr, 0.55, colour, 0.45, 0.0)
    if item.mask is not None and item.mask.any():
        mask = cv2.resize(item.mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(overlay, contours, -1, (0, 255, 0), 1)
    panel = np.hstack([bgr, overlay])
    caption = np.full((40, panel.shape[1], 3), 255, np.uint8)
    outcome = _outcome(item, threshold)
    lines = (
        f"{item.sample.defect_type}  score {item.score:.4g}  thr {threshold:.4g}",
        f"{_LABELS[outcome]}  {item.sample.path.parent.name}/{item.sample.path.name}",
    )
    colour_text = (0, 0, 200) if outcome in ("fn", "fp") else (0, 0, 0)
    for row, text in enumerate(lines):
        cv2.putText(caption, text, (4, 15 + 18 * row), cv2.FONT_HERSHEY_SIMPLEX, 0.42, colour_text, 1, cv2.LINE_AA)
    return np.vstack([caption, panel])


def _write_gallery(items: Sequence[_Scored], threshold: float, out_dir: Path, count: int) -> list[str]:
    folder = out_dir / GALLERY_DIR
    for stale in folder.glob("*.png"):  # a gallery of an earlier run would mislead
        stale.unlink()
    if count == 0:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    heat = _heat_range(items, threshold)
    written = []
    for rank, item in enumerate(gallery_order(items, threshold)[:count]):
        name = f"{rank:03d}_{_outcome(item, threshold)}_{item.sample.defect_type}_{item.sample.path.stem}.png"
        ok, data = cv2.imencode(".png", _render_card(item, threshold, heat))
        if not ok:  # pragma: no cover - OpenCV encodes any uint8 image
            raise OSError(f"cannot encode gallery image {name}")
        (folder / name).write_bytes(data.tobytes())
        written.append(f"{GALLERY_DIR}/{name}")
    return written


# ---------------------------------------------------------------------------------------------- entry point


def _write_scores(items: Sequence[_Scored], threshold: float, root: Path, path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "defect_type", "label", "score", "outcome", "has_mask"])
        for it in items:
            rel = it.sample.path.relative_to(root) if it.sample.path.is_relative_to(root) else it.sample.path
            outcome = _outcome(it, threshold)
            writer.writerow(
                [
                    rel.as_posix(),
                    it.sample.defect_type,
                    int(it.sample.is_anomalous),
                    f"{it.score:.6g}",
                    outcome,
                    int(it.mask is not None and it.sample.is_anomalous),
                ]
            )


def _model_info(card: Any) -> dict[str, Any]:
    fields = ("name", "version", "product_line", "variant", "size", "input_size", "threshold_method")
    info = {f: getattr(card, f) for f in fields if getattr(card, f, None) is not None}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in info.items()}


def _inference_info(detector: Any) -> dict[str, str]:
    """Where the scores were computed: device and precision (a threshold holds at the precision it was chosen at)."""
    info = {"device": getattr(detector, "device", None), "precision": getattr(detector, "precision", None)}
    return {k: str(v) for k, v in info.items() if v is not None}


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def evaluate(
    detector: Scorer,
    index: DatasetIndex,
    out_dir: Path,
    *,
    gallery: int = 24,
    batch_size: int = 8,
    threshold: float | None = None,
    fpr_limit: float = 0.3,
) -> dict[str, Any]:
    """Evaluate ``detector`` on the test split of ``index``; write metrics, scores and gallery.

    Args:
        detector: A :class:`models.detector.Detector` (or anything with ``predict`` and ``card``).
        index: The scanned dataset; only ``index.test`` is used.
        out_dir: Output folder (created): ``metrics.json``, ``scores.csv``, ``gallery/*.png``.
        gallery: Number of gallery images (0 = none).
        batch_size: Images per ``predict`` call.
        threshold: Decision threshold; defaults to ``detector.card.default_threshold``.
        fpr_limit: AU-PRO integration limit.

    Returns:
        The content of ``metrics.json``.

    Raises:
        EvaluationError: No readable test image, or no anomalous test image.
    """
    if batch_size < 1 or gallery < 0:
        raise EvaluationError("batch_size must be >= 1 and gallery >= 0")
    began = time.perf_counter()
    source = "override" if threshold is not None else "card.default_threshold"
    thr = float(threshold if threshold is not None else detector.card.default_threshold)
    skipped: list[tuple[Path, str]] = list(index.skipped)
    items, predict_s = _score(detector, index.test, batch_size, skipped)
    if not items:
        raise EvaluationError(f"{index.root}: no readable test image under test/")
    if not any(it.sample.is_anomalous for it in items):
        raise EvaluationError(f"{index.root}: the test set has no anomalous image; nothing to detect")
    missing = [str(it.sample.path) for it in items if it.mask is None]
    if missing:
        log.warning("evaluate_masks_missing", count=len(missing), first=missing[0])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "schema_version": METRICS_SCHEMA_VERSION,
        "model": _model_info(detector.card),
        "inference": _inference_info(detector),
        "data": {
            "root": str(index.root),
            "n_test": len(items),
            "n_skipped": len(skipped),
            "skipped": [[str(p), reason] for p, reason in skipped],
            "missing_masks": missing,
        },
        "threshold": {"value": thr, "source": source, "rule": "score >= threshold is anomalous"},
        "fpr_limit": fpr_limit,
        **_summarise(items, thr, fpr_limit),
    }
    _write_scores(items, thr, index.root, out_dir / SCORES_FILE)
    result["gallery"] = _write_gallery(items, thr, out_dir, gallery)
    result["timing"] = {
        "predict_ms_per_image": 1000.0 * predict_s / len(items),
        "total_s": time.perf_counter() - began,
    }
    result = _json_safe(result)
    (out_dir / METRICS_FILE).write_text(json.dumps(result, indent=2) + "\n")
    overall = result["overall"]
    log.info(
        "evaluation_done",
        out_dir=str(out_dir),
        n_test=len(items),
        image_auroc=overall["image_auroc"],
        pixel_auroc=overall["pixel_auroc"],
        au_pro=overall["au_pro"],
    )
    return result
