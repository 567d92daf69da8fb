"""Threshold calibration: quantile on normals, F1 on labelled test images, image selection, scoring."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from models.artifact import TrainingSummary
from models.calibration import (
    CalibrationError,
    calibrate,
    calibrate_f1,
    calibrate_quantile,
    score_images,
    select_images,
)
from models.data import DatasetIndex, dataset_fingerprint, scan_dataset
from models.train import split_validation


def test_quantile_flags_at_most_the_target_share_of_normals() -> None:
    normals = np.arange(1, 201, dtype=float) / 100.0  # 0.01 .. 2.00
    result = calibrate_quantile(normals, 0.05, defect_scores=[1.0, 2.5, 3.0, 4.0])
    assert result.method == "quantile"
    assert np.count_nonzero(normals >= result.threshold) == 10  # 5 % of 200
    assert result.fpr == pytest.approx(0.05)
    assert result.threshold == pytest.approx((1.90 + 1.91) / 2)  # midway between kept and flagged
    assert result.recall == pytest.approx(0.75)  # 1.0 is below the threshold
    assert result.precision == pytest.approx(3 / 13)
    assert (result.n_normal, result.n_defect, result.target_fpr) == (200, 4, 0.05)
    assert result.warnings == ()


def test_quantile_without_defects_has_no_recall_and_warns_about_too_few_normals() -> None:
    result = calibrate_quantile([0.1, 0.2, 0.3], 0.01)
    assert result.threshold > 0.3 and result.threshold == pytest.approx(0.3)
    assert result.fpr == 0.0
    assert result.recall is None and result.precision is None
    assert any("at least 100" in w for w in result.warnings)
    assert "recall" not in result.summary()
    assert "expected FPR 0.00% on 3 validation normals" in result.summary()


def test_quantile_on_training_images_says_it_is_optimistic() -> None:
    result = calibrate_quantile(np.linspace(0, 1, 500), 0.01, normal_source="train")
    assert result.normal_source == "train"
    assert any("train/good" in w and "higher" in w for w in result.warnings)


@pytest.mark.parametrize(
    ("normals", "target", "message"),
    [([], 0.01, "at least one normal"), ([0.1], 1.0, "target FPR"), ([0.1, float("nan")], 0.01, "NaN")],
)
def test_quantile_refuses_unusable_input(normals: list[float], target: float, message: str) -> None:
    with pytest.raises(CalibrationError, match=message):
        calibrate_quantile(normals, target)


def test_f1_picks_the_threshold_that_separates_labelled_scores() -> None:
    result = calibrate_f1([0.1, 0.2, 0.3, 0.6], [0.5, 0.7, 0.9])
    # At 0.5: tp 3, fp 1 -> F1 = 6/7, better than 0.7 (tp 2, fp 0 -> F1 = 0.8).
    assert result.threshold == pytest.approx(0.5)
    assert result.fpr == pytest.approx(0.25)
    assert result.recall == pytest.approx(1.0)
    assert result.precision == pytest.approx(0.75)
    assert result.normal_source == "test" and result.target_fpr is None
    assert "F1-optimal" in result.summary() and "recall 100.00% on 3 test defects" in result.summary()


def test_f1_needs_defects() -> None:
    with pytest.raises(CalibrationError, match="defect"):
        calibrate_f1([0.1, 0.2], [])


def _write_images(folder: Path, n: int, value: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        cv2.imwrite(str(folder / f"{i:03d}.png"), np.full((8, 8, 3), value + i, np.uint8))


class _MeanScorer:
    """Scores an image by its mean pixel value / 100 (defects are brighter)."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def predict(self, batch: list[np.ndarray]) -> SimpleNamespace:
        self.batches.append(len(batch))
        return SimpleNamespace(scores=np.array([img.mean() / 100.0 for img in batch], np.float32))


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    _write_images(tmp_path / "train" / "good", 4, 10)
    _write_images(tmp_path / "validation" / "good", 5, 20)  # scores 0.20 .. 0.24
    _write_images(tmp_path / "test" / "good", 3, 30)  # 0.30 .. 0.32
    _write_images(tmp_path / "test" / "crack", 4, 50)  # 0.50 .. 0.53
    return tmp_path


def test_select_images_prefers_validation_then_train(dataset: Path) -> None:
    index = scan_dataset(dataset)
    chosen = select_images(index, "quantile")
    assert chosen.normal_source == "validation" and len(chosen.normals) == 5 and len(chosen.defects) == 4
    assert not chosen.optimistic
    index.validation_good = []
    fallback = select_images(index, "quantile")
    assert fallback.normal_source == "train" and fallback.optimistic and len(fallback.normals) == 4
    f1 = select_images(index, "f1")
    assert f1.normal_source == "test" and len(f1.normals) == 3 and len(f1.defects) == 4


def test_select_images_f1_without_defects_fails(tmp_path: Path) -> None:
    _write_images(tmp_path / "train" / "good", 2, 10)
    _write_images(tmp_path / "test" / "good", 2, 10)
    with pytest.raises(CalibrationError, match="no defect"):
        select_images(scan_dataset(tmp_path), "f1")


