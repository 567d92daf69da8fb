"""Anomaly-detection metrics: image and pixel AUROC, AU-PRO, and decision thresholds.

Conventions (SPACE_SPEC §4): anomalous is the positive class; a sample is flagged anomalous when
``score >= threshold``. Curves are exact: every distinct score is a threshold and tied scores move
together (a tie between a positive and a negative is a diagonal segment, worth one half), which is
what the trapezoidal rule over sklearn/torchmetrics-style collapsed curves gives.

AUROC is computed as the Mann-Whitney statistic (``P(s+ > s-) + P(s+ = s-) / 2``), equal to that
trapezoid, from two sorted arrays: no per-pixel index array, so tens of millions of pixels fit.
AU-PRO follows the MVTec AD evaluation: 8-connected ground-truth regions, PRO = mean per-region
overlap, FPR over every ground-truth-negative pixel of the set, the exact curve integrated up to
``fpr_limit`` with linear interpolation at the limit, divided by ``fpr_limit``. Only thresholds
above the FPR limit are visited, so its cost is a sort of the negative pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import numpy.typing as npt

__all__ = [
    "au_pro",
    "f1_optimal_threshold",
    "image_auroc",
    "pixel_auroc",
    "pro_curve",
    "quantile_threshold",
    "roc_curve",
]

ArrayList = Sequence[np.ndarray] | np.ndarray  # per-image 2-D arrays (sizes may differ)


def _binary_inputs(labels: npt.ArrayLike, scores: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).ravel()
    s = np.asarray(scores).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape[0]} vs {s.shape[0]}")
    if s.size and not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    return y.astype(bool), s


def _check_both_classes(n_pos: int, n_neg: int, what: str) -> None:
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"{what} needs positive and negative samples (got {n_pos} positive, {n_neg} negative)")


def _mann_whitney_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Area under the ROC curve from positive and negative scores, ties counted one half."""
    _check_both_classes(pos.size, neg.size, "AUROC")
    dtype = np.result_type(pos.dtype, neg.dtype)
    neg_sorted = np.sort(neg.astype(dtype, copy=False))
    pos = pos.astype(dtype, copy=False)
    below = np.searchsorted(neg_sorted, pos, side="left").astype(np.int64)
    not_above = np.searchsorted(neg_sorted, pos, side="right").astype(np.int64)
    # 2 * (#neg below + #neg equal / 2), kept in integers so the sum is exact.
    twice = int(below.sum()) + int(not_above.sum())
    return twice / (2.0 * pos.size * neg.size)


