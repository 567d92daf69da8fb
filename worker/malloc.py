"""glibc malloc tuning for CPU inference: keep freed memory instead of handing it back to the kernel.

A CPU forward allocates a few large activations per layer (SPACE-S at 128 px, batch 16: up to
128 MB each) and frees them before the next batch. glibc serves every block above its mmap
threshold (at most 32 MiB) with a fresh ``mmap`` and returns it with ``munmap`` on free, so each
batch page-faults and zeroes its whole working set again, and per-thread arenas trim their heaps
the same way. Measured on the 2-core development VM (docs/performance.md "CPU memory allocator"),
that costs a fifth to a third of the model's time.

:func:`retain_freed_memory` sets three ``mallopt`` parameters for this process: no ``mmap`` for
large blocks (``M_MMAP_MAX=0``), no trimming of the heap top (``M_TRIM_THRESHOLD`` at its maximum)
and one arena (``M_ARENA_MAX=1``), so freed activations are reused by the next batch. The cost is
resident memory: the process keeps its high-water mark (plus some fragmentation) instead of
returning to a lower floor between batches. Size the pod's memory for the peak either way.

Only glibc has these knobs; elsewhere (musl, macOS) the call reports why it did nothing. The same
parameters can be given before start-up with ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:...``; this
module exists so that ``space serve`` gets them without a wrapper script.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from dataclasses import dataclass
from typing import Literal

MallocMode = Literal["retain", "system"]

# mallopt(3) parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
TRIM_THRESHOLD_MAX = 2**31 - 1  # mallopt takes a C int

RETAIN_PARAMETERS: dict[str, tuple[int, int]] = {
    "M_MMAP_MAX": (M_MMAP_MAX, 0),
    "M_TRIM_THRESHOLD": (M_TRIM_THRESHOLD, TRIM_THRESHOLD_MAX),
    "M_ARENA_MAX": (M_ARENA_MAX, 1),
}


@dataclass(frozen=True)
class MallocOutcome:
    """What :func:`configure_malloc` did: the mode, whether the parameters took effect, and why not."""

    mode: MallocMode
    applied: bool
    reason: str = ""


def glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (``mallopt`` available), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def retain_freed_memory(libc: ctypes.CDLL | None = None) -> MallocOutcome:
    """Apply :data:`RETAIN_PARAMETERS` with ``mallopt``; call early, before large allocations and threads."""
    libc = libc if libc is not None else glibc()
    if libc is None:
        libc_name = platform.libc_ver()[0] or "unknown libc"
        return MallocOutcome("retain", False, f"not glibc ({platform.system()} {libc_name})")
    refused = [name for name, (param, value) in RETAIN_PARAMETERS.items() if libc.mallopt(param, value) != 1]
    if refused:
        return MallocOutcome("retain", False, f"mallopt refused {', '.join(refused)}")
    return MallocOutcome("retain", True)


def configure_malloc(mode: MallocMode, libc: ctypes.CDLL | None = None) -> MallocOutcome:
    """``retain``: :func:`retain_freed_memory`; ``system``: leave glibc's defaults."""
    if mode == "system":
        return MallocOutcome("system", False, "glibc defaults kept (SPACE_MODELS__MALLOC=system)")
    if mode == "retain":
        return retain_freed_memory(libc)
    raise ValueError(f"unknown malloc mode {mode!r}; expected 'retain' or 'system'")