def test_score_images_batches_in_order(dataset: Path) -> None:
    scorer = _MeanScorer()
    paths = sorted((dataset / "validation" / "good").glob("*.png"))
    scores = score_images(scorer, paths, batch_size=2)
    assert scorer.batches == [2, 2, 1]
    np.testing.assert_allclose(scores, [0.20, 0.21, 0.22, 0.23, 0.24], rtol=1e-5)
    assert score_images(scorer, [], batch_size=2).shape == (0,)


def test_calibrate_end_to_end_with_both_methods(dataset: Path) -> None:
    index = scan_dataset(dataset)
    quantile = calibrate(_MeanScorer(), index, "quantile", target_fpr=0.2, batch_size=3)
    assert quantile.threshold == pytest.approx(0.235, abs=1e-6)  # flags 1 of 5 validation normals
    assert quantile.fpr == pytest.approx(0.2) and quantile.recall == 1.0
    f1 = calibrate(_MeanScorer(), index, "f1")
    assert 0.32 < f1.threshold <= 0.50 and f1.fpr == 0.0 and f1.recall == 1.0


def _holdout_card(index: DatasetIndex, seed: int, **overrides: object) -> TrainingSummary:
    """The training summary a holdout run over ``index`` writes into its card."""
    train_paths, val_paths, source = split_validation(index, seed)
    fields = {
        "data_root": str(index.root), "data_sha256": dataset_fingerprint(index.train_good, root=index.root),
        "n_train": len(train_paths), "n_validation": len(val_paths), "validation_source": source, "steps": 1,
        "batch_size": 1, "seed": seed, "duration_s": 1.0, "device": "cpu", "precision": "fp32", "penalty_source": "none",
    }  # fmt: skip
    return TrainingSummary.model_validate(fields | overrides)


@pytest.fixture
def holdout_dataset(tmp_path: Path) -> Path:
    _write_images(tmp_path / "train" / "good", 20, 10)  # scores 0.10 .. 0.29, no validation/good
    _write_images(tmp_path / "test" / "crack", 2, 50)
    return tmp_path


def test_quantile_without_validation_uses_the_images_the_model_held_out(holdout_dataset: Path) -> None:
    index = scan_dataset(holdout_dataset)
    card = _holdout_card(index, seed=5)
    _, expected, _ = split_validation(index, 5)
    chosen = select_images(index, "quantile", training=card)
    assert chosen.normal_source == "train_holdout" and chosen.normals == expected and len(expected) == 5
    assert not chosen.optimistic and chosen.notes == () and len(chosen.defects) == 2
    result = calibrate(_MeanScorer(), index, "quantile", target_fpr=0.2, training=card)
    assert result.normal_source == "train_holdout" and result.n_normal == 5
    assert not any("has seen" in w for w in result.warnings)
    assert "on 5 held-out train/good normals" in result.summary()
    # without the card (or with a card that trained on validation/good): all of train/good, as before
    assert select_images(index, "quantile").normal_source == "train"
    own_validation = card.model_copy(update={"validation_source": "validation_good", "n_train": 20})
    plain = select_images(index, "quantile", training=own_validation)
    assert plain.normal_source == "train" and plain.notes == ()


def test_quantile_falls_back_to_train_good_when_the_holdout_cannot_be_rebuilt(holdout_dataset: Path) -> None:
    index = scan_dataset(holdout_dataset)
    card = _holdout_card(index, seed=5)
    cv2.imwrite(str(holdout_dataset / "train" / "good" / "007.png"), np.full((8, 8, 3), 200, np.uint8))
    changed = select_images(scan_dataset(holdout_dataset), "quantile", training=card)
    assert changed.normal_source == "train" and len(changed.normals) == 20
    assert len(changed.notes) == 1 and "sha256" in changed.notes[0]
    _write_images(holdout_dataset / "extra", 1, 0)
    (holdout_dataset / "extra" / "000.png").rename(holdout_dataset / "train" / "good" / "new.png")
    grown = calibrate(_MeanScorer(), scan_dataset(holdout_dataset), "quantile", training=card)
    assert grown.normal_source == "train" and grown.n_normal == 21
    assert "cannot be rebuilt: train/good holds 21 images, the model's training listing had 20" in grown.warnings[0]
    assert any("has seen" in w for w in grown.warnings)


def test_space_calibrate_skips_a_corrupt_image_as_training_does(dataset: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    # calibrate listed images without reading them, then stopped at the first it could not decode
    # ("cannot decode image"), where train and evaluate skip it with a warning.
    from models.artifact import save_artifact
    from tests.test_models.model_fixtures import make_card, make_model
    from worker.cli import main

    model = make_model()
    artifact = save_artifact(tmp_path / "models" / "brick" / "v1", make_card(model), model.state_dict())
    good = (dataset / "validation" / "good" / "000.png").read_bytes()
    (dataset / "validation" / "good" / "IMG_9.PNG").write_bytes(good[: len(good) // 2])  # truncated
    assert main(["calibrate", "--model", str(artifact), "--data", str(dataset), "--json", "--precision", "fp32"]) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("{\n") :])["n_normal"] == 5
