"""Small parts of training: progress line, checkpoints, penalty images, validation split."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from models.checkpoint import load_checkpoint, save_checkpoint
from models.data import DatasetIndex
from models.penalty import PenaltySource
from models.progress import ProgressLine, format_duration
from models.train import _split_validation


def test_format_duration() -> None:
    assert format_duration(5) == "5s"
    assert format_duration(65) == "1m05s"
    assert format_duration(3725) == "1h02m05s"


def test_progress_line_off_a_terminal_prints_the_start_and_every_five_percent() -> None:
    out = io.StringIO()
    bar = ProgressLine(100, stream=out)
    for step in range(1, 101):
        bar.update(step, loss=1.0 / step)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 21  # the first step, then one line per 5 %
    assert lines[0].startswith("train 1/100")
    assert lines[-1].startswith("train 100/100 100% loss 0.0100")
    assert "it/s ETA" in lines[0]
    silent = io.StringIO()
    ProgressLine(10, enabled=False, stream=silent).update(5, 1.0)
    assert silent.getvalue() == ""


def test_checkpoint_round_trip_and_fingerprint_guard(tmp_path: Path) -> None:
    param = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.Adam([param], lr=0.1)
    param.grad = torch.ones_like(param)
    opt.step()
    rng = np.random.default_rng(5)
    meta = {"step": 7, "np_rng": rng.bit_generator.state}
    save_checkpoint(tmp_path, "run-a", {"w": param.detach()}, opt.state_dict(), torch.get_rng_state(), meta)
    assert load_checkpoint(tmp_path, "run-b") is None
    ck = load_checkpoint(tmp_path, "run-a")
    assert ck is not None and ck.meta["step"] == 7
    assert torch.equal(ck.model_state["w"], param.detach())
    assert torch.equal(ck.optimizer_state["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    restored = np.random.default_rng(0)
    restored.bit_generator.state = ck.meta["np_rng"]
    assert restored.random() == rng.random()
    assert load_checkpoint(tmp_path / "none", "run-a") is None


def test_penalty_source_modes(tmp_path: Path) -> None:
    auto = PenaltySource((64, 64), "auto")
    a = auto.sample(np.random.default_rng(0), 3)
    b = auto.sample(np.random.default_rng(0), 3)
    assert a.shape == (3, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert auto.enabled and "procedural" in auto.description
    assert not PenaltySource((64, 64), "none").enabled
    cv2.imwrite(str(tmp_path / "x.png"), np.full((30, 40, 3), 200, np.uint8))
    folder = PenaltySource((64, 64), str(tmp_path))
    assert len(folder.photos) == 1
    with pytest.raises(ValueError, match="no readable image"):
        PenaltySource((64, 64), str(tmp_path / "empty"))


def test_validation_holdout_is_seeded_ten_percent(tmp_path: Path) -> None:
    files = [tmp_path / f"{i:03d}.png" for i in range(25)]
    index = DatasetIndex(root=tmp_path, train_good=files)
    train_a, val_a, source = _split_validation(index, seed=3)
    _, val_b, _ = _split_validation(index, seed=3)
    assert source == "train_holdout" and val_a == val_b and len(val_a) == 2 and len(train_a) == 23
    assert not set(val_a) & set(train_a)
    _, val_c, _ = _split_validation(index, seed=4)
    assert val_c != val_a
    with_val = DatasetIndex(root=tmp_path, train_good=files, validation_good=files[:2])
    assert _split_validation(with_val, seed=0) == (files, files[:2], "validation_good")
