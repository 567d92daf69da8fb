"""Group membership seen from outside: readiness without partitions, and offsets KEDA can read.

/readyz with more workers than partitions: a member the group gives nothing is still ready.

A rollout at full scale (replicas = partitions, maxSurge 1, maxUnavailable 0) starts one pod more
than there are partitions; it joins the group, gets no partition and, under the cooperative protocol,
no assignment callback either. If that left it unready, the rollout would wait for it forever.
"""

from __future__ import annotations

import time

import pytest

from tests.worker_harness import running_worker

pytestmark = [pytest.mark.kafka, pytest.mark.redis]


@pytest.mark.parametrize("topics", [1], indirect=True)
def test_a_worker_without_partitions_is_ready(make_settings, topics, trained_model) -> None:
    settings = make_settings(topics, models={"root": str(trained_model.root), "preload": (trained_model.line,)})
    with running_worker(settings) as first:
        assert len(first.worker.assigned) == 1
        # running_worker waits for readiness and raises TimeoutError if it never comes.
        with running_worker(settings, ready_timeout_s=60) as second:
            ready, detail = second.worker.readiness()
            assert ready, detail
            assert len(first.worker.assigned) + len(second.worker.assigned) == 1
            assert detail["joined"] is True


def test_partitions_the_group_never_committed_get_their_start_committed(make_settings, topics, trained_model) -> None:
    # KEDA's Kafka scaler (offsetResetPolicy: earliest) counts a partition without a committed offset
    # at its whole log-end offset: one whose records expired before the group read it would pin the
    # replicas at the maximum for good, since nothing is ever read there to commit.
    from tests.kafka_helpers import produce
    from tests.reliability.helpers import committed_offsets
    from tests.worker_harness import request_record

    settings = make_settings(topics, models={"root": str(trained_model.root), "preload": (trained_model.line,)})
    image = next((trained_model.data / "test" / "good").glob("*.png"))
    produce(settings, topics.requests, [request_record(image, line=trained_model.line, camera="c", message_id="m0")])
    # Three partitions never held a record: committed at 0; the one with the request: past it once it
    # is answered (its start position, 0, may be committed first, before the record is fetched).
    with running_worker(settings):
        deadline = time.monotonic() + 30
        while True:
            committed = committed_offsets(settings, topics.requests)
            if sorted(o for o in committed.values() if o is not None) == [0, 0, 0, 1]:
                break
            assert time.monotonic() < deadline, f"not every partition committed: {committed}"
            time.sleep(0.2)
    assert sorted(committed.values()) == [0, 0, 0, 1], committed


def test_a_preloaded_line_that_does_not_load_leaves_the_worker_serving_the_others(
    make_settings, topics, trained_model
) -> None:
    # A preload failure used to end App.run before the worker started: with one line without a model
    # (a typo in SPACE_MODELS__PRELOAD, a promotion that does not load), every new pod crash-looped.
    from tests.kafka_helpers import produce
    from tests.reliability.helpers import TopicTail
    from tests.worker_harness import request_record

    settings = make_settings(topics, models={"root": str(trained_model.root), "preload": ("glass", trained_model.line)})
    image = next((trained_model.data / "test" / "good").glob("*.png"))
    with running_worker(settings) as app, TopicTail(settings, topics.results) as results:
        ready, detail = app.worker.readiness()
        assert ready, detail
        assert list(detail["failed_models"]) == ["glass"] and detail["missing_models"] == []
        assert list(detail["models"]) == [trained_model.line]
        produce(
            settings, topics.requests, [request_record(image, line=trained_model.line, camera="c", message_id="m0")]
        )
        results.wait(lambda r: len(r) >= 1, 60, "a result for the line that loaded")
