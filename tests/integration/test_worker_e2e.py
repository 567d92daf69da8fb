"""The worker end to end on the real broker and Redis: N in, exactly N out, right verdicts, order."""

from __future__ import annotations

import json
import random
from pathlib import Path

import cv2
import numpy as np
import pytest

from models.data import load_image
from models.detector import Detector
from models.metrics import image_auroc
from tests.kafka_helpers import collect, header, produce
from tests.worker_harness import request_record, running_worker
from worker.thresholds import ThresholdStore

pytestmark = [pytest.mark.kafka, pytest.mark.redis]


def _test_images(data: Path) -> list[tuple[Path, bool]]:
    items = [(p, p.parent.name != "good") for p in sorted((data / "test").glob("*/*.png"))]
    assert any(a for _, a in items) and any(not a for _, a in items)
    return items


def test_every_request_gets_one_result_with_the_detector_score_and_order_per_camera(
    make_settings, topics, trained_model, tmp_path
) -> None:
    # Heatmaps capped at a quarter of the 128 px input: stored 32 x 32, peaks kept (SPACE_HEATMAPS__MAX_SIDE_PX).
    settings = make_settings(topics, models={"root": str(trained_model.root), "preload": (trained_model.line,)},
                             batching={"max_batch_size": 8, "max_wait_ms": 20},
                             heatmaps={"max_side_px": 32})  # fmt: skip
    images = _test_images(trained_model.data)
    rng = random.Random(3)
    records, expected = [], {}
    for i in range(2):  # every image twice, on three cameras
        order = images[:]
        rng.shuffle(order)
        for j, (path, anomalous) in enumerate(order):
            mid = f"m-{i}-{j}"
            camera = f"cam-{j % 3}"
            records.append(request_record(path, line=trained_model.line, camera=camera, message_id=mid))
            expected[mid] = (path, anomalous, camera)

    with running_worker(settings) as app:
        produce(settings, topics.requests, records)
        results = collect(settings, topics.results, expected=len(records), timeout_s=120, idle_s=1.0)
    assert app.exit_code == 0

    bodies = [json.loads(r.value) for r in results]
    ids = [b["message_id"] for b in bodies]
    assert sorted(ids) == sorted(expected)  # exactly one result per request, none missing
    assert all(r.key == f"{expected[b['message_id']][2]}".encode() for r, b in zip(results, bodies, strict=True))

    # The worker's score is the Detector's own score on the same file (decode + resize are right).
    detector = Detector.load(trained_model.root / trained_model.line / trained_model.version, device="cpu")
    paths = sorted({p for p, _, _ in expected.values()})
    offline = dict(zip(paths, detector.predict([load_image(p) for p in paths]).scores, strict=True))
    for b in bodies:
        assert b["score"] == pytest.approx(float(offline[expected[b["message_id"]][0]]), rel=1e-4, abs=1e-5)
        assert b["verdict"] == ("anomalous" if b["score"] >= b["threshold"]["value"] else "ok")
        assert b["threshold"]["source"] == "model-default"
        assert b["model"]["version"] == trained_model.version
        assert b["heatmap"]["uri"].startswith("file://")
        png = cv2.imread(b["heatmap"]["uri"].removeprefix("file://"), cv2.IMREAD_UNCHANGED)
        assert png.shape == (32, 32) and (b["heatmap"]["width"], b["heatmap"]["height"]) == (32, 32)
        # The threshold sits at 128 and each pixel holds its block's maximum: the shrunk heatmap
        # crosses 128 exactly when the image is anomalous.
        assert (png.max() >= 128) == (b["verdict"] == "anomalous"), (b["score"], b["threshold"], png.max())
    labels = [expected[b["message_id"]][1] for b in bodies]
    assert image_auroc(labels, [b["score"] for b in bodies]) >= 0.9

    # Per camera, results appear in the order the camera's requests were sent.
    sent_order = {
        mid: n for n, (_, _, hdrs) in enumerate(records) for k, v in hdrs if k == "ce_id" for mid in [v.decode()]
    }
    for camera in {c for _, _, c in expected.values()}:
        seq = [sent_order[b["message_id"]] for b in bodies if expected[b["message_id"]][2] == camera]
        assert seq == sorted(seq), f"{camera} results out of order"

    # Alerts: exactly the anomalous results, same result ids.
    alerts = collect(settings, topics.alerts, idle_s=0.5, timeout_s=10)
    assert sorted(header(a, "ce_id") for a in alerts) == sorted(
        b["result_id"] for b in bodies if b["verdict"] == "anomalous"
    )


