"""``ModelConfig.fe_align``: how the student brings the FE and its own trunk (the FM gate input) to its output grid.

The PDN's output conv (k4, no padding) makes output cell j from trunk cells j..j+3, so cell j sits on trunk
position j + 1.5 (padded or not). ``receptive_field`` takes the mean of trunk cells j+1 and j+2;
``align_corners`` (stored configs without the key) is the original bilinear ``align_corners=True`` resize,
bit for bit, which samples j·(g+2)/(g−1): exact at the centre, 1.5 cells off at the borders.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bench.geometry import centroid, uniform_pdn
from models.artifact import load_card
from models.detector import Detector
from models.model import LEGACY_FE_ALIGN, ModelConfig, SpaceModel, efficientad_config, migrate_stored_config
from models.networks import DEFAULT_FE_ALIGN, Student, pdn_out_size, to_output_grid
from models.train import TrainConfig
from tests.test_models.model_fixtures import SIZE, make_model, resume_with_config, save_card_with_config

CHOSEN_DEFAULT = "receptive_field"  # docs/model.md "FE alignment (`fe_align`)": chosen by the experiment there

# (output grid rows, cols): square and non-square; the trunk grid is 3 larger on each axis
GRIDS = [(8, 8), (24, 24), (8, 13), (21, 6)]


def _old_forward(student: Student, x: torch.Tensor, fe: torch.Tensor) -> torch.Tensor:
    """``Student.forward`` before the switch, verbatim."""
    trunk, out = student.pdn.forward_with_trunk(x)
    grid = out.shape[-2:]
    fe = F.interpolate(fe, size=grid, mode="bilinear", align_corners=True)
    if student.fm is not None:
        trunk = F.interpolate(trunk, size=grid, mode="bilinear", align_corners=True)
        return out + student.fm(fe, trunk)
    assert student.fe_proj is not None
    return out + student.fe_proj(fe)


def _student(fe_channels: int, use_fm: bool, fe_align: str, seed: int = 0) -> Student:
    torch.manual_seed(seed)
    student = Student("s", fe_channels=fe_channels, use_fm=use_fm, fm_dropout=0.0, fe_align=fe_align)  # type: ignore[arg-type]
    if student.fm is not None:
        with torch.no_grad():  # a non-zero FM output, so the FE and the gate reach the result
            student.fm.conv3.weight.normal_(0, 0.1)
    return student.eval()


def _sampled_position(align: str, grid: tuple[int, int], axis: int) -> torch.Tensor:
    """Per output cell along ``axis``: the centroid (in trunk positions) of the trunk impulses that reach it."""
    gh, gw = grid
    n = (gh, gw)[axis] + 3
    weight = torch.zeros(n, (gh, gw)[axis], dtype=torch.float64)
    for t in range(n):
        x = torch.zeros(1, 1, gh + 3, gw + 3, dtype=torch.float64)
        if axis == 0:
            x[..., t, :] = 1.0
            weight[t] = to_output_grid(x, grid, align)[0, 0, :, 0]  # type: ignore[arg-type]
        else:
            x[..., :, t] = 1.0
            weight[t] = to_output_grid(x, grid, align)[0, 0, 0, :]  # type: ignore[arg-type]
    assert torch.allclose(weight.sum(0), torch.ones(weight.shape[1], dtype=torch.float64))  # a partition of unity
    return (weight * torch.arange(n, dtype=torch.float64)[:, None]).sum(0)


def test_new_models_get_the_chosen_default() -> None:
    assert DEFAULT_FE_ALIGN == CHOSEN_DEFAULT
    assert ModelConfig().fe_align == CHOSEN_DEFAULT
    assert SpaceModel(ModelConfig(input_size=(SIZE, SIZE))).student.fe_align == CHOSEN_DEFAULT
    assert Student("s", fe_channels=8).fe_align == CHOSEN_DEFAULT
    assert efficientad_config().fe_align == CHOSEN_DEFAULT
    train_cfg = TrainConfig(data=Path("/data"), product_line="brick", out=Path("/out"))
    for kind in ("filterbank", "pdn"):
        cfg = train_cfg.model_config_for_run(kind)  # type: ignore[arg-type]
        assert cfg.fe_align == CHOSEN_DEFAULT and cfg.variant == "space" and cfg.use_fe and cfg.use_fm
    assert LEGACY_FE_ALIGN == "align_corners"


@pytest.mark.parametrize("grid", GRIDS)
def test_an_impulse_in_trunk_cells_j_plus_1_and_2_lands_in_output_cell_j(grid: tuple[int, int]) -> None:
    """receptive_field: output cell j reads trunk cells j+1 and j+2 only, ½ each, so it sits on j + 1.5 at every
    cell, the borders included; align_corners reads j·(g+2)/(g−1), 1.5 cells off at the borders."""
    for axis in (0, 1):
        g = grid[axis]
        j = torch.arange(g, dtype=torch.float64)
        torch.testing.assert_close(_sampled_position("receptive_field", grid, axis), j + 1.5, rtol=0, atol=1e-12)
        legacy = _sampled_position("align_corners", grid, axis)
        torch.testing.assert_close(legacy, j * (g + 2) / (g - 1), rtol=0, atol=1e-9)
        assert float((legacy - (j + 1.5)).abs().max()) == pytest.approx(1.5)
    gh, gw = grid
    for t in range(1, gh + 1):  # one trunk cell: exactly the two output cells j = t-2, t-1 see it, with weight ½
        x = torch.zeros(1, 1, gh + 3, gw + 3)
        x[..., t, 5 % (gw + 3)] = 1.0
        col = to_output_grid(x, grid, "receptive_field")[0, 0].sum(1)
        expected = torch.zeros(gh)
        expected[[j for j in (t - 2, t - 1) if 0 <= j < gh]] = 0.5
        assert torch.equal(col, expected), t


@pytest.mark.parametrize("size", ["s", "m"])
@pytest.mark.parametrize("padding", [False, True])
def test_the_aligned_fe_cell_sees_the_pixels_its_output_cell_sees(size: str, padding: bool) -> None:
    """From the network layers: with uniform positive weights (a symmetric field, as in bench/geometry.py) the input
    gradient of the aligned trunk cell j is centred where output cell j's is: 4j + 16 unpadded, every cell; with
    ``padding`` the zero padding cuts the border cells' fields differently, so exact inside and closer than
    align_corners at the border. align_corners is 6 px (1.5 cells) off at the unpadded border."""
    px = 96
    net = uniform_pdn(size, padding)  # type: ignore[arg-type]
    g = pdn_out_size(px, padding)

    def centre(which: str, j: int) -> float:
        x = torch.full((1, 3, px, px), 0.5, requires_grad=True)
        trunk, out = net.forward_with_trunk(x)
        v = out if which == "out" else to_output_grid(trunk, (g, g), which)  # type: ignore[arg-type]
        v[0, 0, j, j].backward()
        assert x.grad is not None
        return centroid(x.grad.abs().sum(1)[0])[0]

    for j in (0, 1, g // 2, g - 1):
        out, aligned, legacy = centre("out", j), centre("receptive_field", j), centre("align_corners", j)
        if not padding:
            assert out == pytest.approx(4 * j + 16, abs=1e-4)
            assert aligned == pytest.approx(out, abs=1e-4), j
            if j in (0, g - 1):  # the edge cells read trunk 0 / g+2 instead of 1.5 / g+0.5: 6 px towards the border
                assert legacy == pytest.approx(out + (6 if j else -6), abs=1e-4)
        elif j == g // 2:
            assert aligned == pytest.approx(out, abs=1e-4) and out == pytest.approx(4 * j, abs=1e-4)
        else:
            assert abs(aligned - out) < abs(legacy - out), j


@pytest.mark.parametrize("teacher_kind", ["pdn", "filterbank"])
@pytest.mark.parametrize("padding", [False, True])
def test_the_fm_receives_the_aligned_fe_and_gate_input(teacher_kind: str, padding: bool) -> None:
    """The code path itself: the PDN teacher's trunk is averaged onto the output grid, the filter bank's (already on
    it) is passed as it is; the gate input is the student's own trunk averaged the same way."""
    torch.manual_seed(0)
    cfg = ModelConfig(input_size=(SIZE, 96), teacher_kind=teacher_kind, padding=padding, fe_align="receptive_field")  # type: ignore[arg-type]
    model = SpaceModel(cfg).eval()
    assert model.student.fm is not None
    seen: dict[str, torch.Tensor] = {}

    def grab(_m: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        seen["fe"], seen["gate"] = args

    hook = model.student.fm.register_forward_pre_hook(grab)
    x = torch.rand(2, 3, SIZE, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        xn = model.normalize(x)
        trunk, _ = model.teacher_features(xn)
        model.student_features(xn, trunk)
        student_trunk = model.student.pdn.forward_with_trunk(xn)[0]
    hook.remove()
    gh, gw = model.grid
    if teacher_kind == "pdn":
        assert trunk.shape[-2:] == (gh + 3, gw + 3)
        assert torch.equal(seen["fe"], F.avg_pool2d(trunk, 2, stride=1)[..., 1:-1, 1:-1])
    else:
        assert trunk.shape[-2:] == (gh, gw)
        assert torch.equal(seen["fe"], trunk)
    assert torch.equal(seen["gate"], F.avg_pool2d(student_trunk, 2, stride=1)[..., 1:-1, 1:-1])


@pytest.mark.parametrize(("fe_channels", "use_fm"), [(256, True), (132, True), (16, False)])
@pytest.mark.parametrize("fe_grid", ["trunk", "output"])  # PDN teacher (g+3) or filter bank (g)
def test_align_corners_is_bit_identical_to_the_old_forward(fe_channels: int, use_fm: bool, fe_grid: str) -> None:
    student = _student(fe_channels, use_fm, "align_corners")
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    g = (pdn_out_size(64), pdn_out_size(96))
    shape = (g[0] + 3, g[1] + 3) if fe_grid == "trunk" else g
    fe = torch.randn(2, fe_channels, *shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(student(x, fe), _old_forward(student, x, fe))
    fe6 = torch.randn(2, fe_channels, 6, 6)  # any FE size, as before
    with torch.no_grad():
        assert torch.equal(student(x, fe6), _old_forward(student, x, fe6))


def test_the_modes_differ_only_in_the_resize() -> None:
    """Same parameters (the artifact layout is the same in both modes), different outputs once the FM is non-zero."""
    legacy, aligned = _student(256, True, "align_corners"), _student(256, True, "receptive_field")
    assert legacy.state_dict().keys() == aligned.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(legacy.state_dict().values(), aligned.state_dict().values()))
    x, fe = torch.randn(1, 3, 64, 64), torch.randn(1, 256, 11, 11)
    with torch.no_grad():
        assert not torch.allclose(legacy(x, fe), aligned(x, fe))
        fresh = Student("s", fe_channels=256, fe_align="receptive_field").eval()
        assert torch.equal(fresh(x, fe), fresh.pdn(x))  # a fresh SPACE student is still EfficientAD


def test_receptive_field_refuses_an_fe_on_neither_grid() -> None:
    student = _student(16, False, "receptive_field")
    with pytest.raises(ValueError, match="receptive_field"):
        student(torch.zeros(1, 3, 64, 64), torch.zeros(1, 16, 6, 6))
    with pytest.raises(ValueError, match="fe_align"):
        Student("s", fe_channels=16, fe_align="nearest")  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_stays_low_precision(dtype: torch.dtype) -> None:
    x = torch.randn(2, 5, 11, 14)
    out = to_output_grid(x.to(dtype), (8, 11), "receptive_field")
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), to_output_grid(x, (8, 11), "receptive_field"), rtol=0.01, atol=0.01)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert to_output_grid(x.to(dtype), (8, 11), "receptive_field").dtype == dtype
        assert to_output_grid(x, (8, 11), "receptive_field").dtype == torch.float32
    student = _student(256, True, "receptive_field").to(torch.bfloat16)
    with torch.no_grad():
        out = student(
            torch.randn(1, 3, 64, 64, dtype=torch.bfloat16), torch.randn(1, 256, 11, 11, dtype=torch.bfloat16)
        )
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("fe_shape", [(11, 11), (8, 8)])
def test_the_student_traces_as_one_graph(fe_shape: tuple[int, int]) -> None:
    """CUDA graphs and torch.compile need one static graph: dynamo must trace it without a break."""
    student = _student(32, True, "receptive_field")
    x, fe = torch.randn(1, 3, 64, 64), torch.randn(1, 32, *fe_shape)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(student, backend="eager", fullgraph=True, dynamic=False)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, fe), student(x, fe), rtol=0, atol=1e-6)
    finally:
        torch._dynamo.reset()


