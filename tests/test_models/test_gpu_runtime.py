"""Bucketed runtime: bucket choice, padding, warm-up bookkeeping (CPU); CUDA parts where present."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from models.gpu import (
    BranchStreams,
    BucketedRunner,
    Pending,
    SharedExclusiveLock,
    bucket_for,
    bucket_sizes,
    device_work,
    fill_batch,
    split_to_buckets,
    tensors_in,
)
from tests.test_models.model_fixtures import SIZE, make_model


def test_bucket_sizes_are_powers_of_two_capped_by_the_max() -> None:
    assert bucket_sizes(1) == (1,)
    assert bucket_sizes(16) == (1, 2, 4, 8, 16)
    assert bucket_sizes(24) == (1, 2, 4, 8, 16, 24)
    with pytest.raises(ValueError, match="max_batch"):
        bucket_sizes(0)


@pytest.mark.parametrize(("n", "bucket"), [(1, 1), (2, 2), (3, 4), (5, 8), (9, 16), (16, 16), (17, 24)])
def test_bucket_for_picks_the_smallest_that_fits(n: int, bucket: int) -> None:
    assert bucket_for(n, bucket_sizes(24)) == bucket


def test_bucket_for_rejects_empty_and_oversized() -> None:
    with pytest.raises(ValueError, match="at least one"):
        bucket_for(0, (1, 2))
    with pytest.raises(ValueError, match="exceeds"):
        bucket_for(3, (1, 2))


def test_split_to_buckets_covers_every_image() -> None:
    assert split_to_buckets(37, bucket_sizes(16)) == [16, 16, 5]
    assert split_to_buckets(16, bucket_sizes(16)) == [16]
    assert sum(split_to_buckets(1000, bucket_sizes(64))) == 1000


def test_fill_batch_copies_a_list_or_an_array_and_leaves_the_rest_of_the_bucket_alone() -> None:
    out = np.full((4, 2, 2, 3), 7, np.uint8)  # an earlier batch's pixels
    x = np.arange(3 * 2 * 2 * 3, dtype=np.uint8).reshape(3, 2, 2, 3)
    assert fill_batch(out, list(x)) == 3
    assert np.array_equal(out[:3], x) and np.all(out[3] == 7)
    out[:] = 7
    assert fill_batch(out, x[:2]) == 2
    assert np.array_equal(out[:2], x[:2]) and np.all(out[2:] == 7)


@pytest.mark.parametrize(
    ("images", "match"),
    [
        ([], "do not fit"),
        ([np.zeros((2, 2, 3), np.uint8)] * 5, "do not fit"),
        ([np.zeros((2, 2, 3), np.uint8), np.zeros((2, 3), np.uint8)], r"image 1 is \(2, 3\)"),
        ([np.zeros((2, 2, 3), np.float32)], "float32"),
        (np.zeros((2, 2, 2, 4), np.uint8), r"images are \(2, 2, 4\)"),
    ],
)
def test_fill_batch_refuses_what_does_not_fit(images: object, match: str) -> None:
    # A (2, 3) image would broadcast silently into a (2, 2, 3) row: refused instead.
    with pytest.raises(ValueError, match=match):
        fill_batch(np.zeros((4, 2, 2, 3), np.uint8), images)  # type: ignore[arg-type]


def _forward(x: torch.Tensor) -> torch.Tensor:
    # A stand-in "anomaly map": per-pixel mean over channels (b, h, w); padding must not leak.
    return x.mean(dim=1)


def test_runner_scores_a_list_like_the_stacked_array_whatever_the_bucket_held_before() -> None:
    runner = BucketedRunner(_forward, (4, 6), max_batch=8, device=torch.device("cpu"))
    rng = np.random.default_rng(2)
    runner.run(rng.integers(0, 255, (8, 4, 6, 3), dtype=np.uint8))  # fills the 8-bucket with other pixels
    images = rng.integers(0, 255, (5, 4, 6, 3), dtype=np.uint8)
    as_list = runner.submit(list(images)).result()
    as_array = runner.submit(images).result()
    expected = images.astype(np.float32).mean(axis=3) / 255
    np.testing.assert_allclose(as_list, expected, rtol=1e-6)
    np.testing.assert_array_equal(as_list, as_array)


def test_runner_on_cpu_matches_direct_computation_and_tracks_warm_buckets() -> None:
    runner = BucketedRunner(_forward, (4, 6), max_batch=8, device=torch.device("cpu"))
    assert runner.warmed() == ()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (19, 4, 6, 3), dtype=np.uint8)
    maps = runner.run(images)
    expected = images.astype(np.float32).mean(axis=3) / 255
    assert maps.shape == (19, 4, 6)
    np.testing.assert_allclose(maps, expected, rtol=1e-6)
    assert runner.warmed() == (4, 8)  # 19 = 8 + 8 + 3 -> buckets 8, 8 and 4 (3 padded to 4)
    runner.warmup()
    assert runner.warmed() == (1, 2, 4, 8)


def test_cuda_graphs_require_cuda() -> None:
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        BucketedRunner(_forward, (4, 4), max_batch=2, device=torch.device("cpu"), cuda_graphs=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("graphs", [False, True])
def test_runner_on_cuda_matches_cpu(graphs: bool) -> None:  # pragma: no cover - GPU hosts only
    rng = np.random.default_rng(1)
    # 29 = 8 + 8 + 8 + 5: a third batch of one bucket reuses the first one's buffers, which must
    # not happen before the first one's maps were read back.
    images = rng.integers(0, 255, (29, 8, 8, 3), dtype=np.uint8)
    cpu = BucketedRunner(_forward, (8, 8), max_batch=8, device=torch.device("cpu")).run(images)
    gpu = BucketedRunner(_forward, (8, 8), max_batch=8, device=torch.device("cuda"), cuda_graphs=graphs)
    gpu.warmup()
    np.testing.assert_allclose(gpu.run(images), cpu, rtol=1e-5)


def test_a_detached_result_keeps_its_maps_and_no_longer_frees_the_buffers() -> None:
    # The CUDA runner detaches a handle whose buffers a later batch of its bucket needs: the handle
    # must keep its own maps and must not mark the buffers free for the batch that took them over.
    host = torch.arange(12, dtype=torch.float32).reshape(3, 2, 2)
    released: list[int] = []
    pending = Pending(2, _host=host, _done=lambda: released.append(1))
    pending.detach()
    host.fill_(-1)  # the next batch's maps land in the shared buffer
    np.testing.assert_array_equal(pending.result(), np.arange(8, dtype=np.float32).reshape(2, 2, 2))
    assert released == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("graphs", [False, True])
def test_a_held_result_survives_later_batches_of_its_bucket(graphs: bool) -> None:  # pragma: no cover - GPU only
    rng = np.random.default_rng(4)
    first, later = (
        rng.integers(0, 255, (8, 8, 8, 3), dtype=np.uint8),
        rng.integers(0, 255, (24, 8, 8, 3), dtype=np.uint8),
    )
    gpu = BucketedRunner(_forward, (8, 8), max_batch=8, device=torch.device("cuda"), cuda_graphs=graphs)
    held = gpu.submit(first)  # not read yet: its buffers are needed again by the third 8-batch below
    later_maps = gpu.run(later)
    np.testing.assert_allclose(held.result(), first.astype(np.float32).mean(axis=3) / 255, rtol=1e-5)
    np.testing.assert_allclose(later_maps, later.astype(np.float32).mean(axis=3) / 255, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graph_maps_survive_the_next_replay_while_they_are_read_back() -> None:  # pragma: no cover - GPU only
    # The worker submits the next batch before it collects this one; the graphs of all buckets share
    # one memory pool, so a small bucket's replay must not write where a big bucket's maps wait.
    device = torch.device("cuda")
    model = make_model("space").to(device).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    rng = np.random.default_rng(5)
    batches = [rng.integers(0, 255, (n, SIZE, SIZE, 3), dtype=np.uint8) for n in (8, 1, 8, 2, 8, 1) * 3]
    reference = BucketedRunner(model.anomaly_map, (SIZE, SIZE), max_batch=8, device=device)
    want = [reference.submit(b).result() for b in batches]
    runner = BucketedRunner(model.anomaly_map, (SIZE, SIZE), max_batch=8, device=device, cuda_graphs=True)
    runner.warmup()
    inflight: Pending | None = None
    got: list[np.ndarray] = []
    for b in batches:
        nxt = runner.submit(b)
        if inflight is not None:
            got.append(inflight.result())
        inflight = nxt
    assert inflight is not None
    got.append(inflight.result())
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graphs_capture_on_two_threads_while_a_third_serves() -> None:  # pragma: no cover - GPU only
    # Two product lines load at once on two decode threads while the infer thread serves a third.
    import threading

    device = torch.device("cuda")
    images = np.random.default_rng(6).integers(0, 255, (13, 8, 8, 3), dtype=np.uint8)
    want = images.astype(np.float32).mean(axis=3) / 255
    serving = BucketedRunner(_forward, (8, 8), max_batch=8, device=device)
    serving.warmup()
    errors: list[BaseException] = []
    stop = threading.Event()

    def serve() -> None:
        try:
            while not stop.is_set():
                np.testing.assert_allclose(serving.run(images), want, rtol=1e-5)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def load() -> None:
        try:
            runner = BucketedRunner(_forward, (8, 8), max_batch=8, device=device, cuda_graphs=True)
            runner.warmup()
            np.testing.assert_allclose(runner.run(images), want, rtol=1e-5)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    server = threading.Thread(target=serve)
    server.start()
    loaders = [threading.Thread(target=load) for _ in range(2)]
    for t in loaders:
        t.start()
    for t in loaders:
        t.join()
    stop.set()
    server.join()
    assert errors == []


def test_branch_streams_need_cuda() -> None:
    with pytest.raises(ValueError, match="branch streams need a CUDA device"):
        BranchStreams(torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("variant", ["efficientad", "space"])
@pytest.mark.parametrize("graphs", [False, True])
def test_branch_streams_give_the_serial_maps(variant: str, graphs: bool) -> None:  # pragma: no cover - GPU only
    import functools

    device = torch.device("cuda")
    model = make_model(variant).to(device).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    images = np.random.default_rng(3).integers(0, 255, (29, SIZE, SIZE, 3), dtype=np.uint8)
    serial = BucketedRunner(model.anomaly_map, (SIZE, SIZE), max_batch=8, device=device, cuda_graphs=graphs)
    aside = BucketedRunner(
        functools.partial(model.anomaly_map, branches=BranchStreams(device)), (SIZE, SIZE), max_batch=8,
        device=device, cuda_graphs=graphs,
    )  # fmt: skip
    aside.warmup()  # captures every bucket's graph with the side streams forked and joined inside
    want = serial.run(images)
    for _ in range(3):  # replays after other buckets ran: nothing left over from an earlier batch
        np.testing.assert_allclose(aside.run(images), want, rtol=1e-5, atol=1e-6)


# -- review 2026-12-02: streams come from a pool of 32; one capture and nothing else meanwhile --------
def test_shared_holders_run_together_and_an_exclusive_holder_alone() -> None:
    import threading
    import time

    lock = SharedExclusiveLock()
    release_readers, release_writer = threading.Event(), threading.Event()
    readers_in, writer_in, late_in = threading.Barrier(4), threading.Event(), threading.Event()
    guard = threading.Lock()
    state = {"readers": 0}
    seen_by_writer: list[int] = []

    def reader() -> None:
        with lock.shared():
            with guard:
                state["readers"] += 1
            readers_in.wait(10)  # all three hold it at once
            release_readers.wait(10)
            with guard:
                state["readers"] -= 1

    def writer() -> None:
        with lock.exclusive():
            with guard:
                seen_by_writer.append(state["readers"])
            writer_in.set()
            release_writer.wait(10)

    def late_reader() -> None:
        with lock.shared():
            late_in.set()

    def wait_until(condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 10
        while not condition():
            assert time.monotonic() < deadline
            time.sleep(0.001)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    readers_in.wait(10)
    threads.append(threading.Thread(target=writer))
    threads[-1].start()
    wait_until(lambda: lock._writers_waiting == 1)
    threads.append(threading.Thread(target=late_reader))  # arrives while the writer waits
    threads[-1].start()
    time.sleep(0.05)
    assert not writer_in.is_set() and not late_in.is_set()  # readers hold it; the late one queues
    release_readers.set()
    assert writer_in.wait(10)
    assert not late_in.is_set()  # the writer is alone
    release_writer.set()
    assert late_in.wait(10)
    for t in threads:
        t.join(10)
        assert not t.is_alive()
    assert seen_by_writer == [0]


def test_tensors_in_finds_the_tensors_of_a_branch_result() -> None:
    a, b, c = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    assert [t.item() for t in tensors_in((a, (b, [c]), "x", None))] == [0.0, 1.0, 2.0]
    assert tensors_in(a) == [a] and tensors_in(3) == []


def test_a_read_result_lets_go_of_its_release_callback() -> None:
    # The CUDA path's release closure refers to the handle that holds it: a cycle that kept a swapped-out
    # line's slot (graph, private pool, pinned buffers) alive until the cyclic collector ran.
    import gc
    import weakref

    class Slot:
        pending: Pending | None = None

    def submitted() -> tuple[weakref.ref[Slot], Pending]:
        slot = Slot()
        pending = Pending(1, _maps=torch.zeros(1, 2, 2))

        def release() -> None:  # as BucketedRunner._submit_cuda's: it refers to the slot and the handle
            if slot.pending is pending:
                slot.pending = None

        pending._done = release
        slot.pending = pending
        return weakref.ref(slot), pending

    gone, pending = submitted()
    pending.result()
    assert pending._done is None
    gc.disable()
    try:
        del pending
        assert gone() is None  # freed by reference counting alone
    finally:
        gc.enable()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_work_on_a_stream_that_aliases_the_capture_stream_waits_for_the_capture() -> None:  # pragma: no cover
    # torch.cuda.Stream() hands out 32 streams per device round robin, and torch.cuda.graph takes its
    # capture stream from the same pool: 32 streams later another thread can be queueing on it. Without
    # device_gate that thread's matmul lands inside the capture (the forward sleeps there to make sure).
    import threading
    import time

    device = torch.device("cuda")
    images = np.random.default_rng(7).integers(0, 255, (8, 8, 8, 3), dtype=np.uint8)
    want = images.astype(np.float32).mean(axis=3) / 255
    BucketedRunner(_forward, (8, 8), max_batch=8, device=device, cuda_graphs=True).warmup()
    capture_stream = torch.cuda.graph.default_capture_stream  # made by the first capture
    pool = [torch.cuda.Stream(device=device) for _ in range(32)]
    aliased = [s for s in pool if s.cuda_stream == capture_stream.cuda_stream]
    assert aliased, "no pool stream aliases the capture stream: torch changed how it hands them out"
    capturing = threading.Event()

    def slow_forward(x: torch.Tensor) -> torch.Tensor:
        if torch.cuda.is_current_stream_capturing():
            capturing.set()
            time.sleep(0.05)  # the other thread tries to queue work meanwhile
        return _forward(x)

    x = torch.ones(256, 256, device=device)
    torch.cuda.synchronize()
    errors: list[BaseException] = []
    done: list[float] = []

    def other_thread() -> None:
        try:
            assert capturing.wait(30)
            for _ in range(20):
                with device_work(), torch.cuda.stream(aliased[0]):
                    y = x @ x
                    aliased[0].synchronize()
                    assert float(y[0, 0]) == 256.0
                done.append(time.monotonic())
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    worker = threading.Thread(target=other_thread)
    worker.start()
    try:
        runner = BucketedRunner(slow_forward, (8, 8), max_batch=8, device=device, cuda_graphs=True)
        runner.warmup()  # 4 buckets x 2 buffer sets: 8 captures of >= 50 ms each
        np.testing.assert_allclose(runner.run(images), want, rtol=1e-5)
    finally:
        capturing.set()
        worker.join(60)
    assert not worker.is_alive()
    assert errors == [] and len(done) == 20
