"""In-flight accounting survives lost and revoked partitions (no broker; fakes around a real Worker).

Found by this suite: when a partition was forgotten (lost, or revoked after the settle budget) while
some of its records were still decoding or waiting in the per-partition reorder buffer, those records
were dropped without being finished, so ``inflight_images``/``inflight_bytes`` never came back down. A
few such events and backpressure pauses every partition for good while /healthz stays green. Fixed in
worker/service.py (``_registered`` + ``_seq_lock``); these tests fail without the fix.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import cv2
import numpy as np
from kafka import TopicPartition

from schemas.request import InspectionRequest, build_request_headers
from worker.model_manager import LoadedModel
from worker.service import Worker
from worker.settings import load_settings


@dataclass
class _Rec:
    offset: int
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]
    timestamp: int = 0


class _Det:
    card = None

    def prepare(self, image: np.ndarray) -> np.ndarray:
        return image


class _Models:
    def __init__(self) -> None:
        self.model = LoadedModel("brick", "v1", _Det(), 0.0)

    def get(self, line: str) -> LoadedModel:
        return self.model


class _Consumer:
    def pause(self, *tps: Any) -> None: ...
    def resume(self, *tps: Any) -> None: ...
    def commit(self, *a: Any, **k: Any) -> None: ...
    def commit_async(self, *a: Any, **k: Any) -> None: ...


class _Producer:
    def __init__(self) -> None:
        self.sent: list[str] = []

    def send(self, topic: str, **kw: Any) -> Any:
        self.sent.append(topic)
        raise AssertionError("nothing may be sent for a forgotten partition")


def _worker(tmp_path: Any, gates: dict[int, threading.Event]) -> Worker:
    settings = load_settings(worker={"state_dir": str(tmp_path)}, decode={"workers": 4})

    w = Worker(settings, consumer=_Consumer(), producer=_Producer(), models=_Models(), thresholds=None,  # type: ignore[arg-type]
               heatmaps=None, fetcher=None)  # type: ignore[arg-type]  # fmt: skip
    original = w._decode

    def gated_decode(item: Any) -> None:
        gate = gates.get(item.offset)
        if gate is not None:
            assert gate.wait(10)
        original(item)

    w._decode = gated_decode  # type: ignore[method-assign]
    return w


def _records(n: int) -> list[_Rec]:
    png = cv2.imencode(".png", np.zeros((16, 16, 3), np.uint8))[1].tobytes()
    out = []
    for i in range(n):
        req = InspectionRequest(message_id=f"m{i}", source="t", time=datetime.now(UTC), product_line="brick",
                                camera_id="c", content_type="image/png")  # fmt: skip
        out.append(_Rec(i, b"c", png, build_request_headers(req)))
    return out


def _settle(w: Worker, expected: int = 0) -> None:
    w._decode_pool.shutdown(wait=True)
    deadline = time.monotonic() + 5
    while w._inflight_count != expected and time.monotonic() < deadline:
        time.sleep(0.01)


def test_lost_partition_with_records_still_decoding_releases_their_inflight_accounting(tmp_path) -> None:
    tp = TopicPartition("req", 0)
    gates = {0: threading.Event(), 2: threading.Event()}  # offsets 0 and 2 decode slowly, 1 and 3 fast
    w = _worker(tmp_path, gates)
    w._on_assigned([tp])
    for rec in _records(4):
        w._accept(tp, rec)
    time.sleep(0.3)  # 1 and 3 are decoded and wait in the reorder buffer behind 0
    assert w._inflight_count == 4
    w._on_lost([tp])  # evicted: forget everything of the partition
    for gate in gates.values():
        gate.set()  # the slow decodes finish after the partition is gone
    _settle(w)
    assert (w._inflight_count, w._inflight_bytes) == (0, 0)
    assert w.batcher.pending() == 0 and w.producer.sent == []


def test_reassigned_partition_is_not_answered_by_a_stale_decode(tmp_path) -> None:
    tp = TopicPartition("req", 0)
    gates = {0: threading.Event()}
    w = _worker(tmp_path, gates)
    w._on_assigned([tp])
    recs = _records(1)
    w._accept(tp, recs[0])  # decode of offset 0 blocks
    w._on_lost([tp])
    w._on_assigned([tp])  # the partition comes back; offset 0 is polled again
    gates.pop(0).set()
    w._accept(tp, recs[0])
    _settle(w, expected=1)
    # The fresh record is in the batcher, the stale one was finished once: one image in flight.
    assert w.batcher.pending() == 1
    assert w._inflight_count == 1
