"""Detector throughput: images/s at batch 1, 8, 32 in fp32 and bf16 (channels_last), ``space`` next to
``efficientad`` in the same run, the relative inference cost of ``space``, and the offline teachers' cost.

Models are untrained but calibrated (weights do not change the cost). Usage::

    .venv/bin/python bench/model.py --input-size 256 --reps 3 --threads 2

On a shared CPU keep ``--reps`` small; the table reports the best (minimum-time) repetition.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.artifact import ModelCard, Quantiles, ScoreStats, TeacherInfo, TrainingSummary
from models.detector import Detector
from models.model import ModelConfig, SpaceModel, efficientad_config
from models.networks import PDN
from models.teacher import FilterBankTeacher


def _detector(variant: str, size: int, precision: str, device: str) -> Detector:
    cfg = ModelConfig(input_size=(size, size)) if variant == "space" else efficientad_config(input_size=(size, size))
    torch.manual_seed(0)
    model = SpaceModel(cfg)
    model.calibrated.fill_(True)
    card = ModelCard(
        name=f"bench-{variant}",
        product_line="bench",
        version="0",
        variant=cfg.variant,
        size=cfg.size,
        input_size=cfg.input_size,
        config=cfg,
        teacher=TeacherInfo(source="offline:filterbank"),
        quantiles=Quantiles(qa_st=0, qb_st=1, qa_ae=0, qb_ae=1),
        default_threshold=1.0,
        threshold_method="bench",
        validation_scores=ScoreStats(n=0, mean=0, std=0, min=0, q50=0, q90=0, q99=0, max=0),
        training=TrainingSummary(
            data_root="",
            data_sha256="",
            n_train=0,
            n_validation=0,
            validation_source="validation_good",
            steps=0,
            batch_size=1,
            seed=0,
            duration_s=0,
            device="cpu",
            precision="fp32",
            penalty_source="none",
        ),
    )
    return Detector.from_model(model, card, device=device, precision=precision, channels_last=True)  # type: ignore[arg-type]


def _images_per_s(det: Detector, batch: int, reps: int) -> float:
    h, w = det.input_size
    x = np.random.default_rng(0).integers(0, 256, (batch, h, w, 3), dtype=np.uint8)
    det.predict(x)  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        det.predict(x)
        times.append(time.perf_counter() - t0)
    return batch / min(times)


def _teacher_ms(kind: str, size: int, batch: int, reps: int, precision: str) -> float:
    """Milliseconds per image of the teacher alone (the offline-teacher cost comparison)."""
    teacher = FilterBankTeacher() if kind == "filterbank" else PDN("s")
    teacher = teacher.eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    times = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        teacher(x)
        for _ in range(reps):
            t0 = time.perf_counter()
            teacher(x)
            times.append(time.perf_counter() - t0)
    return 1000 * min(times) / batch


def main() -> None:
    """Run the benchmark and print a markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input-size", type=int, default=256)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--malloc", default="retain", choices=["retain", "system"],
                    help="SPACE_MODELS__MALLOC as `space serve` applies it (bench/malloc.py compares the two).")  # fmt: skip
    args = ap.parse_args()
    from worker.malloc import configure_malloc

    configure_malloc(args.malloc)
    torch.set_num_threads(args.threads)
    print(
        f"# Detector throughput, {args.input_size}px, device={args.device}, threads={args.threads}, malloc={args.malloc}, "
        f"reps={args.reps} (best of reps: the CPU is shared, the minimum is the least disturbed), torch {torch.__version__}"
    )
    print("| precision | batch | efficientad img/s | space img/s | space cost vs efficientad |")
    print("|---|---|---|---|---|")
    for precision in args.precisions:
        dets = {v: _detector(v, args.input_size, precision, args.device) for v in ("efficientad", "space")}
        for batch in args.batches:
            # interleave the two variants so a noisy neighbour affects both alike
            eff, spc = [], []
            for _ in range(2):
                eff.append(_images_per_s(dets["efficientad"], batch, args.reps))
                spc.append(_images_per_s(dets["space"], batch, args.reps))
            e, s = max(eff), max(spc)
            print(f"| {precision} | {batch} | {e:.1f} | {s:.1f} | {e / s:.2f}x |", flush=True)
    print()
    print("| teacher (alone) | precision | ms / image at batch 8 |")
    print("|---|---|---|")
    for kind in ("filterbank", "pdn-s"):
        for precision in args.precisions:
            ms = min(_teacher_ms(kind, args.input_size, 8, args.reps, precision) for _ in range(2))
            print(f"| {kind} | {precision} | {ms:.1f} |", flush=True)


if __name__ == "__main__":
    main()
