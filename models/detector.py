"""The runtime the worker uses: :class:`Detector` (load an artifact, prepare images, predict, warm up).

Implements the contract of docs/architecture.md. Inference runs teacher, student (+FE/FM for ``space``) and
autoencoder under ``torch.inference_mode``, normalises each branch map with the card's quantiles, combines
them 0.5/0.5, resizes to the input size as the card's ``map_align`` says (docs/model.md); the image score is
the map's max (SPACE_SPEC §1.8).
One caller at a time: a lock serialises :meth:`Detector.predict`.
"""

from __future__ import annotations

import functools
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Literal, NamedTuple

import cv2
import numpy as np
import structlog
import torch

from models.artifact import ArtifactError, ModelCard, load_artifact
from models.gpu import TORCH_COMPILE_MODES, BranchStreams, BucketedRunner
from models.hardware import cpu_has_native_bf16, cuda_has_native_bf16
from models.model import SpaceModel
from models.preprocess import prepare_image

log = structlog.get_logger(__name__)

Precision = Literal["auto", "fp32", "bf16", "fp16"]
CompileMode = Literal["off", "default", "max-autotune"]

#: The settings that turn torch.compile and branch streams on (models must not import worker.settings;
#: a test checks the names).
COMPILE_SETTING = "SPACE_MODELS__COMPILE"
BRANCHES_SETTING = "SPACE_MODELS__CONCURRENT_BRANCHES"


class DetectorError(ValueError):
    """A device/precision combination or an input the detector cannot serve."""


class Prediction(NamedTuple):
    """Scores (N,) float32 and maps: (N, h, w) float32 at input size, or a list at original sizes."""

    scores: np.ndarray
    maps: np.ndarray | list[np.ndarray]


class PendingPrediction:
    """A batch handed to :meth:`Detector.submit`; :meth:`result` waits for its scores and maps."""

    __slots__ = ("_value", "_wait")

    def __init__(self, wait: Callable[[], Prediction]) -> None:
        """Keep the function that waits for (or already holds) the prediction."""
        self._wait = wait
        self._value: Prediction | None = None

    def result(self) -> Prediction:
        """The prediction (waits once; later calls return the same value)."""
        if self._value is None:
            self._value = self._wait()
        return self._value


