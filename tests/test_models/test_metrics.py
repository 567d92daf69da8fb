"""Tests for models.metrics: hand-computed cases and brute-force references on random inputs."""

from __future__ import annotations

import itertools
from collections import deque

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from models.metrics import (
    au_pro,
    f1_optimal_threshold,
    image_auroc,
    pixel_auroc,
    pro_curve,
    quantile_threshold,
    roc_curve,
)

# ----------------------------------------------------------------------------- brute-force references


def _brute_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    pos, neg = scores[labels], scores[~labels]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def _brute_regions(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """8-connected components by breadth-first search (independent of OpenCV)."""
    seen = np.zeros_like(mask, bool)
    regions = []
    h, w = mask.shape
    for y0 in range(h):
        for x0 in range(w):
            if not mask[y0, x0] or seen[y0, x0]:
                continue
            queue, region = deque([(y0, x0)]), []
            seen[y0, x0] = True
            while queue:
                y, x = queue.popleft()
                region.append((y, x))
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        ny, nx = y + dy, x + dx
                        if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                            seen[ny, nx] = True
                            queue.append((ny, nx))
            regions.append(region)
    return regions


def _brute_au_pro(masks: list[np.ndarray], maps: list[np.ndarray], limit: float) -> float:
    regions = [(i, r) for i, m in enumerate(masks) for r in _brute_regions(m)]
    neg = np.concatenate([a[~m] for m, a in zip(masks, maps, strict=True)])
    thresholds = sorted({float(v) for a in maps for v in a.ravel()}, reverse=True)
    points = [(0.0, 0.0)]
    for t in thresholds:
        fpr = float(np.mean(neg >= t))
        pro = float(np.mean([np.mean([maps[i][y, x] >= t for y, x in r]) for i, r in regions]))
        points.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 >= limit:
            break
        if x1 > limit:
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


def _brute_f1(labels: np.ndarray, scores: np.ndarray) -> float:
    best = 0.0
    for t in np.unique(scores):
        pred = scores >= t
        tp = np.sum(pred & labels)
        if tp:
            p, r = tp / pred.sum(), tp / labels.sum()
            best = max(best, 2 * p * r / (p + r))
    return best


# ----------------------------------------------------------------------------- image AUROC and ROC


def test_image_auroc_hand_cases() -> None:
    labels = np.array([0, 0, 1, 1])
    assert image_auroc(labels, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert image_auroc(labels, [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert image_auroc(labels, [0.5, 0.5, 0.5, 0.5]) == 0.5
    # One positive ties with one negative, the other wins over both: (1 + 0.5 + 1 + 1) / 4.
    assert image_auroc(labels, [0.1, 0.5, 0.5, 0.9]) == pytest.approx(3.5 / 4)


def test_image_auroc_errors() -> None:
    with pytest.raises(ValueError, match="positive and negative"):
        image_auroc([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="differ in length"):
        image_auroc([0, 1], [0.1])
    with pytest.raises(ValueError, match="NaN"):
        image_auroc([0, 1], [0.1, float("nan")])


def test_roc_curve_collapses_ties() -> None:
    fpr, tpr, thr = roc_curve([0, 1, 0, 1], [0.2, 0.5, 0.5, 0.9])
    np.testing.assert_allclose(thr, [np.inf, 0.9, 0.5, 0.2])
    np.testing.assert_allclose(tpr, [0, 0.5, 1, 1])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])


@settings(max_examples=60, deadline=None)
@given(
    labels=arrays(bool, st.integers(2, 14)),
    seed=st.integers(0, 2**16),
    levels=st.integers(1, 6),
)
def test_auroc_matches_brute_force_and_trapezoid(labels: np.ndarray, seed: int, levels: int) -> None:
    assume(labels.any() and not labels.all())
    scores = np.random.default_rng(seed).integers(0, levels, size=labels.size).astype(np.float32)
    expected = _brute_auroc(labels, scores)
    assert image_auroc(labels, scores) == pytest.approx(expected, abs=1e-12)
    fpr, tpr, _ = roc_curve(labels, scores)
    assert np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2) == pytest.approx(expected, abs=1e-12)


# ----------------------------------------------------------------------------- pixel AUROC


def test_pixel_auroc_images_of_different_sizes() -> None:
    masks = [np.array([[True, False], [False, False]]), np.zeros((1, 3), bool)]
    maps = [np.array([[0.9, 0.1], [0.2, 0.3]]), np.array([[0.1, 0.95, 0.0]])]
    # Positive 0.9 beats 5 of the 6 negatives.
    assert pixel_auroc(masks, maps) == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="equal 2-D shapes"):
        pixel_auroc([np.zeros((2, 2), bool)], [np.zeros((2, 3))])
    with pytest.raises(ValueError, match="positive and negative"):
        pixel_auroc([np.zeros((2, 2), bool)], [np.zeros((2, 2))])


def test_pixel_auroc_accepts_stacked_arrays_and_channel_maps() -> None:
    masks = np.zeros((2, 4, 4), bool)
    masks[0, 1:3, 1:3] = True
    maps = masks.astype(np.float32) + 0.01
    assert pixel_auroc(masks, maps) == 1.0
    assert pixel_auroc(list(masks), [m[None] for m in maps]) == 1.0


# ----------------------------------------------------------------------------- AU-PRO


def test_au_pro_hand_example_uses_region_mean() -> None:
    # Region A = pixel 0, region B = pixels 2..4; negatives are pixels 1, 5, 6.
    mask = np.array([[1, 0, 1, 1, 1, 0, 0]], bool)
    amap = np.array([[0.9, 0.85, 0.8, 0.2, 0.2, 0.1, 0.1]])
    # Curve: (0, 0) -> t=0.9 (0, 1/2) -> t=0.85 (1/3, 1/2) -> t=0.8 (1/3, 2/3) -> t=0.2 (1/3, 1)
    # -> t=0.1 (1, 1). Per-pixel (not per-region) averaging would give 1/4 at t=0.9.
    assert au_pro([mask], [amap], fpr_limit=0.3) == pytest.approx(0.5)
    assert au_pro([mask], [amap], fpr_limit=1.0) == pytest.approx(1 / 3 * 0.5 + 2 / 3)
    fpr, pro, thr = pro_curve([mask], [amap])
    np.testing.assert_allclose(fpr, [0, 0, 1 / 3, 1 / 3, 1 / 3, 1])
    np.testing.assert_allclose(pro, [0, 0.5, 0.5, 2 / 3, 1, 1])
    np.testing.assert_allclose(thr[1:], [0.9, 0.85, 0.8, 0.2, 0.1])


def test_au_pro_interpolates_at_the_limit() -> None:
    # A tie between the only region pixel and one of two negatives: PRO rises along y = 2 x.
    mask = np.array([[1, 0, 0]], bool)
    amap = np.array([[0.5, 0.5, 0.1]])
    assert au_pro([mask], [amap], fpr_limit=0.3) == pytest.approx(0.3)  # (0.3 * 0.6 / 2) / 0.3


def test_au_pro_perfect_inverted_and_connectivity() -> None:
    mask = np.zeros((6, 6), bool)
    mask[1, 1] = mask[2, 2] = True  # diagonal neighbours: one 8-connected region
    mask[4:6, 4:6] = True
    good = np.zeros((6, 6), bool)
    amap = mask.astype(float)
    assert au_pro([mask, good], [amap, np.zeros((6, 6))]) == 1.0
    assert au_pro([mask, good], [1 - amap, np.ones((6, 6))]) == 0.0
    # Detect only the single diagonal region: half of the two regions, though 2 of 6 pixels.
    partial = np.zeros((6, 6))
    partial[1, 1] = partial[2, 2] = 1.0
    # Region B ties with every negative at 0: a diagonal from (0, 1/2) to (1, 1), so the mean PRO
    # over [0, 0.3] is (0.5 + 0.65) / 2.
    assert au_pro([mask], [partial]) == pytest.approx(0.575)
    # With region B strictly below the negatives, the curve stays at 1/2 up to the limit.
    partial[4:6, 4:6] = -1.0
    assert au_pro([mask], [partial]) == pytest.approx(0.5)


def test_au_pro_errors() -> None:
    with pytest.raises(ValueError, match="region"):
        au_pro([np.zeros((3, 3), bool)], [np.zeros((3, 3))])
    with pytest.raises(ValueError, match="negative"):
        au_pro([np.ones((3, 3), bool)], [np.zeros((3, 3))])
    with pytest.raises(ValueError, match="fpr_limit"):
        au_pro([np.eye(3, dtype=bool)], [np.zeros((3, 3))], fpr_limit=0.0)
    with pytest.raises(ValueError, match="NaN"):
        au_pro([np.eye(3, dtype=bool)], [np.full((3, 3), np.nan)])


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n_images=st.integers(1, 3),
    side=st.integers(2, 6),
    levels=st.integers(2, 8),
    limit=st.sampled_from([0.05, 0.1, 0.3, 0.5, 1.0]),
)
def test_au_pro_matches_brute_force(seed: int, n_images: int, side: int, levels: int, limit: float) -> None:
    rng = np.random.default_rng(seed)
    masks = [rng.random((side, side)) < 0.3 for _ in range(n_images)]
    maps = [rng.integers(0, levels, size=(side, side)).astype(np.float64) for _ in range(n_images)]
    maps = [a + m * rng.integers(0, 2) for a, m in zip(maps, masks, strict=True)]  # some signal
    total = sum(int(m.sum()) for m in masks)
    assume(0 < total < n_images * side * side)
    assert au_pro(masks, maps, fpr_limit=limit) == pytest.approx(_brute_au_pro(masks, maps, limit), abs=1e-9)


