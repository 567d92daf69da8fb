"""``SPACE_MODELS__MALLOC``: the mallopt calls (fake libc) and their effect (real glibc, in a child process)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from worker.malloc import (
    M_ARENA_MAX,
    M_MMAP_MAX,
    M_TRIM_THRESHOLD,
    TRIM_THRESHOLD_MAX,
    configure_malloc,
    glibc,
)
from worker.settings import load_settings


class FakeLibc:
    """Records mallopt calls; refuses the parameters in ``refuse``."""

    def __init__(self, refuse: tuple[int, ...] = ()) -> None:
        self.calls: list[tuple[int, int]] = []
        self.refuse = refuse

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return 0 if param in self.refuse else 1


def test_retain_sets_no_mmap_no_trim_one_arena() -> None:
    libc = FakeLibc()
    outcome = configure_malloc("retain", libc)  # type: ignore[arg-type]
    assert outcome.applied and outcome.mode == "retain" and outcome.reason == ""
    assert sorted(libc.calls) == sorted([(M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD_MAX), (M_ARENA_MAX, 1)])


def test_a_refused_parameter_is_reported_by_name() -> None:
    outcome = configure_malloc("retain", FakeLibc(refuse=(M_ARENA_MAX,)))  # type: ignore[arg-type]
    assert not outcome.applied
    assert outcome.reason == "mallopt refused M_ARENA_MAX"


def test_system_leaves_malloc_alone() -> None:
    libc = FakeLibc()
    outcome = configure_malloc("system", libc)  # type: ignore[arg-type]
    assert not outcome.applied and libc.calls == []
    assert "SPACE_MODELS__MALLOC=system" in outcome.reason


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown malloc mode 'jemalloc'"):
        configure_malloc("jemalloc", FakeLibc())  # type: ignore[arg-type]


def test_setting_defaults_to_retain_and_rejects_other_values(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().models.malloc == "retain"
    monkeypatch.setenv("SPACE_MODELS__MALLOC", "system")
    assert load_settings().models.malloc == "system"
    monkeypatch.setenv("SPACE_MODELS__MALLOC", "tcmalloc")
    with pytest.raises(Exception, match="SPACE_MODELS__MALLOC"):
        load_settings()


# A 256 MiB block, filled, freed, then a second one: with glibc's defaults the first goes back to
# the kernel on free (munmap) and the second page-faults afresh; with retain both are the same memory.
PROBE = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from worker.malloc import configure_malloc

    outcome = configure_malloc(sys.argv[1])

    def rss_mib():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

    def minor_faults():
        return int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[7])

    block = np.ones(256 * 2**20, np.uint8)
    filled = rss_mib()
    del block
    freed = rss_mib()
    before = minor_faults()
    again = np.ones(256 * 2**20, np.uint8)
    print(json.dumps({"applied": outcome.applied, "returned_mib": filled - freed,
                      "refault_pages": minor_faults() - before}))
    """
)


@pytest.mark.skipif(glibc() is None, reason="mallopt needs glibc")
def test_retain_keeps_freed_memory_for_the_next_allocation() -> None:
    def probe(mode: str) -> dict[str, float]:
        out = subprocess.run([sys.executable, "-c", PROBE, mode], check=True, capture_output=True, text=True)
        return json.loads(out.stdout)

    system, retain = probe("system"), probe("retain")
    assert not system["applied"] and retain["applied"]
    assert system["returned_mib"] > 200  # munmap on free
    assert retain["returned_mib"] < 16  # kept in the heap
    # The second block faults its pages in afresh (128+ faults with 2 MiB transparent huge pages,
    # 65,536 with 4 KiB pages) unless it reuses the first one's.
    assert system["refault_pages"] >= 128
    assert retain["refault_pages"] < system["refault_pages"] / 4, (system, retain)
