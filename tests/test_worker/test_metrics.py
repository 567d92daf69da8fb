"""WorkerMetrics: the serving gauge keeps one series per line, with the precision that scores."""

from __future__ import annotations

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