def test_metrics_scale_to_a_test_set() -> None:
    rng = np.random.default_rng(0)
    masks = [np.zeros((256, 256), bool) for _ in range(30)]
    for m in masks[10:]:
        y, x = rng.integers(20, 200, size=2)
        m[y : y + 30, x : x + 20] = True
    maps = [rng.random((256, 256), dtype=np.float32) + 0.5 * m for m in masks]
    pro = au_pro(masks, maps)
    auc = pixel_auroc(masks, maps)
    assert 0.5 < pro < 1.0
    assert 0.8 < auc < 1.0


# ----------------------------------------------------------------------------- thresholds


def test_f1_optimal_threshold_hand_case() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.7, 0.6, 0.8, 0.9])
    thr, f1, precision, recall = f1_optimal_threshold(labels, scores)
    # t=0.6 flags 0.6, 0.7, 0.8, 0.9: tp 3, fp 1 -> P 0.75, R 1, F1 6/7 (t=0.8: P 1, R 2/3, F1 0.8).
    assert thr == 0.6
    assert f1 == pytest.approx(6 / 7)
    assert precision == pytest.approx(0.75)
    assert recall == 1.0
    with pytest.raises(ValueError, match="positive"):
        f1_optimal_threshold([0, 0], [0.1, 0.2])


