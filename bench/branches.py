"""Serial vs concurrent branches, side by side: the model's images/s and batch-1 latency on CUDA.

The autoencoder needs only the image, and EfficientAD's student does not need its teacher: with
``SPACE_MODELS__CONCURRENT_BRANCHES=true`` they run on side CUDA streams beside the student
(:class:`models.gpu.BranchStreams`, captured into the same CUDA graph). At batch 1 no single
network fills the card (the autoencoder is a chain of small convolutions and resizes), so running
them side by side should shorten a batch; at batch 64 each layer fills the card already.

For each variant and batch size the run builds one model (``bench/gpu.py``'s ``build``; weights in
the compute dtype, as :class:`models.detector.Detector` keeps them) and two
:class:`models.gpu.BucketedRunner` over it, serial and concurrent, checks that both give the same
maps, then alternates timed repeats (serial, concurrent, concurrent, serial, ...) so drift hits
both alike. Batch 1 also gets the median latency of one synchronous call. Example::

    python3 bench/branches.py --precision bf16 --batch 1,8,64 --cuda-graphs both --out branches.json

Untrained but calibrated models: weights do not change the cost. CUDA only (side streams).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu import DTYPES, build, images_per_s, latency_ms
from models.gpu import BranchStreams, BucketedRunner
from models.model import SpaceModel

KINDS = ("serial", "concurrent")


def make_runner(model: SpaceModel, args: argparse.Namespace, batch: int, graphs: bool, kind: str) -> BucketedRunner:
    """A runner whose largest bucket is ``batch`` (the only one timed), serial or with branch streams."""
    device = torch.device("cuda")
    forward = model.anomaly_map
    if kind == "concurrent":
        forward = functools.partial(model.anomaly_map, branches=BranchStreams(device))
    return BucketedRunner(
        forward, (args.px, args.px), batch, device, autocast=DTYPES[args.precision], cuda_graphs=graphs
    )


def measure(model: SpaceModel, args: argparse.Namespace, batch: int, graphs: bool) -> dict[str, Any]:
    """One configuration: agreement, then interleaved timed repeats of both runners."""
    x = np.random.default_rng(0).integers(0, 255, (batch, args.px, args.px, 3), dtype=np.uint8)
    runners = {kind: make_runner(model, args, batch, graphs, kind) for kind in KINDS}
    maps = {kind: runner.submit(x).result() for kind, runner in runners.items()}
    for runner in runners.values():  # the second buffer set (and its CUDA graph) of the bucket, then warm
        for _ in range(5):
            runner.submit(x).result()
    ips: dict[str, list[float]] = {kind: [] for kind in KINDS}
    latency: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for rep in range(args.repeats):
        for kind in KINDS if rep % 2 == 0 else KINDS[::-1]:
            ips[kind].append(images_per_s(runners[kind], x, args.seconds))
            if batch == 1:
                latency[kind].append(latency_ms(runners[kind], args.latency_reps, x))
    serial, concurrent = statistics.median(ips["serial"]), statistics.median(ips["concurrent"])
    row: dict[str, Any] = {
        "batch": batch, "graphs": graphs, "serial_images_per_s": round(serial, 1),
        "concurrent_images_per_s": round(concurrent, 1), "ratio": round(concurrent / serial, 3),
        "max_abs_diff": float(np.abs(maps["concurrent"] - maps["serial"]).max()),
        "map_spread": float(maps["serial"].max() - maps["serial"].min()),
        "runs": {k: [round(v, 1) for v in vs] for k, vs in ips.items()},
    }  # fmt: skip
    if batch == 1:
        row["serial_latency_ms"] = round(statistics.median(latency["serial"]), 3)
        row["concurrent_latency_ms"] = round(statistics.median(latency["concurrent"]), 3)
    return row


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="bf16", choices=list(DTYPES))
    parser.add_argument("--batch", default="1,8,64", help="Comma-separated batch sizes, measured in this order.")
    parser.add_argument("--px", type=int, default=256, help="Model input size.")
    parser.add_argument("--variant", default="efficientad,space", help="Comma-separated: efficientad, space.")
    parser.add_argument("--size", default="s", choices=["s", "m"])
    parser.add_argument("--teacher", default="pdn", choices=["pdn", "filterbank"],
                        help="Teacher network kind (pdn, as bench/gpu.py's table).")  # fmt: skip
    parser.add_argument(
        "--cuda-graphs", default="on", choices=["off", "on", "both"],
        help="Capture a CUDA graph per bucket around both runners; 'both' measures with and without.",
    )  # fmt: skip
    parser.add_argument("--seconds", type=float, default=0.3, help="Timed seconds per repeat.")
    parser.add_argument("--repeats", type=int, default=4, help="Timed repeats of each runner, interleaved.")
    parser.add_argument("--latency-reps", type=int, default=100, help="Synchronous calls per batch-1 latency.")
    parser.add_argument("--out", default=None, help="Write the results as JSON to this file.")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/branches.py needs a CUDA device: branches run on side CUDA streams")
    return args


def main() -> None:
    args = parse_args()
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0), "cpus": os.cpu_count(), "torch": torch.__version__,
        "python": platform.python_version(), "px": args.px, "precision": args.precision,
        "seconds": args.seconds, "repeats": args.repeats, "rows": [], "errors": [],
    }  # fmt: skip
    out = Path(args.out) if args.out else None
    graph_settings = {"off": (False,), "on": (True,), "both": (True, False)}[args.cuda_graphs]
    print(f"# {report['device']}, torch {torch.__version__}, {args.px} px, {args.precision}, "
          f"{args.repeats} interleaved repeats of {args.seconds} s, medians")  # fmt: skip
    print("| variant | batch | graphs | serial images/s | concurrent images/s | concurrent / serial "
          "| batch-1 latency serial / concurrent | max abs diff |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    models: dict[str, SpaceModel] = {}
    for batch in (int(b) for b in args.batch.split(",")):
        for variant in args.variant.split(","):
            teacher = args.teacher
            if variant not in models:
                models[variant] = build(variant, args.size, args.px, teacher, weights=DTYPES[args.precision])
            for graphs in graph_settings:
                name = f"{variant}-{args.size}"
                try:
                    row = {"variant": name, "teacher": teacher, **measure(models[variant], args, batch, graphs)}
                except Exception as exc:  # noqa: BLE001 - one broken configuration must not end the run
                    report["errors"].append(f"{name} batch={batch} graphs={graphs}: {exc!r}"[:500])
                    print(f"| {name} | {batch} | {graphs} | failed: {exc!r} |"[:300], flush=True)
                    continue
                report["rows"].append(row)
                lat = (f"{row['serial_latency_ms']:.3f} / {row['concurrent_latency_ms']:.3f} ms"
                       if batch == 1 else "-")  # fmt: skip
                print(f"| {name} | {batch} | {graphs} | {row['serial_images_per_s']:,.1f} | "
                      f"{row['concurrent_images_per_s']:,.1f} | {row['ratio']:.2f} | {lat} | "
                      f"{row['max_abs_diff']:.2g} |", flush=True)  # fmt: skip
                if out is not None:  # partial results survive a timeout
                    out.write_text(json.dumps(report, indent=2))
                torch.cuda.empty_cache()
    if out is not None:
        out.write_text(json.dumps(report, indent=2))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
