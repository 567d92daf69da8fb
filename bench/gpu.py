"""GPU benchmark: model images/s across batch sizes, precisions, variants, sizes; share of matmul peak.

One run of a few minutes on a CUDA host (``bench/gpu.sh`` calls it, then ``bench/e2e.py``):

* the card's measured dense matmul peak (8192^3 products, bf16 / fp16 / tf32);
* for ``efficientad`` and ``space``, sizes ``s`` and ``m``, precisions fp32 / bf16 / fp16, batch
  1..128: images/s through :class:`models.gpu.BucketedRunner` (uint8 upload, pinned buffers, copy
  stream), with and without CUDA graphs, and batch-1 latency;
* achieved FLOP/s as a share of the measured peak (76 GFLOP per image for EfficientAD-S, 235 for M,
  per SPACE_SPEC; SPACE adds the FM on top, so its share is a lower bound).

``--compile default|max-autotune`` runs the same table through ``torch.compile`` (as
``SPACE_MODELS__COMPILE`` does); every configuration then compiles all its buckets first.

Writes ``gpu.json`` (and prints a markdown table) into ``--out``. Untrained but calibrated models:
weights do not change the cost. Exits with a clear message on a machine without CUDA.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.gpu import TORCH_COMPILE_MODES, BucketedRunner
from models.model import ModelConfig, SpaceModel, efficientad_config

GFLOP_PER_IMAGE = {"s": 76.0, "m": 235.0}  # EfficientAD at 256 px, no padding (SPACE_SPEC §1.2)
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def matmul_peak(dtype: torch.dtype, n: int = 8192, reps: int = 10) -> float:
    """Measured dense matmul TFLOP/s on random data (mean of ``reps`` after 3 warm-ups)."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def build(
    variant: str, size: str, px: int, teacher: str, device: str = "cuda", weights: torch.dtype | None = None
) -> SpaceModel:
    """A calibrated, untrained channels_last model; ``weights`` casts its parameters to that dtype, as
    :class:`models.detector.Detector` keeps them for autocast (no per-call weight casts)."""
    common: dict[str, Any] = {"size": size, "input_size": (px, px), "teacher_kind": teacher}
    cfg = ModelConfig(**common) if variant == "space" else efficientad_config(**common)
    torch.manual_seed(0)
    model = SpaceModel(cfg)
    model.calibrated.fill_(True)
    model = model.eval().to(device).to(memory_format=torch.channels_last)
    if weights is not None:
        for p in model.parameters():
            p.data = p.data.to(weights)
    return model


def images_per_s(runner: BucketedRunner, x: np.ndarray, seconds: float) -> float:
    """Images/s of a warm runner over at least ``seconds`` and two batches, two batches in flight
    (the copy of n+1 overlaps compute of n)."""
    n = 0
    start = time.perf_counter()
    pending = runner.submit(x)
    while n == 0 or time.perf_counter() - start < seconds:
        nxt = runner.submit(x)
        pending.result()
        pending = nxt
        n += len(x)
    pending.result()
    n += len(x)
    return n / (time.perf_counter() - start)


def throughput(runner: BucketedRunner, batch: int, seconds: float) -> float:
    """Images/s at ``batch`` after three warm-up batches."""
    h, w = runner.input_size
    x = np.random.default_rng(0).integers(0, 255, (batch, h, w, 3), dtype=np.uint8)
    for _ in range(3):
        runner.submit(x).result()
    return images_per_s(runner, x, seconds)


