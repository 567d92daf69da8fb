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


def cuda_context_lost() -> bool:
    """Probe the CUDA context: False when it still runs work (or CUDA was never used here).

    CUDA errors such as an illegal address, a device-side assert, a launch failure, an uncorrectable
    ECC error or the GPU falling off the bus are sticky: every later call fails the same way. Which
    exception carries one depends on who called CUDA (``torch.AcceleratorError``, cuDNN, cuBLAS and
    Triton wrappers, a compile error around it), and the same classes also carry recoverable errors
    (a failed pinned allocation, a capture refused), so the context is asked instead: a device-wide
    synchronize and a one-element round trip.
    """
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return False
    from models.gpu import device_work  # not at import: models.gpu is the heavier module

    try:
        with device_work():  # a synchronize during another thread's graph capture would break it
            torch.cuda.synchronize()
            torch.ones(1, device="cuda").item()
    except RuntimeError:
        return True
    return False


def is_device_fault(exc: BaseException) -> bool:
    """``exc`` came with (or after) a sticky CUDA error: :func:`cuda_context_lost` says so.

    Out of memory (``torch.cuda.OutOfMemoryError``) never is one: the context survives it.
    """
    if isinstance(exc, torch.cuda.OutOfMemoryError):  # = torch.OutOfMemoryError where that exists
        return False
    return cuda_context_lost()


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
