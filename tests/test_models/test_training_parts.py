"""Small parts of training: progress line, checkpoints, penalty images, validation split."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from models.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from models.data import DatasetIndex
from models.penalty import PenaltySource
from models.progress import ProgressLine, format_duration
from models.train import _cuda_rng_states, _Data, _restore_rng, _same_split, holdout_size, split_validation


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
    assert ck.cuda_rng == []  # a CPU run stores no CUDA generator state
    assert load_checkpoint(tmp_path / "none", "run-a") is None


def test_checkpoint_keeps_the_cuda_rng_state_of_every_device(tmp_path: Path) -> None:
    # torch.cuda.get_rng_state_all() gives one uint8 state per device; here made up, so it runs on CPU.
    states = [torch.randint(0, 256, (16,), dtype=torch.uint8) for _ in range(11)]
    param = torch.nn.Parameter(torch.randn(2))
    opt = torch.optim.Adam([param])
    save_checkpoint(tmp_path, "run", {"w": param.detach()}, opt.state_dict(), torch.get_rng_state(), {"step": 1},
                    cuda_rng=states)  # fmt: skip
    assert not list(tmp_path.glob("*.pkl")) and not list(tmp_path.glob("*.pt"))
    ck = load_checkpoint(tmp_path, "run")
    assert ck is not None and len(ck.cuda_rng) == 11  # device 10 sorts after device 1 by number, not by name
    for saved, loaded in zip(states, ck.cuda_rng, strict=True):
        assert loaded.dtype == torch.uint8 and torch.equal(saved, loaded)
    assert torch.equal(ck.torch_rng, torch.get_rng_state())
    assert _cuda_rng_states(torch.device("cpu")) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_resume_restores_the_cuda_generator_dropout_draws_from(tmp_path: Path) -> None:  # pragma: no cover
    cuda = torch.device("cuda")
    torch.manual_seed(3)
    torch.rand(5, device=cuda)  # move the CUDA generator off its seed
    save_checkpoint(tmp_path, "run", {}, {"state": {}, "param_groups": []}, torch.get_rng_state(), {"step": 1},
                    cuda_rng=_cuda_rng_states(cuda))  # fmt: skip
    x = torch.ones(4096, device=cuda)
    straight = torch.nn.functional.dropout(x, 0.1, training=True)
    torch.manual_seed(99)  # a new process would start from another state
    ck = load_checkpoint(tmp_path, "run")
    assert ck is not None and len(ck.cuda_rng) == torch.cuda.device_count()
    _restore_rng(ck, cuda)
    assert torch.equal(torch.nn.functional.dropout(x, 0.1, training=True), straight)


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


def test_validation_holdout_is_seeded(tmp_path: Path) -> None:
    files = [tmp_path / f"{i:03d}.png" for i in range(25)]
    index = DatasetIndex(root=tmp_path, train_good=files)
    train_a, val_a, source = split_validation(index, seed=3)
    _, val_b, _ = split_validation(index, seed=3)
    assert source == "train_holdout" and val_a == val_b and len(val_a) == 5 and len(train_a) == 20
    assert not set(val_a) & set(train_a) and sorted(val_a + train_a) == files
    _, val_c, _ = split_validation(index, seed=4)
    assert val_c != val_a
    with_val = DatasetIndex(root=tmp_path, train_good=files, validation_good=files[:2])
    assert split_validation(with_val, seed=0) == (files, files[:2], "validation_good")


def test_holdout_is_ten_percent_but_at_least_five_while_a_quarter_allows() -> None:
    sizes = {n: holdout_size(n) for n in (2, 3, 7, 8, 12, 14, 19, 20, 49, 50, 64, 100)}
    assert sizes == {2: 1, 3: 1, 7: 1, 8: 2, 12: 3, 14: 3, 19: 4, 20: 5, 49: 5, 50: 5, 64: 6, 100: 10}


def test_a_smaller_holdout_of_the_same_seed_is_a_prefix_of_the_permutation(tmp_path: Path) -> None:
    # Models trained when the hold-out was round(10 %) are rebuilt by space calibrate from their card's
    # n_validation: the same permutation, fewer images taken from its start.
    index = DatasetIndex(root=tmp_path, train_good=[tmp_path / f"{i:03d}.png" for i in range(14)])
    _, old, _ = split_validation(index, seed=7, n_holdout=1)
    _, new, _ = split_validation(index, seed=7)
    assert len(old) == 1 and len(new) == 3 and set(old) < set(new)
    with pytest.raises(ValueError, match="cannot hold out 14"):
        split_validation(index, seed=7, n_holdout=14)


def test_a_checkpoint_written_with_another_holdout_is_not_resumed(tmp_path: Path) -> None:
    images = np.zeros((12, 2, 2, 3), np.uint8)
    data = _Data(images[:9], images[9:], "train_holdout", "hash")  # 12 images, 3 held out

    def ck(**meta: object) -> Checkpoint:
        return Checkpoint({}, {}, torch.get_rng_state(), {"step": 1, **meta})

    assert _same_split(ck(n_validation=3), data, tmp_path) is not None
    assert _same_split(ck(n_validation=1), data, tmp_path) is None
    assert _same_split(ck(), data, tmp_path) is None  # before n_validation was stored: 10 % of 12 = 1
    assert _same_split(ck(), _Data(images[:6], images[6:], "validation_good", "hash"), tmp_path) is not None
