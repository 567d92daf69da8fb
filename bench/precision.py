"""Do bf16 / fp16 serving keep the verdicts of an fp32-calibrated model? Scores, flips, AUROC, speed.

A model's map normalisation and threshold are computed in fp32 at training (``space train``);
``SPACE_MODELS__PRECISION=bf16`` serves it at lower precision (the gpu-prod default; 1.8x on CPUs
with native bf16). This bench scores the same test images at each precision, side by side in one
run, and reports against fp32: the largest and mean score change, that change as a share of the
threshold, verdicts that flip at the card's threshold, the largest map change, image AUROC, and
images/s of ``Detector.predict`` at ``--batch``.

Without ``--model``/``--data`` it first renders a synthetic product line (models.synthetic: good
and defective parts) and trains a model on it, as ``space demo`` does for one line.

Usage::

    .venv/bin/python bench/precision.py [--size 128] [--steps 200] [--precisions fp32,bf16] [--device cpu]
    .venv/bin/python bench/precision.py --model ART_DIR --data DATA_DIR   # your own model and test set

Prints a table and a JSON line; figures go to docs/performance.md with the machine they came from.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_and_train(
    work: Path, line: str, size: int, steps: int, device: str, n_test: int, precision: str
) -> tuple[Path, Path]:
    """Render a synthetic line and train a model on it; returns (artifact folder, dataset folder)."""
    from models.synthetic import build_product_line
    from models.train import TrainConfig, train

    data = build_product_line(
        line, work / "data", n_train=40, n_val=20, n_test_good=n_test, n_test_defect=n_test, size=size, seed=0
    )
    artifact = train(TrainConfig(data=data, product_line=line, out=work / "registry", steps=steps, input_size=size,
                                 seed=0, model_version="bench", device=device, precision=precision))  # fmt: skip
    return Path(artifact), data


def score(detector: Any, images: list[np.ndarray], batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores (N,) and maps (N, h, w) of prepared images, in batches."""
    scores, maps = [], []
    for i in range(0, len(images), batch):
        pred = detector.predict(np.stack(images[i : i + batch]))
        scores.append(np.asarray(pred.scores))
        maps.append(np.asarray(pred.maps))
    return np.concatenate(scores), np.concatenate(maps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help="Artifact folder (default: train one).")
    p.add_argument("--data", type=Path, default=None, help="Dataset with test/ (MVTec layout), with --model.")
    p.add_argument("--line", default="brick", help="Synthetic product line to train on (without --model).")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--test-images", type=int, default=40, help="Good and defective test images each (synthetic).")
    p.add_argument("--train-precision", default="fp32", choices=["fp32", "bf16"],
                   help="Training and calibration precision of the synthetic model (space train --precision).")  # fmt: skip
    p.add_argument("--device", default="cpu")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seconds", type=float, default=5.0, help="Timed seconds per precision.")
    p.add_argument("--malloc", default="retain", choices=["retain", "system"])
    p.add_argument("--out", default=None, help="Also write the JSON report here.")
    args = p.parse_args()

    from worker.malloc import configure_malloc

    configure_malloc(args.malloc)
    from bench.e2e import raw_throughput
    from models.data import load_image, scan_dataset
    from models.detector import Detector
    from models.metrics import image_auroc

    if (args.model is None) != (args.data is None):
        raise SystemExit("give --model and --data together, or neither (a synthetic line is trained)")
    if args.model is None:
        work = Path(tempfile.mkdtemp(prefix="space-precision-"))
        start = time.monotonic()
        artifact, data = build_and_train(
            work, args.line, args.size, args.steps, args.device, args.test_images, args.train_precision
        )
        print(
            f"trained {args.line} ({args.steps} steps, {args.size} px) in {time.monotonic() - start:.0f} s", flush=True
        )
    else:
        artifact, data = args.model, args.data
    index = scan_dataset(data, require_train=False)
    labels = np.array([s.is_anomalous for s in index.test])
    precisions = [s.strip() for s in args.precisions.split(",") if s.strip()]
    if precisions[0] != "fp32":
        raise SystemExit("--precisions must start with fp32 (the reference)")

    rows: dict[str, dict[str, Any]] = {}
    ref_scores: np.ndarray | None = None
    ref_maps: np.ndarray | None = None
    threshold = 0.0
    for precision in precisions:
        detector = Detector.load(artifact, device=args.device, precision=precision)  # type: ignore[arg-type]
        threshold = float(detector.card.default_threshold)
        images = [detector.prepare(load_image(s.path)) for s in index.test]
        scores, maps = score(detector, images, args.batch)
        verdicts = scores >= threshold
        row: dict[str, Any] = {
            "image_auroc": round(image_auroc(labels, scores), 4),
            "anomalous": int(verdicts.sum()),
            "images_per_s": round(raw_throughput(detector, args.batch, args.seconds)[0], 2),
        }
        if ref_scores is None or ref_maps is None:
            ref_scores, ref_maps = scores, maps
        else:
            diff = np.abs(scores - ref_scores)
            row |= {
                "max_abs_score_diff": float(diff.max()),
                "mean_abs_score_diff": float(diff.mean()),
                "max_diff_over_threshold": float(diff.max() / abs(threshold)) if threshold else None,
                "verdict_flips": int((verdicts != (ref_scores >= threshold)).sum()),
                "max_abs_map_diff": float(np.abs(maps - ref_maps).max()),
                "closest_fp32_score_to_threshold": float(np.abs(ref_scores - threshold).min()),
            }
        rows[precision] = row
        del detector

    print(f"\n{len(labels)} test images ({int(labels.sum())} defective), threshold {threshold:.4f} (model card), "
          f"device {args.device}, batch {args.batch}")  # fmt: skip
    print(f"{'precision':<10} {'AUROC':>7} {'flagged':>8} {'images/s':>9} {'max |dscore|':>13} {'/ threshold':>12} "
          f"{'flips':>6} {'max |dmap|':>11}")  # fmt: skip
    for precision, row in rows.items():
        extra = (f"{row['max_abs_score_diff']:13.5f} {row['max_diff_over_threshold'] or 0:12.2%} {row['verdict_flips']:6d} "
                 f"{row['max_abs_map_diff']:11.5f}") if "verdict_flips" in row else ""  # fmt: skip
        print(f"{precision:<10} {row['image_auroc']:7.4f} {row['anomalous']:8d} {row['images_per_s']:9.1f} {extra}")
    report = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()} cpus={os.cpu_count()}",
        "device": args.device, "size": args.size, "steps": args.steps, "line": args.line if args.model is None else None,
        "train_precision": args.train_precision if args.model is None else None,
        "model": str(artifact), "test_images": len(labels), "threshold": threshold, "batch": args.batch, "rows": rows,
    }  # fmt: skip
    print("JSON " + json.dumps(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