def _saved_artifact(tmp_path: Path, edit: dict[str, object] | None = None, drop: bool = False) -> Path:
    model = make_model("space", fe_align="receptive_field")
    return save_card_with_config(model, tmp_path / "v1", "fe_align", drop=drop, edit=edit)


def test_an_artifact_without_the_key_loads_as_align_corners(tmp_path: Path) -> None:
    path = _saved_artifact(tmp_path, drop=True)
    assert load_card(path).config.fe_align == "align_corners"
    det = Detector.load(path, device="cpu", precision="fp32")
    assert det.model.config.fe_align == "align_corners" and det.model.student.fe_align == "align_corners"


@pytest.mark.parametrize("align", ["receptive_field", "align_corners"])
def test_an_artifact_with_the_key_keeps_it(tmp_path: Path, align: str) -> None:
    path = _saved_artifact(tmp_path, edit={"fe_align": align})
    assert load_card(path).config.fe_align == align
    assert Detector.load(path, device="cpu", precision="fp32").model.student.fe_align == align


def test_migration_only_fills_missing_keys_and_refuses_unknown_values() -> None:
    stored = {"variant": "space", "map_align": "receptive_field"}
    assert migrate_stored_config(stored) == {**stored, "fe_align": "align_corners"}
    assert "fe_align" not in stored  # the caller's dict is not changed
    kept = {"map_align": "padded", "fe_align": "receptive_field"}
    assert migrate_stored_config(kept) == kept
    assert ModelConfig.from_stored({}).fe_align == "align_corners"
    with pytest.raises(ValueError, match="fe_align"):
        ModelConfig.from_stored({"fe_align": "centre"})


@pytest.mark.parametrize(("stored", "expected"), [(None, "align_corners"), ("receptive_field", "receptive_field")])
def test_a_resumed_checkpoint_keeps_the_resize_it_started_with(stored: str | None, expected: str) -> None:
    rebuilt = resume_with_config(make_model("space"), "fe_align", stored)
    assert rebuilt.config.fe_align == expected and rebuilt.student.fe_align == expected
