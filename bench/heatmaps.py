"""Heatmap stage benchmark: how many maps a second the worker can encode and store.

With ``SPACE_HEATMAPS__POLICY=all`` every result carries a heatmap, and on a GPU pod the heatmap pool
(not the model) set the end-to-end rate (docs/performance.md: 516 img/s with heatmaps vs 1,034
without on an H100). This measures that stage alone, side by side in one run:

* ``current``: :func:`worker.heatmaps.save_heatmap` into a :class:`~worker.heatmaps.FileHeatmapStore`
  from this checkout;
* ``baseline``: the same call from ``worker/heatmaps.py`` at another git revision (``--baseline-rev``),
  loaded from ``git show`` so no old code is copied here.

Both run interleaved (``--repeats`` rounds, the median is reported) through a thread pool of each size
in ``--threads``, on the same maps: smooth fields like the model's (a coarse map upsampled
bilinearly, plus one defect blob), 256x256 by default. A per-step breakdown on one thread (scale to
uint8, PNG encode, store; medians of the same interleaved rounds) and the mean PNG size come first.

Usage: ``.venv/bin/python bench/heatmaps.py [--px 256] [--images 256] [--threads 1,2,4]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from worker import heatmaps as current  # noqa: E402

WHEN = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
THRESHOLD = 0.5


def make_maps(n: int, px: int, seed: int = 0) -> np.ndarray:
    """Model-like maps: a 1/4-resolution random field upsampled bilinearly, one blob above threshold."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((n, px // 4, px // 4), dtype=np.float32) * 0.3
    maps = np.stack([cv2.resize(c, (px, px), interpolation=cv2.INTER_LINEAR) for c in coarse])
    for i, m in enumerate(maps):
        y, x = rng.integers(px // 8, px - px // 8, size=2)
        cv2.circle(m, (int(x), int(y)), px // 16, 1.0 + 0.1 * (i % 5), -1)
        maps[i] = cv2.GaussianBlur(m, (0, 0), px / 128)
    return maps


def load_revision(rev: str) -> types.ModuleType:
    """``worker/heatmaps.py`` as it was at ``rev``, imported under a private name."""
    source = subprocess.run(
        ["git", "show", f"{rev}:worker/heatmaps.py"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    spec = importlib.util.spec_from_loader(f"heatmaps_{rev}", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    exec(compile(source, f"{rev}:worker/heatmaps.py", "exec"), module.__dict__)  # our own history, not user input
    return module


def run_stage(module: types.ModuleType, maps: np.ndarray, root: Path, threads: int, tag: str) -> float:
    """Store every map through a pool of ``threads``; returns images/s."""
    store = module.FileHeatmapStore(root)
    with ThreadPoolExecutor(threads) as pool:
        start = time.perf_counter()
        futures = [
            pool.submit(module.save_heatmap, store, "line-a", WHEN, f"{tag}-{i}", m, THRESHOLD)
            for i, m in enumerate(maps)
        ]
        for f in futures:
            f.result()
        return len(maps) / (time.perf_counter() - start)


def time_per_image_ms(fn: Callable[[int], object], n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - start) / n * 1000


def breakdown(module: types.ModuleType, maps: np.ndarray, root: Path) -> dict[str, float]:
    """Milliseconds per image on one thread for each step of ``save_heatmap``."""
    n = len(maps)
    u8 = [module.heatmap_to_uint8(m, THRESHOLD) for m in maps]
    pngs = [module.encode_heatmap_png(m, THRESHOLD) for m in maps]
    store = module.FileHeatmapStore(root)
    return {
        "to_uint8_ms": time_per_image_ms(lambda i: module.heatmap_to_uint8(maps[i], THRESHOLD), n),
        "png_encode_ms": time_per_image_ms(lambda i: module.encode_heatmap_png(maps[i], THRESHOLD), n),
        "store_put_ms": time_per_image_ms(
            lambda i: store.put(module.heatmap_key("line-a", WHEN, f"p-{i}", "png"), pngs[i], "image/png"), n
        ),
        "png_kib": statistics.mean(len(p) for p in pngs) / 1024,
        "lossless": float(
            all(np.array_equal(cv2.imdecode(np.frombuffer(p, np.uint8), 0), u) for p, u in zip(pngs, u8, strict=True))
        ),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--px", type=int, default=256, help="map side in pixels (the model input size)")
    p.add_argument("--images", type=int, default=256, help="maps per round")
    p.add_argument("--threads", default="1,2,4", help="pool sizes to measure, comma-separated")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds per configuration")
    p.add_argument("--baseline-rev", default="028817d", help="git revision whose worker/heatmaps.py is the baseline")
    p.add_argument("--out", type=Path, help="write the JSON report here")
    args = p.parse_args()

    baseline = load_revision(args.baseline_rev)
    maps = make_maps(args.images, args.px)
    report: dict[str, object] = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.platform()}",
        "opencv": cv2.__version__, "px": args.px, "images": args.images, "baseline_rev": args.baseline_rev,
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="hm-bench-") as tmp:
        root = Path(tmp)
        modules = (("baseline", baseline), ("current", current))
        samples: dict[str, list[dict[str, float]]] = {"baseline": [], "current": []}
        for r in range(args.repeats):
            for name, mod in modules if r % 2 == 0 else modules[::-1]:
                samples[name].append(breakdown(mod, maps, root / f"steps-{name}-{r}"))
        steps = {name: {k: statistics.median(s[k] for s in runs) for k in runs[0]} for name, runs in samples.items()}
        report["steps"] = steps
        print(
            f"heatmap stage, {args.px}x{args.px} maps, {args.images} per round, {report['machine']}, OpenCV {cv2.__version__}"
        )
        print("| step (1 thread) | baseline | current |")
        print("|---|---|---|")
        for key in ("to_uint8_ms", "png_encode_ms", "store_put_ms", "png_kib", "lossless"):
            print(f"| {key} | {steps['baseline'][key]:.3f} | {steps['current'][key]:.3f} |")
        rows = []
        print("\n| threads | baseline img/s | current img/s | current / baseline |")
        print("|---|---|---|---|")
        for threads in (int(t) for t in args.threads.split(",")):
            rates: dict[str, list[float]] = {"baseline": [], "current": []}
            for r in range(args.repeats):
                order = (("baseline", baseline), ("current", current))
                for name, mod in order if r % 2 == 0 else order[::-1]:  # alternate who goes first
                    rates[name].append(run_stage(mod, maps, root / f"{name}-{threads}-{r}", threads, f"{r}"))
            b, c = statistics.median(rates["baseline"]), statistics.median(rates["current"])
            rows.append({"threads": threads, "baseline_images_per_s": round(b, 1), "current_images_per_s": round(c, 1),
                         "ratio": round(c / b, 3)})  # fmt: skip
            print(f"| {threads} | {b:,.0f} | {c:,.0f} | {c / b:.2f} |", flush=True)
        report["rows"] = rows
    print(json.dumps(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
