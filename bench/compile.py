"""torch.compile vs eager, side by side: images/s of the model through the bucketed runner, CPU or CUDA.

For each batch size, variant and CUDA-graphs setting the run builds the model once (``bench/gpu.py``'s
``build``; weights in the compute dtype, as :class:`models.detector.Detector` keeps them), an eager
:class:`models.gpu.BucketedRunner` and a compiled one over the same weights. It times the first
compiled batch (the compile), checks that both give the same maps, then alternates timed repeats
(eager, compiled, compiled, eager, ...) so drift on a shared machine hits both alike. The table gives
the median images/s of each and the ratio compiled / eager. Examples::

    .venv/bin/python bench/compile.py --device cpu --variant efficientad,space --px 128 --batch 8
    python3 bench/compile.py --device cuda --precision bf16 --batch 64,1 --cuda-graphs both --out compile.json

Untrained but calibrated models: weights do not change the cost.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu import DTYPES, build, images_per_s, latency_ms
from models.gpu import TORCH_COMPILE_MODES, BucketedRunner
from models.model import SpaceModel


def make_runner(
    model: SpaceModel, args: argparse.Namespace, batch: int, graphs: bool, compiled: bool
) -> BucketedRunner:
    """A runner whose largest bucket is ``batch`` (the only one timed), compiled or eager."""
    return BucketedRunner(
        model.anomaly_map, (args.px, args.px), batch, torch.device(args.device), autocast=DTYPES[args.precision],
        cuda_graphs=graphs, compile_mode=TORCH_COMPILE_MODES[args.compile] if compiled else None,
    )  # fmt: skip


def measure(model: SpaceModel, args: argparse.Namespace, batch: int, graphs: bool) -> dict[str, Any]:
    """One configuration: compile time, agreement, then interleaved timed repeats of eager and compiled."""
    x = np.random.default_rng(0).integers(0, 255, (batch, args.px, args.px, 3), dtype=np.uint8)
    eager = make_runner(model, args, batch, graphs, compiled=False)
    compiled = make_runner(model, args, batch, graphs, compiled=True)
    want = eager.submit(x).result()
    start = time.perf_counter()
    got = compiled.submit(x).result()  # compiles this bucket (a cached graph when an earlier row built it)
    compile_s = time.perf_counter() - start
    for runner in (eager, compiled):  # the second buffer set (and its CUDA graph) of the bucket
        runner.submit(x).result()
    runs: dict[str, list[float]] = {"eager": [], "compiled": []}
    for rep in range(args.repeats):
        order = ("eager", "compiled") if rep % 2 == 0 else ("compiled", "eager")
        for name in order:
            runs[name].append(images_per_s(eager if name == "eager" else compiled, x, args.seconds))
    eager_ips, compiled_ips = statistics.median(runs["eager"]), statistics.median(runs["compiled"])
    row = {
        "batch": batch, "graphs": graphs, "eager_images_per_s": round(eager_ips, 2),
        "compiled_images_per_s": round(compiled_ips, 2), "ratio": round(compiled_ips / eager_ips, 3),
        "compile_s": round(compile_s, 1), "max_abs_diff": float(np.abs(got - want).max()),
        "map_spread": float(want.max() - want.min()),
        "runs": {k: [round(v, 2) for v in vs] for k, vs in runs.items()},
    }  # fmt: skip
    if batch == 1:  # the latency target (<= 1 ms) is one call's, not 1 / pipelined throughput
        row["eager_latency_ms"] = round(latency_ms(eager, x=x), 3)
        row["compiled_latency_ms"] = round(latency_ms(compiled, x=x), 3)
    return row


def device_name(device: str) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo (platform's guess elsewhere)."""
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="fp32", choices=list(DTYPES))
    parser.add_argument("--batch", default="8", help="Comma-separated batch sizes, measured in this order.")
    parser.add_argument("--px", type=int, default=256, help="Model input size.")
    parser.add_argument("--variant", default="efficientad", help="Comma-separated: efficientad, space.")
    parser.add_argument("--size", default="s", choices=["s", "m"])
    parser.add_argument("--teacher", default="pdn", choices=["pdn", "filterbank"], help="Teacher network kind.")
    parser.add_argument("--compile", default="default", choices=[m for m in TORCH_COMPILE_MODES if m != "off"])
    parser.add_argument(
        "--cuda-graphs", nargs="?", const="on", default="off", choices=["off", "on", "both"],
        help="Capture a CUDA graph per bucket around both runners; 'both' measures with and without.",
    )  # fmt: skip
    parser.add_argument("--seconds", type=float, default=2.0, help="Timed seconds per repeat.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed repeats of each runner, interleaved.")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's).")
    parser.add_argument("--out", default=None, help="Write the results as JSON to this file.")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA device (torch.cuda.is_available() is False)")
    if args.device == "cpu" and (args.precision == "fp16" or args.cuda_graphs != "off"):
        raise SystemExit("fp16 and CUDA graphs need --device cuda")
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    report: dict[str, Any] = {
        "device": device_name(args.device), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(), "px": args.px,
        "precision": args.precision, "compile": args.compile, "teacher": args.teacher, "seconds": args.seconds,
        "repeats": args.repeats, "rows": [], "errors": [],
        "compile_s_note": "compile_s is the first compiled batch; a row whose shape an earlier row compiled "
                          "(graphs on after graphs off) reuses that compiled code, so its compile_s reads ~0",
    }  # fmt: skip
    out = Path(args.out) if args.out else None
    graph_settings = {"off": (False,), "on": (True,), "both": (False, True)}[args.cuda_graphs]
    print(f"# {report['device']}, torch {torch.__version__}, {args.px} px, {args.precision}, compile={args.compile}, "
          f"threads={report['threads']}, {args.repeats} interleaved repeats of {args.seconds} s, medians")  # fmt: skip
    print(
        "| variant | batch | graphs | eager images/s | compiled images/s | compiled / eager | compile s | max abs diff |"
    )
    print("|---|---|---|---|---|---|---|---|")
    models: dict[str, SpaceModel] = {}
    for batch in (int(b) for b in args.batch.split(",")):
        for variant in args.variant.split(","):
            if variant not in models:
                weights = DTYPES[args.precision] or torch.float32
                models[variant] = build(variant, args.size, args.px, args.teacher, args.device, weights)
            for graphs in graph_settings:
                name = f"{variant}-{args.size}"
                try:
                    row = {"variant": name, **measure(models[variant], args, batch, graphs)}
                except Exception as exc:  # noqa: BLE001 - one broken configuration must not end the run
                    report["errors"].append(f"{name} batch={batch} graphs={graphs}: {exc!r}"[:500])
                    print(f"| {name} | {batch} | {graphs} | failed: {exc!r} |"[:300], flush=True)
                    continue
                compiled_before = any(r["variant"] == name and r["batch"] == batch for r in report["rows"])
                if compiled_before:
                    row["compile_s_note"] = "shape compiled by an earlier row: cached code, not a compile"
                report["rows"].append(row)
                mark = " (cached)" if compiled_before else ""
                print(f"| {name} | {batch} | {graphs} | {row['eager_images_per_s']:,.1f} | "
                      f"{row['compiled_images_per_s']:,.1f} | {row['ratio']:.2f} | {row['compile_s']:.1f}{mark} | "
                      f"{row['max_abs_diff']:.2g} |", flush=True)  # fmt: skip
                if out is not None:  # partial results survive a timeout
                    out.write_text(json.dumps(report, indent=2))
                if args.device == "cuda":
                    torch.cuda.empty_cache()
    if any("compile_s_note" in r for r in report["rows"]):
        print("compile s (cached): that shape was compiled by an earlier row, so the figure is not a compile time")
    if out is not None:
        out.write_text(json.dumps(report, indent=2))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
