"""WorkerMetrics: the serving gauge keeps one series per line, with the precision that scores."""

from __future__ import annotations

from worker.http import Heartbeats
from worker.metrics import WorkerMetrics


def _serving(m: WorkerMetrics) -> dict[tuple[str, str, str], float]:
    (family,) = [f for f in m.registry.collect() if f.name == "space_model_serving"]
    return {(s.labels["product_line"], s.labels["version"], s.labels["precision"]): s.value for s in family.samples}


def test_serving_gauge_has_one_series_per_line_and_drops_the_old_one_on_a_swap() -> None:
    m = WorkerMetrics()
    m.set_serving({"brick": ("v1", "bf16"), "grass": ("v4", "fp32")})
    assert _serving(m) == {("brick", "v1", "bf16"): 1.0, ("grass", "v4", "fp32"): 1.0}
    m.set_serving({"brick": ("v2", "bf16"), "grass": ("v4", "fp32")})  # promotion of brick
    assert _serving(m) == {("brick", "v2", "bf16"): 1.0, ("grass", "v4", "fp32"): 1.0}
    m.set_serving({"brick": ("v2", "fp32")})  # same version served at another precision; grass evicted
    assert _serving(m) == {("brick", "v2", "fp32"): 1.0}
    m.set_serving({})
    assert _serving(m) == {}


def _gauge(m: WorkerMetrics, name: str) -> dict[str, float]:
    (family,) = [f for f in m.registry.collect() if f.name == name]
    return {s.labels["loop"]: s.value for s in family.samples}


def test_loop_ages_and_waits_are_read_at_scrape_time() -> None:
    now = [100.0]
    beats = Heartbeats(clock=lambda: now[0])
    m = WorkerMetrics()
    m.watch_loops(beats.ages, lambda: {k: float(w["for_s"]) for k, w in beats.waiting_on().items()})
    beats.beat("poll")
    beats.beat("model-refresh")
    now[0] += 40
    assert _gauge(m, "space_loop_progress_age_seconds") == {"poll": 40.0, "model-refresh": 40.0}
    assert _gauge(m, "space_loop_waiting_seconds") == {}
    with beats.waiting("model-refresh", "model registry, line brick"):
        now[0] += 90
        assert _gauge(m, "space_loop_waiting_seconds") == {"model-refresh": 90.0}
    assert _gauge(m, "space_loop_progress_age_seconds") == {"poll": 130.0, "model-refresh": 0.0}
    assert _gauge(m, "space_loop_waiting_seconds") == {}
