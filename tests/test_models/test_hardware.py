"""``auto`` precision picks bf16 only where the hardware runs it, not where torch emulates it."""

from __future__ import annotations

import pytest
import torch

from models import hardware
from models.detector import native_precision
from models.train import pick_precision


@pytest.fixture
def x86_cpu(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """An x86 CPU with oneDNN; the test sets which bf16 instructions it has."""
    monkeypatch.setattr(hardware.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)

    def has(avx512_bf16: bool, amx: bool) -> None:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)

    return has


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "native"), [(False, False, False), (True, False, True), (False, True, True)]
)
def test_cpu_bf16_is_native_only_with_avx512_bf16_or_amx(x86_cpu, monkeypatch, avx512_bf16, amx, native) -> None:  # type: ignore[no-untyped-def]
    # oneDNN's own check says yes on any AVX-512 core (Skylake to Ice Lake), where bf16 is emulated.
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    x86_cpu(avx512_bf16, amx)
    assert hardware.cpu_has_native_bf16() is native
    assert pick_precision("auto", torch.device("cpu")) == (torch.bfloat16 if native else None)
    assert pick_precision("bf16", torch.device("cpu")) == torch.bfloat16  # asked for: slow but right


@pytest.mark.parametrize(("capability", "native"), [((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_cuda_bf16_is_native_from_ampere(monkeypatch, capability, native) -> None:  # type: ignore[no-untyped-def]
    # torch.cuda.is_bf16_supported() counts emulation: True on a V100 or T4.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert hardware.cuda_has_native_bf16(torch.device("cuda")) is native
    assert native_precision("bf16", torch.device("cuda")) is native
    assert native_precision("fp16", torch.device("cuda"))
