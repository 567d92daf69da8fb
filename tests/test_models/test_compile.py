"""torch.compile in the runtime: one graph per bucket, all built in warm-up, the same maps as eager.

The fast tests run real dynamo with a recording backend (no C++ build), the wiring, and the failure
paths. The ``slow`` ones build real inductor CPU kernels: the three buckets of a 64 px EfficientAD-S
took 140-240 s on the shared 2-core dev VM with a cold inductor cache (``/tmp/torchinductor_$USER``)
and about 17 s once it is warm, so they run with ``make test-slow``.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from structlog.testing import capture_logs

from models.artifact import save_artifact
from models.detector import COMPILE_SETTING, Detector, DetectorError, resolve_compile_mode
from models.gpu import BucketedRunner
from tests.test_models.model_fixtures import SIZE, make_card, make_model
from worker.app import load_detector
from worker.config_docs import env_variable
from worker.errors import ConfigError
from worker.settings import load_settings

# Importing inductor imports torch.utils.mkldnn, which still uses a deprecated torch.jit decorator.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

HAS_CXX = bool(shutil.which("g++") or shutil.which("cc"))
needs_cxx = pytest.mark.skipif(not HAS_CXX, reason="torch.compile on CPU needs a C++ compiler (g++ or cc)")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = make_model("efficientad")
    return save_artifact(tmp_path_factory.mktemp("art") / "v1", make_card(model), model.state_dict())


@pytest.fixture
def _fresh_dynamo() -> Iterator[None]:
    """Empty dynamo caches before and after, so earlier compiles neither help nor count."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


def _patch_compile(monkeypatch: pytest.MonkeyPatch, backend: Callable[..., Any]) -> None:
    """Make ``torch.compile`` use ``backend`` (keeping the caller's ``dynamic``/``fullgraph``), ignoring ``mode``."""
    real_compile = torch.compile

    def compile_with_backend(fn: Callable[..., Any], *, mode: str | None = None, **kwargs: Any) -> Any:
        return real_compile(fn, backend=backend, **kwargs)

    monkeypatch.setattr(torch, "compile", compile_with_backend)


