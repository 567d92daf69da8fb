"""Where a model's time goes: per-layer times, FLOP/s and bytes/s, and the top device kernels.

``bench/gpu.py`` says how fast a model is; this says why. On the H100 (docs/performance.md) the
S models ran at ~18 % of the bf16 matmul peak and flat from batch 8 to 128, which points at memory
traffic or poor kernels, not at FLOPs; which layers and kernels is what the next lever (fusion via
torch.compile, a different memory format, a lighter layer) depends on. For each configuration:

* **layers**: every leaf module (convolutions, pools, activations) and the three networks, timed
  in one forward with CUDA events recorded by forward hooks (no synchronisation in between, so the
  forward runs as it does when serving; on CPU with the wall clock). Convolutions report GFLOP per
  batch, achieved TFLOP/s and the share of the card's measured matmul peak, and the bytes their
  input and output move (a lower bound of the traffic) as GB/s: a layer far below both the FLOP
  and the bandwidth ceiling is launch- or kernel-bound, one near the bandwidth ceiling is
  memory-bound. Per network, "functional ops" is its time outside its leaf modules (``F.relu``,
  concatenation: the passes a fused kernel would save); "outside networks" is the forward's time
  under no network (normalisation, map arithmetic, upsampling).
* **kernels**: ``torch.profiler``'s top kernels by self device time over a few forwards.

Usage (CUDA host, from the repo root; runs on CPU too, for a smoke run)::

    python3 bench/breakdown.py --device cuda --precision bf16 --batch 64 --out OUT

Writes ``breakdown.json`` and prints one table per configuration.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu import DTYPES, build, matmul_peak

NETWORKS = ("teacher", "student", "ae")


@dataclass
class LayerTime:
    """One module's time per batch and, for convolutions, its work and traffic."""

    name: str
    kind: str
    out_shape: list[int]
    ms: float
    gflop: float = 0.0
    mbytes: float = 0.0  # input read + output written, at the activation dtype

    @property
    def tflops(self) -> float:
        return self.gflop / self.ms if self.ms > 0 else 0.0  # GFLOP / ms = TFLOP/s

    @property
    def gbytes_per_s(self) -> float:
        return self.mbytes / self.ms if self.ms > 0 else 0.0  # MB / ms = GB/s


def conv_gflop(conv: nn.Conv2d, out_shape: torch.Size) -> float:
    """Multiply-adds x 2 of one convolution over a batch, in GFLOP."""
    n, c_out, h, w = out_shape
    k_h, k_w = conv.kernel_size
    c_in_per_group = conv.in_channels // conv.groups
    return 2.0 * n * c_out * h * w * c_in_per_group * k_h * k_w / 1e9


def leaf_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Modules without children, under the model's networks (names as in the state dict)."""
    for name, module in model.named_modules():
        if name and not any(True for _ in module.children()):
            yield name, module


class Timer:
    """Start/stop marks on the device's timeline (CUDA events) or the wall clock (CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def elapsed_ms(self, start: Any, end: Any) -> float:
        if self.cuda:
            return float(start.elapsed_time(end))
        return (end - start) * 1000.0


@contextmanager
def hooked(model: nn.Module, timer: Timer, marks: dict[str, list[Any]], shapes: dict[str, Any]) -> Iterator[None]:
    """Record a start and an end mark around every leaf module and every network's entry points.

    Leaves get forward hooks. The networks are wrapped at ``forward`` and ``forward_with_trunk``
    (the teacher is called through the latter, which module hooks do not see).
    """
    handles = []
    wrapped: list[tuple[nn.Module, str, Any]] = []

    def pre(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            marks.setdefault(name, []).append(timer.mark())

        return hook

    def post(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            marks[name].append(timer.mark())
            if isinstance(out, torch.Tensor):
                shapes[name] = (out.shape, out.element_size(), args[0].numel() if args else 0)

        return hook

    def timed(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            marks.setdefault(name, []).append(timer.mark())
            out = method(*args, **kwargs)
            marks[name].append(timer.mark())
            return out

        return call

    for name in NETWORKS:
        network = getattr(model, name, None)
        for method in ("forward", "forward_with_trunk"):
            if network is not None and hasattr(network, method):
                wrapped.append((network, method, vars(network).get(method)))
                setattr(network, method, timed(name, getattr(network, method)))  # instance attribute shadows
    for name, module in leaf_modules(model):
        handles.append(module.register_forward_pre_hook(pre(name)))
        handles.append(module.register_forward_hook(post(name)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for network, method, own in wrapped:
            if own is None:
                delattr(network, method)  # the class's method shows through again
            else:
                setattr(network, method, own)


def layer_times(
    model: nn.Module, forward: Callable[[], Any], device: torch.device, reps: int = 5
) -> tuple[float, list[LayerTime]]:
    """Median forward time (ms) and each hooked module's median time over ``reps`` forwards.

    Modules that run several times per forward (a network called twice) add up within a forward.
    """
    timer = Timer(device)
    totals: list[float] = []
    per_rep: list[dict[str, float]] = []
    shapes: dict[str, Any] = {}
    modules = dict(model.named_modules())
    for _ in range(reps):
        marks: dict[str, list[Any]] = {}
        with hooked(model, timer, marks, shapes):
            start = timer.mark()
            forward()
            end = timer.mark()
        if timer.cuda:
            torch.cuda.synchronize(device)
        totals.append(timer.elapsed_ms(start, end))
        per_rep.append(
            {
                name: sum(timer.elapsed_ms(a, b) for a, b in zip(m[::2], m[1::2], strict=True))
                for name, m in marks.items()
            }
        )
    layers = []
    for name in per_rep[0]:
        ms = sorted(rep[name] for rep in per_rep)[len(per_rep) // 2]
        module = modules[name]
        out_shape, elem, in_numel = shapes.get(name, (torch.Size(), 4, 0))
        layer = LayerTime(name, type(module).__name__, list(out_shape), ms)
        if isinstance(module, nn.Conv2d) and len(out_shape) == 4:
            layer.gflop = conv_gflop(module, out_shape)
            layer.mbytes = (in_numel + torch.Size(out_shape).numel()) * elem / 1e6
        layers.append(layer)
    return sorted(totals)[len(totals) // 2], layers


def kernel_table(forward: Callable[[], Any], device: torch.device, reps: int = 3, rows: int = 20) -> str:
    """``torch.profiler``'s top operators/kernels by self time on the device (CPU time on CPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(reps):
            forward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    averages = prof.key_averages()
    keys = ["self_device_time_total", "self_cuda_time_total"] if device.type == "cuda" else ["self_cpu_time_total"]
    for key in keys:
        try:
            return str(averages.table(sort_by=key, row_limit=rows))
        except (AttributeError, KeyError, ValueError):
            continue
    return str(averages.table(row_limit=rows))


