"""Smoke test per variant: shapes, no NaN, gradients on every student/AE parameter, deterministic eval."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.model import SpaceModel, normalize_map
from models.networks import pdn_out_size
from models.train import training_losses
from tests.test_models.model_fixtures import SIZE, make_model

VARIANTS = {
    "space": {},
    "space-no-fm": {"use_fm": False},
    "space-no-scl": {"use_scl": False},
    "efficientad": None,
}


def _build(name: str) -> SpaceModel:
    kw = VARIANTS[name]
    return make_model("efficientad") if kw is None else make_model("space", **kw)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_trains_and_evaluates(name: str) -> None:
    torch.manual_seed(0)
    model = _build(name).train()
    params = dict(model.student.named_parameters()) | {f"ae.{k}": v for k, v in model.ae.named_parameters()}
    opt = torch.optim.Adam(params.values(), lr=1e-3)
    x = torch.rand(1, 3, SIZE, SIZE)
    pen = torch.rand(1, 3, SIZE, SIZE)
    rng = np.random.default_rng(0)
    lam = 1.0 if model.config.use_scl else 0.0
    # With an FM, a second pass is needed: the zero-initialised last FM conv blocks gradients until it moves.
    for _ in range(2 if model.student.fm is not None else 1):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = training_losses(model, x, pen, rng, lam)
        assert set(losses) >= {"hard", "ae", "stae", "pen", "total"}
        assert ("scl" in losses) == (lam > 0)
        assert all(torch.isfinite(v) for v in losses.values())
        opt.zero_grad()
        losses["total"].backward()
        opt.step()
    missing = [k for k, p in params.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    assert all(p.grad is None for p in model.teacher.parameters())

    model.eval()
    with torch.inference_mode():
        m1 = model.anomaly_map(x)
        m2 = model.anomaly_map(x)
    assert m1.shape == (1, SIZE, SIZE)
    assert torch.isfinite(m1).all()
    assert torch.equal(m1, m2)


def test_quantile_normalisation_maps_qa_to_0_and_qb_to_01() -> None:
    m = torch.tensor([1.0, 3.0, 5.0])
    out = normalize_map(m, torch.tensor(1.0), torch.tensor(3.0))
    torch.testing.assert_close(out, torch.tensor([0.0, 0.1, 0.2]))


def test_anomaly_map_is_half_half_of_normalised_branches() -> None:
    model = make_model("efficientad")
    x = torch.rand(1, 3, SIZE, SIZE)
    with torch.inference_mode():
        st, ae = model.branch_maps(x)
        combined = model.anomaly_map(x)
    q = model.quantiles
    expected = 0.05 * (st - q[0]) / (q[1] - q[0]) + 0.05 * (ae - q[2]) / (q[3] - q[2])
    torch.testing.assert_close(combined, expected.squeeze(1))
    # pad-by-4 then resize: the border of the map comes from the zero padding, i.e. raw value 0
    raw = model.raw_maps(x)
    assert raw.st.shape[-1] == pdn_out_size(SIZE) and model.upsample(raw.st).shape[-1] == SIZE


def test_teacher_stays_in_eval_mode() -> None:
    model = make_model("space").train()
    assert not model.teacher.training and model.student.training


class _RecordingBranches:
    """Runs each branch inline and records what started where and when the join came."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []

    def start(self, index: int, fn):  # type: ignore[no-untyped-def]
        self.events.append(("start", index))
        return fn()

    def join(self) -> None:
        self.events.append(("join", -1))


@pytest.mark.parametrize(
    ("variant", "lanes"),
    [
        ("efficientad", [("start", 0), ("start", 1), ("join", -1)]),  # AE and teacher beside the student
        ("space", [("start", 0), ("join", -1)]),  # the student reads the teacher's trunk (FE): only the AE
    ],
)
def test_branches_run_the_independent_networks_aside_and_give_the_same_map(
    variant: str, lanes: list[tuple[str, int]]
) -> None:
    model = make_model(variant)
    x = torch.rand(2, 3, SIZE, SIZE)
    branches = _RecordingBranches()
    with torch.inference_mode():
        serial = model.anomaly_map(x)
        aside = model.anomaly_map(x, branches=branches)
    assert branches.events == lanes
    torch.testing.assert_close(aside, serial, rtol=0, atol=0)
