"""Crash safety: `space serve` SIGKILLed at random points of a stream, restarted in the same group.

What would make this fail: committing an offset before the record's result (or dead letter) was
acknowledged by the broker (a kill between that commit and the send loses the image), committing
past a gap (an out-of-order ack), or a result id that depends on anything but the source
topic/partition/offset and the model version (duplicates would not be recognisable).
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections import defaultdict
from pathlib import Path

import pytest

from tests.kafka_helpers import produce
from tests.reliability.helpers import (
    TopicTail,
    committed_offsets,
    distinct_ids,
    log_events,
    serve_env,
    spawn_worker,
    stop_process,
)
from tests.worker_harness import request_record

pytestmark = [pytest.mark.kafka, pytest.mark.redis]


def _kill_and_restart(make_settings, topics, trained_model, tmp_path: Path, *, kills: int, n: int, seed: int) -> dict:
    settings = make_settings(topics, batching={"max_batch_size": 8, "max_wait_ms": 20}, heatmaps={"policy": "anomalous"})
    images = sorted((trained_model.data / "test").glob("*/*.png"))
    records = [
        request_record(images[i % len(images)], line=trained_model.line, camera=f"cam-{i % 6}", message_id=f"m-{i:04d}")
        for i in range(n)
    ]
    produce(settings, topics.requests, records)  # the whole stream is waiting before the first worker starts
    env = serve_env(settings, trained_model.root)
    rng = random.Random(seed)
    # Each run must make some progress before it dies, and the backlog must last until the last kill.
    quota = max(1, (n * 2 // 3) // kills)
    logs = tmp_path / "logs"
    started = time.monotonic()
    with TopicTail(settings, topics.results) as tail:
        for i in range(kills):
            before = len(distinct_ids(tail.snapshot()))
            proc = spawn_worker(env, logs / f"run-{i}.log")
            try:
                target = min(n, before + rng.randint(1, quota))  # an earlier run may have answered most
                tail.wait(lambda recs, t=target: len(distinct_ids(recs)) >= t, 60, f"run {i}: {target} answered")
                # A random point: before the commit of what was just published, or inside the next batch.
                time.sleep(rng.uniform(0.0, 1.5))
            finally:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
            assert proc.returncode == -signal.SIGKILL
        proc = spawn_worker(env, logs / "final.log")
        try:
            tail.wait(lambda recs: len(distinct_ids(recs)) >= n, 90, "every request answered")
            # When the killed runs answered everything, the wait above ends at once: the last run must
            # still join, answer what they left uncommitted and commit it before it is stopped (a
            # SIGTERM during its start-up, before the handler is installed, would just end it).
            until = time.monotonic() + 90
            while not (
                any(e.get("event") == "partitions_assigned" for e in log_events(logs / "final.log"))
                and committed_offsets(settings, topics.requests) == _ends(tail.snapshot())
            ):
                assert time.monotonic() < until and proc.poll() is None, (logs / "final.log").read_text()[-2000:]
                time.sleep(0.5)
        finally:
            rc = stop_process(proc, signal.SIGTERM, timeout_s=30)
        results = tail.snapshot()
    elapsed = time.monotonic() - started
    assert rc == 0, (logs / "final.log").read_text()[-2000:]

    bodies = [json.loads(r.value) for r in results]
    by_id: dict[str, list[dict]] = defaultdict(list)
    for b in bodies:
        by_id[b["message_id"]].append(b)
    assert set(by_id) == {f"m-{i:04d}" for i in range(n)}, "a request has no result"
    for mid, copies in by_id.items():
        # A duplicate is the same record scored by the same model: same idempotency key and source.
        assert len({c["result_id"] for c in copies}) == 1, f"{mid}: duplicates with different result ids"
        assert len({(c["source"]["partition"], c["source"]["offset"]) for c in copies}) == 1
        assert len({c["verdict"] for c in copies}) == 1
    # Everything is committed at the end: a restart now would re-deliver nothing.
    assert committed_offsets(settings, topics.requests) == _ends(results)
    figures = {"kills": kills, "requests": n, "results": len(bodies), "duplicates": len(bodies) - n,
               "elapsed_s": round(elapsed, 1)}  # fmt: skip
    print(f"crash test: {figures}")
    return figures


def _ends(results: list) -> dict[int, int | None]:
    """Per partition of the requests topic (4), the offset after the last record with a result.

    A partition without records is committed at its start (0) by the worker's start-position commit.
    """
    ends: dict[int, int] = defaultdict(int)
    for r in results:
        source = json.loads(r.value)["source"]
        ends[source["partition"]] = max(ends[source["partition"]], source["offset"] + 1)
    return {p: ends.get(p, 0) for p in range(4)}


def test_sigkill_at_random_points_loses_nothing(make_settings, topics, trained_model, tmp_path) -> None:
    kills = int(os.environ.get("SPACE_RELIABILITY_KILLS", "4"))
    _kill_and_restart(make_settings, topics, trained_model, tmp_path, kills=kills, n=72, seed=8)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_twenty_sigkills_lose_nothing(make_settings, topics, trained_model, tmp_path) -> None:
    _kill_and_restart(make_settings, topics, trained_model, tmp_path, kills=20, n=300, seed=20)