@pytest.fixture
def compiled(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Batch sizes dynamo built a graph for: ``torch.compile`` with a recording backend (no C++ build)."""
    batches: list[int] = []

    def recording_backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable[..., Any]:
        batches.append(int(example_inputs[0].shape[0]))
        return gm.forward

    _patch_compile(monkeypatch, recording_backend)
    return batches


# -- settings and wiring ------------------------------------------------------------------------


def test_compile_setting_is_off_by_default_and_rejects_unknown_modes(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().models.compile == "off"
    assert env_variable("models", "compile") == COMPILE_SETTING
    monkeypatch.setenv(COMPILE_SETTING, "max-autotune")
    assert load_settings().models.compile == "max-autotune"
    monkeypatch.setenv(COMPILE_SETTING, "fast")
    with pytest.raises(ConfigError, match=COMPILE_SETTING):
        load_settings()


def test_compile_modes_never_capture_cuda_graphs_themselves() -> None:
    assert resolve_compile_mode("off") is None
    assert resolve_compile_mode("default") == "default"
    assert resolve_compile_mode("max-autotune") == "max-autotune-no-cudagraphs"
    with pytest.raises(DetectorError, match="unknown compile mode 'reduce-overhead'"):
        resolve_compile_mode("reduce-overhead")


def test_cpu_runs_directly_unless_compile_is_on(artifact: Path) -> None:
    eager = Detector.load(artifact, device="cpu", max_batch=4)
    assert eager._runner is None  # the CPU default path: any batch size, no padding
    compiled = Detector.load(artifact, device="cpu", max_batch=4, compile_mode="default")
    assert compiled._runner is not None
    assert compiled._runner.compile_mode == "default"
    assert compiled._runner.buckets == (1, 2, 4)


def test_load_detector_passes_the_compile_setting(artifact: Path) -> None:
    settings = load_settings(models={"device": "cpu", "compile": "max-autotune"}, batching={"max_batch_size": 8})
    detector = load_detector(settings)(artifact)
    assert detector.compile_mode == "max-autotune"
    assert detector._runner.compile_mode == "max-autotune-no-cudagraphs"
    assert detector._runner.buckets == (1, 2, 4, 8)


# -- one graph per bucket (real dynamo, recording backend) ----------------------------------------


@pytest.mark.usefixtures("_fresh_dynamo")
def test_warmup_compiles_every_bucket_once_even_past_dynamos_default_limit(compiled: list[int]) -> None:
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)

    with torch._dynamo.config.patch(recompile_limit=8):  # torch's default; restored on exit
        runner = BucketedRunner(forward, (2, 3), max_batch=512, device=torch.device("cpu"), compile_mode="default")
        assert len(runner.buckets) == 10  # more shapes than dynamo compiles by default
        assert torch._dynamo.config.recompile_limit >= len(runner.buckets) + 2
        runner.warmup()
        assert runner.warmed() == runner.buckets
        assert compiled == list(runner.buckets)  # one static-shape graph per bucket, none eager

        rng = np.random.default_rng(0)
        for n in (*runner.buckets, 3, 100):  # 3 and 100 pad to buckets 4 and 128
            images = rng.integers(0, 256, (n, 2, 3, 3), dtype=np.uint8)
            np.testing.assert_allclose(runner.run(images), images.mean(axis=3) / 255, rtol=1e-6)
        assert compiled == list(runner.buckets)  # serving never compiles again


@pytest.mark.usefixtures("_fresh_dynamo")
def test_a_second_model_on_the_same_code_gets_its_own_graphs(compiled: list[int]) -> None:
    def make_forward(reduction: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def forward(x: torch.Tensor) -> torch.Tensor:  # one code object, like SpaceModel.anomaly_map
            return getattr(x, reduction)(dim=1)

        return forward

    images = np.random.default_rng(1).integers(0, 256, (5, 2, 3, 3), dtype=np.uint8)
    with torch._dynamo.config.patch(recompile_limit=8):
        for reduction, expected in (("mean", images.mean(axis=3)), ("amax", images.max(axis=3))):
            runner = BucketedRunner(
                make_forward(reduction), (2, 3), max_batch=32, device=torch.device("cpu"), compile_mode="default"
            )
            before = len(compiled)
            runner.warmup()
            assert compiled[before:] == list(runner.buckets)  # 6 + 6 graphs on one code object
            np.testing.assert_allclose(runner.run(images), expected / 255, rtol=1e-6)


@pytest.mark.usefixtures("_fresh_dynamo")
def test_reloaded_compiled_models_use_their_own_weights_and_old_ones_are_freed(compiled: list[int]) -> None:
    """The model manager evicts and reloads models for weeks: each must score with its own weights.

    Dynamo keeps graphs on ``SpaceModel.anomaly_map``'s code object, shared by every model, and with
    parameters lifted into graph inputs a graph built for one model serves the next model of the same
    config. Bugs this would catch: a reused graph that still computes with the evicted model's
    weights (wrong scores after a promotion), a cache that keeps evicted models alive (weights leak on
    every reload), or entries that pile up (every call checks more guards).
    """
    import gc
    import weakref

    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from models.model import SpaceModel

    code = SpaceModel.anomaly_map.__code__
    images = _images(2, seed=3)
    cpu = torch.device("cpu")
    alive: list[weakref.ref[Any]] = []
    entries, maps = [], []
    for seed in range(3):  # three versions of a line: same config, different weights
        model = make_model("efficientad", seed=seed)
        eager = Detector(make_model("efficientad", seed=seed), make_card(model), cpu, None, False)
        detector = Detector(model, make_card(model), cpu, None, False, max_batch=2, compile_mode="default")
        detector.warmup((1, 2))
        got = detector.predict(images).maps
        np.testing.assert_allclose(got, eager.predict(images).maps, rtol=1e-5, atol=1e-6)
        maps.append(got)
        alive.append(weakref.ref(model))
        del detector, model
        gc.collect()
        entries.append(len(_debug_get_cache_entry_list(code)))
    # Versions 2 and 3 reuse version 1's graphs (one per bucket): a promotion costs no compile.
    assert len(compiled) == 2, f"graphs built for three versions of one config: {len(compiled)}"
    assert not np.allclose(maps[0], maps[1]), "the versions should score differently"
    assert [ref() for ref in alive] == [None, None, None]
    assert max(entries) <= 2, f"graphs on the shared code object after each reload: {entries}"


@pytest.mark.usefixtures("_fresh_dynamo")
def test_compiled_detector_takes_a_list_of_images_like_an_array(compiled: list[int]) -> None:
    # With the bucketed runner a list goes image by image into the bucket's buffer (no stacked copy).
    model = make_model("efficientad", seed=5)
    eager = Detector(make_model("efficientad", seed=5), make_card(model), torch.device("cpu"), None, False)
    detector = Detector(model, make_card(model), torch.device("cpu"), None, False, max_batch=4, compile_mode="default")
    detector.warmup((4,))
    images = _images(3, seed=6)
    np.testing.assert_allclose(
        detector.submit(list(images)).result().maps, eager.predict(images).maps, rtol=1e-5, atol=1e-6
    )
    assert compiled


# -- failures are clear errors, never a silent fallback --------------------------------------------


@pytest.mark.usefixtures("_fresh_dynamo")
def test_backend_failure_is_a_detector_error_naming_the_setting(
    artifact: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable[..., Any]:
        raise RuntimeError("triton is not installed\nsecond line of the story")

    _patch_compile(monkeypatch, failing_backend)
    detector = Detector.load(artifact, device="cpu", max_batch=1, compile_mode="default")
    expected = f"{COMPILE_SETTING}=default.*RuntimeError: triton is not installed; set {COMPILE_SETTING}=off"
    with pytest.raises(DetectorError, match=expected):
        detector.warmup()
    with pytest.raises(DetectorError, match=expected):  # without warm-up the first batch fails the same way
        detector.predict(_images(1))


@pytest.mark.usefixtures("_fresh_dynamo")
def test_missing_cxx_compiler_is_a_detector_error_naming_the_setting(artifact: Path) -> None:
    detector = Detector.load(artifact, device="cpu", max_batch=1, compile_mode="max-autotune")
    no_compiler = {"cpp.cxx": (None, "/nonexistent/g++"), "fx_graph_cache": False}  # a cached build needs none
    with (
        torch._inductor.config.patch(no_compiler),
        torch._functorch.config.patch(enable_autograd_cache=False),
        pytest.raises(DetectorError, match=f"{COMPILE_SETTING}=max-autotune.*InvalidCxxCompiler: No working C"),
    ):
        detector.warmup()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graph_capturing_compile_mode_conflicts_with_cuda_graphs() -> None:  # pragma: no cover - GPU hosts only
    with pytest.raises(ValueError, match="captures CUDA graphs itself"):
        BucketedRunner(torch.sin, (4, 4), 2, torch.device("cuda"), cuda_graphs=True, compile_mode="max-autotune")


# -- real inductor kernels on CPU -----------------------------------------------------------------


@pytest.fixture(scope="module")
def compiled_detector(artifact: Path) -> Iterator[tuple[Detector, int, list[dict[str, Any]]]]:
    """A warmed fp32 detector compiled with inductor (buckets 1, 2, 4), the graphs warm-up built, its logs."""
    torch._dynamo.reset()
    detector = Detector.load(artifact, device="cpu", precision="fp32", max_batch=4, compile_mode="default")
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with capture_logs() as logs:
        detector.warmup()
    yield detector, torch._dynamo.utils.counters["stats"]["unique_graphs"] - before, logs
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.timeout(600)  # the first test also pays for the fixture's cold-cache compiles
@needs_cxx
def test_inductor_warmup_compiles_every_bucket_and_serving_never_recompiles(
    compiled_detector: tuple[Detector, int, list[dict[str, Any]]],
) -> None:
    detector, graphs_in_warmup, logs = compiled_detector
    runner = detector._runner
    assert runner is not None
    assert runner.warmed() == (1, 2, 4)
    assert graphs_in_warmup >= len(runner.buckets)
    [event] = [e for e in logs if e["event"] == "detector_compiled"]
    assert event["compile_mode"] == "default" and event["buckets"] == [1, 2, 4]
    assert event["model_name"] == detector.card.name and event["compile_s"] > 0

    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for n in (1, 2, 3, 4):
        detector.predict(_images(n, seed=n))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == before


@pytest.mark.slow
@pytest.mark.timeout(600)  # the first test also pays for the fixture's cold-cache compiles
@needs_cxx
def test_inductor_maps_match_eager_at_and_between_buckets(
    artifact: Path, compiled_detector: tuple[Detector, int, list[dict[str, Any]]]
) -> None:
    compiled = compiled_detector[0]
    eager = Detector.load(artifact, device="cpu", precision="fp32", max_batch=4)
    for n in (1, 3, 4):  # 3 is padded to bucket 4 by repeating its last image
        batch = _images(n, seed=10 + n)
        want, got = eager.predict(batch), compiled.predict(batch)
        spread = float(want.maps.max() - want.maps.min())
        diff = float(np.abs(got.maps - want.maps).max())
        print(f"batch {n}: max |compiled - eager| = {diff:.3g} (map spread {spread:.3g})")
        # Measured 4e-9 against a spread of 5e-4 (fused fp32 reductions reassociate); 1e-4 of the
        # spread leaves 10x headroom and is far below any threshold decision.
        assert diff <= 1e-4 * spread
        np.testing.assert_allclose(got.scores, want.scores, rtol=0, atol=1e-4 * spread)


def test_compile_on_a_cpu_without_a_cxx_compiler_is_refused_at_load(
    artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The shipped CPU image has no g++: refused when the model loads (and, in space serve, at start:
    # tests/test_worker/test_settings.py), not minutes later with an inductor trace at warm-up.
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(DetectorError, match=f"{COMPILE_SETTING}=default on CPU needs a C\\+\\+ compiler"):
        Detector.load(artifact, device="cpu", max_batch=1, compile_mode="default")
    Detector.load(artifact, device="cpu", max_batch=1, compile_mode="off")  # eager needs none
