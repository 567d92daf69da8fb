"""Accelerator runtime: fixed batch buckets, pinned host buffers, a copy stream, CUDA graphs.

EfficientAD-class networks are small; on a GPU the host side (copies, kernel launches, Python)
decides throughput. This module keeps the device busy:

* **Buckets.** A batch of n images is padded up to the smallest bucket >= n (powers of two up to
  ``max_batch``), so every call has one of a few fixed shapes: cuDNN picks its algorithms once,
  CUDA graphs can be captured per bucket, and ``warmup()`` covers every shape before ``/readyz``.
* **Pinned buffers + copy streams.** Each bucket owns a page-locked host buffer; the host->device
  copy runs ``non_blocking`` on a side stream, so the copy of batch n+1 overlaps compute of batch n,
  and the maps come back on another, so the forward of batch n+1 does not wait for that copy
  (:meth:`BucketedRunner.submit` returns a handle, :meth:`Pending.result` waits, sleeping on a
  blocking-sync event instead of spinning a core).
* **One capture at a time, and nothing else meanwhile.** ``torch.cuda.Stream()`` hands out streams
  from a pool of 32 per device, round robin, and ``torch.cuda.graph`` takes its capture stream from
  the same pool: past 32 streams, the stream a graph is captured on can be the very stream another
  thread is queueing work on (a runner's copy stream, a decode thread's, a side branch's), and that
  work would be recorded into the graph or break the capture. So every piece of device work holds
  :data:`device_gate` shared, and a capture holds it exclusive (:func:`device_work`).
* **uint8 on the wire.** Images cross PCIe as uint8 NHWC (4x fewer bytes than fp32); the
  conversion to float and the NCHW view (channels_last strides for free) run on the device.
* **CUDA graphs** (optional) replay the whole forward of a bucket with one launch.
* **torch.compile** (optional) compiles the forward once per bucket shape (``dynamic=False``); the
  first call of each bucket compiles, so :meth:`BucketedRunner.warmup` pays for all of them.
* **Branch streams** (optional, :class:`BranchStreams`): the networks that do not wait for each
  other run on side streams, captured into the same graph.

The pure parts (bucket choice, padding, bookkeeping) are tested on CPU; the CUDA parts run only
where ``torch.cuda.is_available()``. On CPU :class:`BucketedRunner` runs synchronously with the same API.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

#: ``SPACE_MODELS__COMPILE`` values -> ``torch.compile`` modes. Never a mode that captures CUDA graphs
#: itself: the runner captures its own per bucket (``cuda_graphs``), around the compiled forward.
TORCH_COMPILE_MODES: dict[str, str | None] = {
    "off": None,
    "default": "default",
    "max-autotune": "max-autotune-no-cudagraphs",
}
_GRAPH_CAPTURING_MODES = ("reduce-overhead", "max-autotune")

_compiled_shapes_lock = threading.Lock()
_compiled_shapes = 0  # bucket shapes of every forward compiled in this process


class SharedExclusiveLock:
    """A readers-writer lock that prefers writers: once a writer waits, new readers wait behind it.

    Not reentrant: a thread holding it (either way) must not take it again.
    """

    def __init__(self) -> None:
        """Start free."""
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        """Hold it with other readers (no writer holds or waits)."""
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold it alone."""
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


#: Device work of this process (copies, forwards, read-backs, nvJPEG decodes) holds it shared; a CUDA
#: graph capture holds it exclusive, so nothing is queued on any stream while a graph is captured
#: (see the module docstring: streams come from a pool, the capture stream may alias a busy one).
#: Models load on decode and refresh threads, so captures meet serving and each other.
device_gate = SharedExclusiveLock()


#: One loader at a time warms up and captures (:meth:`BucketedRunner._capture`). A second loader waits
#: here, not as a writer on :data:`device_gate`: the lock prefers writers, so a writer waiting behind a
#: first loader's long warm-up (torch.compile on a bucket's first call, under the gate shared) would hold
#: every new reader, serving included, until that warm-up ended. Taken before the gate, never after.
_capture_lock = threading.Lock()


def device_work() -> contextlib.AbstractContextManager[None]:
    """Hold :data:`device_gate` shared around queueing device work outside :class:`BucketedRunner`."""
    return device_gate.shared()


