"""CPU model throughput and peak memory with glibc's default malloc vs ``SPACE_MODELS__MALLOC=retain``.

``mallopt`` settings hold for a whole process and cannot be undone, so each measurement runs in a
child process of its own; the children alternate (system, retain, system, retain, ...) so drift on
a shared machine hits both modes alike. Each child loads an untrained, calibrated detector (weights
do not change the cost), scores batches in a thread of its own as the worker's inference thread
does, alternating full batches with random smaller ones (as a dynamic batcher hands them over), and
reports the full batches' images/s and its peak resident memory (``ru_maxrss``: the high-water mark,
not a sample between batches).

Usage::

    .venv/bin/python bench/malloc.py --px 128 --batch 16 --rounds 3 --threads 2

Prints a table and a JSON line; figures go to docs/performance.md with the machine they came from.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODES = ("system", "retain")


def child(mode: str, variant: str, px: int, batch: int, batches: int, threads: int) -> dict[str, Any]:
    """Measure in this process (``--child``): configure malloc first, then load and score."""
    from worker.malloc import configure_malloc

    outcome = configure_malloc(mode)  # type: ignore[arg-type]
    import numpy as np
    import torch

    from bench.model import _detector

    torch.set_num_threads(threads)
    detector = _detector(variant, px, "fp32", "cpu")
    rng = np.random.default_rng(0)
    rates: list[float] = []

    def score() -> None:
        for i in range(batches + 1):
            n = batch if i % 2 == 0 else int(rng.integers(1, batch + 1))
            x = rng.integers(0, 255, (n, px, px, 3), dtype=np.uint8)
            start = time.perf_counter()
            detector.predict(x)
            if n == batch and i > 0:  # batch 0 warms up
                rates.append(n / (time.perf_counter() - start))

    thread = threading.Thread(target=score, name="infer")
    thread.start()
    thread.join()
    return {
        "mode": mode,
        "applied": outcome.applied,
        "images_per_s": statistics.median(rates),
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="space", choices=["space", "efficientad"])
    p.add_argument("--px", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--batches", type=int, default=12, help="Scored batches per child (half of them full).")
    p.add_argument("--rounds", type=int, default=3, help="Children per mode, alternating.")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.variant, args.px, args.batch, args.batches, args.threads)))
        return

    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    for r in range(args.rounds):
        for mode in MODES if r % 2 == 0 else MODES[::-1]:
            cmd = [sys.executable, __file__, "--child", mode, "--variant", args.variant, "--px", str(args.px),
                   "--batch", str(args.batch), "--batches", str(args.batches), "--threads", str(args.threads)]  # fmt: skip
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs[mode].append(json.loads(out.strip().splitlines()[-1]))
            print(f"  round {r + 1} {mode:<7} {runs[mode][-1]['images_per_s']:7.1f} images/s  "
                  f"peak RSS {runs[mode][-1]['max_rss_mib']:6.0f} MiB", flush=True)  # fmt: skip
    summary = {
        m: {
            "images_per_s": round(statistics.median(r["images_per_s"] for r in rs), 2),
            "max_rss_mib": round(statistics.median(r["max_rss_mib"] for r in rs)),
            "applied": all(r["applied"] for r in rs),
        }
        for m, rs in runs.items()
    }
    speedup = summary["retain"]["images_per_s"] / summary["system"]["images_per_s"]
    rss = summary["retain"]["max_rss_mib"] / summary["system"]["max_rss_mib"]
    print(f"\n{args.variant} {args.px} px batch {args.batch} fp32, {args.threads} threads, median of {args.rounds}:")
    print(f"  system  {summary['system']['images_per_s']:7.1f} images/s  peak RSS {summary['system']['max_rss_mib']} MiB")
    print(f"  retain  {summary['retain']['images_per_s']:7.1f} images/s  peak RSS {summary['retain']['max_rss_mib']} MiB")
    print(f"  retain / system: {speedup:.2f}x throughput, {rss:.2f}x peak RSS")
    report = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()} cpus={os.cpu_count()}",
        "variant": args.variant, "px": args.px, "batch": args.batch, "threads": args.threads, "rounds": args.rounds,
        "summary": summary, "speedup": round(speedup, 3), "rss_ratio": round(rss, 3), "runs": runs,
    }  # fmt: skip
    print("JSON " + json.dumps(report))


if __name__ == "__main__":
    main()
