"""Probes of the grid geometry in docs/model.md: "Map alignment (`map_align`)" and "Known limitations (geometry)".

Both probes change one pixel of a flat, slightly noisy image and find where the change lands, as the
|change|-weighted centroid (summed over channels). Untrained networks (seeded), CPU, no files, seconds.

* ``fe``: the student's FE and FM-gate resize (``Student.forward``, ``align_corners=True`` from the trunk's
  ``(g+3)²`` grid to the output's ``g²``). A pixel at row ``r`` belongs to output cell ``(r - 16) / 4``
  (receptive-field centre ``4q + 16``). Columns, all as row centroids in output cells, pixels on the diagonal:
  ``teacher trunk - 1.5`` (the trunk before the resize, shifted to output cells: where it should land),
  ``FE`` and ``gate`` (the teacher's and the student's trunk as the FM receives them, captured by a
  forward pre-hook on ``student.fm``, i.e. the code path itself) and ``aligned`` (what
  ``F.avg_pool2d(trunk, 2, stride=1)[..., 1:-1, 1:-1]`` would give: the fix left for an experiment).
  The filter-bank teacher's trunk is already on the ``g²`` grid, so its FE is not resized; its gate is.
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
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.model import MapAlign, ModelConfig, SpaceModel, efficientad_config  # noqa: E402
from models.networks import PDN, PdnSize, pdn_out_size  # noqa: E402
from models.teacher import FilterBankTeacher  # noqa: E402

STRIDE, RF_CENTRE = 4, 16  # unpadded PDN grid: cell q's receptive field is centred on pixel 4q + 16
MAP_ALIGNS: tuple[MapAlign, ...] = ("padded", "receptive_field")
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


def aligned(trunk: torch.Tensor) -> torch.Tensor:
    """The aligned resize: mean of trunk cells j+1 and j+2, centred on j + 1.5."""
    return F.avg_pool2d(trunk, 2, stride=1)[..., 1:-1, 1:-1]


def fe_probe(px: int, teacher: str, seed: int) -> list[dict[str, float | None]]:
    """Row centroids (output cells) of a one-pixel change at (r, r), r in (30, px/2, px-30)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(input_size=(px, px), teacher_kind=teacher, use_fe=True, use_fm=True, use_scl=False)
    m = SpaceModel(cfg).eval()
    assert m.student.fm is not None
    captured: dict[str, torch.Tensor] = {}

    def grab(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        captured["fe"], captured["gate"] = args[0].detach(), args[1].detach()

    hook = m.student.fm.register_forward_pre_hook(grab)
    x = base_image(px, seed)

    @torch.no_grad()
    def parts(img: torch.Tensor) -> dict[str, torch.Tensor]:
        xn = m.normalize(img)
        trunk, _ = m.teacher_features(xn)
        m.student_features(xn, trunk)
        return {"trunk": trunk, "fe": captured["fe"], "gate": captured["gate"], "aligned": aligned(trunk)}

    try:
        p0 = parts(x)
        rows = []
        for r in (30, px // 2, px - 30):
            p1 = parts(poke(x, r, r))
            cen = {k: centroid((p1[k] - p0[k]).abs().sum(1)[0])[0] for k in p0}
            resized = p0["trunk"].shape[-1] != p0["fe"].shape[-1]
            rows.append(
                {
                    "pixel": r,
                    "true_cell": (r - RF_CENTRE) / STRIDE,
                    "trunk": cen["trunk"] - 1.5 if resized else cen["trunk"],
                    "fe": cen["fe"],
                    "gate": cen["gate"],
                    "aligned": cen["aligned"] if resized else None,
                }
            )
        return rows
    finally:
        hook.remove()


def _grid_origin(padding: bool) -> int:
    return 0 if padding else RF_CENTRE


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
        net = PDN(size, 8, padding)
        with torch.no_grad():
            for mod in net.modules():
                if isinstance(mod, torch.nn.Conv2d):
                    mod.weight.fill_(1.0 / mod.weight[0].numel())
                    assert mod.bias is not None
                    mod.bias.zero_()
        out = net(x)[0, 0, q, q]
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
        print(f"FE / gate resize, {args.px} px: row centroid of a one-pixel change (r, r), in output cells")
        print(f"{'teacher':<11} {'pixel':>5} {'true cell':>9} {'trunk':>9} {'FE':>6} {'gate':>6} {'aligned':>7}")
        fe: dict[str, list[dict[str, float | None]]] = {}
        for teacher in args.teacher:
            fe[teacher] = fe_probe(args.px, teacher, args.seed)
            for row in fe[teacher]:
                al = "-" if row["aligned"] is None else f"{row['aligned']:.2f}"
                print(
                    f"{teacher:<11} {row['pixel']:>5} {row['true_cell']:>9.2f} {row['trunk']:>9.2f} "
                    f"{row['fe']:>6.2f} {row['gate']:>6.2f} {al:>7}"
                )
        print("(trunk: the teacher trunk before the resize, minus 1.5 cells; the filter bank's trunk is on the output")
        print(" grid already: trunk as is, its FE is not resized, no 'aligned'. gate: the student's own trunk.)")
        result["fe"] = fe

    if "map" in args.probe:
        result["map"] = map_report(args.px, args.teacher, args.seed)

    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