def test_threshold_written_to_redis_changes_verdicts_within_one_second(
    make_settings, topics, trained_model, redis_client
) -> None:
    import time

    settings = make_settings(topics, models={"root": str(trained_model.root), "preload": (trained_model.line,)},
                             batching={"max_batch_size": 1, "max_wait_ms": 0}, thresholds={"cache_ttl_s": 300})  # fmt: skip
    good = next(p for p, a in _test_images(trained_model.data) if not a)
    store = ThresholdStore(redis_client, settings.redis.key_prefix, 100)
    with running_worker(settings):
        produce(
            settings, topics.requests, [request_record(good, line=trained_model.line, camera="c", message_id="before")]
        )
        first = collect(settings, topics.results, expected=1, timeout_s=30)
        assert json.loads(first[0].value)["threshold"]["source"] == "model-default"
        record = store.set(trained_model.line, -1.0, model_version=trained_model.version, method="manual",
                           updated_by="test", force=True)  # fmt: skip
        time.sleep(1.0)
        produce(
            settings, topics.requests, [request_record(good, line=trained_model.line, camera="c", message_id="after")]
        )
        results = collect(settings, topics.results, expected=2, timeout_s=30)
    after = next(json.loads(r.value) for r in results if json.loads(r.value)["message_id"] == "after")
    assert after["threshold"] == {"value": -1.0, "version": record.version, "source": "redis", "model_version": "v1"}
    assert after["verdict"] == "anomalous"


def test_bad_records_become_dead_letters_and_the_rest_is_served(make_settings, topics, trained_model) -> None:
    settings = make_settings(topics, models={"root": str(trained_model.root), "preload": (trained_model.line,)},
                             decode={"max_pixels": 300 * 300})  # fmt: skip
    good = next(p for p, a in _test_images(trained_model.data) if not a)
    png = good.read_bytes()
    import cv2

    big = cv2.imencode(".png", np.zeros((400, 400, 3), np.uint8))[1].tobytes()
    bad = {
        "corrupt": request_record(
            None, line=trained_model.line, camera="c", message_id="corrupt", data=png[: len(png) // 3]
        ),
        "wrong-type": request_record(
            None, line=trained_model.line, camera="c", message_id="wrong-type", data=png, content_type="image/jpeg"
        ),
        "unknown-line": request_record(good, line="no-such-line", camera="c", message_id="unknown-line"),
        "too-big": request_record(None, line=trained_model.line, camera="c", message_id="too-big", data=big),
        "bad-claim": request_record(
            None,
            line=trained_model.line,
            camera="c",
            message_id="bad-claim",
            claim_check={"image_uri": "file:///etc/passwd", "sha256": "0" * 64},
        ),
    }
    no_id_key, no_id_value, no_id_headers = request_record(good, line=trained_model.line, camera="c", message_id="x")
    no_id_headers = [(k, v) for k, v in no_id_headers if k != "ce_id"]
    records = [*bad.values(), (no_id_key, no_id_value, no_id_headers)]
    records += [request_record(good, line=trained_model.line, camera="c", message_id=f"ok-{i}") for i in range(3)]
    with running_worker(settings):
        produce(settings, topics.requests, records)
        letters = collect(settings, topics.dlq, expected=len(bad) + 1, timeout_s=60)
        results = collect(settings, topics.results, expected=3, timeout_s=60)
    reasons = {header(d, "ce_id") or "missing-id": header(d, "error-reason") for d in letters}
    assert reasons == {
        "corrupt": "corrupt-image",
        "wrong-type": "content-type-mismatch",
        "unknown-line": "unknown-product-line",
        "too-big": "too-many-pixels",
        "bad-claim": "claim-check-denied",
        "missing-id": "missing-attribute",
    }
    for d in letters:
        assert header(d, "error-source-topic") == topics.requests
        assert header(d, "error-detail")
    original = next(d for d in letters if header(d, "ce_id") == "corrupt")
    assert original.value == png[: len(png) // 3]  # the original bytes are kept for replay
    assert sorted(json.loads(r.value)["message_id"] for r in results) == ["ok-0", "ok-1", "ok-2"]
