"""Serving models per product line: lazy load, bounded set, warm hot-swap, failures keep the old one.

A line's model loads on first use (the active version in the registry). ``refresh()`` (called by a
background thread every ``refresh_interval_s``) notices a promotion, loads the new version beside
the old one, warms it, and swaps the reference atomically; batches already formed keep the object
they hold, so nothing in flight fails. A load that fails leaves the old version serving, logged and
counted, and that version is tried again only after a back-off; a line evicted meanwhile comes back
at the version that served, not the failing one. At most ``max_loaded`` lines stay in memory (least
recently used go first). Unknown lines and lines whose load failed (registry unreadable, artifact
broken) are remembered for ``negative_ttl_s``, so a stream of images for them does not hit the
registry per image.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from worker.errors import SpaceError
from worker.registry import ModelRegistry, NoActiveModel, RegistryError

log = structlog.get_logger(__name__)

_MAX_REMEMBERED = 1024  # unknown / failed lines remembered at once

Waiting = Callable[[str], AbstractContextManager[object]]
"""Wraps a step that waits on something outside the process (``on`` says what), for liveness."""


class DeviceLost(RuntimeError):
    """The process's CUDA context is unusable (a sticky CUDA error); its argument names the stage.

    Only a new process gets a new context: the worker stops without committing (records re-delivered).
    """


def device_lost(exc: BaseException) -> bool:
    """``exc`` came with (or after) a sticky CUDA error (:func:`models.hardware.is_device_fault`).

    Only asked where torch is already loaded: without it no CUDA work can have failed.
    """
    if "torch" not in sys.modules:
        return False
    from models.hardware import is_device_fault

    return is_device_fault(exc)


def _not_tracked(on: str) -> AbstractContextManager[object]:
    return contextlib.nullcontext()


class ModelUnavailable(SpaceError):
    """No model can serve this product line (unknown line, or its model fails to load)."""

    def __init__(self, line: str, detail: str, *, unknown_line: bool) -> None:
        prefix = f"product line {line!r}"
        super().__init__(detail if detail.startswith(prefix) else f"{prefix}: {detail}")
        self.line = line
        self.detail = detail
        self.unknown_line = unknown_line


@dataclass(frozen=True)
class _FailedSwap:
    """A promoted version that failed to load, the version that kept serving, and the retry schedule."""

    wanted: str
    serving: str
    retry_at: float
    delay_s: float


@dataclass(frozen=True)
class LoadedModel:
    """A warm model of one line at one version."""

    line: str
    version: str
    detector: Any  # models.detector.Detector (kept untyped here: models import torch)
    loaded_at: float

    @property
    def key(self) -> tuple[str, str]:
        return (self.line, self.version)

    @property
    def name(self) -> str:
        return str(getattr(self.detector.card, "name", self.line))

    @property
    def default_threshold(self) -> float:
        return float(self.detector.card.default_threshold)

    @property
    def precision(self) -> str:
        """What the detector scores at (``SPACE_MODELS__PRECISION=auto`` resolves per model and node)."""
        return str(getattr(self.detector, "precision", "unknown"))


class ModelManager:
    """Holds the serving model of each line.

    Args:
        registry: Where versions and active pointers live.
        load: Loads a detector from a local artifact directory.
        max_loaded: Lines kept in memory.
        warmup_batch_sizes: Batch sizes run once before a model serves (empty: no warm-up).
        on_load: Callback ``(line, outcome)`` for metrics (outcome: ok | failed).
        negative_ttl_s: How long an unknown line, or a line whose first load failed, is answered
            from memory instead of asking the registry (and loading) again for every image.
        swap_retry_s: After a promoted version failed to load, :meth:`refresh` tries that same
            version again only after this long (doubling up to 16x), so a broken artifact does not
            cost a download and a failed load every refresh interval.
        clock: Monotonic seconds (injected in tests).
    """

    def __init__(
        self,
        registry: ModelRegistry,
        load: Callable[[Path], Any],
        *,
        max_loaded: int = 4,
        warmup_batch_sizes: Sequence[int] = (1,),
        on_load: Callable[[str, str], None] | None = None,
        negative_ttl_s: float = 5.0,
        swap_retry_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_loaded < 1:
            raise ValueError("max_loaded must be >= 1")
        self.registry = registry
        self._load = load
        self.max_loaded = max_loaded
        self.warmup_batch_sizes = tuple(warmup_batch_sizes)
        self._on_load = on_load or (lambda line, outcome: None)
        self._negative_ttl_s = negative_ttl_s
        self._swap_retry_s = swap_retry_s
        self._clock = clock
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        # line -> (retry_at, message, unknown_line): lines that cannot serve right now.
        self._unavailable: dict[str, tuple[float, str, bool]] = {}
        self._preload_failed: dict[str, str] = {}
        # line -> a promoted version that failed to load (kept across eviction of the line).
        self._failed_swaps: dict[str, _FailedSwap] = {}
        self._lock = threading.Lock()
        self._line_locks: dict[str, threading.Lock] = {}

    def get(self, line: str) -> LoadedModel:
        """The serving model of ``line``, loading it on first use; raises :class:`ModelUnavailable`."""
        with self._lock:
            model = self._models.get(line)
            if model is not None:
                self._models.move_to_end(line)
                return model
            self._raise_if_remembered(line)
            line_lock = self._line_locks.setdefault(line, threading.Lock())
        with line_lock:  # one loader per line; others wait for its result
            with self._lock:
                model = self._models.get(line)
                if model is not None:
                    return model
                self._raise_if_remembered(line)  # the loader we waited for failed
            try:
                model = self._load_active(line)
            except ModelUnavailable as exc:
                with self._lock:
                    self._remember_unavailable(line, exc.detail, unknown=exc.unknown_line)
                raise
            with self._lock:
                self._models[line] = model
                self._models.move_to_end(line)
                self._unavailable.pop(line, None)
                while len(self._models) > self.max_loaded:
                    evicted, _ = self._models.popitem(last=False)
                    log.info("model_evicted", product_line=evicted)
            return model

    def _load_active(self, line: str) -> LoadedModel:
        """Load the version the pointer names, or the one that served while that version fails to load."""
        try:
            version = self.registry.active_version(line)
        except RegistryError as exc:
            # Only "never promoted" is an unknown line; an unreadable or corrupt pointer is a processing failure.
            raise ModelUnavailable(line, str(exc), unknown_line=isinstance(exc, NoActiveModel)) from exc
        except Exception as exc:  # a registry bug must still be remembered, not retried per image
            log.exception("model_pointer_read_failed", product_line=line)
            detail = f"cannot read the active pointer: {type(exc).__name__}: {exc}"
            raise ModelUnavailable(line, detail, unknown_line=False) from exc
        failed = self._failed_swaps.get(line)
        if failed is None or failed.wanted != version:
            return self._load_version(line, version)
        # Evicted while a promotion failed: serve what served before; refresh() retries `version` on its schedule.
        log.error(
            "model_promotion_held_back", product_line=line, wanted_version=version, serving_version=failed.serving,
            retry_in_s=round(max(failed.retry_at - self._clock(), 0.0), 1),
        )  # fmt: skip
        try:
            return self._load_version(line, failed.serving)
        except ModelUnavailable:
            del self._failed_swaps[line]  # the old one fails too: the next try loads the pointer's version
            raise

    def _remember_unavailable(self, line: str, detail: str, *, unknown: bool) -> None:
        """Remember a failure; bounded, since product lines come from message headers (holds the lock)."""
        self._unavailable.pop(line, None)
        self._unavailable[line] = (self._clock() + self._negative_ttl_s, detail, unknown)
        while len(self._unavailable) > _MAX_REMEMBERED:
            self._unavailable.pop(next(iter(self._unavailable)))
        if line not in self._models:
            self._line_locks.pop(line, None)  # a waiter still holds it; new callers see the failure first

    def _raise_if_remembered(self, line: str) -> None:
        """Raise the remembered failure of ``line`` while it is fresh (caller holds the lock)."""
        entry = self._unavailable.get(line)
        if entry is None:
            return
        retry_at, detail, unknown = entry
        if self._clock() < retry_at:
            raise ModelUnavailable(line, detail, unknown_line=unknown)
        del self._unavailable[line]

    def _load_version(self, line: str, version: str) -> LoadedModel:
        start = time.monotonic()
        try:
            path = self.registry.local_path(line, version)
            detector = self._load(path)
            if self.warmup_batch_sizes:
                detector.warmup(self.warmup_batch_sizes)
        except Exception as exc:  # any load failure: counted, logged, the old model (if any) kept
            self._on_load(line, "failed")
            log.error("model_load_failed", product_line=line, model_version=version, error=str(exc))
            if device_lost(exc):
                # Not this version's fault, and no later load in this process will work: the caller stops.
                raise DeviceLost("model load") from exc
            self._discard(line, version)
            detail = f"model version {version!r} failed to load: {exc}"
            raise ModelUnavailable(line, detail, unknown_line=False) from exc
        self._on_load(line, "ok")
        card_version = getattr(getattr(detector, "card", None), "version", version)
        if card_version != version:  # results say `version`; `space calibrate` writes card_version
            log.warning(
                "model_card_version_mismatch", product_line=line, model_version=version, card_version=card_version
            )
        load_ms = round((time.monotonic() - start) * 1000, 1)
        log.info("model_loaded", product_line=line, model_version=version, load_ms=load_ms)
        return LoadedModel(line, version, detector, time.monotonic())

    def _discard(self, line: str, version: str) -> None:
        try:
            self.registry.discard_local(line, version)
        except (RegistryError, OSError) as exc:
            log.warning("model_cache_discard_failed", product_line=line, model_version=version, error=str(exc))

    def refresh(self, *, waiting: Waiting = _not_tracked) -> list[str]:
        """Swap in promoted (or rolled back) versions of the loaded lines; returns the lines swapped.

        The new version is loaded and warmed beside the old one, then the reference is swapped; a
        version that fails to load leaves the old one serving (``model_swap_failed``) and is tried
        again after ``swap_retry_s``.

        Args:
            waiting: Wraps every step that waits on the registry, a model load or another loader of
                the line (:meth:`worker.http.Heartbeats.waiting`), so a slow store or a long warm-up
                reads as waiting rather than as a stalled thread.
        """
        with self._lock:
            lines = list(self._models)
            # New lines may have been published; failed loads keep their own expiry.
            self._unavailable = {k: v for k, v in self._unavailable.items() if not v[2]}
        swapped = []
        for line in lines:
            if self._refresh_line(line, waiting):
                swapped.append(line)
        return swapped

    def _refresh_line(self, line: str, waiting: Waiting) -> bool:
        with self._lock:
            line_lock = self._line_locks.setdefault(line, threading.Lock())
        with waiting(f"another load of line {line}"):
            line_lock.acquire()
        try:
            with self._lock:
                model = self._models.get(line)
            if model is None:  # evicted meanwhile: the next get() loads the active version
                return False
            return self._swap_if_promoted(model, waiting)
        finally:
            line_lock.release()

    def _swap_if_promoted(self, model: LoadedModel, waiting: Waiting) -> bool:
        """Load the pointer's version of ``model.line`` if it is another one (holds the line lock)."""
        line = model.line
        try:
            with waiting(f"model registry, line {line}"):
                version = self.registry.active_version(line)
        except Exception as exc:  # noqa: BLE001 - a registry hiccup (S3 down, bad pointer) keeps the model
            log.warning("model_pointer_unreadable", product_line=line, error=str(exc))
            return False
        if version == model.version:
            self._failed_swaps.pop(line, None)
            return False
        failed = self._failed_swaps.get(line)
        if failed is not None and failed.wanted == version and self._clock() < failed.retry_at:
            return False
        try:
            with waiting(f"model load, line {line} version {version}"):
                new = self._load_version(line, version)
        except ModelUnavailable as exc:
            delay = (
                self._swap_retry_s
                if failed is None or failed.wanted != version
                else min(failed.delay_s * 2, self._swap_retry_s * 16)
            )
            self._failed_swaps[line] = _FailedSwap(version, model.version, self._clock() + delay, delay)
            log.error(
                "model_swap_failed", product_line=line, serving_version=model.version, wanted_version=version,
                error=str(exc.__cause__ or exc), retry_in_s=delay,
            )  # fmt: skip
            return False
        self._failed_swaps.pop(line, None)
        with self._lock:
            kept = line in self._models
            if kept:
                self._models[line] = new
        if not kept:  # evicted while the new version loaded: the next get() loads the active version
            log.info("model_swap_dropped", product_line=line, old_version=model.version, new_version=version)
            return False
        log.info("model_swapped", product_line=line, old_version=model.version, new_version=version)
        return True

    def loaded(self) -> dict[str, LoadedModel]:
        """The serving model of every loaded line."""
        with self._lock:
            return dict(self._models)

    def preload(self, lines: Sequence[str], *, stop: Callable[[], bool] = lambda: False) -> dict[str, str]:
        """Load (and warm) these lines now, so the first image does not pay for it.

        A line that does not load (no active version, a version that fails its checks, a store that
        is down) is logged (``model_preload_failed``) and skipped: one bad line must not keep a new
        pod from serving the others (a crash here crash-looped every new pod of the fleet). Its
        images are dead-lettered as ``model-unavailable`` and it loads on first use once it can.

        Args:
            lines: product lines, in order.
            stop: checked before each line; True ends the preload early (SIGTERM while warming up).

        Returns:
            The lines that failed, with why.
        """
        failed: dict[str, str] = {}
        for line in lines:
            if stop():
                break
            try:
                self.get(line)
            except ModelUnavailable as exc:
                failed[line] = exc.detail
                log.error("model_preload_failed", product_line=line, error=exc.detail)
        with self._lock:
            self._preload_failed.update(failed)
        return failed

    def preload_failures(self) -> dict[str, str]:
        """Preloaded lines that failed to load and have not loaded since, with why."""
        with self._lock:
            return {line: why for line, why in self._preload_failed.items() if line not in self._models}