def prepare(
    variant: str, size: str, px: int, teacher: str, device: torch.device, dtype: torch.dtype | None, memory_format: str
) -> nn.Module:
    """A calibrated, untrained model as the detector serves it (weights in the compute dtype)."""
    model = build(variant, size, px, teacher, device=str(device), weights=dtype)
    fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    return model.to(memory_format=fmt)  # type: ignore[call-overload]


def make_forward(model: Any, x: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> Callable[[], Any]:
    """The detector's forward (inference mode, autocast without weight cache) on a fixed batch."""

    def forward() -> Any:
        with (
            torch.inference_mode(),
            torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None, cache_enabled=False),
        ):
            return model.anomaly_map(x)

    return forward


def print_layers(title: str, total_ms: float, layers: list[LayerTime], batch: int, peak_tflops: float | None) -> None:
    print(f"\n{title}: {total_ms:.3f} ms per batch, {batch / total_ms * 1000:,.0f} images/s (hooks on)")
    nets = [lt for lt in layers if lt.name in NETWORKS]
    outside = total_ms - sum(lt.ms for lt in nets)
    for lt in nets:
        leaves = sum(x.ms for x in layers if x.name.startswith(lt.name + "."))
        functional = lt.ms - leaves
        print(f"  {lt.name:<16} {lt.ms:8.3f} ms {lt.ms / total_ms:6.1%}   of which functional ops (relu, cat, ...) "
              f"{functional:7.3f} ms {functional / total_ms:6.1%}")  # fmt: skip
    print(f"  {'outside networks':<16} {outside:8.3f} ms {outside / total_ms:6.1%}   (normalisation, maps, upsampling)")
    print(f"  {'layer':<28} {'kind':<10} {'out shape':<22} {'ms':>8} {'share':>6} {'GFLOP':>8} {'TFLOP/s':>8} "
          f"{'% peak':>7} {'GB/s':>8}")  # fmt: skip
    leaves = sorted((lt for lt in layers if lt.name not in NETWORKS), key=lambda lt: -lt.ms)
    for lt in leaves[:25]:
        peak = f"{lt.tflops / peak_tflops:7.1%}" if peak_tflops and lt.gflop else f"{'':>7}"
        print(f"  {lt.name:<28} {lt.kind:<10} {lt.out_shape!s:<22} {lt.ms:8.3f} {lt.ms / total_ms:6.1%} "
              f"{lt.gflop:8.2f} {lt.tflops:8.1f} {peak} {lt.gbytes_per_s:8.0f}")  # fmt: skip


#: The convolutions that read the 3-channel image: (name, out channels, kernel, stride, padding).
FIRST_CONVS = (("pdn conv1 (S)", 128, 4, 1, 0), ("ae encoder.0", 32, 4, 2, 1))


