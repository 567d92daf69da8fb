"""Whether this machine runs bf16 in hardware: the precision ``auto`` picks, for serving and training.

torch's own checks count emulation as support: ``torch.cuda.is_bf16_supported()`` is True on a T4 or
V100 (no bf16 tensor cores; PyTorch hands bf16 convolutions to cuDNN only from compute capability
8.0), and oneDNN's ``_is_mkldnn_bf16_supported()`` on any AVX-512 core (Skylake, Cascade Lake, Ice
Lake), where it emulates bf16. There bf16 is slower than fp32, so ``auto`` must not choose it.
"""

from __future__ import annotations

import platform

import torch

#: Compute capability from which CUDA devices have bf16 tensor cores (Ampere).
CUDA_BF16_CAPABILITY = (8, 0)

#: What torch raises for errors the accelerator reports (torch >= 2.8; before: RuntimeError("CUDA error: ...")).
_ACCELERATOR_ERROR: type[BaseException] | None = getattr(torch, "AcceleratorError", None)


def is_device_fault(exc: BaseException) -> bool:
    """``exc`` is a CUDA error: the process's CUDA context is unusable from here on.

    CUDA errors (an illegal address, a device-side assert, a launch failure, an uncorrectable ECC
    error, the GPU falling off the bus) are sticky: every later call in the context fails the same
    way, so scoring on would fail every batch; only a new process gets a new context. Running out of
    memory is not one (``torch.OutOfMemoryError``): the context survives it.
    """
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    if _ACCELERATOR_ERROR is not None and isinstance(exc, _ACCELERATOR_ERROR):
        return True
    return isinstance(exc, RuntimeError) and str(exc).startswith("CUDA error")


def cuda_has_native_bf16(device: torch.device | int | None = None) -> bool:
    """The CUDA device has bf16 tensor cores (compute capability 8.0 or later)."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= CUDA_BF16_CAPABILITY


def cpu_has_native_bf16() -> bool:
    """oneDNN has bf16 instructions to run on this CPU: AVX-512 bf16 or AMX on x86, bf16 on Arm."""
    if not torch.backends.mkldnn.is_available():
        return False
    if platform.machine().lower() in ("x86_64", "amd64"):
        avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
        amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
        if avx512_bf16 is not None and amx is not None:
            return bool(avx512_bf16()) or bool(amx())
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
