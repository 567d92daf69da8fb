"""Probes of the grid geometry in docs/model.md: "Map alignment (`map_align`)" and "FE alignment (`fe_align`)".

Both probes change one pixel of a flat, slightly noisy image and find where the change lands, as the
|change|-weighted centroid (summed over channels). Untrained networks (seeded), CPU, no files, seconds.

* ``fe``: the student's FE and FM-gate resize (``Student.forward``, ``models.networks.to_output_grid``, from the
  trunk's ``(g+3)²`` grid to the output's ``g²``), both ``ModelConfig.fe_align`` modes side by side on the same
  seeded weights: ``align_corners`` (the original bilinear ``align_corners=True`` resize) and
  ``receptive_field`` (the 2x2 mean of trunk cells j+1 and j+2, centred on j + 1.5). A pixel at row ``r``
  belongs to output cell ``(r - c) / 4`` (receptive-field centre ``4q + c``, c = 16 unpadded, 0 with
  ``padding``). Columns, all as row centroids in output cells, pixels on the diagonal: ``trunk`` (the teacher
  trunk before the resize, shifted by -1.5 to output cells: where it should land), then per mode ``FE`` and
  ``gate`` (the teacher's and the student's trunk as the FM receives them, captured by a forward pre-hook on
  ``student.fm``, i.e. the code path itself). The filter-bank teacher's trunk is already on the ``g²`` grid,
  so its FE is not resized in either mode; its gate is. Unpadded first, then ``padding=True``.
* ``map``: the anomaly map's placement (``SpaceModel.upsample``), both ``ModelConfig.map_align`` modes side
  by side: ``padded`` (the original: pad the unpadded grid by 4, resize with ``align_corners=False``) and
  ``receptive_field`` (cell q on its receptive-field centre ``4q + c``). First the centre c itself, measured
  on the networks (``models.networks.pdn_rf_centre`` says 16 unpadded, 0 padded): the centroid of the input
  gradient of one interior output cell of a PDN-S with uniform positive weights (a symmetric field), and of
  the filter-bank teacher's Gaussian-mean channels (its sampling point); both without and with ``padding``.
  Then ``impulse``: the exact offset of one grid cell after ``upsample`` against ``4q + c`` (dy, dx), per
  mode and padding (``padded``: +1.5 px). Then, per pixel, the centroid of the change of the
  student-teacher map (``branch_maps().st``) of a whole untrained ``efficientad`` model minus the pixel
  (dy, dx in px; positive = down/right), the same seeded networks in both modes. The untrained networks'
  receptive fields are not symmetric, so single pixels scatter around the offset of the resize; the last
  pixel (20, 100) at 128 px sits within one receptive field of the top and right borders, where the
  unpadded grid cuts the field off (pulling the centroid inwards), so the summary range is over the
  interior pixels. An untrained ``space`` model gives the same map (the FM's last conv starts at zero), so
  there is no variant switch.

Usage: ``.venv/bin/python bench/geometry.py [--px 128] [--probe fe map] [--teacher pdn filterbank]
[--seed 0] [--out geometry.json]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.model import MapAlign, ModelConfig, SpaceModel, efficientad_config  # noqa: E402
from models.networks import PDN, FeAlign, PdnSize, pdn_out_size, pdn_rf_centre  # noqa: E402
from models.teacher import FilterBankTeacher  # noqa: E402

STRIDE, RF_CENTRE = 4, 16  # unpadded PDN grid: cell q's receptive field is centred on pixel 4q + 16
MAP_ALIGNS: tuple[MapAlign, ...] = ("padded", "receptive_field")
FE_ALIGNS: tuple[FeAlign, ...] = ("align_corners", "receptive_field")
MAP_PIXELS_128 = ((40, 70), (64, 64), (90, 30), (20, 100))  # scaled by px / 128; the last one is at the border


def centroid(d: torch.Tensor) -> tuple[float, float]:
    """(row, col) centroid of a non-negative (H, W) map."""
    w = d / d.sum()
    rows = torch.arange(d.shape[0], dtype=torch.float64)
    cols = torch.arange(d.shape[1], dtype=torch.float64)
    return float((w.sum(1).double() * rows).sum()), float((w.sum(0).double() * cols).sum())


def base_image(px: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.5 + 0.02 * torch.rand(1, 3, px, px, generator=g)


def poke(x: torch.Tensor, r: int, c: int) -> torch.Tensor:
    y = x.clone()
    y[..., r, c] = 1.0
    return y


def fe_probe(px: int, teacher: str, seed: int, padding: bool = False) -> list[dict[str, float | bool]]:
    """Row centroids (output cells) of a one-pixel change at (r, r), r in (30, px/2, px-30), in both modes.

    Two ``space`` models from the same seed (``fe_align`` adds no parameter, so their weights are identical),
    one per ``ModelConfig.fe_align``; the FE and gate are what the FM receives (a forward pre-hook on
    ``student.fm``). ``trunk`` / ``student_trunk``: the teacher's / student's trunk before the resize, minus
    1.5 cells when it is on the ``(g+3)²`` grid (output cell j sits on trunk position j + 1.5).
    """
    c = pdn_rf_centre(padding)
    captured: dict[str, torch.Tensor] = {}

    def grab(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        captured["fe"], captured["gate"] = args[0].detach(), args[1].detach()

    models: dict[FeAlign, SpaceModel] = {}
    for align in FE_ALIGNS:
        torch.manual_seed(seed)
        cfg = ModelConfig.model_validate(
            {"input_size": (px, px), "teacher_kind": teacher, "padding": padding, "use_scl": False, "fe_align": align}
        )
        models[align] = SpaceModel(cfg).eval()
        assert models[align].student.fm is not None
    ref, new = models["align_corners"], models["receptive_field"]
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), new.state_dict().values(), strict=True))
    x = base_image(px, seed)

    @torch.no_grad()
    def parts(img: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for align, m in models.items():
            hook = m.student.fm.register_forward_pre_hook(grab)  # type: ignore[union-attr]
            try:
                xn = m.normalize(img)
                trunk, _ = m.teacher_features(xn)
                m.student_features(xn, trunk)
            finally:
                hook.remove()
            out[f"fe:{align}"], out[f"gate:{align}"] = captured["fe"], captured["gate"]
        xn = ref.normalize(img)
        out["trunk"] = ref.teacher_features(xn)[0]
        out["student_trunk"] = ref.student.pdn.forward_with_trunk(xn)[0]
        return out

    p0 = parts(x)
    grid = ref.grid[0]
    rows: list[dict[str, float | bool]] = []
    for r in (30, px // 2, px - 30):
        p1 = parts(poke(x, r, r))
        cen = {k: centroid((p1[k] - p0[k]).abs().sum(1)[0])[0] for k in p0}
        fe_resized = p0["trunk"].shape[-1] != grid
        rows.append(
            {
                "pixel": r,
                "true_cell": (r - c) / STRIDE,
                "trunk": cen["trunk"] - 1.5 if fe_resized else cen["trunk"],
                "student_trunk": cen["student_trunk"] - 1.5,
                "fe": cen["fe:align_corners"],
                "gate": cen["gate:align_corners"],
                "aligned": cen["fe:receptive_field"],
                "gate_aligned": cen["gate:receptive_field"],
                "fe_resized": fe_resized,
            }
        )
    return rows


def fe_report(px: int, teachers: list[str], seed: int) -> dict[str, list[dict[str, float | bool]]]:
    """Print and return the ``fe`` probe: per teacher, unpadded then padded, both ``fe_align`` modes."""
    print(
        f"FE / gate resize, {px} px: row centroid of a one-pixel change (r, r), in output cells (ModelConfig.fe_align)"
    )
    fe: dict[str, list[dict[str, float | bool]]] = {}
    for padding in (False, True):
        if padding:
            print(
                "padding=True (cell q centred on pixel 4q; the trunk is again (g+3)², output cell j on trunk j + 1.5):"
            )
        print(f"{'':<32} {'align_corners':>13} {'receptive_field':>16}")
        print(
            f"{'teacher':<11} {'pixel':>5} {'true cell':>9} {'trunk':>9} {'FE':>6} {'gate':>6} {'FE':>7} {'gate':>7}"
            f" {'s.trunk':>8}"
        )
        for teacher in teachers:
            rows = fe[f"{teacher}_padded" if padding else teacher] = fe_probe(px, teacher, seed, padding)
            for row in rows:
                print(
                    f"{teacher:<11} {row['pixel']:>5} {row['true_cell']:>9.2f} {row['trunk']:>9.2f} "
                    f"{row['fe']:>6.2f} {row['gate']:>6.2f} {row['aligned']:>7.2f} {row['gate_aligned']:>7.2f}"
                    f" {row['student_trunk']:>8.2f}"
                )
    print("(trunk / s.trunk: the teacher's / student's trunk before the resize, minus 1.5 cells; the filter bank's")
    print(" trunk is on the output grid already, so its FE is not resized in either mode. gate: the student's own")
    print(" trunk as the FM receives it, resized in both modes.)")
    errors = {
        align: [
            v
            for rows in fe.values()
            for r in rows
            for v in (float(r[f]) - float(r["trunk"]), float(r[g]) - float(r["student_trunk"]))
        ]
        for align, f, g in (("align_corners", "fe", "gate"), ("receptive_field", "aligned", "gate_aligned"))
    }
    print("the resize's own shift (FE - trunk, gate - s.trunk; 0 = aligned), all rows, in output cells:")
    for align, errs in errors.items():
        print(f"  {align:<16} {min(errs):+.2f} to {max(errs):+.2f}, largest |shift| {max(map(abs, errs)):.2f}")
    return fe


def _grid_origin(padding: bool) -> int:
    return 0 if padding else RF_CENTRE


def uniform_pdn(size: PdnSize, padding: bool) -> PDN:
    """A PDN with uniform positive weights and no bias: every cell's receptive field is symmetric."""
    net = PDN(size, 8, padding)
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, torch.nn.Conv2d):
                mod.weight.fill_(1.0 / mod.weight[0].numel())
                assert mod.bias is not None
                mod.bias.zero_()
    return net


