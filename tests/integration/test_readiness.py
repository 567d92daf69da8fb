"""/readyz with more workers than partitions: a member the group gives nothing is still ready.

A rollout at full scale (replicas = partitions, maxSurge 1, maxUnavailable 0) starts one pod more
than there are partitions; it joins the group, gets no partition and, under the cooperative protocol,
no assignment callback either. If that left it unready, the rollout would wait for it forever.
"""

from __future__ import annotations

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
