"""``space demo`` end to end, shortened: real broker, real Redis, a real ``space serve`` subprocess."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest

from worker.stack import pid_alive

pytestmark = [pytest.mark.kafka, pytest.mark.redis]

LINES = ("brick", "grass")
IMAGES = 16


def _demo(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "worker", "demo", "--lines", ",".join(LINES), "--steps", "30", "--images", str(IMAGES),
        "--size", "128", "--rate", "20", "--out", str(out), "--no-progress", *extra,
    ]  # fmt: skip


@pytest.mark.timeout(480)
def test_short_demo_reports_every_image(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run(_demo(out), capture_output=True, text=True, timeout=470, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # The summary table: one row per line whose confusion counts add up to the images streamed.
    rows = {m.group(1): m for m in re.finditer(r"^(\w+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s", proc.stdout, re.M)}
    for line in LINES:
        assert line in rows, proc.stdout
        images, tp, fp, tn, fn = (int(rows[line].group(i)) for i in range(2, 7))
        assert images == IMAGES and tp + fp + tn + fn == images

    index = Path(re.search(r"report: (\S+)", proc.stdout).group(1))  # type: ignore[union-attr]
    assert index == out.resolve() / "report" / "index.html"
    page = index.read_text(encoding="utf-8")
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) > 2 * len(LINES)
    for src in sources:
        assert (index.parent / src).is_file(), src
        assert cv2.imread(str(index.parent / src)) is not None, src
    for line in LINES:
        assert f"<h2>{line}</h2>" in page

    metrics = json.loads((index.parent / "metrics.json").read_text(encoding="utf-8"))
    expected = {"schema_version", "duration_s", "timings_s", "config", "lines", "images_streamed", "unanswered"}
    assert expected <= set(metrics)
    assert metrics["images_streamed"] == IMAGES * len(LINES) and metrics["unanswered"] == 0
    assert metrics["dead_letters"] == []
    for line in LINES:
        m = metrics["lines"][line]
        assert m["images"] == m["sent"] == IMAGES
        assert m["tp"] + m["fp"] + m["tn"] + m["fn"] == IMAGES
        assert 0.0 <= m["auroc"] <= 1.0
        # Verdicts used the threshold the demo wrote to Redis for exactly this model version.
        assert m["threshold_sources"] == ["redis"]
        assert m["threshold"]["version"] >= 1 and m["threshold"]["method"] == "quantile"
        assert m["threshold"]["model_version"] == m["model_version"]
        assert m["latency_ms"]["p50"] is not None
    # The stack was stopped: no state left behind.
    assert not (out / "stack" / "state.json").exists()


@pytest.mark.timeout(120)
def test_sigterm_stops_the_stack(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.Popen(_demo(out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        state = out / "stack" / "state.json"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not state.exists():
            time.sleep(0.1)
        assert state.exists(), "the stack never came up"
        time.sleep(0.5)
        pids = [s["pid"] for s in json.loads(state.read_text()).values() if s["started_by_stack"]]
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, output
    assert not state.exists()
    assert pids and not any(pid_alive(pid) for pid in pids)
