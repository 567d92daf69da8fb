"""Serving models per product line: lazy load, bounded set, warm hot-swap, failures keep the old one.

A line's model loads on first use (the active version in the registry). ``refresh()`` (called by a
background thread every ``refresh_interval_s``) notices a promotion, loads the new version beside
the old one, warms it, and swaps the reference atomically; batches already formed keep the object
they hold, so nothing in flight fails. A load that fails leaves the old version serving, logged and
counted. At most ``max_loaded`` lines stay in memory (least recently used go first).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from worker.errors import SpaceError
from worker.registry import ModelRegistry, RegistryError

log = structlog.get_logger(__name__)


class ModelUnavailable(SpaceError):
    """No model can serve this product line (unknown line, or its model fails to load)."""

    def __init__(self, line: str, detail: str, *, unknown_line: bool) -> None:
        super().__init__(f"product line {line!r}: {detail}")
        self.line = line
        self.unknown_line = unknown_line


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


class ModelManager:
    """Holds the serving model of each line.

    Args:
        registry: Where versions and active pointers live.
        load: Loads a detector from a local artifact directory.
        max_loaded: Lines kept in memory.
        warmup_batch_sizes: Batch sizes run once before a model serves (empty: no warm-up).
        on_load: Callback ``(line, outcome)`` for metrics (outcome: ok | failed).
        negative_ttl_s: How long an unknown line is remembered as unknown.
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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self._load = load
        self.max_loaded = max_loaded
        self.warmup_batch_sizes = tuple(warmup_batch_sizes)
        self._on_load = on_load or (lambda line, outcome: None)
        self._negative_ttl_s = negative_ttl_s
        self._clock = clock
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._unknown: dict[str, tuple[float, str]] = {}
        self._lock = threading.Lock()
        self._line_locks: dict[str, threading.Lock] = {}

    def get(self, line: str) -> LoadedModel:
        """The serving model of ``line``, loading it on first use; raises :class:`ModelUnavailable`."""
        with self._lock:
            model = self._models.get(line)
            if model is not None:
                self._models.move_to_end(line)
                return model
            unknown = self._unknown.get(line)
            if unknown is not None and self._clock() < unknown[0]:
                raise ModelUnavailable(line, unknown[1], unknown_line=True)
            line_lock = self._line_locks.setdefault(line, threading.Lock())
        with line_lock:  # one loader per line; others wait for its result
            with self._lock:
                model = self._models.get(line)
                if model is not None:
                    return model
            try:
                version = self.registry.active_version(line)
            except RegistryError as exc:
                with self._lock:
                    self._unknown[line] = (self._clock() + self._negative_ttl_s, str(exc))
                raise ModelUnavailable(line, str(exc), unknown_line=True) from exc
            model = self._load_version(line, version)
            with self._lock:
                self._models[line] = model
                self._models.move_to_end(line)
                while len(self._models) > self.max_loaded:
                    evicted, _ = self._models.popitem(last=False)
                    log.info("model_evicted", product_line=evicted)
            return model

    def _load_version(self, line: str, version: str) -> LoadedModel:
        start = time.monotonic()
        try:
            path = self.registry.local_path(line, version)
            detector = self._load(path)
            if self.warmup_batch_sizes:
                detector.warmup(self.warmup_batch_sizes)
        except Exception as exc:
            self._on_load(line, "failed")
            log.error("model_load_failed", product_line=line, model_version=version, error=str(exc))
            raise ModelUnavailable(
                line, f"model version {version!r} failed to load: {exc}", unknown_line=False
            ) from exc
        self._on_load(line, "ok")
        log.info(
            "model_loaded",
            product_line=line,
            model_version=version,
            load_ms=round((time.monotonic() - start) * 1000, 1),
        )
        return LoadedModel(line, version, detector, time.monotonic())

    def refresh(self) -> list[str]:
        """Swap in promoted versions of the loaded lines; returns the lines swapped."""
        with self._lock:
            current = dict(self._models)
        swapped = []
        for line, model in current.items():
            try:
                version = self.registry.active_version(line)
            except RegistryError as exc:
                log.warning("model_pointer_unreadable", product_line=line, error=str(exc))
                continue
            if version == model.version:
                continue
            try:
                new = self._load_version(line, version)
            except ModelUnavailable:
                log.error("model_swap_failed", product_line=line, serving_version=model.version, wanted_version=version)
                continue
            with self._lock:
                if line in self._models:
                    self._models[line] = new
            swapped.append(line)
            log.info("model_swapped", product_line=line, old_version=model.version, new_version=version)
        with self._lock:
            self._unknown.clear()  # new lines may have appeared
        return swapped

    def loaded(self) -> dict[str, LoadedModel]:
        """The serving model of every loaded line."""
        with self._lock:
            return dict(self._models)

    def preload(self, lines: Sequence[str]) -> None:
        """Load (and warm) these lines now, so the first image does not pay for it."""
        for line in lines:
            self.get(line)
