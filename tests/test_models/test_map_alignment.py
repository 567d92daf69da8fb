"""``ModelConfig.map_align``: where ``SpaceModel.upsample`` puts the feature grid on the image.

``receptive_field`` (new models) puts grid cell q on its receptive-field centre, pixel 4q + c (c = 16
unpadded, 0 padded), and replicates the edge cells outside the grid; ``padded`` (artifacts and checkpoints
written before the switch) is the original pad-by-4 + ``align_corners=False`` resize, bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bench.geometry import receptive_field_centre
from models.artifact import CARD_FILE, ArtifactError, ModelCard, load_card
from models.detector import Detector
from models.model import ModelConfig, SpaceModel, efficientad_config, migrate_stored_config
from models.networks import PDN_STRIDE, pdn_rf_centre
from models.train import TrainConfig
from tests.test_models.model_fixtures import SIZE, make_model, resume_with_config, save_card_with_config

MAP_TENSORS = {"map_rows", "map_row_weight", "map_cols", "map_col_weight"}

# (input size, padding): square and non-square, unpadded (c = 16) and padded (c = 0) PDN grids
GEOMETRIES = [((64, 64), False), ((128, 64), False), ((64, 96), False), ((64, 64), True), ((96, 64), True)]


def _model(input_size: tuple[int, int], padding: bool, align: str = "receptive_field") -> SpaceModel:
    cfg = efficientad_config(input_size=input_size, padding=padding, map_align=align)
    return SpaceModel(cfg).eval()


def _random_grid(model: SpaceModel, seed: int = 0, n: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, *model.grid, generator=g)


def _triangle(size: int, peak: int) -> torch.Tensor:
    """Bilinear footprint of one cell with a 4 px stride: 1 at ``peak``, 0.75, 0.5, 0.25 beside it."""
    i = torch.arange(size, dtype=torch.float32)
    return (1 - (i - peak).abs() / PDN_STRIDE).clamp_min(0)


def test_new_models_default_to_receptive_field_and_cells_sit_on_their_centres() -> None:
    assert ModelConfig().map_align == "receptive_field"
    assert efficientad_config().map_align == "receptive_field"
    train_cfg = TrainConfig(data=Path("/data"), product_line="brick", out=Path("/out"))
    assert train_cfg.model_config_for_run("filterbank").map_align == "receptive_field"
    assert train_cfg.model_copy(update={"variant": "efficientad"}).model_config_for_run("pdn").map_align == (
        "receptive_field"
    )
    assert (pdn_rf_centre(False), pdn_rf_centre(True)) == (16, 0)


@pytest.mark.parametrize(("input_size", "padding"), GEOMETRIES)
def test_an_impulse_in_cell_q_peaks_at_pixel_4q_plus_centre(input_size: tuple[int, int], padding: bool) -> None:
    """Rows and columns separately: the upsampled impulse is exactly the triangle centred on 4q + c."""
    model = _model(input_size, padding)
    h, w = input_size
    gh, gw = model.grid
    c = 0 if padding else 16
    for q, p in ((1, gw - 2), (gh // 2, gw // 2), (gh - 2, 1)):  # interior cells: no edge replication involved
        cell = torch.zeros(1, 1, gh, gw)
        cell[..., q, p] = 1.0
        out = model.upsample(cell)[0, 0]
        assert out.shape == (h, w)
        expected = torch.outer(_triangle(h, PDN_STRIDE * q + c), _triangle(w, PDN_STRIDE * p + c))
        assert torch.equal(out, expected), (q, p)
        flat = int(out.argmax())
        assert divmod(flat, w) == (PDN_STRIDE * q + c, PDN_STRIDE * p + c)
        assert int((out == 1).sum()) == 1


@pytest.mark.parametrize(("input_size", "padding"), GEOMETRIES)
def test_receptive_field_is_bilinear_between_centres_and_replicates_outside(
    input_size: tuple[int, int], padding: bool
) -> None:
    """Independent reference: align_corners=True resize to 4(g-1)+1 pixels (cell q on 4q), placed at c,
    replicate-padded to the image."""
    model = _model(input_size, padding)
    m = _random_grid(model)
    (h, w), (gh, gw) = input_size, model.grid
    c = 0 if padding else 16
    span_h, span_w = PDN_STRIDE * (gh - 1) + 1, PDN_STRIDE * (gw - 1) + 1
    ref = F.interpolate(m, size=(span_h, span_w), mode="bilinear", align_corners=True)
    ref = F.pad(ref, (c, w - c - span_w, c, h - c - span_h), mode="replicate")
    torch.testing.assert_close(model.upsample(m), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("input_size", "padding"), GEOMETRIES)
def test_border_pixels_replicate_the_edge_cells(input_size: tuple[int, int], padding: bool) -> None:
    """A defect in an edge cell stays at full strength out to the image border (no fade to zero padding)."""
    model = _model(input_size, padding)
    m = _random_grid(model, seed=1)
    out = model.upsample(m)
    (h, w), (gh, gw) = input_size, model.grid
    c = 0 if padding else 16
    last_h, last_w = PDN_STRIDE * (gh - 1) + c, PDN_STRIDE * (gw - 1) + c
    assert last_h < h - 1 and last_w < w - 1  # every geometry here has a band after the last cell
    assert torch.equal(out[..., :c, :], out[..., c : c + 1, :].expand(-1, -1, c, -1))
    assert torch.equal(out[..., last_h:, :], out[..., last_h : last_h + 1, :].expand(-1, -1, h - last_h, -1))
    assert torch.equal(out[..., :, :c], out[..., :, c : c + 1].expand(-1, -1, -1, c))
    assert torch.equal(out[..., :, last_w:], out[..., :, last_w : last_w + 1].expand(-1, -1, -1, w - last_w))
    corners = {(0, 0): (0, 0), (h - 1, w - 1): (-1, -1), (0, w - 1): (0, -1), (h - 1, 0): (-1, 0)}
    for (r, col), (q, p) in corners.items():
        assert torch.equal(out[..., r, col], m[..., q, p])  # image corners = corner cells, exactly


@pytest.mark.parametrize(("input_size", "padding"), GEOMETRIES)
def test_padded_mode_is_bit_identical_to_the_original_resize(input_size: tuple[int, int], padding: bool) -> None:
    model = _model(input_size, padding, align="padded")
    m = _random_grid(model, seed=2)
    original = m if padding else F.pad(m, (4, 4, 4, 4))
    expected = F.interpolate(original, size=input_size, mode="bilinear", align_corners=False)
    assert torch.equal(model.upsample(m), expected)
    assert not MAP_TENSORS & {name for name, _ in model.named_buffers()}  # nothing extra built for it


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_maps_keep_their_dtype(dtype: torch.dtype) -> None:
    model = _model((128, 64), False)
    m = _random_grid(model, seed=3)
    out = model.upsample(m.to(dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), model.upsample(m.to(dtype).float()), rtol=0.01, atol=0.01)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what the Detector runs the forward under
        assert model.upsample(m.to(dtype)).dtype == dtype
        assert model.upsample(m).dtype == torch.float32


def test_upsample_traces_as_one_graph_without_data_dependent_branches() -> None:
    """CUDA graphs and torch.compile need one static graph: dynamo must trace it without a break."""
    model = _model((128, 64), False)
    m = _random_grid(model, seed=4)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model.upsample, backend="eager", fullgraph=True, dynamic=False)
        assert torch.equal(compiled(m), model.upsample(m))
    finally:
        torch._dynamo.reset()


def test_resampling_tensors_stay_out_of_the_state_dict() -> None:
    new, old = _model((64, 64), False), _model((64, 64), False, align="padded")
    assert {name for name, _ in new.named_buffers()} >= MAP_TENSORS
    assert not MAP_TENSORS & set(new.state_dict())
    assert set(new.state_dict()) == set(old.state_dict())  # same artifact layout in both modes
    new.load_state_dict(old.state_dict())  # strict: nothing missing, nothing unexpected
    assert new.to(torch.float64).map_rows.dtype == torch.int64  # indices survive a dtype cast


@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("kind", ["pdn", "filterbank"])
def test_networks_receptive_field_centres_are_where_upsample_puts_the_cells(kind: str, padding: bool) -> None:
    """Measured on the networks (bench/geometry.py): a uniform-weight PDN's field and the filter bank's
    sampling point of the middle cell q are centred on 4q + pdn_rf_centre(padding), rows and columns."""
    cy, cx = receptive_field_centre(kind, padding, 128)
    assert cy == pytest.approx(pdn_rf_centre(padding), abs=1e-4)
    assert cx == pytest.approx(pdn_rf_centre(padding), abs=1e-4)


@pytest.mark.parametrize("padding", [False, True])
def test_pdn_m_has_the_same_centre(padding: bool) -> None:
    cy, cx = receptive_field_centre("pdn", padding, 128, size="m")
    assert (cy, cx) == pytest.approx((pdn_rf_centre(padding),) * 2, abs=1e-4)


def _saved_artifact(tmp_path: Path, edit: dict[str, object] | None = None, drop: bool = False) -> Path:
    model = make_model("efficientad")
    assert model.config.map_align == "receptive_field"
    return save_card_with_config(model, tmp_path / "v1", "map_align", drop=drop, edit=edit)


def test_an_artifact_without_the_key_loads_as_padded(tmp_path: Path) -> None:
    """Cards written before the switch were calibrated on the padded maps: they keep them."""
    path = _saved_artifact(tmp_path, drop=True)
    assert load_card(path).config.map_align == "padded"
    assert ModelCard.model_validate_json((path / CARD_FILE).read_text()).config.map_align == "padded"
    det = Detector.load(path, device="cpu", precision="fp32")
    assert det.model.config.map_align == "padded"
    m = _random_grid(det.model, seed=5)
    expected = F.interpolate(F.pad(m, (4, 4, 4, 4)), size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    assert torch.equal(det.model.upsample(m), expected)


@pytest.mark.parametrize("align", ["receptive_field", "padded"])
def test_an_artifact_with_the_key_keeps_it(tmp_path: Path, align: str) -> None:
    path = _saved_artifact(tmp_path, edit={"map_align": align})
    assert load_card(path).config.map_align == align
    assert Detector.load(path, device="cpu", precision="fp32").model.config.map_align == align


def test_stored_configs_still_reject_unknown_keys(tmp_path: Path) -> None:
    path = _saved_artifact(tmp_path, edit={"map_alignment": "padded"}, drop=True)
    with pytest.raises(ArtifactError, match="invalid model card"):
        load_card(path)
    with pytest.raises(ValueError, match="map_alignment"):
        ModelConfig.from_stored({"map_alignment": "padded"})
    with pytest.raises(ValueError, match="map_align"):
        ModelConfig.from_stored({"map_align": "centre"})


def test_migration_only_fills_the_missing_key() -> None:
    stored = {"variant": "space", "input_size": [64, 64]}
    assert migrate_stored_config(stored) == {**stored, "map_align": "padded", "fe_align": "align_corners"}
    assert "map_align" not in stored  # the caller's dict is not changed
    kept = {"map_align": "receptive_field", "fe_align": "receptive_field"}  # fe_align: test_fe_alignment.py
    assert migrate_stored_config(kept) == kept


@pytest.mark.parametrize(("stored", "expected"), [(None, "padded"), ("receptive_field", "receptive_field")])
def test_a_resumed_checkpoint_keeps_the_maps_it_started_with(stored: str | None, expected: str) -> None:
    """A training run checkpointed before the switch resumes (and is later calibrated) on padded maps."""
    model = make_model("efficientad")
    rebuilt = resume_with_config(model, "map_align", stored)
    assert rebuilt.config.map_align == expected
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in model.state_dict().items())