@settings(max_examples=60, deadline=None)
@given(labels=arrays(bool, st.integers(1, 12)), seed=st.integers(0, 2**16), levels=st.integers(1, 5))
def test_f1_matches_brute_force(labels: np.ndarray, seed: int, levels: int) -> None:
    assume(labels.any())
    scores = np.random.default_rng(seed).integers(0, levels, size=labels.size).astype(float)
    thr, f1, precision, recall = f1_optimal_threshold(labels, scores)
    assert f1 == pytest.approx(_brute_f1(labels, scores))
    pred = scores >= thr
    assert precision == pytest.approx(np.sum(pred & labels) / pred.sum())
    assert recall == pytest.approx(np.sum(pred & labels) / labels.sum())


def test_quantile_threshold_hand_cases() -> None:
    normal = np.arange(10, dtype=float)  # 0..9
    assert quantile_threshold(normal, 0.1) == 8.5  # flags only 9
    assert quantile_threshold(normal, 0.25) == 7.5  # 2.5 allowed -> 2 flagged
    zero = quantile_threshold(normal, 0.0)
    assert zero > 9.0
    assert zero == np.nextafter(9.0, np.inf)
    with pytest.raises(ValueError, match="target_fpr"):
        quantile_threshold(normal, 1.0)
    with pytest.raises(ValueError, match="at least one"):
        quantile_threshold([], 0.1)


@settings(max_examples=80, deadline=None)
@given(
    scores=arrays(np.float64, st.integers(1, 40), elements=st.integers(0, 6).map(float)),
    target=st.floats(0.0, 0.99),
)
def test_quantile_threshold_respects_target(scores: np.ndarray, target: float) -> None:
    thr = quantile_threshold(scores, target)
    flagged = scores >= thr
    assert flagged.mean() <= target + 1e-12
    # Tightest: every score above the threshold is flagged and lowering it to the next lower
    # distinct score would break the target.
    below = np.unique(scores[scores < thr])
    if below.size:
        assert np.mean(scores >= below[-1]) > target
