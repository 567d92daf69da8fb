"""Decision thresholds from data: which images to use, scoring them, and the threshold with its rates.

Two methods (DESIGN "Thresholds"):

* ``quantile``: from normal images only. The threshold flags at most ``target_fpr`` of them
  (:func:`models.metrics.quantile_threshold`). The normals are ``validation/good``; without it, the
  ``train/good`` images the model held out of training (rebuilt from its card: seed, counts and the
  sha256 of the listing must match); failing that, all of ``train/good``, and the result says it is
  optimistic (the model has seen those images, so their scores are lower than those of new normal
  parts and the real false-positive rate is higher).
* ``f1``: from the labelled ``test/`` set (``good`` = normal, every other folder = defect), the
  F1-optimal threshold (:func:`models.metrics.f1_optimal_threshold`).

Both report the rates the threshold gives on the data it was chosen from: false-positive rate on
the normals and, when defects exist in ``test/``, recall on them. No Redis, no Kafka: the CLI
(``space calibrate``) writes the result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np
import numpy.typing as npt

from models.data import DatasetError, DatasetIndex, dataset_fingerprint, load_image
from models.metrics import f1_optimal_threshold, quantile_threshold

if TYPE_CHECKING:
    from models.artifact import TrainingSummary

__all__ = [
    "Calibration",
    "CalibrationError",
    "CalibrationSet",
    "Method",
    "calibrate",
    "calibrate_f1",
    "calibrate_quantile",
    "score_images",
    "select_images",
    "training_holdout",
]

Method = Literal["quantile", "f1"]
NormalSource = Literal["validation", "train_holdout", "train", "test"]
_SOURCE_WORDS = {"validation": "validation", "train_holdout": "held-out train/good", "train": "train", "test": "test"}


class CalibrationError(ValueError):
    """The data cannot give a threshold with this method (no normals, no defects, bad target)."""


class _Prediction(Protocol):
    @property
    def scores(self) -> np.ndarray: ...


class Scorer(Protocol):
    """What calibration needs from :class:`models.detector.Detector` (tests pass a fake)."""

    def predict(self, batch: Sequence[np.ndarray]) -> _Prediction:
        """Score a list of RGB images of any size."""
        ...


@dataclass(frozen=True)
class CalibrationSet:
    """The images a threshold is chosen from.

    Attributes:
        normals: Known-good images the false-positive rate is measured on.
        normal_source: Where they come from: ``validation``, ``train_holdout`` (the ``train/good``
            images the model did not train on), ``train`` (all of ``train/good``) or ``test``.
        defects: Defect images of ``test/`` (empty when there are none).
        notes: Warnings about the choice (e.g. why the model's hold-out could not be used).
    """

    normals: list[Path]
    normal_source: NormalSource
    defects: list[Path] = field(default_factory=list)
    notes: tuple[str, ...] = ()

    @property
    def optimistic(self) -> bool:
        """True when the normals are training images (the FPR measured on them is too low)."""
        return self.normal_source == "train"


@dataclass(frozen=True)
class Calibration:
    """A chosen threshold and what it does on the calibration data.

    Attributes:
        threshold: Flag an image anomalous when ``score >= threshold``.
        method: ``quantile`` or ``f1``.
        normal_source: Where the normals came from.
        n_normal: Normal images scored.
        n_defect: Defect images scored (0 when none).
        fpr: Fraction of the normals at or above the threshold.
        recall: Fraction of the defects at or above the threshold; None without defects.
        precision: Of the flagged images, the fraction that are defects; None when none flagged
            or without defects.
        target_fpr: The requested false-positive rate (quantile method only).
        warnings: Things the operator should know (optimistic normals, too few images).
    """

    threshold: float
    method: Method
    normal_source: NormalSource
    n_normal: int
    n_defect: int
    fpr: float
    recall: float | None
    precision: float | None
    target_fpr: float | None = None
    warnings: tuple[str, ...] = ()

    def summary(self) -> str:
        """One line for people, e.g. ``threshold 0.42 (quantile, target FPR 0.01): expected FPR ...``."""
        how = f"quantile, target FPR {self.target_fpr:g}" if self.target_fpr is not None else "F1-optimal"
        text = (
            f"threshold {self.threshold:.6g} ({how}): expected FPR {self.fpr:.2%} "
            f"on {self.n_normal} {_SOURCE_WORDS[self.normal_source]} normals"
        )
        if self.recall is not None:
            text += f", recall {self.recall:.2%} on {self.n_defect} test defects"
        return text


def _rates(threshold: float, normal: np.ndarray, defect: np.ndarray) -> tuple[float, float | None, float | None]:
    false_alarms = int(np.count_nonzero(normal >= threshold))
    fpr = false_alarms / normal.size if normal.size else 0.0
    if defect.size == 0:
        return fpr, None, None
    hits = int(np.count_nonzero(defect >= threshold))
    flagged = hits + false_alarms
    return fpr, hits / defect.size, (hits / flagged if flagged else None)


def _scores(values: npt.ArrayLike, what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).ravel()
    if not np.isfinite(arr).all():
        raise CalibrationError(f"{what} scores contain NaN or infinity")
    return arr


def calibrate_quantile(
    normal_scores: npt.ArrayLike,
    target_fpr: float,
    *,
    defect_scores: npt.ArrayLike = (),
    normal_source: NormalSource = "validation",
) -> Calibration:
    """Threshold that flags at most ``target_fpr`` of the normal scores.

    Args:
        normal_scores: Scores of known-good images.
        target_fpr: Wanted false-positive rate in [0, 1).
        defect_scores: Scores of defect images, for the recall (optional).
        normal_source: Where the normals came from (``train`` adds an optimism warning).

    Raises:
        CalibrationError: No normal score, a non-finite score, or a target outside [0, 1).
    """
    normal = _scores(normal_scores, "normal")
    defect = _scores(defect_scores, "defect")
    if normal.size == 0:
        raise CalibrationError("the quantile method needs at least one normal image")
    if not 0.0 <= target_fpr < 1.0:
        raise CalibrationError(f"target FPR must be in [0, 1), got {target_fpr}")
    threshold = quantile_threshold(normal, target_fpr)
    fpr, recall, precision = _rates(threshold, normal, defect)
    warnings = []
    if normal_source == "train":
        warnings.append(
            "no validation/good images: calibrated on train/good, which the model has seen; "
            "the real false-positive rate will be higher than the one shown"
        )
    if target_fpr > 0 and normal.size * target_fpr < 1.0:
        needed = int(np.ceil(1.0 / target_fpr))
        warnings.append(
            f"only {normal.size} normal images: a target FPR of {target_fpr:g} needs at least {needed} "
            "to be resolved, so the threshold sits just above the highest normal score"
        )
    return Calibration(
        threshold=threshold, method="quantile", normal_source=normal_source, n_normal=int(normal.size),
        n_defect=int(defect.size), fpr=fpr, recall=recall, precision=precision, target_fpr=target_fpr,
        warnings=tuple(warnings),
    )  # fmt: skip


def calibrate_f1(normal_scores: npt.ArrayLike, defect_scores: npt.ArrayLike) -> Calibration:
    """F1-optimal threshold over labelled normals and defects (the ``test/`` set).

    Args:
        normal_scores: Scores of the test set's good images (may be empty).
        defect_scores: Scores of its defect images (at least one).

    Raises:
        CalibrationError: No defect score, or a non-finite score.
    """
    normal = _scores(normal_scores, "normal")
    defect = _scores(defect_scores, "defect")
    if defect.size == 0:
        raise CalibrationError("the f1 method needs defect images in test/<defect_type>/")
    labels = np.r_[np.zeros(normal.size, bool), np.ones(defect.size, bool)]
    threshold, _, _, _ = f1_optimal_threshold(labels, np.r_[normal, defect])
    fpr, recall, precision = _rates(threshold, normal, defect)
    warnings = []
    if normal.size == 0:
        warnings.append("test/good holds no image: the false-positive rate is unknown (shown as 0)")
    warnings.append("the rates are measured on the images the threshold was chosen from (optimistic)")
    return Calibration(
        threshold=threshold, method="f1", normal_source="test", n_normal=int(normal.size),
        n_defect=int(defect.size), fpr=fpr, recall=recall, precision=precision, warnings=tuple(warnings),
    )  # fmt: skip


def training_holdout(index: DatasetIndex, training: TrainingSummary) -> tuple[list[Path], str | None]:
    """The ``train/good`` images a model held out of training, rebuilt from its card's training summary.

    Training without ``validation/good`` holds out a seeded part of ``train/good``
    (:func:`models.train.split_validation`). It is rebuilt when the card says so and this ``train/good``
    is the listing the model saw: same number of images and same sha256 over names and bytes.

    Returns:
        (hold-out, None), or ([], why not) when the card has no hold-out or the listing differs.
    """
    if training.validation_source != "train_holdout":
        return [], None
    expected = training.n_train + training.n_validation
    if not 1 <= training.n_validation < expected:
        return [], f"the card's n_validation {training.n_validation} of {expected} images is no hold-out"
    if len(index.train_good) != expected:
        return [], f"train/good holds {len(index.train_good)} images, the model's training listing had {expected}"
    try:
        same = dataset_fingerprint(index.train_good, root=index.root) == training.data_sha256
    except DatasetError as exc:
        return [], str(exc)
    if not same:
        return [], "train/good is not the listing the model was trained on (sha256 of names and bytes differs)"
    from models.train import split_validation  # torch and the training stack: only when a hold-out is rebuilt

    _, holdout, _ = split_validation(
        DatasetIndex(root=index.root, train_good=list(index.train_good)), training.seed, training.n_validation
    )
    return holdout, None


def select_images(index: DatasetIndex, method: Method, *, training: TrainingSummary | None = None) -> CalibrationSet:
    """The images each method uses from a scanned dataset.

    ``quantile``: ``validation/good`` as normals; else, given the model card's ``training`` summary,
    the ``train/good`` images the model held out (:func:`training_holdout`); else all of ``train/good``.
    ``test/`` defects give the recall. ``f1``: ``test/good`` as normals and the other ``test/`` folders
    as defects.

    Raises:
        CalibrationError: The method's images are missing.
    """
    defects = [s.path for s in index.test if s.is_anomalous]
    if method == "f1":
        if not defects:
            raise CalibrationError(f"{index.root}/test holds no defect folder: the f1 method needs labelled defects")
        normals = [s.path for s in index.test if not s.is_anomalous]
        return CalibrationSet(normals, "test", defects)
    if index.validation_good:
        return CalibrationSet(list(index.validation_good), "validation", defects)
    notes: tuple[str, ...] = ()
    if training is not None and index.train_good:
        holdout, why_not = training_holdout(index, training)
        if holdout:
            return CalibrationSet(holdout, "train_holdout", defects)
        if why_not:
            notes = (f"the model's held-out train/good images cannot be rebuilt: {why_not}",)
    if index.train_good:
        return CalibrationSet(list(index.train_good), "train", defects, notes)
    raise CalibrationError(f"{index.root} has no validation/good or train/good image to calibrate on")


def score_images(
    scorer: Scorer,
    paths: Sequence[Path],
    *,
    batch_size: int = 8,
    load: Callable[[Path], np.ndarray] = load_image,
) -> np.ndarray:
    """Image scores of ``paths`` in order, scored ``batch_size`` at a time.

    Raises:
        models.data.DatasetError: An image cannot be read.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    scores: list[np.ndarray] = []
    for start in range(0, len(paths), batch_size):
        images = [load(p) for p in paths[start : start + batch_size]]
        scores.append(np.asarray(scorer.predict(images).scores, dtype=np.float64))
    return np.concatenate(scores) if scores else np.zeros(0, np.float64)


def calibrate(
    scorer: Scorer,
    index: DatasetIndex,
    method: Method,
    *,
    target_fpr: float = 0.01,
    batch_size: int = 8,
    training: TrainingSummary | None = None,
) -> Calibration:
    """Choose a threshold for ``scorer`` from a scanned dataset (see the module docstring).

    ``training`` is the model card's training summary: without ``validation/good`` it lets the quantile
    method use the images the model held out of ``train/good`` instead of all of them.

    Raises:
        CalibrationError: The data does not suit the method.
        models.data.DatasetError: An image cannot be read.
    """
    chosen = select_images(index, method, training=training)
    normal = score_images(scorer, chosen.normals, batch_size=batch_size)
    defect = score_images(scorer, chosen.defects, batch_size=batch_size)
    if method == "f1":
        return calibrate_f1(normal, defect)
    result = calibrate_quantile(normal, target_fpr, defect_scores=defect, normal_source=chosen.normal_source)
    return replace(result, warnings=chosen.notes + result.warnings) if chosen.notes else result