def receptive_field_centre(kind: str, padding: bool, px: int = 128, size: PdnSize = "s") -> tuple[float, float]:
    """Measured (row, col) of the receptive-field centre of the middle grid cell q, minus 4q: c in 4q + c.

    ``pdn``: a PDN-S (or ``size``) with every conv weight 1/fan-in and zero biases (all activations positive, so the
    network is linear and its field a symmetric box cascade); the centroid of the input gradient of output
    cell (q, q). ``filterbank``: the gradient of the teacher's Gaussian colour-mean channels of luminance
    (positive filters, so the rectification passes) at cell (q, q), i.e. where the bank samples the image.
    """
    x = torch.full((1, 3, px, px), 0.5, requires_grad=True)
    g = pdn_out_size(px, padding)
    q = g // 2
    if kind == "pdn":
        out = uniform_pdn(size, padding)(x)[0, 0, q, q]
    else:
        bank = FilterBankTeacher(padding=padding)
        n = bank.kernels.shape[0]  # per scale: [relu(r) for n filters | relu(-r) for n filters]
        trunk, _ = bank.forward_with_trunk(x)
        out = sum(trunk[0, 2 * n * scale + n - 3, q, q] for scale in range(3))  # n - 3: Gaussian mean, luminance
    assert isinstance(out, torch.Tensor)
    out.backward()
    assert x.grad is not None
    cy, cx = centroid(x.grad.abs().sum(1)[0])
    return cy - STRIDE * q, cx - STRIDE * q