def latency_ms(runner: BucketedRunner, reps: int = 200, x: np.ndarray | None = None) -> float:
    """Median wall time of one synchronous call (upload, forward, maps back) after 20 warm-up calls, in ms;
    ``x`` defaults to one black image."""
    h, w = runner.input_size
    x = np.zeros((1, h, w, 3), np.uint8) if x is None else x
    for _ in range(20):
        runner.submit(x).result()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        runner.submit(x).result()
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".", help="Folder for gpu.json.")
    parser.add_argument("--px", type=int, default=256)
    parser.add_argument("--batches", default="1,8,16,32,64,128")
    parser.add_argument("--seconds", type=float, default=1.0, help="Timed seconds per configuration.")
    parser.add_argument("--teacher", default="pdn", choices=["pdn", "filterbank"], help="Teacher network kind.")
    parser.add_argument("--quick", action="store_true", help="Only S models and bf16 (a smoke run).")
    parser.add_argument("--variants", default="efficientad,space")
    parser.add_argument("--sizes", default="s,m")
    parser.add_argument("--precisions", default="fp32,bf16,fp16")
    parser.add_argument(
        "--compile", default="off", choices=list(TORCH_COMPILE_MODES),
        help="torch.compile mode (as SPACE_MODELS__COMPILE); each configuration first compiles every bucket.",
    )  # fmt: skip
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA device (torch.cuda.is_available() is False)")
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    props = torch.cuda.get_device_properties(0)
    report: dict[str, Any] = {
        "device": props.name,
        "sms": props.multi_processor_count,
        "torch": torch.__version__,
        "px": args.px,
        "teacher": args.teacher,
        "compile": args.compile,
        "weights": "compute dtype (bf16/fp16 rows: weights cast to it, as the Detector serves)",
        "peak_tflops": {
            "bf16": round(matmul_peak(torch.bfloat16), 1),
            "fp16": round(matmul_peak(torch.float16), 1),
            "fp32": round(matmul_peak(torch.float32), 1),
        },
        "rows": [],
        "errors": [],
    }
    print(f"# {props.name}: matmul peak TFLOP/s {report['peak_tflops']}, compile={args.compile}", flush=True)
    batches = [int(b) for b in args.batches.split(",")]
    sizes = ("s",) if args.quick else tuple(args.sizes.split(","))
    precisions = ("bf16",) if args.quick else tuple(args.precisions.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print("| variant | size | precision | graphs | batch | images/s | share of peak | batch-1 latency ms |")
    print("|---|---|---|---|---|---|---|---|")
    for variant in args.variants.split(","):
        for size in sizes:
            model = build(variant, size, args.px, args.teacher)
            masters = {name: p.data for name, p in model.named_parameters()}  # fp32, cast per precision below
            for precision in precisions:
                # Weights in the compute dtype, as models.detector.Detector keeps them for autocast (no
                # per-call weight casts). The 2026-11-27 H100 table had fp32 weights under autocast.
                for name, param in model.named_parameters():
                    param.data = masters[name].to(DTYPES[precision] or torch.float32)
                # Graphs on and off side by side where it matters most (bf16); graphs only elsewhere.
                for graphs in (False, True) if precision == "bf16" or args.quick else (True,):
                    try:
                        rows = measure(model, variant, size, precision, graphs, batches, args, report)
                    except Exception as exc:  # noqa: BLE001 - one broken configuration must not end the run
                        report["errors"].append(f"{variant}-{size}-{precision}-graphs={graphs}: {exc!r}"[:500])
                        print(f"| {variant} | {size} | {precision} | {graphs} | failed: {exc!r} |", flush=True)
                        rows = []
                    report["rows"].extend(rows)
                    torch.cuda.empty_cache()
                    (out / "gpu.json").write_text(json.dumps(report, indent=2))  # partial results survive a timeout
            report.setdefault("memory_mib", {})[f"{variant}-{size}"] = round(torch.cuda.max_memory_allocated() / 2**20)
            torch.cuda.reset_peak_memory_stats()
            del model, masters
    (out / "gpu.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out / 'gpu.json'}")


def measure(
    model: SpaceModel, variant: str, size: str, precision: str, graphs: bool, batches: list[int],
    args: argparse.Namespace, report: dict[str, Any],
) -> list[dict[str, Any]]:  # fmt: skip
    """One configuration: warm every bucket, batch-1 latency, then images/s per batch size."""
    runner = BucketedRunner(
        model.anomaly_map, (args.px, args.px), max(batches), torch.device("cuda"),
        autocast=DTYPES[precision], cuda_graphs=graphs, compile_mode=TORCH_COMPILE_MODES[args.compile],
    )  # fmt: skip
    runner.warmup()
    lat = latency_ms(runner)
    rows = []
    for batch in batches:
        ips = throughput(runner, batch, args.seconds)
        peak = report["peak_tflops"]["fp32" if precision == "fp32" else precision]
        share = ips * GFLOP_PER_IMAGE[size] * (args.px / 256) ** 2 / 1000 / peak
        rows.append({"variant": variant, "size": size, "precision": precision, "graphs": graphs, "batch": batch,
                     "images_per_s": round(ips, 1), "share_of_peak": round(share, 4),
                     "batch1_latency_ms": round(lat, 3)})  # fmt: skip
        print(
            f"| {variant} | {size} | {precision} | {graphs} | {batch} | {ips:,.0f} | {share:.1%} | {lat:.3f} |",
            flush=True,
        )
    del runner
    return rows


if __name__ == "__main__":
    main()
