"""Several ``space serve`` processes in one consumer group, for benchmarks that scale a pod's host side.

One worker process is bound by its interpreter lock: kafka-python, request parsing, result JSON and
the sends are Python, about 1 ms of CPU per image (bench/host.py), so a process tops out near a
thousand images a second whatever the card does. Running N processes against one GPU (N pods per
GPU with the device plugin's time-slicing, docs/scaling.md) multiplies that. This module starts N
workers as subprocesses, tells when the group has settled (every process assigned partitions, all of
them covered: only then is the measurement window fair), reads their CPU time from /proc and stops
them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.reliability.helpers import serve_env, stop_process  # noqa: E402
from worker.stack import free_port  # noqa: E402


@dataclass
class Fleet:
    """Worker subprocesses of one group, each with its own HTTP port for /readyz."""

    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    @classmethod
    def start(
        cls, n: int, settings: Any, model_root: Path, log_dir: Path, command: list[str], **env_extra: str
    ) -> Fleet:
        """Start ``n`` processes running ``command`` (``space serve`` or a wrapper of it) with ``settings``."""
        fleet = cls()
        log_dir.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            port = free_port()
            defaults = {"SPACE_HTTP__PORT": str(port), "SPACE_WORKER__STATE_DIR": str(log_dir / f"state-{i}"),
                        "SPACE_LOG__LEVEL": "WARNING"}  # fmt: skip
            env = serve_env(settings, model_root, **{**defaults, **env_extra})
            log = log_dir / f"worker-{i}.log"
            with open(log, "ab") as out:
                proc = subprocess.Popen(
                    command, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                )
            fleet.procs.append(proc)
            fleet.ports.append(port)
            fleet.logs.append(log)
        return fleet

    def readiness(self) -> list[dict[str, Any] | None]:
        """Each process's /readyz document (None while it does not answer)."""
        docs: list[dict[str, Any] | None] = []
        for port in self.ports:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as resp:
                    docs.append(json.loads(resp.read()))
            except urllib.error.HTTPError as exc:  # 503 while not ready still carries the document
                docs.append(json.loads(exc.read()))
            except OSError:
                docs.append(None)
        return docs

    def wait_settled(self, partitions: int, timeout_s: float) -> float:
        """Wait until every process is ready with partitions and together they hold all ``partitions``.

        Returns:
            The wall-clock time (``time.time()``) at which that was first seen.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for proc, log in zip(self.procs, self.logs, strict=True):
                if proc.poll() is not None:
                    raise RuntimeError(f"worker exited with {proc.returncode}; see {log}")
            docs = self.readiness()
            held = [d.get("assigned_partitions", 0) if d is not None and d.get("ready") else 0 for d in docs]
            if all(held) and sum(held) == partitions:
                return time.time()
            time.sleep(0.05)
        raise TimeoutError(f"group did not settle within {timeout_s} s: {self.readiness()}")

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of all processes so far (from /proc; Linux)."""
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0
        for proc in self.procs:
            try:
                fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
        return total / ticks

    def stop(self) -> list[int]:
        """SIGTERM every process and wait; returns their exit codes."""
        return [stop_process(p) for p in self.procs]


def steady_rate(stamps: list[float], trim: float = 0.05) -> tuple[float, float, float]:
    """Images/s over the middle of a run: drops the first and last ``trim`` of the stamps.

    The edges are where processes join, rebalance, or finish at different times (partitions carry
    unequal shares of a backlog), which is not the steady state a pod runs in.

    Returns:
        (images/s, window start, window end) with the times from ``stamps``.
    """
    s = sorted(stamps)
    lo, hi = int(len(s) * trim), int(len(s) * (1 - trim)) - 1
    if hi <= lo or s[hi] <= s[lo]:
        raise ValueError(f"too few results for a steady rate: {len(s)}")
    return (hi - lo) / (s[hi] - s[lo]), s[lo], s[hi]