def impulse_offset(px: int, align: MapAlign = "padded", padding: bool = False) -> tuple[float, float]:
    """(row, col) offset (px) of one grid cell after ``SpaceModel.upsample`` against its centre 4q + c."""
    m = SpaceModel(efficientad_config(input_size=(px, px), teacher_kind="filterbank", padding=padding, map_align=align))
    gh, gw = m.grid
    q, p = gh // 2, gw // 2 - 1
    cell = torch.zeros(1, 1, gh, gw)
    cell[..., q, p] = 1.0
    with torch.no_grad():
        up = m.upsample(cell)[0, 0]
    cy, cx = centroid(up)
    c = _grid_origin(padding)
    return cy - (STRIDE * q + c), cx - (STRIDE * p + c)


def map_probe(px: int, teacher: str, seed: int, align: MapAlign = "padded") -> list[dict[str, Any]]:
    """Offset (px) of the ST map's change against the poked pixel, per pixel, over the grid's footprint.

    The centroid is taken over the pixels the unpadded grid spans (16 to 4(g-1) + 16, in both modes): outside
    it ``receptive_field`` replicates the edge cells, which would pull the centroid of a change near the
    border outwards by the width of the replicated band, and ``padded`` fades to the zero padding.
    """
    torch.manual_seed(seed)
    m = SpaceModel(efficientad_config(input_size=(px, px), teacher_kind=teacher, map_align=align)).eval()
    lo, hi = RF_CENTRE, RF_CENTRE + STRIDE * (m.grid[0] - 1) + 1
    x = base_image(px, seed + 1)
    rows = []
    with torch.no_grad():
        a = m.branch_maps(x).st[0, 0]
        for r128, c128 in MAP_PIXELS_128:
            r, c = round(r128 * px / 128), round(c128 * px / 128)
            cy, cx = centroid((m.branch_maps(poke(x, r, c)).st[0, 0] - a).abs()[lo:hi, lo:hi])
            rows.append(
                {"pixel": [r, c], "dy": cy + lo - r, "dx": cx + lo - c, "border": (r128, c128) == MAP_PIXELS_128[-1]}
            )
    return rows


