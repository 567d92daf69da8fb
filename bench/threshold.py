"""False-positive rate of the model-default threshold vs the number n of validation images, old rule vs new.

docs/model.md, "Calibration and the default threshold". Both rules run on the same draws, side by side:

* old: ``q99 + 0.25 * (q99 - q50)`` of the n validation scores (the rule before the small-sample floor);
* new: :func:`models.normalization.default_threshold` (``max(old, max + 0.05 * ln(50 / n))``).

Populations (``--population``):

* ``synthetic`` (default, seconds): image scores drawn from N(0.12, 0.02) (a population of 10,000, seed 0);
  each draw takes n of them as validation scores, and the FPR is measured on the whole population.
* ``trained`` (minutes): small models trained with :func:`models.train.train` on synthetic lines of
  :func:`models.synthetic.build_product_line` (bundled scikit-image textures; default brick, grass,
  gravel: 20 train images, 128 px, 100 steps, procedural penalty images, CPU), then the raw per-branch maps
  (``branch_maps``, fp32) of a pool of ``--images`` validation normals. Each draw picks n images of the
  pool; the map quantiles (q_a = 0.9, q_b = 0.995 of their pixels, per branch) and all image scores
  (max of ``0.5 * M'_ST + 0.5 * M'_AE``) are recomputed from those n, as calibration would, and the FPR
  is measured on the other pool images. ``margin`` is the mean of new threshold - max of the n scores.
* ``both``: the two above.

Usage: ``.venv/bin/python bench/threshold.py [--population synthetic|trained|both] [--draws N]
[--n 1,2,4,10,20,50] [--lines brick grass gravel] [--steps 100] [--images 80] [--train-images 20]
[--px 128] [--work DIR] [--out threshold.json]``. ``--work DIR`` keeps the datasets, models and maps
there and reuses maps already saved under the same settings.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.artifact import ScoreStats  # noqa: E402
from models.normalization import default_threshold, score_stats  # noqa: E402

Q_A, Q_B = 0.9, 0.995  # map quantiles of calibration (models.normalization.calibrate)
SYNTHETIC_N = (1, 2, 4, 10, 20, 50)
TRAINED_N = (1, 2, 4, 5, 10, 20, 50)


def old_threshold(stats: ScoreStats) -> float:
    """The default threshold before the small-sample floor."""
    return stats.q99 + 0.25 * max(stats.q99 - stats.q50, 0.0)


def synthetic_fpr(ns: list[int], draws: int, mean: float, std: float, size: int, seed: int) -> dict[int, dict]:
    """{n: {old, new, margin}}: mean FPR over ``draws`` draws of n scores from a normal population."""
    rng = np.random.default_rng(seed)
    normals = rng.normal(mean, std, size)
    out = {}
    for n in ns:
        old, new, margin = [], [], []
        for _ in range(draws):
            st = score_stats(rng.choice(normals, n, replace=False))
            thr = default_threshold(st)
            old.append((normals >= old_threshold(st)).mean())
            new.append((normals >= thr).mean())
            margin.append(thr - st.max)
        out[n] = {"old": float(np.mean(old)), "new": float(np.mean(new)), "margin": float(np.mean(margin))}
    return out


def normalize(m: np.ndarray, qa: float, qb: float) -> np.ndarray:
    """Quantile normalisation q_a -> 0, q_b -> 0.1 (models.model.normalize_map)."""
    return 0.1 * (m - qa) / max(qb - qa, 1e-12)


def maps_fpr(st: np.ndarray, ae: np.ndarray, ns: list[int], draws: int, seed: int) -> dict[int, dict]:
    """{n: {old, new, margin}} over draws of n validation images of a pool of raw branch maps (N, H, W)."""
    pool = len(st)
    rng = np.random.default_rng(seed)
    out = {}
    for n in ns:
        old, new, margin = [], [], []
        for _ in range(draws):
            sel = rng.choice(pool, n, replace=False)
            rest = np.setdiff1d(np.arange(pool), sel)
            q = [np.quantile(m[sel], [Q_A, Q_B]) for m in (st, ae)]
            scores = (0.5 * normalize(st, *q[0]) + 0.5 * normalize(ae, *q[1])).reshape(pool, -1).max(1)
            s = score_stats(scores[sel])
            thr = default_threshold(s)
            old.append((scores[rest] >= old_threshold(s)).mean())
            new.append((scores[rest] >= thr).mean())
            margin.append(thr - s.max)
        out[n] = {"old": float(np.mean(old)), "new": float(np.mean(new)), "margin": float(np.mean(margin))}
    return out


def train_and_map(line: str, work: Path, args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """Train a small model on a synthetic line; raw fp32 ST and AE maps of its validation pool."""
    import torch

    from models import data as dataset
    from models.artifact import load_artifact
    from models.model import SpaceModel
    from models.normalization import to_tensor
    from models.synthetic import build_product_line
    from models.train import TrainConfig, train

    cache = work / f"{line}_s{args.steps}_t{args.train_images}_v{args.images}_px{args.px}_seed{args.seed}.npz"
    if cache.exists():
        z = np.load(cache)
        print(f"{line}: maps from {cache}", flush=True)
        return z["st"], z["ae"]
    t0 = time.monotonic()
    d = build_product_line(
        line, work / "data", n_train=args.train_images, n_val=args.images, n_test_good=0, n_test_defect=0,
        size=args.px, seed=args.seed,
    )  # fmt: skip
    art = train(
        TrainConfig(
            data=d, product_line=line, out=work / "models", input_size=args.px, steps=args.steps,
            penalty="procedural", seed=args.seed, device=args.device, model_version=f"s{args.steps}", overwrite=True,
        )
    )  # fmt: skip
    card, state = load_artifact(art)
    model = SpaceModel(card.config)
    model.load_state_dict(state)
    model.eval()
    device = next(model.parameters()).device
    images = np.stack([dataset.load_image(p) for p in dataset.scan_dataset(d).validation_good])
    st, ae = [], []
    with torch.no_grad():
        for i in range(0, len(images), 8):
            b = model.branch_maps(to_tensor(images[i : i + 8], device))
            st.append(b.st[:, 0].float().cpu().numpy())
            ae.append(b.ae[:, 0].float().cpu().numpy())
    st_all, ae_all = np.concatenate(st), np.concatenate(ae)
    np.savez_compressed(cache, st=st_all, ae=ae_all)
    print(
        f"{line}: trained {args.steps} steps and mapped {len(images)} images in {time.monotonic() - t0:.0f} s",
        flush=True,
    )
    return st_all, ae_all


def print_table(title: str, columns: dict[str, dict[int, dict]]) -> None:
    print(f"\n{title}\nFPR of the default threshold on new normals, old rule -> new rule (margin: new threshold - max)")
    ns = sorted({n for col in columns.values() for n in col})
    header = f"{'n':>3}" + "".join(f" | {name:^24}" for name in columns)
    print(header.rstrip())
    print("-" * len(header))
    for n in ns:
        cells = []
        for col in columns.values():
            r = col.get(n)
            cells.append(f"{r['old']:.3f} -> {r['new']:.3f} (+{r['margin']:.3f})" if r else "")
        print((f"{n:>3}" + "".join(f" | {c:^24}" for c in cells)).rstrip())


def parse_ns(text: str | None, default: tuple[int, ...]) -> list[int]:
    return [int(v) for v in text.split(",")] if text else list(default)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--population", choices=("synthetic", "trained", "both"), default="synthetic")
    ap.add_argument("--n", help=f"validation sizes, comma-separated (synthetic {SYNTHETIC_N}, trained {TRAINED_N})")
    ap.add_argument("--draws", type=int, help="random validation draws per n (synthetic 500, trained 200)")
    ap.add_argument("--seed", type=int, default=0)
    g = ap.add_argument_group("synthetic")
    g.add_argument("--mean", type=float, default=0.12)
    g.add_argument("--std", type=float, default=0.02)
    g.add_argument("--population-size", type=int, default=10_000)
    g = ap.add_argument_group("trained")
    g.add_argument("--lines", nargs="+", default=["brick", "grass", "gravel"], help="models.synthetic product lines")
    g.add_argument("--steps", type=int, default=100, help="training steps per model")
    g.add_argument("--images", type=int, default=80, help="validation pool per line (n draws + the rest for FPR)")
    g.add_argument("--train-images", type=int, default=20)
    g.add_argument("--px", type=int, default=128, help="image side")
    g.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    g.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    g.add_argument("--work", type=Path, help="keep datasets, models and maps here (default: a temporary folder)")
    ap.add_argument("--out", type=Path, help="write the results as JSON")
    args = ap.parse_args()
    result: dict[str, object] = {"seed": args.seed}

    if args.population in ("synthetic", "both"):
        ns = parse_ns(args.n, SYNTHETIC_N)
        draws = args.draws or 500
        res = synthetic_fpr(ns, draws, args.mean, args.std, args.population_size, args.seed)
        print_table(
            f"population N({args.mean}, {args.std}) of {args.population_size} scores, {draws} draws", {"synthetic": res}
        )
        result["synthetic"] = {"draws": draws, "mean": args.mean, "std": args.std, "fpr": res}

    if args.population in ("trained", "both"):
        import torch

        torch.set_num_threads(args.threads)
        ns = parse_ns(args.n, TRAINED_N)
        bad = [n for n in ns if n >= args.images]
        if bad:
            ap.error(f"--n {bad} must be below --images {args.images}")
        draws = args.draws or 200
        work = args.work or Path(tempfile.mkdtemp(prefix="space-threshold-"))
        work.mkdir(parents=True, exist_ok=True)
        try:
            columns = {}
            for line in args.lines:
                st, ae = train_and_map(line, work, args)
                columns[line] = maps_fpr(st, ae, ns, draws, args.seed)
        finally:
            if args.work is None:
                shutil.rmtree(work, ignore_errors=True)
        print_table(
            f"trained models: {args.steps} steps, {args.train_images} train images, {args.px} px, "
            f"pool of {args.images} validation normals, {draws} draws",
            columns,
        )
        result["trained"] = {
            "draws": draws, "steps": args.steps, "train_images": args.train_images, "images": args.images,
            "px": args.px, "fpr": columns,
        }  # fmt: skip

    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
