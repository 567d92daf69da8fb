"""Tests for models.evaluate and ``space evaluate``: original-resolution metrics, gallery order, CLI.

The detector is a fake that sees defects exactly (the parts are flat gray, so any other pixel is a
defect), which makes every metric known in advance. An end-to-end run with the real Detector is in
``test_evaluate_cli_end_to_end``.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

from models.data import TestSample, scan_dataset
from models.evaluate import _Scored, evaluate, gallery_order
from models.synthetic import draw_defect
from worker.cli import main

H, W = 48, 64  # not square: a swapped (h, w) anywhere breaks the shapes


@dataclass
class FakeCard:
    default_threshold: float = 0.5
    name: str = "fake"
    version: str = "0"
    input_size: tuple[int, int] = (32, 32)


@dataclass
class FakePrediction:
    scores: np.ndarray
    maps: list[np.ndarray]


class OracleDetector:
    """Map = 1 where a pixel differs from the flat gray part, else 0; score = max of the map."""

    def __init__(self, threshold: float = 0.5, input_size_maps: bool = False) -> None:
        self.card = FakeCard(default_threshold=threshold)
        self.input_size_maps = input_size_maps
        self.seen_shapes: list[tuple[int, ...]] = []

    def predict(self, batch: list[np.ndarray], map_size: str = "input") -> FakePrediction:
        maps = []
        for image in batch:
            self.seen_shapes.append(image.shape)
            amap = (image != 128).any(axis=2).astype(np.float32)
            if self.input_size_maps or map_size != "original":
                amap = cv2.resize(amap, (32, 32), interpolation=cv2.INTER_AREA)
            maps.append(amap)
        return FakePrediction(np.array([m.max() for m in maps], np.float32), maps)


def _png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image
    path.write_bytes(cv2.imencode(".png", bgr)[1].tobytes())


def _dataset(
    root: Path, kinds: tuple[str, ...] = ("hole", "scratch"), n_good: int = 3, n_each: int = 2
) -> Path:
    flat = np.full((H, W, 3), 128, np.uint8)
    rng = np.random.default_rng(0)
    for i in range(n_good):
        _png(root / "test" / "good" / f"{i:03d}.png", flat)
    for kind in kinds:
        for i in range(n_each):
            image, mask = draw_defect(flat, kind, rng)
            _png(root / "test" / kind / f"{i:03d}.png", image)
            _png(root / "ground_truth" / kind / f"{i:03d}_mask.png", mask.astype(np.uint8) * 255)
    return root


def test_evaluate_oracle_is_perfect_at_original_resolution(tmp_path: Path) -> None:
    index = scan_dataset(_dataset(tmp_path / "data"), require_train=False)
    detector = OracleDetector()
    result = evaluate(detector, index, tmp_path / "out", gallery=3, batch_size=3)
    assert all(shape == (H, W, 3) for shape in detector.seen_shapes)
    overall = result["overall"]
    assert (overall["n_images"], overall["n_good"], overall["n_anomalous"]) == (7, 3, 4)
    assert overall["image_auroc"] == 1.0
    assert overall["pixel_auroc"] == 1.0
    assert overall["au_pro"] == pytest.approx(1.0, abs=1e-12)
    assert overall["at_threshold"] == {
        "tp": 4, "fp": 0, "tn": 3, "fn": 0, "precision": 1.0, "recall": 1.0, "f1": 1.0, "accuracy": 1.0,
    }  # fmt: skip
    assert set(result["per_defect_type"]) == {"hole", "scratch"}
    for block in result["per_defect_type"].values():
        assert (block["n_images"], block["n_good"], block["n_anomalous"]) == (5, 3, 2)
        assert block["image_auroc"] == 1.0
        assert block["au_pro"] == pytest.approx(1.0, abs=1e-12)
    assert result["threshold"] == {
        "value": 0.5,
        "source": "card.default_threshold",
        "rule": "score >= threshold is anomalous",
    }
    assert result["model"]["name"] == "fake"
    on_disk = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert on_disk == result
    assert len(result["gallery"]) == 3
    for rel in result["gallery"]:
        card = cv2.imread(str(tmp_path / "out" / rel))
        assert card.shape[1] == 2 * W  # original | overlay
        assert card.shape[0] > H  # caption above
    rows = list(csv.DictReader((tmp_path / "out" / "scores.csv").open()))
    assert len(rows) == 7
    assert {r["outcome"] for r in rows} == {"tp", "tn"}
    assert rows[0]["path"] == "test/good/000.png"


def test_evaluate_resizes_input_size_maps_to_the_original(tmp_path: Path) -> None:
    index = scan_dataset(_dataset(tmp_path / "data"), require_train=False)
    result = evaluate(OracleDetector(input_size_maps=True), index, tmp_path / "out", gallery=0)
    overall = result["overall"]
    assert overall["image_auroc"] == 1.0
    assert 0.9 < overall["pixel_auroc"] <= 1.0  # blurred by the down/up resize, still localised
    assert 0.5 < overall["au_pro"] <= 1.0
    assert result["gallery"] == []
    assert not (tmp_path / "out" / "gallery").exists()
    # A rerun into the same folder leaves no gallery images of the earlier run behind.
    evaluate(OracleDetector(), index, tmp_path / "out", gallery=2)
    assert len(list((tmp_path / "out" / "gallery").glob("*.png"))) == 2
    evaluate(OracleDetector(), index, tmp_path / "out", gallery=1)
    assert len(list((tmp_path / "out" / "gallery").glob("*.png"))) == 1


def test_evaluate_gallery_puts_misses_first(tmp_path: Path) -> None:
    # Threshold above every score: all defects are missed, goods pass.
    index = scan_dataset(_dataset(tmp_path / "data"), require_train=False)
    result = evaluate(OracleDetector(threshold=2.0), index, tmp_path / "out", gallery=10)
    tags = [Path(rel).name.split("_")[1] for rel in result["gallery"]]
    assert tags == ["fn"] * 4 + ["tn"] * 3
    assert result["overall"]["at_threshold"]["fn"] == 4
    assert result["overall"]["at_threshold"]["recall"] == 0.0
    assert result["overall"]["best_f1_on_test"]["f1"] == 1.0
    # Override: threshold 0 flags the goods too.
    again = evaluate(OracleDetector(threshold=2.0), index, tmp_path / "out2", gallery=10, threshold=0.0)
    assert again["threshold"]["source"] == "override"
    assert [Path(r).name.split("_")[1] for r in again["gallery"]] == ["fp"] * 3 + ["tp"] * 4


def _item(kind: str, score: float, name: str) -> _Scored:
    return _Scored(TestSample(Path(f"/x/{kind}/{name}.png"), kind), score, np.zeros((2, 2), np.float32), None)


def test_gallery_order() -> None:
    items = [
        _item("good", 0.2, "g_low"),
        _item("good", 0.9, "fp_high"),
        _item("good", 0.6, "fp_low"),
        _item("crack", 0.1, "fn_low"),
        _item("crack", 0.4, "fn_high"),
        _item("crack", 0.95, "tp_top"),
        _item("crack", 0.7, "tp"),
    ]
    order = [it.sample.path.stem for it in gallery_order(items, threshold=0.5)]
    assert order == ["fn_low", "fn_high", "fp_high", "fp_low", "tp_top", "tp", "g_low"]


def test_evaluate_without_masks_and_errors(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "data")
    (root / "ground_truth" / "hole" / "000_mask.png").unlink()
    index = scan_dataset(root, require_train=False)
    result = evaluate(OracleDetector(), index, tmp_path / "out", gallery=0)
    assert result["overall"]["n_pixel_images"] == 6
    assert result["data"]["missing_masks"] == [str(root / "test" / "hole" / "000.png")]
    assert result["overall"]["image_auroc"] == 1.0
    assert result["per_defect_type"]["hole"]["n_pixel_images"] == 4

    good_only = _dataset(tmp_path / "good_only", kinds=())
    with pytest.raises(ValueError, match="no anomalous"):
        evaluate(OracleDetector(), scan_dataset(good_only, require_train=False), tmp_path / "o")
    (tmp_path / "empty" / "test").mkdir(parents=True)
    with pytest.raises(ValueError, match="no readable test image"):
        evaluate(OracleDetector(), scan_dataset(tmp_path / "empty", require_train=False), tmp_path / "o")


def test_evaluate_cli_operator_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _dataset(tmp_path / "data")
    code = main(
        ["evaluate", "--model", str(tmp_path / "nope"), "--data", str(data), "--out", str(tmp_path / "o")]
    )
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("space: error: --model")
    assert "\n" not in err
    (tmp_path / "model").mkdir()
    code = main(
        [
            "evaluate",
            "--model",
            str(tmp_path / "model"),
            "--data",
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 1
    assert "no test/ folder" in capsys.readouterr().err
    code = main(
        ["evaluate", "--model", str(tmp_path / "model"), "--data", str(data), "--out", str(tmp_path / "o")]
    )
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("space: error:")
    assert "\n" not in err


def test_evaluate_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Real Detector on a tiny, barely trained model: checks the wiring, not the accuracy.
    import torch

    from models.synthetic import build_product_line
    from models.train import TrainConfig, train

    data = build_product_line(
        "brick", tmp_path / "data", n_train=4, n_val=2, n_test_good=2, n_test_defect=3, size=128
    )
    config = TrainConfig(
        data=data, product_line="brick", out=tmp_path / "models", steps=2, input_size=128, device="cpu",
        precision="fp32", distill_steps=1,
    )  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CI machines have two shared cores
    try:
        artifact = train(config)
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "eval"
    argv = ["evaluate", "--model", str(artifact), "--data", str(data), "--out", str(out), "--device", "cpu"]
    assert main([*argv, "--gallery", "2"]) == 0
    assert "image AUROC" in capsys.readouterr().out
    result = json.loads((out / "metrics.json").read_text())
    assert result["model"]["product_line"] == "brick"
    assert result["inference"] == {"device": "cpu", "precision": "fp32"}  # an fp32 card: auto serves fp32
    assert result["overall"]["n_images"] == 5
    assert set(result["per_defect_type"]) == {"crack", "hole", "scratch"}
    for key in ("image_auroc", "pixel_auroc", "au_pro"):
        assert 0.0 <= result["overall"][key] <= 1.0
    assert len(list((out / "gallery").glob("*.png"))) == 2