def first_conv_variants(
    device: torch.device, dtype: torch.dtype | None, batch: int, px: int, reps: int = 10
) -> list[dict[str, Any]]:
    """ms per batch of each first convolution with its input as served (3 channels) and zero-padded
    to 4 and 8 channels, channels_last and contiguous.

    Tensor-core kernels want channel counts in multiples of 4 or 8 in NHWC; a 3-channel input can
    fall back to a slow kernel. Padding the image and the weights with zero channels gives the same
    output, so if a padded row is much faster, the runner can pad at no cost in accuracy.
    """
    timer = Timer(device)
    dt = dtype or torch.float32
    rows = []
    for name, c_out, k, stride, pad in FIRST_CONVS:
        for fmt_name, fmt in (("channels_last", torch.channels_last), ("contiguous", torch.contiguous_format)):
            for c_in in (3, 4, 8):
                x = torch.rand(batch, c_in, px, px, device=device, dtype=dt).contiguous(memory_format=fmt)
                w = torch.rand(c_out, c_in, k, k, device=device, dtype=dt).contiguous(memory_format=fmt)
                b = torch.rand(c_out, device=device, dtype=dt)
                times = []
                with torch.inference_mode():
                    for i in range(reps + 3):
                        start = timer.mark()
                        torch.nn.functional.conv2d(x, w, b, stride, pad)
                        end = timer.mark()
                        if timer.cuda:
                            torch.cuda.synchronize(device)
                        if i >= 3:
                            times.append(timer.elapsed_ms(start, end))
                rows.append({"conv": name, "memory_format": fmt_name, "in_channels": c_in,
                             "ms": round(sorted(times)[len(times) // 2], 4)})  # fmt: skip
    return rows


def print_first_convs(rows: list[dict[str, Any]], batch: int, px: int) -> None:
    print(
        f"\nfirst convolutions at batch {batch}, {px} px (input zero-padded to 4 / 8 channels gives the same output):"
    )
    for row in rows:
        base = next(r for r in rows if r["conv"] == row["conv"] and r["memory_format"] == row["memory_format"]
                    and r["in_channels"] == 3)  # fmt: skip
        print(f"  {row['conv']:<14} {row['memory_format']:<14} C={row['in_channels']}  {row['ms']:8.3f} ms  "
              f"{base['ms'] / row['ms']:5.2f}x vs C=3")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--px", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--variant", default="efficientad,space")
    p.add_argument("--size", default="s")
    p.add_argument("--teacher", default="pdn", choices=["pdn", "filterbank"])
    p.add_argument("--memory-format", default="channels_last,contiguous", help="Comma list: channels_last, contiguous.")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-kernels", action="store_true", help="Skip the torch.profiler kernel table.")
    p.add_argument("--out", default=None, help="Folder for breakdown.json.")
    args = p.parse_args()

    device = torch.device(args.device)
    dtype = DTYPES[args.precision]  # None = fp32 (tf32 on CUDA)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    peak = matmul_peak(dtype or torch.float32) if device.type == "cuda" else None
    if peak:
        print(f"matmul peak {args.precision}: {peak:.0f} TFLOP/s")
    report: dict[str, Any] = {"device": str(device), "precision": args.precision, "px": args.px, "batch": args.batch,
                              "peak_tflops": peak, "cases": []}  # fmt: skip
    if device.type == "cuda":
        report["card"] = torch.cuda.get_device_name(device)
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        """breakdown.json so far: a run cut off by a time limit keeps the finished cases."""
        if out is not None:
            (out / "breakdown.json").write_text(json.dumps(report, indent=1))

    for variant in args.variant.split(","):
        for size in args.size.split(","):
            for memory_format in args.memory_format.split(","):
                model = prepare(variant, size, args.px, args.teacher, device, dtype, memory_format)
                x = torch.rand(args.batch, 3, args.px, args.px, device=device)
                if memory_format == "channels_last":
                    x = x.contiguous(memory_format=torch.channels_last)
                forward = make_forward(model, x, device, dtype)
                for _ in range(3):  # cuDNN picks its algorithms on the first calls
                    forward()
                total_ms, layers = layer_times(model, forward, device, args.reps)
                title = f"{variant}-{size} {args.precision} {memory_format} batch {args.batch} at {args.px} px"
                print_layers(title, total_ms, layers, args.batch, peak)
                case: dict[str, Any] = {
                    "variant": variant, "size": size, "memory_format": memory_format, "total_ms": round(total_ms, 4),
                    "layers": [{**asdict(lt), "tflops": round(lt.tflops, 2), "gbytes_per_s": round(lt.gbytes_per_s, 1)}
                               for lt in layers],
                }  # fmt: skip
                if not args.no_kernels:
                    table = kernel_table(forward, device)
                    print(table)
                    case["kernels"] = table
                report["cases"].append(case)
                save()
                del model
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    report["first_convs"] = first_conv_variants(device, dtype, args.batch, args.px)
    print_first_convs(report["first_convs"], args.batch, args.px)
    save()


if __name__ == "__main__":
    main()
