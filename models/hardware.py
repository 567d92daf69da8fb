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
