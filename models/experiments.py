"""Small, reproducible accuracy comparisons behind docs/model.md (not used at run time).

Owns :func:`compare`: builds synthetic product lines (:mod:`models.synthetic`), trains each run spec on the
same data, steps, seed and teacher, evaluates with :mod:`models.evaluate`, and prints a markdown table::

    .venv/bin/python -m models.experiments --lines brick grass gravel --steps 100 \
        --runs space:offline efficientad:offline --out work/exp

A run spec is ``variant:teacher[:flag=value,...]`` (flags are :class:`models.train.TrainConfig` fields).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import structlog
import torch

from models import data as dataset
from models.detector import Detector
from models.evaluate import evaluate
from models.synthetic import build_product_line
from models.train import TrainConfig, train

log = structlog.get_logger(__name__)


def _parse_run(spec: str) -> tuple[str, dict[str, Any]]:
    variant, teacher, *rest = spec.split(":")
    kw: dict[str, Any] = {"variant": variant, "teacher": teacher}
    for item in rest[0].split(",") if rest else []:
        key, _, value = item.partition("=")
        kw[key] = {"true": True, "false": False}.get(value.lower(), value)
    return spec, kw


def compare(
    lines: list[str], runs: list[str], out: Path, *, steps: int, size: int, seed: int, n_train: int, n_test: int
) -> list[dict[str, Any]]:
    """Train and evaluate every run spec on every line; returns one row per (line, run)."""
    rows = []
    for line in lines:
        root = build_product_line(
            line,
            out / "data",
            n_train=n_train,
            n_val=max(4, n_train // 5),
            n_test_good=n_test,
            n_test_defect=n_test,
            size=size,
            seed=seed,
        )
        for spec, kw in map(_parse_run, runs):
            tag = spec.replace(":", "_").replace(",", "_").replace("=", "-")
            cfg = TrainConfig.model_validate(
                {
                    "data": root,
                    "product_line": f"{line}-{tag}",
                    "out": out / "models",
                    "steps": steps,
                    "input_size": size,
                    "seed": seed,
                    "model_version": "exp",
                    **kw,
                }
            )
            t0 = time.monotonic()
            artifact = train(cfg)
            train_s = time.monotonic() - t0
            det = Detector.load(artifact, device="cpu", precision="bf16")
            metrics = evaluate(det, dataset.scan_dataset(root), out / "eval" / f"{line}-{tag}", gallery=0)
            overall = metrics["overall"]
            row = {
                "line": line,
                "run": spec,
                "steps": steps,
                "image_auroc": overall["image_auroc"],
                "pixel_auroc": overall["pixel_auroc"],
                "au_pro": overall["au_pro"],
                "train_s": round(train_s, 1),
                "s_per_1000_steps": round(1000 * det.card.training.duration_s / steps, 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    """CLI entry point (``python -m models.experiments``)."""
    ap = argparse.ArgumentParser(description="Compare variants/teachers on synthetic product lines.")
    ap.add_argument("--lines", nargs="+", default=["brick", "grass", "gravel"])
    ap.add_argument("--runs", nargs="+", default=["space:offline", "efficientad:offline"])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=20)
    ap.add_argument("--n-test", type=int, default=12, help="good and defective test images each")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True, help="work folder (data, models, eval)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = compare(
        args.lines,
        args.runs,
        args.out,
        steps=args.steps,
        size=args.size,
        seed=args.seed,
        n_train=args.n_train,
        n_test=args.n_test,
    )
    print("| line | run | steps | image AUROC | pixel AUROC | AU-PRO | s / 1000 steps |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        keys = ("image_auroc", "pixel_auroc", "au_pro")
        fmt = [f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys]
        print(f"| {r['line']} | {r['run']} | {r['steps']} | {' | '.join(fmt)} | {r['s_per_1000_steps']} |")


if __name__ == "__main__":
    main()