def roc_curve(labels: npt.ArrayLike, scores: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact ROC curve with tied scores collapsed into one point.

    Args:
        labels: Truth per sample, anomalous = True/1.
        scores: Anomaly score per sample (higher = more anomalous).

    Returns:
        ``(fpr, tpr, thresholds)``, thresholds decreasing from ``+inf`` (nothing flagged) to the
        lowest score (everything flagged); point ``i`` flags the samples with ``score >= thresholds[i]``.

    Raises:
        ValueError: Lengths differ, NaN scores, or a class is missing.
    """
    y, s = _binary_inputs(labels, scores)
    n_pos = int(y.sum())
    _check_both_classes(n_pos, y.size - n_pos, "roc_curve")
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s_sorted) != 0), s_sorted.size - 1]
    tp = np.cumsum(y_sorted)[last_of_tie]
    fp = (last_of_tie + 1) - tp
    fpr = np.r_[0.0, fp / (y.size - n_pos)]
    tpr = np.r_[0.0, tp / n_pos]
    thresholds = np.r_[np.inf, s_sorted[last_of_tie].astype(np.float64)]
    return fpr, tpr, thresholds


def image_auroc(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """Image-level AUROC (anomalous = positive).

    Args:
        labels: Truth per image.
        scores: Image score per image (the max of the anomaly map).

    Returns:
        Area in [0, 1]: 1 for perfect separation, 0 for inverted, 0.5 when all scores tie.

    Raises:
        ValueError: Lengths differ, NaN scores, or only one class present.
    """
    y, s = _binary_inputs(labels, scores)
    return _mann_whitney_auc(s[y], s[~y])


def _pixel_pairs(masks: ArrayList, maps: ArrayList) -> list[tuple[np.ndarray, np.ndarray]]:
    if len(masks) != len(maps):
        raise ValueError(f"{len(masks)} masks but {len(maps)} maps")
    pairs = []
    for i, (mask, amap) in enumerate(zip(masks, maps, strict=True)):
        m, a = np.asarray(mask), np.asarray(amap)
        if a.ndim == 3 and a.shape[0] == 1:
            a = a[0]
        if m.shape != a.shape or m.ndim != 2:
            raise ValueError(f"image {i}: mask {m.shape} and map {a.shape} must be equal 2-D shapes")
        if np.isnan(a).any():
            raise ValueError(f"image {i}: anomaly map contains NaN")
        pairs.append((m.astype(bool), a))
    if not pairs:
        raise ValueError("no images given")
    return pairs


def pixel_auroc(masks: ArrayList, maps: ArrayList) -> float:
    """Pixel-level AUROC over all pixels of all images (good images included).

    Args:
        masks: Ground truth per image, ``(H, W)`` bool (all False for good images).
        maps: Anomaly map per image, same shape as its mask (sizes may differ between images).

    Returns:
        Area in [0, 1].

    Raises:
        ValueError: Shapes differ, NaN in a map, or no positive / no negative pixel.
    """
    pairs = _pixel_pairs(masks, maps)
    pos = np.concatenate([a[m] for m, a in pairs])
    neg = np.concatenate([a[~m] for m, a in pairs])
    return _mann_whitney_auc(pos, neg)


def _region_weights(pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Scores of ground-truth pixels and their PRO weights ``1 / (region size * number of regions)``."""
    scores, weights = [], []
    n_regions = 0
    for mask, amap in pairs:
        if not mask.any():
            continue
        count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8, ltype=cv2.CV_32S)
        sizes = np.bincount(labels.ravel(), minlength=count)
        lab = labels[mask]
        scores.append(amap[mask])
        weights.append(1.0 / sizes[lab])
        n_regions += count - 1
    if n_regions == 0:
        raise ValueError("AU-PRO needs at least one ground-truth region")
    return np.concatenate(scores), np.concatenate(weights) / n_regions


def pro_curve(masks: ArrayList, maps: ArrayList, fpr_limit: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact PRO curve: mean per-region overlap against pixel FPR, one point per distinct score.

    Args:
        masks: Ground truth per image, ``(H, W)`` bool.
        maps: Anomaly map per image, same shape as its mask.
        fpr_limit: Points are returned up to the first one with FPR above this limit.

    Returns:
        ``(fpr, pro, thresholds)``, starting at ``(0, 0, +inf)``, FPR non-decreasing.

    Raises:
        ValueError: Shapes differ, NaN in a map, no region, or no negative pixel.
    """
    pairs = _pixel_pairs(masks, maps)
    pos, weights = _region_weights(pairs)
    neg = np.concatenate([a[~m] for m, a in pairs])
    if neg.size == 0:
        raise ValueError("AU-PRO needs ground-truth-negative pixels")
    dtype = np.result_type(pos.dtype, neg.dtype)
    neg = np.sort(neg.astype(dtype, copy=False))
    pos = pos.astype(dtype, copy=False)
    order = np.argsort(pos, kind="stable")
    pos, weights = pos[order], weights[order]
    cum_weight = np.r_[0.0, np.cumsum(weights)]
    # Lowest threshold worth visiting: the first distinct score whose FPR exceeds the limit.
    allowed = int(np.floor(fpr_limit * neg.size + 1e-9))
    floor = neg[neg.size - allowed - 1] if allowed < neg.size else -np.inf
    candidates = np.unique(np.concatenate([neg[neg >= floor], pos[pos >= floor]]))[::-1]
    fp = neg.size - np.searchsorted(neg, candidates, side="left")
    # Normalised by the summed weights (1 in exact arithmetic) so full detection is exactly 1.
    pro = (cum_weight[-1] - cum_weight[np.searchsorted(pos, candidates, side="left")]) / cum_weight[-1]
    fpr = np.r_[0.0, fp / neg.size]
    pro = np.r_[0.0, np.clip(pro, 0.0, 1.0)]
    return fpr, pro, np.r_[np.inf, candidates.astype(np.float64)]


def _area_up_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area of ``y(x)`` on ``[0, limit]``, interpolating linearly at the limit."""
    inside = np.flatnonzero(x <= limit)
    last = inside[-1]
    xs, ys = x[: last + 1], y[: last + 1]
    area = float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1])) / 2.0)
    if last + 1 < x.size and x[last] < limit:
        x0, x1, y0, y1 = x[last], x[last + 1], y[last], y[last + 1]
        y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area += (limit - x0) * (y0 + y_limit) / 2.0
    return area


