"""The runtime contract of docs/architecture.md: load, prepare, predict, warmup, precision rules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import structlog
import torch

import models.detector as detector_module
from models.artifact import save_artifact
from models.detector import (
    Detector,
    DetectorError,
    Prediction,
    choose_precision,
    precision_name,
    resolve_precision,
)
from tests.test_models.model_fixtures import SIZE, make_card, make_model


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = make_model("space")
    return save_artifact(tmp_path_factory.mktemp("art") / "v1", make_card(model), model.state_dict())


@pytest.fixture(scope="module")
def detector(artifact: Path) -> Detector:
    return Detector.load(artifact, device="cpu", precision="fp32", channels_last=True)


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


def test_load_exposes_card_and_input_size(detector: Detector) -> None:
    assert detector.input_size == (SIZE, SIZE)
    assert detector.card.variant == "space"
    assert detector.device.type == "cpu"


@pytest.mark.parametrize("shape", [(50, 70), (50, 70, 1), (300, 200, 3), (64, 64, 4), (SIZE, SIZE, 3)])
def test_prepare_accepts_gray_rgb_rgba_of_any_size(detector: Detector, shape: tuple[int, ...]) -> None:
    img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    out = detector.prepare(img)
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8
    if len(shape) == 2:
        assert (out[..., 0] == out[..., 1]).all()


def test_prepare_rejects_bad_input(detector: Detector) -> None:
    with pytest.raises(DetectorError):
        detector.prepare(np.zeros((10, 10, 2), np.uint8))
    with pytest.raises(DetectorError):
        detector.prepare(np.zeros((10, 10, 3), np.float32))


def test_predict_shapes_and_score_is_map_max(detector: Detector) -> None:
    pred = detector.predict(_images(3))
    assert isinstance(pred, Prediction)
    assert pred.scores.shape == (3,) and pred.scores.dtype == np.float32
    assert pred.maps.shape == (3, SIZE, SIZE) and pred.maps.dtype == np.float32
    np.testing.assert_array_equal(pred.scores, pred.maps.reshape(3, -1).max(1))
    assert np.isfinite(pred.maps).all()


def test_predict_matches_the_model_combination(detector: Detector) -> None:
    batch = _images(2, seed=5)
    pred = detector.predict(batch)
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255
    with torch.inference_mode():
        st, ae = detector.model.branch_maps(x)
    q = detector.card.quantiles
    expected = 0.5 * 0.1 * (st - q.qa_st) / (q.qb_st - q.qa_st) + 0.5 * 0.1 * (ae - q.qa_ae) / (q.qb_ae - q.qa_ae)
    np.testing.assert_allclose(pred.maps, expected.squeeze(1).numpy(), rtol=1e-4, atol=1e-5)


def test_predict_is_deterministic_and_batch_independent(detector: Detector) -> None:
    batch = _images(4, seed=1)
    a, b = detector.predict(batch), detector.predict(batch)
    np.testing.assert_array_equal(a.scores, b.scores)
    single = detector.predict(batch[2:3])
    np.testing.assert_allclose(single.maps[0], a.maps[2], rtol=1e-4, atol=1e-5)


def test_submit_gives_what_predict_gives(detector: Detector) -> None:
    batch = _images(3, seed=2)
    pending = [detector.submit(batch), detector.submit(batch[:1])]
    first, second = (p.result() for p in pending)
    expected = detector.predict(batch)
    np.testing.assert_array_equal(first.scores, expected.scores)
    np.testing.assert_array_equal(first.maps, expected.maps)
    np.testing.assert_allclose(second.maps[0], expected.maps[0], rtol=1e-4, atol=1e-5)
    assert pending[0].result() is first  # waits once


def test_submit_takes_a_list_of_images_like_the_stacked_array(detector: Detector) -> None:
    # The worker hands batches over as lists of decoded images; other sizes are prepared first.
    batch = _images(3, seed=4)
    expected = detector.predict(batch)
    listed = detector.submit(list(batch)).result()
    np.testing.assert_array_equal(listed.maps, expected.maps)
    larger = [np.repeat(np.repeat(im, 2, axis=0), 2, axis=1) for im in batch]  # prepare() shrinks them back
    np.testing.assert_allclose(detector.submit(larger).result().maps, expected.maps, rtol=1e-4, atol=1e-5)


def test_an_empty_batch_gives_empty_results_in_every_form(detector: Detector) -> None:
    # An empty list reached np.stack([]) ("need at least one array to stack") before the empty check.
    h, w = detector.input_size
    for batch in ([], np.zeros((0, h, w, 3), np.uint8)):
        for prediction in (detector.predict(batch), detector.submit(batch).result()):
            assert prediction.scores.shape == (0,) and prediction.maps.shape == (0, h, w)


def test_list_input_and_original_map_size(detector: Detector) -> None:
    imgs = [np.zeros((90, 120), np.uint8), np.full((300, 200, 4), 128, np.uint8)]
    pred = detector.predict(imgs, map_size="original")
    assert [m.shape for m in pred.maps] == [(90, 120), (300, 200)]
    same = detector.predict(np.stack([detector.prepare(i) for i in imgs]))
    np.testing.assert_allclose(pred.scores, same.scores, rtol=1e-5)


def test_bf16_is_close_to_fp32(artifact: Path, detector: Detector) -> None:
    bf16 = Detector.load(artifact, device="cpu", precision="bf16", channels_last=True)
    batch = _images(2, seed=3)
    a, b = detector.predict(batch), bf16.predict(batch)
    spread = float(a.maps.max() - a.maps.min())
    assert np.abs(a.maps - b.maps).mean() < 0.05 * spread


def test_fp16_on_cpu_and_missing_cuda_are_clear_errors(artifact: Path) -> None:
    with pytest.raises(DetectorError, match="fp16 needs a CUDA"):
        Detector.load(artifact, device="cpu", precision="fp16")
    if not torch.cuda.is_available():
        with pytest.raises(DetectorError, match="no CUDA"):
            Detector.load(artifact, device="cuda")


def test_warmup_and_uncalibrated_model(detector: Detector) -> None:
    detector.warmup(batch_sizes=(1, 2))
    model = make_model("efficientad")
    model.calibrated.fill_(False)
    with pytest.raises(DetectorError, match="not calibrated"):
        Detector.from_model(model, detector.card)


def test_weights_that_do_not_fit_the_card_are_an_artifact_error(tmp_path: Path) -> None:
    from models.artifact import ArtifactError

    model = make_model("efficientad")
    card = make_card(make_model("space"))  # card says space (with FM), weights are efficientad
    path = save_artifact(tmp_path / "v1", card, model.state_dict())
    with pytest.raises(ArtifactError, match="do not fit"):
        Detector.load(path, device="cpu")


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_without_native_bf16_is_allowed_but_logged(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    # Emulated bf16 ran 4-8x slower than fp32 on an AVX2-only EPYC: an operator who sets it must hear so.
    monkeypatch.setattr(detector_module, "cpu_has_native_bf16", lambda: native)
    with structlog.testing.capture_logs() as logs:
        assert resolve_precision("bf16", torch.device("cpu")) is torch.bfloat16
    assert [e["event"] for e in logs] == ([] if native else ["bf16_emulated_on_cpu"])


@pytest.mark.parametrize(("serving", "warned"), [("fp32", False), ("bf16", True)])
def test_serving_at_another_precision_than_the_calibration_is_logged(
    artifact: Path, serving: str, warned: bool
) -> None:
    # The fixture's card was calibrated in fp32; bf16 scores move by a few % of the threshold.
    with structlog.testing.capture_logs() as logs:
        Detector.load(artifact, device="cpu", precision=serving)  # type: ignore[arg-type]
    found = [e for e in logs if e["event"] == "precision_differs_from_calibration"]
    assert bool(found) is warned
    if warned:
        assert (found[0]["precision"], found[0]["calibrated_precision"]) == ("bf16", "fp32")
        assert "space calibrate --precision bf16" in found[0]["hint"]


def test_recorded_training_precisions_map_to_setting_values() -> None:
    assert [precision_name(p) for p in ("fp32", "torch.bfloat16", "torch.float16")] == ["fp32", "bf16", "fp16"]


@pytest.mark.parametrize(
    ("setting", "calibrated", "device", "native_bf16", "chosen"),
    [
        ("auto", "bf16", "cpu", True, "bf16"),  # AVX-512 bf16 / AMX: serve where the threshold was chosen
        ("auto", "bf16", "cpu", False, "fp32"),  # AVX2: emulated bf16 is 4-8x slower, fp32 instead
        ("auto", "fp32", "cpu", True, "fp32"),  # an fp32 card never drops to bf16 on its own
        ("auto", "fp16", "cpu", True, "fp32"),  # no fp16 kernels on CPU
        ("fp32", "bf16", "cpu", True, "fp32"),  # an explicit setting always wins
        ("bf16", "fp32", "cpu", False, "bf16"),
    ],
)
def test_auto_precision_serves_at_the_cards_precision_where_the_device_runs_it(
    monkeypatch: pytest.MonkeyPatch, setting: str, calibrated: str, device: str, native_bf16: bool, chosen: str
) -> None:
    monkeypatch.setattr(detector_module, "cpu_has_native_bf16", lambda: native_bf16)
    assert choose_precision(setting, calibrated, torch.device(device)) == chosen


@pytest.mark.parametrize("native_bf16", [True, False])
def test_auto_load_of_a_bf16_card(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, native_bf16: bool) -> None:
    model = make_model("efficientad")
    card = make_card(model)
    card = card.model_copy(update={"training": card.training.model_copy(update={"precision": "torch.bfloat16"})})
    path = save_artifact(tmp_path / "v1", card, model.state_dict())
    monkeypatch.setattr(detector_module, "cpu_has_native_bf16", lambda: native_bf16)
    with structlog.testing.capture_logs() as logs:
        det = Detector.load(path, device="cpu")  # precision="auto" is the default
    assert det.precision == ("bf16" if native_bf16 else "fp32")
    assert (det.autocast is torch.bfloat16) is native_bf16
    assert next(e for e in logs if e["event"] == "detector_loaded")["precision"] == det.precision
    differs = [e for e in logs if e["event"] == "precision_differs_from_calibration"]
    assert bool(differs) is not native_bf16  # fp32 on a CPU without bf16: the card's threshold may move
    assert det.predict(_images(2)).scores.shape == (2,)


def test_precision_property_names_what_scores(artifact: Path, detector: Detector) -> None:
    assert detector.precision == "fp32"
    assert Detector.load(artifact, device="cpu", precision="bf16").precision == "bf16"


def test_concurrent_branches_are_a_no_op_on_cpu_and_refused_with_compile(artifact: Path, detector: Detector) -> None:
    det = Detector.load(artifact, device="cpu", precision="fp32", concurrent_branches=True)
    assert det.concurrent_branches is False  # side streams are CUDA streams; the CPU path is unchanged
    batch = _images(2, seed=5)
    np.testing.assert_array_equal(det.predict(batch).maps, detector.predict(batch).maps)
    with pytest.raises(DetectorError, match="SPACE_MODELS__CONCURRENT_BRANCHES=true runs side CUDA streams"):
        Detector.load(artifact, device="cpu", concurrent_branches=True, compile_mode="default")