def resolve_device(device: str) -> torch.device:
    """``auto`` picks cuda when available; ``cuda`` without a GPU is a :class:`DetectorError`."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DetectorError("device 'cuda' requested but no CUDA device is available")
    if device != "cpu" and not device.startswith("cuda"):
        raise DetectorError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``precision`` on ``device`` (None = fp32); fp16 is cuda-only; resolve ``auto`` first."""
    if precision == "fp32":
        return None
    if precision == "fp16":
        if device.type != "cuda":
            raise DetectorError("precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
        return torch.float16
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise DetectorError("this CUDA device does not support bf16; use fp16 or fp32")
        if device.type == "cuda" and not cuda_has_native_bf16(device):
            log.warning("bf16_emulated_on_gpu", capability=".".join(map(str, torch.cuda.get_device_capability(device))))
        if device.type == "cpu" and not cpu_has_native_bf16():
            # Allowed (results are right), but emulated: 4-8x slower than fp32 on an AVX2-only EPYC.
            log.warning("bf16_emulated_on_cpu", cpu_capability=torch.backends.cpu.get_cpu_capability())
        return torch.bfloat16
    raise DetectorError(f"unknown precision {precision!r}; use fp32, bf16 or fp16")


def precision_name(recorded: str) -> str:
    """A model card's training precision (``fp32``, ``torch.bfloat16``, ...) as a setting value (``bf16``)."""
    names = {"torch.bfloat16": "bf16", "bfloat16": "bf16", "torch.float16": "fp16", "float16": "fp16"}
    return names.get(recorded, recorded)


def native_precision(precision: str, device: torch.device) -> bool:
    """Whether ``device`` runs ``precision`` in hardware (fp32 always; bf16/fp16 where the kernels exist)."""
    if precision == "fp32":
        return True
    if device.type == "cuda":
        return precision == "fp16" or (precision == "bf16" and cuda_has_native_bf16(device))
    return precision == "bf16" and cpu_has_native_bf16()


def choose_precision(setting: str, calibrated: str, device: torch.device) -> str:
    """The precision to serve a card at: ``setting``, or for ``auto`` the card's own where it runs natively.

    ``auto`` keeps scores where the card's default threshold was chosen (its training precision) when
    the device has the kernels for it (:mod:`models.hardware`): a bf16 card serves in bf16 on an Ampere
    or later GPU or on a CPU with AVX-512 bf16 or AMX (1.8x fp32 on an AVX-512 bf16 EPYC), and in fp32
    elsewhere (emulated bf16 is 4-8x slower), which :meth:`Detector.load` then logs as
    ``precision_differs_from_calibration``.
    """
    if setting != "auto":
        return setting
    return calibrated if calibrated in ("bf16", "fp16") and native_precision(calibrated, device) else "fp32"


def resolve_compile_mode(compile_mode: str) -> str | None:
    """``torch.compile`` mode for a ``compile`` setting (None = eager); never one that captures CUDA graphs."""
    if compile_mode not in TORCH_COMPILE_MODES:
        raise DetectorError(f"unknown compile mode {compile_mode!r}; use off, default or max-autotune")
    return TORCH_COMPILE_MODES[compile_mode]


def check_compile_toolchain(compile_mode: str, device: torch.device) -> None:
    """Raise :class:`DetectorError` when torch.compile on a CPU device has no C++ compiler to call.

    Inductor compiles CPU kernels with the C++ compiler in ``$CXX`` or on the PATH; without one
    (slim runtime images) every load would fail at warm-up with a long inductor trace.
    """
    if compile_mode == "off" or device.type != "cpu":
        return
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    if not any(shutil.which(name) for name in candidates):
        raise DetectorError(
            f"{COMPILE_SETTING}={compile_mode} on CPU needs a C++ compiler (tried {', '.join(candidates)}; "
            f"the shipped CPU image has none): install g++ or set {COMPILE_SETTING}=off"
        )


def compile_failure(compile_mode: str, exc: BaseException) -> DetectorError:
    """A :class:`DetectorError` naming the setting and the first line of the innermost error."""
    root = exc
    while (inner := getattr(root, "inner_exception", None) or root.__cause__) is not None and inner is not root:
        root = inner
    lines = [line for line in str(root).splitlines() if line.strip()]
    detail = f"{type(root).__name__}: {lines[0]}" if lines else type(root).__name__
    return DetectorError(
        f"torch.compile failed ({COMPILE_SETTING}={compile_mode}): {detail}; "
        f"set {COMPILE_SETTING}=off to run the model eagerly"
    )


class Detector:
    """A loaded, calibrated model ready to score images."""

    def __init__(
        self,
        model: SpaceModel,
        card: ModelCard,
        device: torch.device,
        autocast: torch.dtype | None,
        channels_last: bool,
        max_batch: int = 64,
        cuda_graphs: bool = False,
        compile_mode: CompileMode = "off",
        concurrent_branches: bool = False,
    ) -> None:
        """Wrap ``model`` (use :meth:`load` or :meth:`from_model`); the detector takes ownership of it.

        On CUDA, batches run through :class:`models.gpu.BucketedRunner` (fixed bucket shapes up to
        ``max_batch``, pinned uint8 uploads on a copy stream, optional CUDA graphs per bucket). With
        ``compile_mode`` other than ``off`` they do on CPU too, so torch.compile sees only the bucket
        shapes: one graph per bucket, all compiled by :meth:`warmup`. ``concurrent_branches`` runs the
        networks that do not wait for each other on side CUDA streams (:class:`models.gpu.BranchStreams`;
        CUDA only, a no-op on CPU; not with torch.compile).
        """
        if not bool(model.calibrated):
            raise DetectorError("model is not calibrated (no map quantiles)")
        if concurrent_branches and compile_mode != "off":
            raise DetectorError(
                f"{BRANCHES_SETTING}=true runs side CUDA streams that torch.compile does not capture; "
                f"set {COMPILE_SETTING}=off or {BRANCHES_SETTING}=false"
            )
        self.model = model.eval().to(device).requires_grad_(False)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        if autocast is not None:
            # Autocast would re-cast every fp32 weight on every call (a third of a CPU batch-1 pass);
            # weights kept in the compute dtype give the same numbers. Buffers (calibration) stay fp32.
            for p in self.model.parameters():
                p.data = p.data.to(autocast)
        self.card = card
        self.device = device
        self.autocast = autocast
        self.channels_last = channels_last
        self.compile_mode = compile_mode
        torch_mode = resolve_compile_mode(compile_mode)
        check_compile_toolchain(compile_mode, device)
        self._lock = threading.Lock()
        self._runner: BucketedRunner | None = None
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # bucketed batches: few fixed shapes, tuned once in warm-up
        self.concurrent_branches = concurrent_branches and device.type == "cuda"
        if device.type == "cuda" or torch_mode is not None:
            forward = self.model.anomaly_map
            if self.concurrent_branches:
                forward = functools.partial(self.model.anomaly_map, branches=BranchStreams(device))
            self._runner = BucketedRunner(
                forward, self.input_size, max_batch, device, autocast=autocast,
                cuda_graphs=cuda_graphs, compile_mode=torch_mode,
            )  # fmt: skip

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str = "auto",
        precision: Precision = "auto",
        channels_last: bool = True,
        *,
        max_batch: int = 64,
        cuda_graphs: bool = False,
        compile_mode: CompileMode = "off",
        concurrent_branches: bool = False,
    ) -> Detector:
        """Load an artifact folder (weights hash checked) onto ``device``.

        ``precision="auto"`` serves at the card's training precision where ``device`` runs it natively,
        else fp32 (:func:`choose_precision`); :attr:`precision` says which one was chosen.
        """
        dev = resolve_device(device)
        card, state = load_artifact(Path(path))
        calibrated_at = precision_name(card.training.precision)
        serving = choose_precision(precision, calibrated_at, dev)
        autocast = resolve_precision(serving, dev)
        model = SpaceModel(card.config)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise ArtifactError(f"{path}: weights do not fit the card's model config ({first})") from exc
        log.info(
            "detector_loaded",
            path=str(path),
            model_name=card.name,
            model_version=card.version,
            device=str(dev),
            precision=serving,
            precision_setting=precision,
            compile_mode=compile_mode,
            concurrent_branches=concurrent_branches and dev.type == "cuda",
        )
        if calibrated_at != serving:
            # The card's default threshold came from scores at the training precision; another precision
            # moves a score by up to ~6 % of the threshold (docs/performance.md, bench/precision.py). A
            # threshold calibrated at the serving precision and written to Redis is not affected.
            log.info(
                "precision_differs_from_calibration",
                model_name=card.name,
                model_version=card.version,
                precision=serving,
                calibrated_precision=calibrated_at,
                hint=f"results that fall back to the card's default threshold (source=model-default) may differ; "
                f"calibrate at {serving}: space calibrate --precision {serving} --write",
            )
        return cls(
            model, card, dev, autocast, channels_last, max_batch=max_batch, cuda_graphs=cuda_graphs,
            compile_mode=compile_mode, concurrent_branches=concurrent_branches,
        )  # fmt: skip

    @classmethod
    def from_model(
        cls,
        model: SpaceModel,
        card: ModelCard,
        device: str = "cpu",
        precision: Precision = "fp32",
        channels_last: bool = False,
    ) -> Detector:
        """Wrap an in-memory model (tests, evaluation right after training)."""
        dev = resolve_device(device)
        return cls(model, card, dev, resolve_precision(precision, dev), channels_last)

    @property
    def precision(self) -> str:
        """The precision this detector scores at: ``fp32``, ``bf16`` or ``fp16`` (never ``auto``)."""
        if self.autocast is None:
            return "fp32"
        return "bf16" if self.autocast is torch.bfloat16 else "fp16"

    @property
    def input_size(self) -> tuple[int, int]:
        """Model input (h, w)."""
        return tuple(self.card.input_size)  # type: ignore[return-value]

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """Gray/RGB/RGBA uint8 of any size -> (h, w, 3) uint8 RGB at :attr:`input_size` (INTER_AREA)."""
        try:
            return prepare_image(image, self.input_size)
        except ValueError as exc:
            raise DetectorError(str(exc)) from exc

    def _stack(self, batch: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        h, w = self.input_size
        if isinstance(batch, np.ndarray) and batch.ndim == 4 and batch.shape[1:] == (h, w, 3):
            if batch.dtype != np.uint8:
                raise DetectorError(f"batch must be uint8, got {batch.dtype}")
            return batch
        if isinstance(batch, np.ndarray) and batch.ndim != 4:
            raise DetectorError(f"expected (N, {h}, {w}, 3) uint8 or a list of images, got shape {batch.shape}")
        if len(batch) == 0:
            return np.zeros((0, h, w, 3), np.uint8)
        return np.stack([self.prepare(img) for img in batch])

    def predict(
        self, batch: np.ndarray | Sequence[np.ndarray], map_size: Literal["input", "original"] = "input"
    ) -> Prediction:
        """Score a batch: (N, h, w, 3) uint8 at input size, or a list of images of any size.

        Args:
            batch: the images.
            map_size: ``"input"`` gives maps (N, h, w); ``"original"`` (list inputs) resizes each map to
                its image's own size and returns a list.
        """
        originals = [img.shape[:2] for img in batch] if map_size == "original" else None
        x_np = self._stack(batch)
        if len(x_np) == 0:
            h, w = self.input_size
            return Prediction(np.zeros(0, np.float32), np.zeros((0, h, w), np.float32))
        if self._runner is not None:
            with self._lock, self._compile_errors():
                maps = self._runner.run(np.ascontiguousarray(x_np))
            return self._finish(maps, originals)
        with self._lock, torch.inference_mode():
            x = torch.from_numpy(x_np).to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(
                self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None
            ):
                maps_t = self.model.anomaly_map(x)
            maps = maps_t.float().cpu().numpy()
        return self._finish(maps, originals)

    def submit(self, batch: np.ndarray | Sequence[np.ndarray]) -> PendingPrediction:
        """Start scoring N images: an (N, h, w, 3) uint8 array or a list of (h, w, 3) uint8 images at
        :attr:`input_size`; :meth:`PendingPrediction.result` waits for it.

        With the bucketed runner (CUDA, or torch.compile on) a list goes image by image into the
        bucket's buffer, with no stacked copy of the batch first. On CUDA (N <= ``max_batch``) this
        returns once the upload and the forward are queued, so the caller can prepare the next batch
        while the device computes this one; keep at most two batches in flight. Elsewhere it computes
        before returning.
        """
        runner = self._runner
        images: np.ndarray | Sequence[np.ndarray] = batch if self._at_input_size(batch) else self._stack(batch)
        if runner is None or len(images) == 0 or len(images) > runner.max_batch:
            done = self.predict(images)
            return PendingPrediction(lambda: done)
        with self._lock, self._compile_errors():
            pending = runner.submit(images)
        return PendingPrediction(lambda: self._finish(pending.result(), None))

    def _at_input_size(self, batch: np.ndarray | Sequence[np.ndarray]) -> bool:
        """Whether ``batch`` is a list of (h, w, 3) uint8 images at the input size (usable as they are)."""
        if isinstance(batch, np.ndarray):
            return False
        shape = (*self.input_size, 3)
        return all(isinstance(im, np.ndarray) and im.dtype == np.uint8 and im.shape == shape for im in batch)

    @staticmethod
    def _finish(maps: np.ndarray, originals: list[tuple[int, int]] | None) -> Prediction:
        scores = maps.reshape(len(maps), -1).max(axis=1).astype(np.float32)
        if originals is None:
            return Prediction(scores, maps.astype(np.float32, copy=False))
        resized = [
            cv2.resize(m, (ow, oh), interpolation=cv2.INTER_LINEAR) for m, (oh, ow) in zip(maps, originals, strict=True)
        ]
        return Prediction(scores, resized)

    @contextmanager
    def _compile_errors(self) -> Iterator[None]:
        """With torch.compile on, turn a compile failure (dynamo, inductor, backend) into a :class:`DetectorError`."""
        try:
            yield
        except torch._dynamo.exc.TorchDynamoException as exc:
            if self.compile_mode == "off":
                raise
            raise compile_failure(self.compile_mode, exc) from exc

    def warmup(self, batch_sizes: Iterable[int] = (1,)) -> None:
        """Run each batch size once so kernels are chosen and memory is allocated before serving.

        With a bucketed runner (CUDA, or torch.compile on) every bucket runs instead, which also
        captures its CUDA graph and compiles its graph; ``detector_compiled`` logs what that cost.
        """
        h, w = self.input_size
        if self._runner is not None:
            start = time.perf_counter()
            with self._compile_errors():
                self._runner.warmup()  # every bucket (and its CUDA graph) before the model serves
            batch_sizes = self._runner.buckets
            if self.compile_mode != "off":
                log.info(
                    "detector_compiled",
                    model_name=self.card.name,
                    compile_mode=self.compile_mode,
                    buckets=list(batch_sizes),
                    compile_s=round(time.perf_counter() - start, 2),
                )
        else:
            for n in batch_sizes:
                self.predict(np.zeros((n, h, w, 3), np.uint8))
        log.info("detector_warm", model_name=self.card.name, batch_sizes=list(batch_sizes))