def _px(v: float, sign: str = "+") -> str:
    """Two decimals (signed by default), no "-0.00"."""
    return f"{round(v, 2) + 0.0:{sign}.2f}"


def map_report(px: int, teachers: list[str], seed: int) -> dict[str, Any]:
    """Print and return the ``map`` probe: receptive-field centres, impulses and one-pixel changes per mode."""
    print(f"\nMap alignment, {px} px (SpaceModel.upsample, ModelConfig.map_align)")
    centres = {
        f"{kind}{'_padded' if padding else ''}": receptive_field_centre(kind, padding, px)
        for kind in ("pdn", "filterbank")
        for padding in (False, True)
    }
    print("receptive-field centre c of cell q (4q + c), measured (row, col):")
    print("  " + "   ".join(f"{k.replace('_', ' ')} {_px(cy, '')},{_px(cx, '')}" for k, (cy, cx) in centres.items()))
    impulse = {a: {pad: impulse_offset(px, a, pad == "padded") for pad in ("unpadded", "padded")} for a in MAP_ALIGNS}
    print("one grid cell after upsample, offset from 4q + c (dy, dx px):")
    print(f"  {'map_align':<16} {'unpadded PDN':>14} {'padded PDN':>14}")
    for a, by_pad in impulse.items():
        cells = " ".join(f"{_px(dy) + ',' + _px(dx):>14}" for dy, dx in by_pad.values())
        print(f"  {a:<16} {cells}")
    lo, hi = RF_CENTRE, RF_CENTRE + STRIDE * (pdn_out_size(px) - 1)
    print("one-pixel change of the ST map (efficientad, untrained, same weights in both modes): centroid over pixels")
    print(f"{lo}-{hi} (the grid's footprint) - pixel, dy,dx px")
    one_pixel: dict[str, dict[str, list[dict[str, Any]]]] = {a: {} for a in MAP_ALIGNS}
    for teacher in teachers:
        for a in MAP_ALIGNS:
            rows = one_pixel[a][teacher] = map_probe(px, teacher, seed, a)
            cells = "  ".join(
                f"({r['pixel'][0]},{r['pixel'][1]}){'*' if r['border'] else ''} {r['dy']:+.1f},{r['dx']:+.1f}"
                for r in rows
            )
            print(f"{teacher:<11} {a:<16} {cells}")
    summary: dict[str, dict[str, float]] = {}
    for a in MAP_ALIGNS:
        inner = [v for rows in one_pixel[a].values() for r in rows if not r["border"] for v in (r["dy"], r["dx"])]
        summary[a] = {"min": min(inner), "max": max(inner), "mean": sum(inner) / len(inner)}
    shift = [
        p[k] - n[k]
        for teacher in teachers
        for p, n in zip(one_pixel["padded"][teacher], one_pixel["receptive_field"][teacher], strict=True)
        if not p["border"]
        for k in ("dy", "dx")
    ]
    summary["padded_minus_receptive_field"] = {"min": min(shift), "max": max(shift), "mean": sum(shift) / len(shift)}
    print("interior pixels (* at the border, receptive field cut off: not counted):")
    for key, v in summary.items():
        print(f"  {key:<28} {v['min']:+.2f} to {v['max']:+.2f} px, mean {v['mean']:+.2f}")
    return {
        "rf_centre": {k: list(v) for k, v in centres.items()},
        "impulse_offset_px": {a: {k: list(v) for k, v in by_pad.items()} for a, by_pad in impulse.items()},
        "one_pixel": one_pixel,
        "interior": summary,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--px", type=int, default=128, help="image side (multiple of 32, >= 96)")
    ap.add_argument("--probe", nargs="+", choices=("fe", "map"), default=["fe", "map"])
    ap.add_argument("--teacher", nargs="+", choices=("pdn", "filterbank"), default=["pdn", "filterbank"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, help="write the results as JSON")
    args = ap.parse_args()
    if args.px % 32 or args.px < 96:
        ap.error("--px must be a multiple of 32, at least 96")
    torch.set_num_threads(args.threads)
    result: dict[str, object] = {"px": args.px, "seed": args.seed}

    if "fe" in args.probe:
        result["fe"] = fe_report(args.px, args.teacher, args.seed)

    if "map" in args.probe:
        result["map"] = map_report(args.px, args.teacher, args.seed)

    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