def raise_recompile_limit(limit: int) -> None:
    """Let dynamo keep at least ``limit`` compiled graphs per function (never lowers a limit).

    Past the limit (8 by default) dynamo runs the function eagerly with only a warning, so a
    runner with many buckets would quietly lose the compiled graphs of its largest ones.
    """
    cfg = torch._dynamo.config
    names = ["recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"]  # torch < 2.6
    if hasattr(cfg, "accumulated_recompile_limit"):
        names.append("accumulated_recompile_limit")
    for name in names:
        if getattr(cfg, name) < limit:
            setattr(cfg, name, limit)


def compile_forward(
    forward: Callable[[torch.Tensor], torch.Tensor], mode: str, n_shapes: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``torch.compile`` for ``n_shapes`` fixed input shapes: one graph each, built on its first call.

    Dynamo keeps the graphs on the function's code object, which every model of a class shares
    (``SpaceModel.anomaly_map``): a second product line with another config or precision adds its
    own graphs there. The limit therefore counts the shapes of every compiled runner, plus two.
    """
    global _compiled_shapes
    with _compiled_shapes_lock:
        _compiled_shapes += n_shapes
        raise_recompile_limit(_compiled_shapes + 2)
    return torch.compile(forward, mode=mode, dynamic=False, fullgraph=False)


def bucket_sizes(max_batch: int) -> tuple[int, ...]:
    """Powers of two below ``max_batch``, plus ``max_batch`` itself: (1, 2, 4, ..., max_batch)."""
    if max_batch < 1:
        raise ValueError("max_batch must be >= 1")
    sizes = []
    b = 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    sizes.append(max_batch)
    return tuple(sizes)


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``n`` images."""
    if n < 1:
        raise ValueError("a batch needs at least one image")
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"batch of {n} exceeds the largest bucket {buckets[-1]}")