def au_pro(masks: ArrayList, maps: ArrayList, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (SPACE_SPEC §4, MVTec AD protocol).

    Args:
        masks: Ground truth per image, ``(H, W)`` bool; good images (all False) add negatives only.
        maps: Anomaly map per image at the mask's resolution.
        fpr_limit: Upper integration limit on the pixel FPR, in (0, 1].

    Returns:
        Area divided by ``fpr_limit``, in [0, 1].

    Raises:
        ValueError: Bad limit, shapes differ, NaN in a map, no region, or no negative pixel.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    fpr, pro, _ = pro_curve(masks, maps, fpr_limit)
    return _area_up_to(fpr, pro, fpr_limit) / fpr_limit


def f1_optimal_threshold(labels: npt.ArrayLike, scores: npt.ArrayLike) -> tuple[float, float, float, float]:
    """Threshold that maximises F1 when flagging ``score >= threshold``.

    Candidates are the distinct scores; among equal F1 the highest threshold (fewest alarms) wins.

    Args:
        labels: Truth per sample.
        scores: Score per sample.

    Returns:
        ``(threshold, f1, precision, recall)``.

    Raises:
        ValueError: Lengths differ, NaN scores, or no positive sample.
    """
    y, s = _binary_inputs(labels, scores)
    n_pos = int(y.sum())
    if n_pos == 0:
        raise ValueError("F1 needs at least one positive sample")
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s_sorted) != 0), s_sorted.size - 1]
    tp = np.cumsum(y_sorted)[last_of_tie].astype(np.float64)
    flagged = (last_of_tie + 1).astype(np.float64)
    precision = tp / flagged
    recall = tp / n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(tp > 0, 2 * precision * recall / (precision + recall), 0.0)
    best = int(np.argmax(f1))
    return float(s_sorted[last_of_tie[best]]), float(f1[best]), float(precision[best]), float(recall[best])


def quantile_threshold(normal_scores: npt.ArrayLike, target_fpr: float) -> float:
    """Threshold that flags at most ``target_fpr`` of the given normal scores.

    Between two normal scores the midpoint is used (margin on both sides); when no false alarm is
    allowed the threshold is the next float above the largest normal score. Flagging is
    ``score >= threshold``; ties can only lower the empirical FPR below the target.

    Args:
        normal_scores: Scores of known-good samples (validation images, pixels, ...).
        target_fpr: Wanted false-positive rate in [0, 1).

    Returns:
        The threshold.

    Raises:
        ValueError: No scores, NaN scores, or a target outside [0, 1).
    """
    s = np.sort(np.asarray(normal_scores, dtype=np.float64).ravel())
    if s.size == 0:
        raise ValueError("quantile_threshold needs at least one normal score")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    if not 0.0 <= target_fpr < 1.0:
        raise ValueError(f"target_fpr must be in [0, 1), got {target_fpr}")
    allowed = int(np.floor(target_fpr * s.size + 1e-9))
    highest_kept = s[s.size - allowed - 1]
    if allowed == 0:
        return float(np.nextafter(highest_kept, np.inf))
    lowest_flagged = s[s.size - allowed]
    if lowest_flagged == highest_kept:
        return float(np.nextafter(highest_kept, np.inf))
    return float((highest_kept + lowest_flagged) / 2.0)
