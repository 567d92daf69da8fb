"""Training end to end: a short run on a synthetic texture line reaches image AUROC >= 0.9; CLI; resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from structlog.testing import capture_logs

from models import data as dataset
from models.artifact import load_artifact
from models.detector import Detector
from models.metrics import image_auroc
from models.normalization import default_threshold, score_stats, small_sample_margin
from models.synthetic import build_product_line
from models.train import TrainConfig, train
from worker.cli import main as cli_main

LINE = "brick"


@pytest.fixture(scope="module")
def line_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_product_line(
        LINE, tmp_path_factory.mktemp("synth"), n_train=12, n_val=4, n_test_good=8, n_test_defect=8, size=128, seed=0
    )


def _cfg(line_dir: Path, out: Path, **kw: object) -> TrainConfig:
    base = {"data": line_dir, "product_line": LINE, "out": out, "input_size": 128, "penalty": "procedural"}
    return TrainConfig.model_validate(base | kw)


def test_short_training_detects_drawn_defects(line_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    with capture_logs() as logs:
        out = train(_cfg(line_dir, tmp_path, variant="space", steps=8, model_version="v1"))
    few = [e for e in logs if e["event"] == "few_validation_images"]
    assert len(few) == 1 and few[0]["log_level"] == "warning" and few[0]["n_validation"] == 4
    assert out == tmp_path / LINE / "v1"
    det = Detector.load(out, device="cpu", precision="bf16")
    index = dataset.scan_dataset(line_dir)
    labels = np.array([s.defect_type != "good" for s in index.test])
    scores = det.predict([dataset.load_image(s.path) for s in index.test]).scores
    assert image_auroc(labels, scores) >= 0.9
    card = det.card
    assert card.training.steps == 8 and card.training.n_validation == 4
    assert card.training.validation_source == "validation_good"
    assert len(card.training.data_sha256) == 64
    assert card.default_threshold == pytest.approx(default_threshold(card.validation_scores))
    assert card.default_threshold >= card.validation_scores.max + small_sample_margin(4)
    assert card.quantiles.qb_st > card.quantiles.qa_st
    assert not (tmp_path / LINE / ".checkpoint").exists()


def test_cli_trains_efficientad_with_holdout_validation(line_dir: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    (data / "train" / "good").symlink_to(line_dir / "train" / "good")
    rc = cli_main(
        [
            "train",
            "--data",
            str(data),
            "--product-line",
            "p1",
            "--out",
            str(tmp_path / "models"),
            "--variant",
            "efficientad",
            "--steps",
            "2",
            "--input-size",
            "128",
            "--penalty",
            "none",
            "--model-version",
            "v7",
            "--no-progress",
        ]
    )
    assert rc == 0
    out = Path(capsys.readouterr().out.strip().splitlines()[-1])  # logs may precede it
    card, state = load_artifact(out)
    assert card.variant == "efficientad" and not card.config.use_scl and not card.config.use_fe
    assert card.training.validation_source == "train_holdout" and card.training.n_validation == 3
    assert card.training.n_train == 9  # 12 images: 3 held out (10 % would be 1)
    assert not any(k.startswith("student.fm") for k in state)
    # space calibrate without validation/good scores the 3 held-out images, not the 9 the model trained on
    assert cli_main(["calibrate", "--model", str(out), "--data", str(data), "--json", "--precision", "fp32"]) == 0
    printed = capsys.readouterr().out
    result = json.loads(printed[printed.index("{\n") :])
    assert result["normal_source"] == "train_holdout" and result["n_normal"] == 3
    assert not any("has seen" in w for w in result["warnings"])


def test_cli_operator_errors_are_one_line(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty" / "train" / "good").mkdir(parents=True)
    rc = cli_main(["train", "--data", str(tmp_path / "empty"), "--product-line", "x", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc != 0 and err.startswith("space: error:") and err.count("\n") == 1
    rc = cli_main(
        ["train", "--data", str(tmp_path), "--product-line", "x", "--out", str(tmp_path), "--input-size", "100"]
    )
    assert rc != 0 and "input_size" in capsys.readouterr().err


def test_resume_after_interruption_gives_identical_weights(
    line_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kw = {
        "variant": "space",
        "steps": 2,
        "checkpoint_every": 1,
        "model_version": "v1",
        "penalty": "none",
        "input_size": 64,
    }
    straight = train(_cfg(line_dir, tmp_path / "a", **kw))

    import models.train as train_mod

    real_save = train_mod.save_checkpoint
    calls = {"n": 0}

    def crash_after_first(*args: object, **kwargs: object) -> None:
        real_save(*args, **kwargs)
        calls["n"] += 1
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "save_checkpoint", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(line_dir, tmp_path / "b", **kw))
    (saved,) = (tmp_path / "b" / LINE / ".checkpoint").glob("*/checkpoint.safetensors")  # one folder per run
    with safe_open(str(saved), framework="pt") as file:
        state = json.loads(file.metadata()["space.checkpoint"])
    assert state["step"] == 1 and calls["n"] == 1
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    resumed = train(_cfg(line_dir, tmp_path / "b", **kw))
    _, a = load_artifact(straight)
    _, b = load_artifact(resumed)
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_another_run_of_the_line_neither_takes_nor_deletes_an_interrupted_runs_checkpoint(
    line_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # All runs of a line shared .checkpoint/: a second run (other steps or seed) overwrote the first's
    # checkpoint and deleted it when done, so the first started over from step 0.
    import models.train as train_mod

    kw = {"variant": "space", "checkpoint_every": 1, "penalty": "none", "input_size": 64}
    real_save = train_mod.save_checkpoint

    def crash_after_first(*args: object, **kwargs: object) -> None:
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "save_checkpoint", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(line_dir, tmp_path, steps=3, model_version="a", **kw))
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    first = list((tmp_path / LINE / ".checkpoint").glob("*/checkpoint.safetensors"))
    assert len(first) == 1
    train(_cfg(line_dir, tmp_path, steps=2, seed=1, model_version="b", **kw))
    assert first[0].is_file()  # the other run left it alone
    with capture_logs() as logs:
        train(_cfg(line_dir, tmp_path, steps=3, model_version="a", **kw))
    started = [e for e in logs if e["event"] == "train_started"]
    assert started and started[0]["start_step"] == 1  # resumed, not started over
    assert not (tmp_path / LINE / ".checkpoint").exists()  # both runs done: nothing left


def test_default_threshold_is_q99_plus_a_quarter_of_the_spread_with_50_or_more_images() -> None:
    scores = np.random.default_rng(0).normal(0.12, 0.05, 60)
    stats = score_stats(scores)
    thr = default_threshold(stats)
    assert thr > stats.max
    assert thr == pytest.approx(stats.q99 + 0.25 * (stats.q99 - stats.q50))


def test_default_threshold_with_few_images_keeps_a_margin_above_their_maximum() -> None:
    one = score_stats(np.array([0.2]))
    assert default_threshold(one) == pytest.approx(0.2 + 0.05 * np.log(50))  # q99 = q50 = max: no spread
    four = score_stats(np.array([0.1, 0.12, 0.11, 0.3], dtype=np.float32))
    assert default_threshold(four) == pytest.approx(0.3 + 0.05 * np.log(50 / 4))
    margins = [small_sample_margin(n) for n in (1, 2, 5, 10, 20, 49, 50, 500)]
    assert margins == sorted(margins, reverse=True) and margins[-2:] == [0.0, 0.0] and margins[-3] < 2e-3


def test_default_threshold_flags_few_new_normals_whatever_the_validation_count() -> None:
    # Normal image scores of a trained model spread like a Gumbel law of scale 0.04-0.05 (normalised map
    # unit; docs/model.md). Before the floor, one validation image flagged half of the new normals.
    rng = np.random.default_rng(0)
    normals = rng.gumbel(0.15, 0.05, 20_000)
    for n in (1, 2, 5, 10):
        fpr = np.mean([(normals >= default_threshold(score_stats(rng.choice(normals, n)))).mean() for _ in range(300)])
        assert fpr <= 0.03, (n, fpr)


@pytest.mark.parametrize("source", ["imported", "distilled", "offline:random-pdn"])
def test_training_with_each_teacher_source(source: str, line_dir: Path, tmp_path: Path) -> None:
    from tests.test_models.test_teacher import _nelson_sequential

    if source == "imported":
        teacher = tmp_path / "teacher_small.pth"
        torch.save(_nelson_sequential("s").state_dict(), teacher)
        spec = str(teacher)
    elif source == "distilled":
        spec = "distill:tests.test_models.test_teacher:tiny_backbone"
    else:
        spec = "random-pdn"
    out = train(
        _cfg(
            line_dir,
            tmp_path,
            variant="space",
            steps=1,
            input_size=64,
            penalty="none",
            teacher=spec,
            distill_steps=1,
            model_version="v1",
        )
    )
    card, state = load_artifact(out)
    assert card.teacher.source == source
    assert card.config.teacher_kind == "pdn"
    assert state["teacher.conv1.weight"].shape == (128, 3, 4, 4)
    if source == "imported":
        assert card.teacher.detail.startswith("teacher_small.pth sha256=")
        assert torch.equal(state["teacher.conv4.weight"], torch.load(teacher, weights_only=True)["8.weight"])