def split_to_buckets(n: int, buckets: Sequence[int]) -> list[int]:
    """Chunk sizes that cover ``n`` images with full largest buckets and one padded tail."""
    largest = buckets[-1]
    chunks = [largest] * (n // largest)
    if n % largest:
        chunks.append(n % largest)
    return chunks


def fill_batch(out: np.ndarray, images: np.ndarray | Sequence[np.ndarray]) -> int:
    """Copy ``n`` images into ``out[:n]``, one copy each (no stacked intermediate); returns ``n``.

    The worker hands a batch over as a list of decoded images: copying each straight into the bucket's
    (pinned) buffer replaces a stack, a pad and a copy of the whole batch. Rows past ``n`` keep what
    they held (zeros in a new buffer, else an earlier batch's images): every row is scored on its own,
    so they only need to be valid pixels, and refilling them could copy most of a bucket for nothing.

    Raises:
        ValueError: no images, more than ``out`` holds, or an image of another shape or dtype.
    """
    n = len(images)
    if n == 0 or n > out.shape[0]:
        raise ValueError(f"{n} images do not fit a buffer of {out.shape[0]}")
    if isinstance(images, np.ndarray):
        if images.shape[1:] != out.shape[1:] or images.dtype != out.dtype:
            raise ValueError(f"images are {images.shape[1:]} {images.dtype}, expected {out.shape[1:]} {out.dtype}")
        out[:n] = images
        return n
    for i, image in enumerate(images):
        if image.shape != out.shape[1:] or image.dtype != out.dtype:
            raise ValueError(f"image {i} is {image.shape} {image.dtype}, expected {out.shape[1:]} {out.dtype}")
        out[i] = image
    return n


class BranchStreams:
    """Side CUDA streams for the parts of a forward that do not wait for each other (fork/join).

    ``SpaceModel.anomaly_map(x, branches=...)`` starts the autoencoder (and, for EfficientAD, the
    teacher) here while the student runs on the current stream. At batch 1 no single network fills
    the card, so side by side they finish sooner; ``bench/branches.py`` measures it. Works inside
    CUDA graph capture: each side stream first waits for the current stream (fork) and the current
    stream waits for all of them in :meth:`join`, which capture requires before it ends.

    Memory: tensors cross streams only along that order. The image read by a side stream was
    queued before the fork, and whatever the current stream allocates after the join runs after
    the side streams finished. A side stream's outputs are read by the current stream and freed
    into the side stream's pool: :meth:`join` marks them used by the current stream
    (``record_stream``), because streams come from a pool of 32 that other threads draw from too
    (a decode thread, another line's warm-up), and one of them allocating on the same stream could
    otherwise get an output's block while the current stream's reads of it are still queued. Not
    during graph capture: captured work allocates from the graph's private pool. Intermediates
    stay on their side stream, where any reuse is ordered behind them. One caller at a time (the
    detector's lock).
    """

    def __init__(self, device: torch.device, count: int = 2) -> None:
        """Create ``count`` side streams on ``device`` (CUDA)."""
        if device.type != "cuda":
            raise ValueError("branch streams need a CUDA device")
        self.device = device
        self.streams = [torch.cuda.Stream(device=device) for _ in range(count)]
        self._started: list[Any] = []
        self._outputs: list[torch.Tensor] = []

    def start(self, index: int, fn: Callable[[], Any]) -> Any:
        """Queue ``fn`` on side stream ``index`` after everything queued so far; valid after :meth:`join`."""
        stream = self.streams[index]
        stream.wait_stream(torch.cuda.current_stream(self.device))
        self._started.append(stream)
        with torch.cuda.stream(stream):
            result = fn()
        self._outputs.extend(tensors_in(result))
        return result

    def join(self) -> None:
        """Make the current stream wait for every side stream started since the last join."""
        current = torch.cuda.current_stream(self.device)
        for stream in self._started:
            current.wait_stream(stream)
        if not torch.cuda.is_current_stream_capturing():
            for tensor in self._outputs:
                tensor.record_stream(current)
        self._started.clear()
        self._outputs.clear()


def tensors_in(value: Any) -> list[torch.Tensor]:
    """The tensors in ``value``: itself, or those of a (nested) tuple or list."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, tuple | list):
        return [t for item in value for t in tensors_in(item)]
    return []


@dataclass
class Pending:
    """A submitted batch; :meth:`result` returns the (n, h, w) float32 maps."""

    n: int
    _maps: torch.Tensor | None = None
    _event: Any = None
    _host: torch.Tensor | None = None
    _done: Callable[[], None] | None = None

    def result(self) -> np.ndarray:
        if self._event is not None:
            self._event.synchronize()
        assert self._host is not None or self._maps is not None
        out = self._host if self._host is not None else self._maps
        assert out is not None
        maps = out[: self.n].float().numpy().copy()
        done, self._done = self._done, None  # the closure refers to this handle: no cycle left behind
        if done is not None:
            done()
        return maps

    def detach(self) -> None:
        """Keep this batch's maps in memory of its own: its buffers are about to be reused.

        Waits for the batch; :meth:`result` then reads the copy and no longer releases the buffers.
        """
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        if self._host is not None:
            self._host = self._host[: self.n].clone()
        self._done = None


@dataclass
class _Bucket:
    size: int
    host_in: torch.Tensor  # pinned uint8 (b, h, w, 3)
    dev_in: torch.Tensor | None = None  # uint8 on device (static for graphs)
    dev_out: torch.Tensor | None = None
    host_out: torch.Tensor | None = None  # pinned maps
    graph: Any = None
    warm: bool = False
    busy: bool = False
    done_event: Any = None
    pending: Pending | None = None  # the handle of the batch in these buffers, until its result is read


@dataclass
class BucketedRunner:
    """Runs ``forward(x_float_nchw) -> maps (b, h, w)`` on fixed bucket shapes.

    Args:
        forward: The model's anomaly-map function on float NCHW in [0, 1].
        input_size: (h, w).
        max_batch: Largest bucket.
        device: Where the model lives.
        autocast: bf16/fp16 autocast dtype or None.
        cuda_graphs: Capture a CUDA graph per bucket (CUDA only).
        compile_mode: A ``torch.compile`` mode (see :data:`TORCH_COMPILE_MODES`), or None for eager.
            Each bucket compiles on its first call; compile errors surface there.
    """

    forward: Callable[[torch.Tensor], torch.Tensor]
    input_size: tuple[int, int]
    max_batch: int
    device: torch.device
    autocast: torch.dtype | None = None
    cuda_graphs: bool = False
    compile_mode: str | None = None
    buckets: tuple[int, ...] = field(init=False)
    _forward: Callable[[torch.Tensor], torch.Tensor] = field(init=False)
    _slots: dict[tuple[int, int], _Bucket] = field(init=False, default_factory=dict)
    _turn: dict[int, int] = field(init=False, default_factory=dict)
    _copy_stream: Any = field(init=False, default=None)
    _readback_stream: Any = field(init=False, default=None)
    _warm_stream: Any = field(init=False, default=None)
    _graph_pool: Any = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.buckets = bucket_sizes(self.max_batch)
        self.is_cuda = self.device.type == "cuda"
        if self.cuda_graphs and not self.is_cuda:
            raise ValueError("CUDA graphs need a CUDA device")
        self._forward = self.forward
        if self.compile_mode is not None:
            if self.cuda_graphs and self.compile_mode in _GRAPH_CAPTURING_MODES:
                raise ValueError(
                    f"compile mode {self.compile_mode!r} captures CUDA graphs itself; "
                    "with cuda_graphs use 'default' or 'max-autotune-no-cudagraphs'"
                )
            self._forward = compile_forward(self.forward, self.compile_mode, len(self.buckets))
        if self.is_cuda:
            self._copy_stream = torch.cuda.Stream(device=self.device)
            self._readback_stream = torch.cuda.Stream(device=self.device)
            if self.cuda_graphs:  # one per runner, not one per capture: the pool has 32
                self._warm_stream = torch.cuda.Stream(device=self.device)

    # -- bookkeeping -----------------------------------------------------------------------------
    @property
    def slots_per_bucket(self) -> int:
        """Two buffer sets per bucket on CUDA (double buffering), one on CPU."""
        return 2 if self.is_cuda else 1

    def warmed(self) -> tuple[int, ...]:
        """Buckets whose every buffer set ran (and was captured, with graphs) at least once."""
        return tuple(
            b
            for b in self.buckets
            if all((b, i) in self._slots and self._slots[(b, i)].warm for i in range(self.slots_per_bucket))
        )

    def warmup(self) -> None:
        """Run every bucket's buffer sets once (capturing graphs) so serving never allocates."""
        h, w = self.input_size
        for b in self.buckets:
            for _ in range(self.slots_per_bucket):
                self.submit(np.zeros((b, h, w, 3), np.uint8)).result()

    def _slot(self, bucket: int) -> _Bucket:
        turn = self._turn.get(bucket, 0)
        self._turn[bucket] = (turn + 1) % self.slots_per_bucket
        slot = self._slots.get((bucket, turn))
        if slot is None:
            h, w = self.input_size
            host = torch.zeros((bucket, h, w, 3), dtype=torch.uint8, pin_memory=self.is_cuda)
            slot = _Bucket(bucket, host)
            self._slots[(bucket, turn)] = slot
        return slot

    def _compute(self, x_u8: torch.Tensor) -> torch.Tensor:
        x = x_u8.permute(0, 3, 1, 2).float().div_(255)  # NHWC uint8 -> NCHW view, channels_last strides
        # No autocast weight cache: under CUDA graph capture it would live in memory freed after capture.
        dtype, enabled = self.autocast or torch.float32, self.autocast is not None
        with torch.autocast(self.device.type, dtype=dtype, enabled=enabled, cache_enabled=False):
            return self._forward(x)

    # -- execution -------------------------------------------------------------------------------
    def submit(self, images: np.ndarray | Sequence[np.ndarray]) -> Pending:
        """Start scoring n (h, w, 3) uint8 images (an array or a list, n <= max_batch); returns a handle.

        The images are copied into the bucket's buffer (:func:`fill_batch`) before this returns, so
        the caller may reuse or drop them at once.
        """
        n = len(images)
        bucket = bucket_for(n, self.buckets)
        slot = self._slot(bucket)
        if not self.is_cuda:
            fill_batch(slot.host_in.numpy(), images)
            with torch.inference_mode():
                maps = self._compute(slot.host_in)
            slot.warm = True
            return Pending(n, _maps=maps.detach())
        return self._submit_cuda(slot, images, n)

    def _submit_cuda(
        self, slot: _Bucket, images: np.ndarray | Sequence[np.ndarray], n: int
    ) -> Pending:  # pragma: no cover - needs CUDA
        failed_before = slot.pending is None and slot.busy  # a submit that raised part way
        if slot.pending is not None:
            # The batch submitted two turns ago still owns these buffers (its maps were not read yet):
            # wait for it and move its maps out of host_out, where this batch's maps will land.
            slot.pending.detach()
            slot.pending = None
        elif failed_before and slot.done_event is not None:
            slot.done_event.synchronize()
        slot.busy = True
        fill_batch(slot.host_in.numpy(), images)
        compute = torch.cuda.current_stream(self.device)
        with torch.inference_mode():
            fresh = slot.dev_in is None
            if fresh:
                with device_gate.shared():
                    slot.dev_in = torch.empty(slot.host_in.shape, dtype=torch.uint8, device=self.device)
            if self.cuda_graphs and slot.graph is None:
                self._capture(slot)  # takes the gate exclusive: not inside a shared section
            with device_gate.shared():
                # After a failed submit, kernels it queued may still read dev_in: wait for them too.
                event = self._enqueue(slot, compute, wait_for_compute=fresh or failed_before)
        slot.done_event = event
        slot.warm = True
        pending = Pending(n, _event=event, _host=slot.host_out)

        def release() -> None:
            if slot.pending is pending:
                slot.busy = False
                slot.pending = None

        pending._done = release
        slot.pending = pending
        return pending

    def _enqueue(self, slot: _Bucket, compute: Any, *, wait_for_compute: bool) -> Any:  # pragma: no cover - CUDA
        """Queue upload, forward and read-back of a filled slot; returns the event that ends them."""
        assert slot.dev_in is not None
        with torch.cuda.stream(self._copy_stream):
            if wait_for_compute:
                # A new dev_in may be a block the compute stream's queued kernels still read. A reused
                # one is not: the slot's last batch was waited for (done_event, after its forward and
                # read-back) before this submit, so the upload need not wait for batch n-1's forward.
                self._copy_stream.wait_stream(compute)
            slot.dev_in.copy_(slot.host_in, non_blocking=True)
        compute.wait_stream(self._copy_stream)
        if self.cuda_graphs:
            slot.graph.replay()
        else:
            slot.dev_out = self._compute(slot.dev_in)
        out = slot.dev_out
        assert out is not None
        if slot.host_out is None or slot.host_out.shape != out.shape or slot.host_out.dtype != out.dtype:
            slot.host_out = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
        # The maps go back on their own stream, so the next batch's forward does not queue behind
        # this copy. dev_out is rewritten only when this slot runs again, after done_event.
        self._readback_stream.wait_stream(compute)
        with torch.cuda.stream(self._readback_stream):
            slot.host_out.copy_(out, non_blocking=True)
        # Blocking sync: the waiting thread sleeps instead of spinning a core for the whole batch.
        event = torch.cuda.Event(blocking=True)
        event.record(self._readback_stream)
        return event

    def _capture(self, slot: _Bucket) -> None:  # pragma: no cover - needs CUDA
        with _capture_lock:
            self._warm_and_capture(slot)

    def _warm_and_capture(self, slot: _Bucket) -> None:  # pragma: no cover - needs CUDA
        assert slot.dev_in is not None
        compute = torch.cuda.current_stream(self.device)
        side = self._warm_stream
        with device_gate.shared():
            side.wait_stream(compute)
            with torch.cuda.stream(side):
                for _ in range(3):  # warm cuDNN/autotuning outside the graph
                    warm = self._compute(slot.dev_in)
            compute.wait_stream(side)
        # The maps land in a buffer of their own, outside the graphs' pool, and the graph copies its
        # output there. One memory pool serves all buckets' graphs (without sharing, 16 graphs of an
        # M model at batch <= 128 held 47 GiB on the H100), so one graph's scratch may be memory a
        # graph captured earlier wrote its output to. Replays queue one after another on the compute
        # stream, but the maps are read back on another stream: an output inside the pool could be
        # overwritten by the next batch's replay while it is still being copied out.
        slot.dev_out = torch.empty_like(warm)
        del warm
        graph = torch.cuda.CUDAGraph()
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        # Exclusive: no thread queues device work while the graph is captured (module docstring).
        # thread_local: other threads may still wait on events and free memory meanwhile.
        with (
            device_gate.exclusive(),
            torch.cuda.graph(graph, pool=self._graph_pool, capture_error_mode="thread_local"),
        ):
            slot.dev_out.copy_(self._compute(slot.dev_in))
        slot.graph = graph

    def run(self, images: np.ndarray) -> np.ndarray:
        """Score any number of images: full largest buckets plus one padded tail, pipelined.

        At most :attr:`slots_per_bucket` batches are in flight: a third batch of the same bucket
        would reuse the first one's buffers before its maps were read back.
        """
        pending: deque[Pending] = deque()
        out: list[np.ndarray] = []
        start = 0
        for chunk in split_to_buckets(images.shape[0], self.buckets):
            if len(pending) == self.slots_per_bucket:
                out.append(pending.popleft().result())
            pending.append(self.submit(images[start : start + chunk]))
            start += chunk
        out.extend(p.result() for p in pending)
        return np.concatenate(out, axis=0)
